//! `lxbench`: end-to-end figures for lxbridge beside a raw-RabbitMQ baseline in the same run.
//!
//! For each scenario it starts a fresh lxbridge (the `lxbridge` binary next to this one, or
//! `--bridge-bin`) with a generated config routing a source node to lxbench's own HTTP sink(s),
//! POSTs N changes of S bytes over C connections with B changes per request (optionally paced
//! at a fixed rate), waits until the sink has every change, and prints one JSON line:
//! accepted/s, delivered/s, latency accept → arrival (p50/p99/max), lxbridge's peak RSS and CPU
//! seconds, and the baseline (confirmed persistent publishes to a quorum queue, one consumer,
//! same N and S) with the ratio bridge/baseline.
//!
//! `--backend embedded` (or `both`) measures lxbridge on its embedded backend too; the
//! baseline always needs RabbitMQ, and the RabbitMQ backend Redis (same defaults as
//! lxbridge). See BENCHMARKS.md for the commands.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "lxbench",
    about = "End-to-end benchmark of lxbridge against raw RabbitMQ"
)]
struct Args {
    /// Run the standard scenarios of BENCHMARKS.md (ignores the shape options below).
    #[arg(long)]
    all: bool,
    /// Scenario name printed in the JSON line.
    #[arg(long, default_value = "custom")]
    name: String,
    /// Changes to send.
    #[arg(long, short = 'n', default_value_t = 50_000)]
    n: usize,
    /// Bytes of `data` per change (approximately).
    #[arg(long, short = 's', default_value_t = 1024)]
    size: usize,
    /// Concurrent HTTP connections posting.
    #[arg(long, short = 'c', default_value_t = 4)]
    connections: usize,
    /// Changes per request.
    #[arg(long, short = 'b', default_value_t = 100)]
    batch: usize,
    /// Paced mode: changes per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Push targets the source routes to (fan-out).
    #[arg(long, default_value_t = 1)]
    targets: usize,
    /// Percent of changes the sink fails once (per-change error, retried).
    #[arg(long, default_value_t = 0)]
    fail_pct: u64,
    /// Measure how soon a long-polling pull node gets a change after it was posted.
    #[arg(long)]
    pull_latency: bool,
    /// Measure the transform cost per change instead (no broker needed).
    #[arg(long)]
    transform: bool,
    /// The end-to-end budget the transform cost is compared with, in changes/s (default: the
    /// batch100 figure of BENCHMARKS.md).
    #[arg(long, default_value_t = 10_000.0)]
    budget_per_s: f64,
    /// Skip the raw-RabbitMQ baseline.
    #[arg(long)]
    no_baseline: bool,
    /// The lxbridge backend(s) to measure: `rabbitmq`, `embedded`, or `both` (one line each,
    /// beside the same baseline).
    #[arg(long, default_value = "rabbitmq", value_parser = ["rabbitmq", "embedded", "both"])]
    backend: String,
    /// The lxbridge binary (default: next to lxbench).
    #[arg(long)]
    bridge_bin: Option<String>,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379/0")]
    redis: String,
}

/// What the sink saw: arrival time (µs since the run's epoch, +1) per change index.
struct Sink {
    arrivals: Vec<Vec<AtomicU64>>,
    received: AtomicUsize,
    failed_once: Vec<AtomicBool>,
    fail_pct: u64,
    epoch: Instant,
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Peak RSS (VmHWM) in MB and CPU seconds (user + system) of a process.
fn process_usage(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after ")": state is field 3 → index 0; utime is field 14 → index 11, stime 15 → 12
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    (hwm_kb / 1024.0, ticks / 100.0)
}

/// Where an embedded lxbridge of this run keeps its database.
fn embedded_dir(prefix: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(prefix)
}

/// The backend sections of a config: RabbitMQ + Redis, or embedded.
fn backend_toml(prefix: &str, args: &Args) -> String {
    if args.backend == "embedded" {
        format!(
            "[embedded]\ndata_dir = {:?}\n",
            embedded_dir(prefix).display().to_string()
        )
    } else {
        format!(
            "[broker]\nurl = \"{}\"\nprefix = \"{prefix}\"\n[store]\nredis_url = \"{}\"\n",
            args.amqp, args.redis
        )
    }
}

fn bridge_config(prefix: &str, port: u16, sink: &str, args: &Args) -> String {
    let backend = backend_toml(prefix, args);
    if args.pull_latency {
        return format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n{backend}\
             [[node]]\nname = \"central\"\ntoken = \"bench\"\n[[node]]\nname = \"sink0\"\ntoken = \"x\"\n\
             deliver = {{ mode = \"pull\", batch_max = 100 }}\n[[route]]\nfrom = \"central\"\nto = [\"sink0\"]\n"
        );
    }
    let mut toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{backend}[retry]
delays = ["1s", "10s"]
[[node]]
name = "central"
token = "bench"
"#
    );
    let mut targets = Vec::new();
    for t in 0..args.targets {
        toml.push_str(&format!(
            "[[node]]\nname = \"sink{t}\"\ntoken = \"x\"\ndeliver = {{ mode = \"push\", url = \"{sink}/{t}\", batch_max = 100, concurrency = 8, gzip = false }}\n"
        ));
        targets.push(format!("\"sink{t}\""));
    }
    toml.push_str(&format!(
        "[[route]]\nfrom = \"central\"\nto = [{}]\n",
        targets.join(", ")
    ));
    toml
}

