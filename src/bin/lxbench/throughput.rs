//! The throughput scenarios: lxbench's HTTP sink (what arrived when, failing a share of the
//! changes once), posting the changes over several connections, and the figures of a run.

use crate::bridge::{bridge_bin, cleanup, process_usage, Bridge};
use crate::usage::Usage;
use crate::{change_json, latency_summary, round3, Args};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{json, Value};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the sink saw: arrival time (µs since the run's epoch, +1) per change index.
struct Sink {
    arrivals: Vec<Vec<AtomicU64>>,
    received: AtomicUsize,
    failed_once: Vec<AtomicBool>,
    fail_pct: u64,
    epoch: Instant,
}

impl Sink {
    /// An empty sink for `args.targets` targets of `args.n` changes.
    fn new(args: &Args, epoch: Instant) -> Sink {
        Sink {
            arrivals: (0..args.targets)
                .map(|_| (0..args.n).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            received: AtomicUsize::new(0),
            failed_once: (0..args.n).map(|_| AtomicBool::new(false)).collect(),
            fail_pct: args.fail_pct,
            epoch,
        }
    }
}

async fn receive(
    State(sink): State<Arc<Sink>>,
    Path(t): Path<usize>,
    headers: HeaderMap,
    body: Bytes,
) -> String {
    let now = sink.epoch.elapsed().as_micros() as u64 + 1;
    let raw = if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
        let mut out = Vec::new();
        let _ = flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut out);
        out
    } else {
        body.to_vec()
    };
    #[derive(serde::Deserialize)]
    struct Batch {
        changes: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        id: String,
    }
    let Ok(batch) = serde_json::from_slice::<Batch>(&raw) else {
        return "{}".into();
    };
    let mut errors = Vec::new();
    for item in batch.changes {
        let Some(i) = item
            .id
            .strip_prefix("b")
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if i >= sink.failed_once.len() {
            continue;
        }
        if sink.fail_pct > 0
            && (i as u64 % 100) < sink.fail_pct
            && !sink.failed_once[i].swap(true, Ordering::SeqCst)
        {
            errors.push(json!({"id": item.id, "status": "error", "error": "bench: fail once", "retry": true}));
            continue;
        }
        if sink.arrivals[t][i]
            .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            sink.received.fetch_add(1, Ordering::SeqCst);
        }
    }
    json!({ "results": errors }).to_string()
}

/// One scenario on one backend: start the sink and lxbridge, post every change, wait for
/// the sink to have them all; the bridge's figures.
pub(crate) async fn run_bridge(args: &Args) -> Value {
    let bin = bridge_bin(args);
    let prefix = format!(
        "lxbench-{}-{}-{}",
        std::process::id(),
        args.name,
        args.backend
    );
    let epoch = Instant::now();
    let sink = Arc::new(Sink::new(args, epoch));
    let (sink_url, server) = serve_sink(sink.clone()).await;
    let bridge = Bridge::start(&bin, &prefix, &sink_url, args).await;
    let pid = bridge.child.id();

    let posting = Posting::new(args, &bridge.base);
    let mut usage = Usage::new(args, pid).await;
    let before = usage.read().await;
    let start = Instant::now();
    posting.run(args, start, epoch).await;
    let accept_secs = start.elapsed().as_secs_f64();
    let expected = args.n * args.targets;
    let received = || sink.received.load(Ordering::SeqCst);
    crate::wait_until(
        received,
        expected,
        Duration::from_secs(300),
        "changes arrived",
    )
    .await;
    let total_secs = start.elapsed().as_secs_f64();
    let (rss_mb, cpu_secs) = process_usage(pid);
    // Settled: the last acks and records land a moment after the last arrival.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cost = Usage::figures(&before, &usage.read().await, args.n, args.n);
    let latencies = send_to_arrival_ms(&sink, &posting.sent_at, expected);
    bridge.stop();
    server.abort();
    cleanup(args, &prefix).await;
    let mut figures = json!({
        "accepted_per_s": round3(args.n as f64 / accept_secs),
        "delivered_per_s": round3(sink.received.load(Ordering::SeqCst) as f64 / total_secs),
        "delivered": sink.received.load(Ordering::SeqCst),
        "latency_send_to_arrival_ms": latency_summary(&latencies),
        "peak_rss_mb": round3(rss_mb),
        "cpu_s": round3(cpu_secs),
        "seconds": round3(total_secs),
    });
    crate::merge(&mut figures, cost);
    figures
}

