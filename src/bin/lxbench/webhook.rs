//! `--webhook`: services' webhooks into `[node.webhook]` nodes, one event per request as
//! services send them, `--webhook-connections` requests in flight: an amoCRM-style form body
//! (bracket keys, one lead a request, a distinct id each) and a JSON body (an order event),
//! both signed with HMAC-SHA256 over `<timestamp>.<body>`. Requests/s accepted (2xx), the
//! request latency (send → answer), the changes delivered to a push sink, beside the
//! raw-RabbitMQ baseline for as many messages of the bodies' mean size.

use crate::baseline::run_baseline;
use crate::bridge::{backend_toml, bridge_bin, cleanup_after, process_usage, Bridge};
use crate::commerceml::{serve_sink, Sink};
use crate::{backends, latency_summary, round3, Args};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The nodes' HMAC secret.
const SECRET: &str = "lxbench-webhook-secret";

/// The bodies the scenario posts, one phase each.
#[derive(Clone, Copy)]
enum Body {
    /// `application/x-www-form-urlencoded` as amoCRM sends a lead status change.
    Form,
    /// `application/json`: an order event.
    Json,
}

impl Body {
    fn name(self) -> &'static str {
        match self {
            Body::Form => "amocrm-form",
            Body::Json => "json",
        }
    }

    /// The node the body is posted to.
    fn node(self) -> &'static str {
        match self {
            Body::Form => "amocrm",
            Body::Json => "shop",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Body::Form => "application/x-www-form-urlencoded",
            Body::Json => "application/json",
        }
    }

    /// Request `k`'s body at Unix second `ts`: the form's keys percent-encoded as a form
    /// encoder (PHP's `http_build_query`, amoCRM) writes them.
    fn text(self, k: usize, ts: u64) -> String {
        match self {
            Body::Form => {
                let lead = "leads%5Bstatus%5D%5B0%5D";
                format!(
                    "{lead}%5Bid%5D={k}&{lead}%5Bstatus_id%5D=142&{lead}%5Bpipeline_id%5D=7\
                     &{lead}%5Blast_modified%5D={ts}&account%5Bid%5D=29&account%5Bsubdomain%5D=test"
                )
            }
            Body::Json => format!(
                r#"{{"event":"order.paid","order":{{"id":"{k}","amount":1500,"currency":"RUB"}}}}"#
            ),
        }
    }
}

/// Runs the scenario on each backend `--backend` names, one JSON line per body.
pub(crate) async fn webhook_bench(args: &Args) {
    let ts = unix_now();
    let mean_size = (Body::Form.text(args.n, ts).len() + Body::Json.text(args.n, ts).len()) / 2;
    let baseline = if args.no_baseline {
        Value::Null
    } else {
        run_baseline(&Args {
            name: "webhook-baseline".into(),
            size: mean_size,
            ..args.clone()
        })
        .await
    };
    for backend in backends(args) {
        let args = Args {
            backend: backend.to_string(),
            ..args.clone()
        };
        let prefix = format!("lxbench-{}-webhook-{backend}", std::process::id());
        for (body, bridge) in run_one(&args, &prefix).await {
            let line = json!({
                "scenario": "webhook",
                "body": body.name(),
                "backend": backend,
                "n": args.n, "connections": args.connections,
                "body_bytes": body.text(args.n, ts).len(),
                "bridge": bridge,
                "baseline": baseline,
                "ratio_accepted": crate::ratio(&bridge["requests_per_s"], &baseline),
                "ratio_delivered": crate::ratio(&bridge["delivered_per_s"], &baseline),
            });
            println!("{line}");
        }
    }
}

/// One backend: lxbridge with the two webhook nodes routed to the sink, then each body's
/// phase (post all, wait until every change the answers accepted arrived); its figures.
async fn run_one(args: &Args, prefix: &str) -> Vec<(Body, Value)> {
    let sink = Arc::new(Sink::default());
    let (sink_url, server) = serve_sink(sink.clone()).await;
    let config = |port| bench_config(prefix, port, &sink_url, args);
    let bridge = Bridge::start_with(&bridge_bin(args), prefix, config).await;
    let pid = bridge.child.id();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut phases = Vec::new();
    let mut cpu_before = 0.0;
    for body in [Body::Form, Body::Json] {
        let (before, received_before) = (sink.refs.lock().unwrap().len(), received(&sink));
        let start = Instant::now();
        let sent = send_all(&client, &bridge.base, body, args).await;
        let accept_secs = start.elapsed().as_secs_f64();
        let arrived = || sink.refs.lock().unwrap().len() - before;
        crate::wait_until(
            arrived,
            sent.changes as usize,
            Duration::from_secs(300),
            "webhook changes arrived",
        )
        .await;
        let total = start.elapsed().as_secs_f64();
        let (rss_mb, cpu_s) = process_usage(pid);
        let delivered = arrived();
        phases.push((
            body,
            json!({
                "requests_per_s": round3(sent.ok as f64 / accept_secs),
                "accepted": sent.ok,
                "changes_accepted": sent.changes,
                "duplicate": sent.duplicate,
                "refused": sent.refused,
                "transport_errors": sent.errors,
                "latency_request_ms": latency_summary(&sent.latencies),
                "delivered_per_s": round3(delivered as f64 / total),
                "delivered": delivered,
                "changes_received": received(&sink) - received_before,
                "accept_s": round3(accept_secs),
                "seconds": round3(total),
                "peak_rss_mb": round3(rss_mb),
                "cpu_s": round3(cpu_s - cpu_before),
                "cpu_us_per_request": round3((cpu_s - cpu_before) * 1e6 / sent.ok.max(1) as f64),
            }),
        ));
        cpu_before = cpu_s;
    }
    bridge.stop();
    server.abort();
    let config = bench_config(prefix, 0, "http://127.0.0.1:1", args);
    cleanup_after(args, prefix, &config).await;
    phases
}