struct Bridge {
    child: Child,
    base: String,
    config_path: std::path::PathBuf,
}

impl Bridge {
    async fn start(bin: &str, prefix: &str, sink: &str, args: &Args) -> Bridge {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config_path = std::env::temp_dir().join(format!("{prefix}.toml"));
        std::fs::write(&config_path, bridge_config(prefix, port, sink, args))
            .expect("write bench config");
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin}: {e} (build it with cargo build --release)")
            });
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "lxbridge not ready: are RabbitMQ and Redis up?"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Bridge {
            child,
            base,
            config_path,
        }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config_path);
    }
}

async fn cleanup(args: &Args, prefix: &str) {
    if args.backend == "embedded" {
        let _ = std::fs::remove_dir_all(embedded_dir(prefix));
        return;
    }
    if let Ok(conn) = Connection::connect(&args.amqp, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            // What the bridge declared for the config it ran with, and the baseline's queue.
            let config = lxbridge::config::Config::parse(
                &bridge_config(prefix, 0, "http://127.0.0.1:1", args),
                "bench",
            )
            .expect("the bench config parses");
            let (exchanges, mut queues) = lxbridge::broker::declared_names(&config);
            queues.push(format!("{prefix}.baseline"));
            for x in exchanges {
                let _ = ch
                    .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            for q in queues {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "bench done".into()).await;
    }
    if let Ok(client) = redis::Client::open(args.redis.as_str()) {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}:*"))
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            for chunk in keys.chunks(1000) {
                let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut c).await;
            }
        }
    }
}

/// The `data` of change `i`, about `size` bytes of JSON.
fn change_json(i: usize, size: usize) -> String {
    let filler = "x".repeat(size.saturating_sub(60));
    format!(
        r#"{{"id":"b{i}","type":"Catalog.Bench","ref":"r{i}","data":{{"Code":{i},"Description":"{filler}"}}}}"#
    )
}