/// Serves the sink's `POST /sink/<target>` on a free port; its base URL and the server task.
async fn serve_sink(sink: Arc<Sink>) -> (String, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new()
        .route("/sink/{t}", post(receive))
        .with_state(sink);
    let (base, server) = crate::serve(app).await;
    (format!("{base}/sink"), server)
}

/// The changes of a run as requests of `batch` changes, posted over `connections` workers.
struct Posting {
    /// Send time (µs since epoch) per change: when its request left lxbench. Latency is
    /// measured from there (an upper bound of accept → arrival: it includes ingress).
    sent_at: Arc<Vec<AtomicU64>>,
    /// The change index range of each request.
    requests: Arc<Vec<(usize, usize)>>,
    /// The next request to post.
    next: Arc<AtomicUsize>,
    client: reqwest::Client,
    url: String,
}

impl Posting {
    fn new(args: &Args, base: &str) -> Posting {
        Posting {
            sent_at: Arc::new((0..args.n).map(|_| AtomicU64::new(0)).collect()),
            requests: Arc::new(
                (0..args.n)
                    .step_by(args.batch)
                    .map(|s| (s, (s + args.batch).min(args.n)))
                    .collect(),
            ),
            next: Arc::new(AtomicUsize::new(0)),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(args.connections)
                .build()
                .unwrap(),
            url: format!("{base}/api/v1/nodes/central/changes"),
        }
    }

    /// Posts every request, `args.connections` at a time (paced from `start` with
    /// `--rate`), each until ingress accepts it.
    async fn run(&self, args: &Args, start: Instant, epoch: Instant) {
        let mut workers = Vec::new();
        for _ in 0..args.connections {
            let worker = Posting {
                sent_at: self.sent_at.clone(),
                requests: self.requests.clone(),
                next: self.next.clone(),
                client: self.client.clone(),
                url: self.url.clone(),
            };
            let (size, rate, batch) = (args.size, args.rate, args.batch);
            workers.push(tokio::spawn(async move {
                worker.work(size, rate, batch, start, epoch).await
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
    }

    /// One connection's loop: takes the next request until there are none.
    async fn work(&self, size: usize, rate: u64, batch: usize, start: Instant, epoch: Instant) {
        loop {
            let k = self.next.fetch_add(1, Ordering::SeqCst);
            let Some(&(from, to)) = self.requests.get(k) else {
                break;
            };
            if rate > 0 {
                let due = start + Duration::from_secs_f64((k * batch) as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            let sent = epoch.elapsed().as_micros() as u64 + 1;
            self.post_until_accepted(request_body(from, to, size)).await;
            for a in &self.sent_at[from..to] {
                a.store(sent, Ordering::SeqCst);
            }
        }
    }

    /// Posts one request again every 200 ms until ingress answers 202.
    async fn post_until_accepted(&self, body: String) {
        loop {
            let resp = self
                .client
                .post(&self.url)
                .bearer_auth("bench")
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            match resp {
                Ok(r) if r.status().as_u16() == 202 => break,
                Ok(r) => {
                    eprintln!("lxbench: ingress answered {}; retrying", r.status());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    eprintln!("lxbench: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// The JSON array of changes `from..to`.
fn request_body(from: usize, to: usize, size: usize) -> String {
    let mut body = String::with_capacity((to - from) * (size + 100));
    body.push('[');
    for i in from..to {
        if i > from {
            body.push(',');
        }
        body.push_str(&change_json(i, size));
    }
    body.push(']');
    body
}

/// Send → arrival in ms of every change that arrived, at every target, sorted.
fn send_to_arrival_ms(sink: &Sink, sent_at: &[AtomicU64], expected: usize) -> Vec<f64> {
    let mut latencies: Vec<f64> = Vec::with_capacity(expected);
    for arrivals in &sink.arrivals {
        for (arrived, accepted) in arrivals.iter().zip(sent_at) {
            let arrived = arrived.load(Ordering::SeqCst);
            let accepted = accepted.load(Ordering::SeqCst);
            if arrived > 0 && accepted > 0 {
                latencies.push(arrived.saturating_sub(accepted) as f64 / 1000.0);
            }
        }
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    latencies
}
