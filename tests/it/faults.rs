//! Faults: the broker connection cut (through a TCP proxy, so tests beside this one are not
//! disturbed) and the broker unreachable at start (RabbitMQ only: the embedded backend has no
//! connection), SIGTERM and kill -9 under load (both backends). Every change that got 202
//! must arrive.

use crate::common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn config(target: &Target) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "10s"
[broker]
url = "{{amqp}}"
prefix = "{{prefix}}"
[store]
redis_url = "{{redis}}"
[admin]
token = "admin-secret"
[retry]
delays = ["200ms", "500ms", "1s", "2s", "5s"]
[[node]]
name = "central"
token = "central-secret"
[[node]]
name = "shop"
token = "shop-secret"
deliver = {{ mode = "push", url = "{}", batch_max = 20, concurrency = 2 }}
[[route]]
from = "central"
to = ["shop"]
"#,
        target.url()
    )
}

fn batch(prefix: &str, start: usize, n: usize) -> Value {
    Value::Array(
        (start..start + n)
            .map(|i| json!({"id": format!("{prefix}-{i}"), "type": "Catalog.X", "ref": format!("r-{prefix}-{i}"), "data": {"i": i}}))
            .collect(),
    )
}

/// Ids of a 202 answer's accepted items.
fn accepted_ids(answer: &Value) -> Vec<String> {
    answer["results"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter(|i| i["status"] == "accepted")
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_cut_gives_503_with_retry_after_then_recovers_without_loss() {
    // Printed only when the test fails: what the connections and consumers did.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("lxbridge=debug")
        .with_test_writer()
        .try_init();
    let target = Target::start().await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let bridge = Bridge::start_with(
        Backend::Rabbit,
        &unique_prefix("cut"),
        &config(&target),
        &proxy.amqp_url(),
        true,
    )
    .await;

    let accepted = Arc::new(Mutex::new(HashSet::<String>::new()));
    let mut saw_503 = false;
    let mut retry_after = None;
    let start = Instant::now();
    let mut i = 0;
    let mut cut_at = None;
    let mut restored = false;
    while start.elapsed() < Duration::from_secs(8) {
        if cut_at.is_none() && start.elapsed() > Duration::from_secs(1) {
            proxy.cut();
            cut_at = Some(Instant::now());
        }
        if let Some(at) = cut_at {
            if !restored && at.elapsed() > Duration::from_secs(3) {
                proxy.restore();
                restored = true;
            }
        }
        let resp = bridge
            .http
            .post(bridge.url("/api/v1/nodes/central/changes"))
            .bearer_auth("central-secret")
            .header("content-type", "application/json")
            .body(batch("cut", i, 10).to_string())
            .send()
            .await
            .unwrap();
        i += 10;
        let status = resp.status().as_u16();
        let ra = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let body: Value = resp.json_value().await;
        match status {
            202 => accepted.lock().unwrap().extend(accepted_ids(&body)),
            503 => {
                saw_503 = true;
                retry_after = ra;
                assert!(
                    body["error"].as_str().unwrap().contains("unavailable"),
                    "{body}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(saw_503, "ingress answered 503 while the broker was away");
    assert_eq!(retry_after.as_deref(), Some("5"));
    // It recovered by itself: a request now is accepted.
    bridge.wait_ready(Duration::from_secs(20)).await;
    let (status, body) = bridge
        .post_json("central", "central-secret", &batch("cut-after", 0, 5))
        .await;
    assert_eq!(status, 202, "{body}");
    accepted.lock().unwrap().extend(accepted_ids(&body));

    let want = accepted.lock().unwrap().clone();
    assert!(want.len() > 50, "load ran: {} accepted", want.len());
    eventually(
        Duration::from_secs(60),
        "every 202'd change delivered",
        || {
            let got = target.distinct_ids();
            want.iter().all(|id| got.contains(id))
        },
    )
    .await;
    let metrics = bridge.metrics().await;
    assert!(metrics.contains("lx_broker_up 1"), "{metrics}");
    assert!(
        metrics.contains("lx_ingress_requests_total{code=\"503\",node=\"central\"}"),
        "{metrics}"
    );
    bridge.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_unreachable_at_start_is_503_until_it_appears() {
    let target = Target::start().await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    proxy.cut();
    let bridge = Bridge::start_with(
        Backend::Rabbit,
        &unique_prefix("late"),
        &config(&target),
        &proxy.amqp_url(),
        false,
    )
    .await;
    let ready = bridge.http.get(bridge.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let body: Value = ready.json_value().await;
    assert_eq!(
        (&body["broker"], &body["store"]),
        (&json!(false), &json!(true)),
        "{body}"
    );
    // And why, naming the node it cannot reach (password hidden), once an attempt failed.
    let port = proxy
        .amqp_url()
        .rsplit_once(':')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let shown = format!("amqp://guest:***@127.0.0.1:{port}/");
    let started = Instant::now();
    loop {
        let ready = bridge.http.get(bridge.url("/readyz")).send().await.unwrap();
        let body: Value = ready.json_value().await;
        let error = body["broker_endpoints"]["error"]
            .as_str()
            .unwrap_or_default();
        if error.starts_with(&shown) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no error naming {shown} in {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = bridge
        .post_json("central", "central-secret", &batch("late", 0, 3))
        .await;
    assert_eq!(status, 503, "{body}");
    proxy.restore();
    bridge.wait_ready(Duration::from_secs(30)).await;
    let (status, body) = bridge
        .post_json("central", "central-secret", &batch("late", 3, 3))
        .await;
    assert_eq!(status, 202, "{body}");
    eventually(Duration::from_secs(20), "3 changes delivered", || {
        target.count() == 3
    })
    .await;
    bridge.finish().await;
}

/// Sends SIGTERM to the lxbridge binary while thousands of changes are in flight.
async fn sigterm_under_load_exits_zero_and_loses_nothing(backend: Backend) {
    let target = Target::start().await;
    // A slow target keeps most changes queued when SIGTERM comes.
    target
        .inner
        .delay_ms
        .store(20, std::sync::atomic::Ordering::SeqCst);
    let (path, parsed, base) = binary_config(backend, &target, "sigterm");
    let http = reqwest::Client::new();

    let mut child = spawn_binary(&path);
    wait_binary_ready(&http, &base).await;
    let mut accepted: HashSet<String> = HashSet::new();
    for r in 0..50 {
        let resp = http
            .post(format!("{base}/api/v1/nodes/central/changes"))
            .bearer_auth("central-secret")
            .header("content-type", "application/json")
            .body(batch("t", r * 100, 100).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
        accepted.extend(accepted_ids(&resp.json_value().await));
    }
    assert_eq!(accepted.len(), 5000);
    assert!(
        target.count() < 5000,
        "changes still in flight when SIGTERM is sent"
    );
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(15),
            "lxbridge did not exit within the grace period"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    let delivered_before_restart = target.count();
    assert!(
        delivered_before_restart < 5000,
        "SIGTERM came while changes were in flight"
    );

    let mut child = spawn_binary(&path);
    wait_binary_ready(&http, &base).await;
    target
        .inner
        .delay_ms
        .store(0, std::sync::atomic::Ordering::SeqCst);
    eventually(
        Duration::from_secs(60),
        "all 5000 changes delivered after restart",
        || target.distinct_ids().len() == 5000,
    )
    .await;
    let got = target.distinct_ids();
    assert!(accepted.iter().all(|id| got.contains(id)));
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    cleanup(&parsed).await;
}

/// A started lxbridge binary, killed if the test ends (or fails) without stopping it.
struct Child(std::process::Child);

impl std::ops::Deref for Child {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Child {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A config file for the lxbridge binary on a free port: its path, the parsed config (for
/// cleanup) and the base URL.
fn binary_config(
    backend: Backend,
    target: &Target,
    name: &str,
) -> (std::path::PathBuf, lxbridge::config::Config, String) {
    let prefix = unique_prefix(name);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = render(backend, &config(target), &prefix, AMQP_URL)
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let path = std::env::temp_dir().join(format!("{prefix}.toml"));
    std::fs::write(&path, &text).unwrap();
    let parsed = lxbridge::config::Config::parse(&text, "t").unwrap();
    (path, parsed, format!("http://127.0.0.1:{port}"))
}

/// Starts the lxbridge binary on a config file.
fn spawn_binary(path: &std::path::Path) -> Child {
    Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_lxbridge"))
            .args(["run", "--config"])
            .arg(path)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("lxbridge binary starts"),
    )
}

async fn wait_binary_ready(http: &reqwest::Client, base: &str) {
    let start = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "binary not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// kill -9 while a client is posting as fast as it can: every change answered 202 before the
/// kill is delivered after a restart (the embedded backend's fsync at commit, RabbitMQ's
/// publisher confirms).
async fn kill_9_under_load_loses_nothing_accepted(backend: Backend) {
    let target = Target::start().await;
    target
        .inner
        .delay_ms
        .store(20, std::sync::atomic::Ordering::SeqCst);
    let (path, parsed, base) = binary_config(backend, &target, "kill9");
    let http = reqwest::Client::new();

    let mut child = spawn_binary(&path);
    wait_binary_ready(&http, &base).await;
    // Two clients post batches of 50 until the process dies under them.
    let accepted = Arc::new(Mutex::new(HashSet::<String>::new()));
    let mut clients = Vec::new();
    for c in 0..2 {
        let (http, base, accepted) = (http.clone(), base.clone(), accepted.clone());
        clients.push(tokio::spawn(async move {
            for r in 0.. {
                let sent = http
                    .post(format!("{base}/api/v1/nodes/central/changes"))
                    .bearer_auth("central-secret")
                    .header("content-type", "application/json")
                    .body(batch(&format!("k{c}"), r * 50, 50).to_string())
                    .send()
                    .await;
                let Ok(resp) = sent else { break };
                if resp.status().as_u16() != 202 {
                    break;
                }
                let Ok(text) = resp.text().await else { break };
                let answer: Value = serde_json::from_str(&text).unwrap();
                accepted.lock().unwrap().extend(accepted_ids(&answer));
            }
        }));
    }
    eventually(Duration::from_secs(30), "2,000 changes accepted", || {
        accepted.lock().unwrap().len() >= 2000
    })
    .await;
    let kill = std::process::Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed, not exited: {status:?}");
    for c in clients {
        c.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let before = target.distinct_ids();
    assert!(
        before.len() < accepted.len(),
        "changes were still in flight at the kill ({} of {} delivered)",
        before.len(),
        accepted.len()
    );

    let mut child = spawn_binary(&path);
    wait_binary_ready(&http, &base).await;
    target
        .inner
        .delay_ms
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let restarted = Instant::now();
    loop {
        let got = target.distinct_ids();
        let missing: Vec<&String> = accepted.iter().filter(|id| !got.contains(*id)).collect();
        if missing.is_empty() {
            break;
        }
        if restarted.elapsed() > Duration::from_secs(60) {
            let sample = missing[0].clone();
            let object = http
                .get(format!("{base}/api/v1/objects/r-{sample}"))
                .bearer_auth("admin-secret")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            panic!(
                "{} of {} accepted changes never delivered after the restart, e.g. {sample}: {object}",
                missing.len(),
                accepted.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    cleanup(&parsed).await;
}

both_backends!(
    sigterm_under_load_exits_zero_and_loses_nothing,
    kill_9_under_load_loses_nothing_accepted,
);

trait JsonValue {
    async fn json_value(self) -> Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> Value {
        let text = self.text().await.unwrap();
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    }
}