fn received(sink: &Sink) -> usize {
    sink.changes.load(Ordering::SeqCst)
}

fn bench_config(prefix: &str, port: u16, sink: &str, args: &Args) -> String {
    let auth = format!(
        r#"auth = {{ kind = "hmac", secret = "{SECRET}", header = "X-Signature", timestamp_header = "X-Timestamp" }}"#
    );
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{backend}[[node]]
name = "amocrm"
token = "amo-token"
[node.webhook]
{auth}
[[node.webhook.changes]]
each = "leads.status"
type = "AmoCRM.Lead"
ref = "lead-{{id}}"
id = "amo-lead-{{id}}-{{last_modified}}"
[[node]]
name = "shop"
token = "shop-token"
[node.webhook]
{auth}
[[node.webhook.changes]]
each = "order"
filter = [{{ field = "event", eq = "order.paid" }}]
type = "Shop.Order"
ref = "order-{{id}}"
id = "shop-{{$.event}}-{{id}}"
[[node]]
name = "crm"
token = "x"
deliver = {{ mode = "push", url = "{sink}", batch_max = 100, concurrency = 8, gzip = false }}
[[route]]
from = "amocrm"
to = ["crm"]
[[route]]
from = "shop"
to = ["crm"]
"#,
        backend = backend_toml(prefix, args),
    )
}

/// What the requests of a phase were answered.
#[derive(Default)]
struct Sent {
    /// Requests answered 2xx.
    ok: usize,
    /// The sum of the 2xx answers' `accepted` (and of their `duplicate`).
    changes: u64,
    duplicate: u64,
    /// Other answers by status (503 and 429 retried, the others not).
    refused: BTreeMap<u16, usize>,
    /// Connection errors and timeouts (retried).
    errors: usize,
    /// Send → answer read, in ms, of the 2xx requests.
    latencies: Vec<f64>,
}

impl Sent {
    fn merge(&mut self, other: Sent) {
        self.ok += other.ok;
        self.changes += other.changes;
        self.duplicate += other.duplicate;
        for (status, count) in other.refused {
            *self.refused.entry(status).or_default() += count;
        }
        self.errors += other.errors;
        self.latencies.extend(other.latencies);
    }
}

/// Posts the phase's `-n` requests, `--webhook-connections` in flight.
async fn send_all(client: &reqwest::Client, base: &str, body: Body, args: &Args) -> Sent {
    let url = format!("{base}/api/v1/nodes/{}/webhook", body.node());
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..args.connections)
        .map(|_| {
            let (client, url, next, n) = (client.clone(), url.clone(), next.clone(), args.n);
            tokio::spawn(async move {
                let mut sent = Sent::default();
                loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    if k >= n {
                        return sent;
                    }
                    post_one(&client, &url, body, k, &mut sent).await;
                }
            })
        })
        .collect();
    let mut all = Sent::default();
    for w in workers {
        all.merge(w.await.unwrap());
    }
    all.latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    all
}

/// Whether a refusal was already shown (the first one is, with its answer).
static TOLD: AtomicBool = AtomicBool::new(false);

/// Posts request `k`, signed afresh each time, again after 200 ms while it is answered 503
/// or 429 or not answered (as a service retries); other answers are final.
async fn post_one(client: &reqwest::Client, url: &str, body: Body, k: usize, sent: &mut Sent) {
    loop {
        let ts = unix_now();
        let text = body.text(k, ts);
        let signature = signature(ts, &text);
        let started = Instant::now();
        let resp = client
            .post(url)
            .header("content-type", body.content_type())
            .header("X-Timestamp", ts.to_string())
            .header("X-Signature", signature)
            .body(text)
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => {
                let answer: Value = serde_json::from_slice(&r.bytes().await.unwrap_or_default())
                    .unwrap_or(Value::Null);
                sent.latencies
                    .push(started.elapsed().as_secs_f64() * 1000.0);
                sent.ok += 1;
                sent.changes += answer["accepted"].as_u64().unwrap_or(0);
                sent.duplicate += answer["duplicate"].as_u64().unwrap_or(0);
                return;
            }
            Ok(r) => {
                let status = r.status().as_u16();
                *sent.refused.entry(status).or_default() += 1;
                let retry = status == 503 || status == 429;
                if !TOLD.swap(true, Ordering::SeqCst) {
                    let answer = r.text().await.unwrap_or_default();
                    eprintln!("lxbench: the webhook answered {status}: {answer}");
                }
                if !retry {
                    return;
                }
            }
            Err(e) => {
                sent.errors += 1;
                eprintln!("lxbench: {e}; retrying");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `sha256=<hex HMAC-SHA256(SECRET, "<ts>.<body>")>`.
fn signature(ts: u64, body: &str) -> String {
    use std::fmt::Write;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(format!("{ts}.").as_bytes());
    context.update(body.as_bytes());
    let mut out = String::from("sha256=");
    for b in context.sign().as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