async fn run_bridge(args: &Args) -> Value {
    let bin = args.bridge_bin.clone().unwrap_or_else(|| {
        let me = std::env::current_exe().expect("own path");
        me.with_file_name("lxbridge").display().to_string()
    });
    let prefix = format!(
        "lxbench-{}-{}-{}",
        std::process::id(),
        args.name,
        args.backend
    );
    let epoch = Instant::now();
    let sink = Arc::new(Sink {
        arrivals: (0..args.targets)
            .map(|_| (0..args.n).map(|_| AtomicU64::new(0)).collect())
            .collect(),
        received: AtomicUsize::new(0),
        failed_once: (0..args.n).map(|_| AtomicBool::new(false)).collect(),
        fail_pct: args.fail_pct,
        epoch,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_url = format!("http://{}/sink", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/sink/{t}", post(receive))
        .with_state(sink.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let bridge = Bridge::start(&bin, &prefix, &sink_url, args).await;
    let pid = bridge.child.id();

    // Send time (µs since epoch) per change: when its request left lxbench. Latency is
    // measured from there (an upper bound of accept → arrival: it includes ingress).
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..args.n).map(|_| AtomicU64::new(0)).collect());
    let requests: Arc<Vec<(usize, usize)>> = Arc::new(
        (0..args.n)
            .step_by(args.batch)
            .map(|s| (s, (s + args.batch).min(args.n)))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()
        .unwrap();
    let url = format!("{}/api/v1/nodes/central/changes", bridge.base);
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let (requests, next, client, url, sent_at) = (
            requests.clone(),
            next.clone(),
            client.clone(),
            url.clone(),
            sent_at.clone(),
        );
        let (size, rate, batch) = (args.size, args.rate, args.batch);
        workers.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                let Some(&(from, to)) = requests.get(k) else {
                    break;
                };
                if rate > 0 {
                    let due = start + Duration::from_secs_f64((k * batch) as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let sent = epoch.elapsed().as_micros() as u64 + 1;
                let mut body = String::with_capacity((to - from) * (size + 100));
                body.push('[');
                for i in from..to {
                    if i > from {
                        body.push(',');
                    }
                    body.push_str(&change_json(i, size));
                }
                body.push(']');
                loop {
                    let resp = client
                        .post(&url)
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
                for a in &sent_at[from..to] {
                    a.store(sent, Ordering::SeqCst);
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let accept_secs = start.elapsed().as_secs_f64();
    let expected = args.n * args.targets;
    let deadline = Instant::now() + Duration::from_secs(300);
    while sink.received.load(Ordering::SeqCst) < expected {
        if Instant::now() > deadline {
            eprintln!(
                "lxbench: only {} of {expected} arrived in time",
                sink.received.load(Ordering::SeqCst)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total_secs = start.elapsed().as_secs_f64();
    let (rss_mb, cpu_secs) = process_usage(pid);
    let mut latencies: Vec<f64> = Vec::with_capacity(expected);
    for t in 0..args.targets {
        for i in 0..args.n {
            let arrived = sink.arrivals[t][i].load(Ordering::SeqCst);
            let accepted = sent_at[i].load(Ordering::SeqCst);
            if arrived > 0 && accepted > 0 {
                latencies.push(arrived.saturating_sub(accepted) as f64 / 1000.0);
            }
        }
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    bridge.stop();
    server.abort();
    cleanup(args, &prefix).await;
    json!({
        "accepted_per_s": round3(args.n as f64 / accept_secs),
        "delivered_per_s": round3(sink.received.load(Ordering::SeqCst) as f64 / total_secs),
        "delivered": sink.received.load(Ordering::SeqCst),
        "latency_send_to_arrival_ms": {"p50": round3(percentile(&latencies, 0.50)), "p99": round3(percentile(&latencies, 0.99)), "max": round3(latencies.last().copied().unwrap_or(0.0))},
        "peak_rss_mb": round3(rss_mb),
        "cpu_s": round3(cpu_secs),
        "seconds": round3(total_secs),
    })
}

/// Raw RabbitMQ: N persistent messages of S bytes, confirmed publishes to a quorum queue
/// (a window of 1000 unconfirmed), one consumer acking each; delivered/s until the last arrives.
async fn run_baseline(args: &Args) -> Value {
    let queue = format!("lxbench-{}-{}.baseline", std::process::id(), args.name);
    let publisher = Connection::connect(&args.amqp, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let consumer_conn = Connection::connect(&args.amqp, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let pch = publisher.create_channel().await.unwrap();
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    pch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        qargs,
    )
    .await
    .unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let cch = consumer_conn.create_channel().await.unwrap();
    cch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = cch
        .basic_consume(
            queue.as_str().into(),
            "lxbench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let n = args.n;
    let epoch = Instant::now();
    let consumed = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(n);
        let mut count = 0;
        while count < n {
            let Some(Ok(d)) = consumer.next().await else {
                break;
            };
            let sent: u64 = std::str::from_utf8(&d.data[..20])
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            latencies
                .push((epoch.elapsed().as_micros() as u64).saturating_sub(sent) as f64 / 1000.0);
            d.ack(BasicAckOptions::default()).await.unwrap();
            count += 1;
        }
        (count, epoch.elapsed(), latencies)
    });
    let start = Instant::now();
    let mut window = VecDeque::with_capacity(1000);
    for _ in 0..n {
        let mut payload = format!("{:<20}", epoch.elapsed().as_micros()).into_bytes();
        payload.resize(args.size.max(20), b'x');
        let confirm = pch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        window.push_back(confirm);
        if window.len() >= 1000 {
            window.pop_front().unwrap().await.unwrap();
        }
    }
    for c in window {
        c.await.unwrap();
    }
    let publish_secs = start.elapsed().as_secs_f64();
    let (count, done, mut latencies) = consumed.await.unwrap();
    let total_secs = (done - start.duration_since(epoch)).as_secs_f64();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let _ = pch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = publisher.close(200, "".into()).await;
    let _ = consumer_conn.close(200, "".into()).await;
    json!({
        "published_per_s": round3(n as f64 / publish_secs),
        "delivered_per_s": round3(count as f64 / total_secs),
        "latency_publish_to_consume_ms": {"p50": round3(percentile(&latencies, 0.5)), "p99": round3(percentile(&latencies, 0.99)), "max": round3(latencies.last().copied().unwrap_or(0.0))},
    })
}

async fn scenario(args: &Args) {
    let baseline = if args.no_baseline {
        Value::Null
    } else {
        run_baseline(args).await
    };
    for backend in backends(args) {
        let args = Args {
            backend: backend.to_string(),
            ..args.clone()
        };
        let bridge = run_bridge(&args).await;
        let ratio = match (
            bridge["delivered_per_s"].as_f64(),
            baseline["delivered_per_s"].as_f64(),
        ) {
            (Some(b), Some(r)) if r > 0.0 => json!(round3(b / r)),
            _ => Value::Null,
        };
        let line = json!({
            "scenario": args.name,
            "backend": backend,
            "n": args.n, "size": args.size, "connections": args.connections, "batch": args.batch,
            "rate": args.rate, "targets": args.targets, "fail_pct": args.fail_pct,
            "bridge": bridge,
            "baseline": baseline,
            "ratio_delivered": ratio,
        });
        println!("{line}");
    }
}

/// A 10-rule mapping for the 1C customer order fixture.
const TEN_RULES: &str = r#"
[types."Document.ЗаказКлиента"]
rename = "Document.Order"
filter = [{ field = "Posted", eq = true }]
drop = ["Комментарий", "Товары[].СтавкаНДС"]
fields = { "Number" = "number", "Date" = "date", "Товары[].Номенклатура" = "Товары[].product" }
set = { "origin" = "1c" }
values = { "Статус" = { "КОтгрузке" = "ready" } }
defaults = { "Склад" = "" }
refs = { "Контрагент" = "Catalog.Контрагенты" }
"#;

const SCRIPT: &str = r#"
[types."*"]
[types."Document.ЗаказКлиента"]
rename = "Document.Order"
"#;

/// Transform cost per change on the ~1 KB 1C order: parse the data (as delivery does),
/// apply the mapping, serialise the result.
fn transform_bench(args: &Args) {
    use lxbridge::transform::{Change, Compiled, Mapping, Outcome, Remap};
    let order: Value =
        serde_json::from_str(include_str!("../../tests/fixtures/1c/document-order.json"))
            .expect("fixture");
    let parsed = lxbridge::model::parse_change(order).expect("fixture parses");
    let raw = serde_json::to_string(parsed.data.as_ref().expect("upsert")).expect("data");
    let change = |data: Value| Change {
        id: "bench".into(),
        kind: parsed.kind.clone(),
        reference: parsed.reference.clone(),
        op: parsed.op,
        data: Some(data),
        source: "central".into(),
        seq: 1,
    };
    let mut script_mapping: Mapping = toml::from_str(SCRIPT).expect("mapping");
    script_mapping.script =
        Some("change.data.origin = \"1c\"; change.data.remove(\"Комментарий\"); change".into());
    let variants: Vec<(&str, Compiled)> = vec![
        ("none", Compiled::identity()),
        (
            "ten_rules",
            Compiled::new(
                &toml::from_str(TEN_RULES).expect("mapping"),
                std::path::Path::new("."),
            )
            .expect("compiles"),
        ),
        (
            "script",
            Compiled::new(&script_mapping, std::path::Path::new(".")).expect("compiles"),
        ),
    ];
    let remap = Remap::new();
    let budget_ns = 1e9 / args.budget_per_s;
    for (name, compiled) in variants {
        let iterations = if name == "script" { 20_000 } else { 100_000 };
        let start = Instant::now();
        for _ in 0..iterations {
            let data: Value = serde_json::from_str(&raw).expect("data");
            match compiled.apply(change(data), &remap) {
                Outcome::Deliver(c) => {
                    std::hint::black_box(
                        serde_json::value::to_raw_value(&c.data).expect("serialises"),
                    );
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        let ns = start.elapsed().as_nanos() as f64 / iterations as f64;
        println!(
            "{}",
            json!({"scenario": format!("transform-{name}"), "bytes": raw.len(), "ns_per_change": round3(ns),
                   "budget_ns_per_change": round3(budget_ns), "share_of_budget": round3(ns / budget_ns)})
        );
    }
}

/// A pull node long-polls its inbox (and confirms at once); changes are posted one at a time
/// every 20 ms to an otherwise idle bridge. Latency = POST sent → the poll that carries it
/// returned.
async fn pull_latency(args: &Args) {
    for backend in backends(args) {
        pull_latency_on(&Args {
            backend: backend.to_string(),
            ..args.clone()
        })
        .await;
    }
}

/// The backends `--backend` names, one by one.
fn backends(args: &Args) -> Vec<&str> {
    match args.backend.as_str() {
        "both" => vec!["rabbitmq", "embedded"],
        one => vec![one],
    }
}

async fn pull_latency_on(args: &Args) {
    let bin = args.bridge_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("own path")
            .with_file_name("lxbridge")
            .display()
            .to_string()
    });
    let prefix = format!("lxbench-{}-pull-{}", std::process::id(), args.backend);
    let bridge = Bridge::start(&bin, &prefix, "", args).await;
    let client = reqwest::Client::new();
    let n = args.n.min(2_000);
    let epoch = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let got: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let poller = {
        let (client, base, got) = (client.clone(), bridge.base.clone(), got.clone());
        tokio::spawn(async move {
            let mut received = 0;
            while received < n {
                let resp = client
                    .get(format!("{base}/api/v1/nodes/sink0/inbox?limit=100&wait=25"))
                    .bearer_auth("x")
                    .send()
                    .await
                    .expect("inbox");
                let at = epoch.elapsed().as_micros() as u64 + 1;
                let msg: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
                let Some(no) = msg["message_no"].as_i64() else {
                    continue;
                };
                for c in msg["changes"].as_array().unwrap() {
                    let i: usize = c["id"].as_str().unwrap()[1..].parse().unwrap();
                    if got[i]
                        .compare_exchange(0, at, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        received += 1;
                    }
                }
                client
                    .post(format!("{base}/api/v1/nodes/sink0/inbox/ack"))
                    .bearer_auth("x")
                    .header("content-type", "application/json")
                    .body(json!({"message_no": no}).to_string())
                    .send()
                    .await
                    .expect("ack");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..n {
        sent[i].store(epoch.elapsed().as_micros() as u64 + 1, Ordering::SeqCst);
        let resp = client
            .post(format!("{}/api/v1/nodes/central/changes", bridge.base))
            .bearer_auth("bench")
            .header("content-type", "application/json")
            .body(change_json(i, args.size))
            .send()
            .await
            .expect("ingress");
        assert_eq!(resp.status().as_u16(), 202);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(60), poller).await;
    let mut latencies: Vec<f64> = (0..n)
        .filter(|&i| got[i].load(Ordering::SeqCst) > 0)
        .map(|i| {
            got[i]
                .load(Ordering::SeqCst)
                .saturating_sub(sent[i].load(Ordering::SeqCst)) as f64
                / 1000.0
        })
        .collect();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    bridge.stop();
    cleanup(args, &prefix).await;
    println!(
        "{}",
        json!({"scenario": "pull-latency", "backend": args.backend, "n": n, "received": latencies.len(),
               "post_to_poll_return_ms": {"p50": round3(percentile(&latencies, 0.5)), "p99": round3(percentile(&latencies, 0.99)), "max": round3(latencies.last().copied().unwrap_or(0.0))}})
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.pull_latency {
        pull_latency(&args).await;
        return;
    }
    if args.transform {
        transform_bench(&args);
        return;
    }
    if !args.all {
        scenario(&args).await;
        return;
    }
    let base = Args {
        all: false,
        ..args.clone()
    };
    let scenarios = [
        Args {
            name: "batch100".into(),
            batch: 100,
            connections: 4,
            ..base.clone()
        },
        Args {
            name: "single-c64".into(),
            batch: 1,
            connections: 64,
            ..base.clone()
        },
        Args {
            name: "paced-1000".into(),
            batch: 1,
            connections: 16,
            rate: 1000,
            n: 20_000,
            ..base.clone()
        },
        Args {
            name: "retry-10pct".into(),
            batch: 100,
            connections: 4,
            fail_pct: 10,
            ..base.clone()
        },
        Args {
            name: "fanout-4".into(),
            batch: 100,
            connections: 4,
            targets: 4,
            ..base.clone()
        },
    ];
    for s in &scenarios {
        scenario(s).await;
    }
}
