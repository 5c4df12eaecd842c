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
//!
//! The parts: `throughput` (the sink, posting, the figures of a scenario), `bridge`
//! (starting, stopping and cleaning up after an lxbridge), `baseline` (raw RabbitMQ),
//! `pull` (`--pull-latency`), `transform` (`--transform`), `commerceml` (`--commerceml`),
//! `site` (`--commerceml-site`), `webhook` (`--webhook`).

mod baseline;
mod bridge;
mod commerceml;
mod pull;
mod site;
mod throughput;
mod transform;
mod usage;
mod webhook;

use baseline::run_baseline;
use clap::Parser;
use commerceml::commerceml_bench;
use pull::pull_latency;
use serde_json::{json, Value};
use site::site_bench;
use throughput::run_bridge;
use transform::transform_bench;
use webhook::webhook_bench;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "lxbench",
    about = "End-to-end benchmark of lxbridge against raw RabbitMQ"
)]
struct Args {
    /// Run the standard scenarios of BENCHMARKS.md, `--webhook` last (ignores the shape
    /// options below).
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
    /// Upload a synthetic CommerceML catalog as 1C's site exchange does, until every element
    /// arrived at a push sink (elements/s, peak RSS).
    #[arg(long)]
    commerceml: bool,
    /// The size of that catalog in MB.
    #[arg(long, default_value_t = 100)]
    cml_mb: usize,
    /// Feed lxbench's CommerceML site (zip, 200 KB parts) through a `mode = "commerceml"`
    /// target: products/s the site read.
    #[arg(long)]
    commerceml_site: bool,
    /// The products of that scenario.
    #[arg(long, default_value_t = 10_000)]
    site_products: usize,
    /// POST signed webhooks (an amoCRM-style form, then a JSON body) to `[node.webhook]`
    /// nodes routed to a push sink, one event per request: requests/s accepted, latency.
    #[arg(long)]
    webhook: bool,
    /// The requests of that scenario, per body.
    #[arg(long, default_value_t = 20_000)]
    webhook_requests: usize,
    /// The requests of that scenario in flight.
    #[arg(long, default_value_t = 64)]
    webhook_connections: usize,
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
        let ratio = crate::ratio(&bridge["delivered_per_s"], &baseline);
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

/// A bridge figure (per second) ÷ the baseline's delivered/s, or null without one.
fn ratio(bridge_per_s: &Value, baseline: &Value) -> Value {
    match (bridge_per_s.as_f64(), baseline["delivered_per_s"].as_f64()) {
        (Some(b), Some(r)) if r > 0.0 => json!(round3(b / r)),
        _ => Value::Null,
    }
}

/// The backends `--backend` names, one by one.
fn backends(args: &Args) -> Vec<&str> {
    match args.backend.as_str() {
        "both" => vec!["rabbitmq", "embedded"],
        one => vec![one],
    }
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

/// `{"p50", "p99", "max"}` of sorted latencies.
fn latency_summary(sorted: &[f64]) -> Value {
    json!({"p50": round3(percentile(sorted, 0.5)), "p99": round3(percentile(sorted, 0.99)), "max": round3(sorted.last().copied().unwrap_or(0.0))})
}

/// Serves `app` on a free port of 127.0.0.1; its base URL (`http://host:port`) and the task.
async fn serve(app: axum::Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (base, server)
}

/// Waits until `count()` reaches `expected`, at most `limit` (then says how far it got).
async fn wait_until(
    count: impl Fn() -> usize,
    expected: usize,
    limit: std::time::Duration,
    what: &str,
) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let got = count();
        if got >= expected {
            return;
        }
        if std::time::Instant::now() > deadline {
            eprintln!("lxbench: only {got} of {expected} {what} in {limit:?}");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The `data` of change `i`, about `size` bytes of JSON.
/// Adds `extra`'s fields to the object `into`.
fn merge(into: &mut Value, extra: Value) {
    if let (Value::Object(into), Value::Object(extra)) = (into, extra) {
        into.extend(extra);
    }
}

fn change_json(i: usize, size: usize) -> String {
    let filler = "x".repeat(size.saturating_sub(60));
    format!(
        r#"{{"id":"b{i}","type":"Catalog.Bench","ref":"r{i}","data":{{"Code":{i},"Description":"{filler}"}}}}"#
    )
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
    if args.commerceml {
        commerceml_bench(&args).await;
        return;
    }
    if args.commerceml_site {
        site_bench(&Args {
            n: args.site_products,
            ..args.clone()
        })
        .await;
        return;
    }
    if args.webhook {
        webhook_bench(&webhook_args(&args)).await;
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
            name: "paced-100".into(),
            batch: 1,
            connections: 4,
            rate: 100,
            n: 3_000,
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
    webhook_bench(&webhook_args(&base)).await;
}

/// The shape of `--webhook`: its own request count and requests in flight.
fn webhook_args(args: &Args) -> Args {
    Args {
        n: args.webhook_requests,
        connections: args.webhook_connections,
        ..args.clone()
    }
}
