//! Pull delivery: a node polls its inbox and confirms, as the 1C module in clients/1c/ does
//! (GET …/inbox, POST …/inbox/ack with per-change results).

use crate::common::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

fn config(lease: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"
[broker]
url = "{{amqp}}"
prefix = "{{prefix}}"
[store]
redis_url = "{{redis}}"
[admin]
token = "admin-secret"
[retry]
delays = ["100ms", "100ms"]
[[node]]
name = "central"
token = "central-secret"
[[node]]
name = "branch"
token = "branch-secret"
deliver = {{ mode = "pull", batch_max = 100, lease = "{lease}" }}
[[route]]
from = "central"
to = ["branch"]
"#
    )
}

/// The node's side of the protocol, over plain HTTP.
struct Node {
    http: reqwest::Client,
    base: String,
}

impl Node {
    fn new(base: &str) -> Node {
        Node {
            http: reqwest::Client::new(),
            base: base.to_string(),
        }
    }

    async fn poll(&self, limit: usize, wait: u64) -> Value {
        let resp = self
            .http
            .get(format!(
                "{}/api/v1/nodes/branch/inbox?limit={limit}&wait={wait}",
                self.base
            ))
            .basic_auth("branch", Some("branch-secret"))
            .send()
            .await
            .expect("inbox answers");
        assert_eq!(resp.status().as_u16(), 200);
        serde_json::from_str(&resp.text().await.unwrap()).unwrap()
    }

    async fn ack(&self, message_no: i64, results: Option<Value>) -> (u16, Value) {
        let mut body = json!({ "message_no": message_no });
        if let Some(r) = results {
            body["results"] = r;
        }
        let resp = self
            .http
            .post(format!("{}/api/v1/nodes/branch/inbox/ack", self.base))
            .bearer_auth("branch-secret")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("ack answers");
        let status = resp.status().as_u16();
        (
            status,
            serde_json::from_str(&resp.text().await.unwrap()).unwrap(),
        )
    }
}

fn changes(prefix: &str, n: usize) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"id": format!("{prefix}-{i}"), "type": "Catalog.X", "ref": format!("{prefix}-r{i}"), "data": {"i": i}}))
            .collect(),
    )
}

fn ids(message: &Value) -> Vec<String> {
    message["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

async fn node_receives_everything_through_inbox_and_ack_with_lease_and_numbering(backend: Backend) {
    let bridge = Bridge::start(backend, "pull", &config("1s")).await;
    let node = Node::new(&format!("http://{}", bridge.addr));
    // Nothing there: the poll waits, then answers an empty message.
    let started = Instant::now();
    let empty = node.poll(100, 1).await;
    assert_eq!(empty, json!({"message_no": null, "changes": []}));
    assert!(started.elapsed() >= Duration::from_millis(900));

    assert_eq!(
        bridge
            .post_json("central", "central-secret", &changes("p", 250))
            .await
            .0,
        202
    );
    let first = node.poll(100, 5).await;
    let n = first["message_no"].as_i64().unwrap();
    assert!(!ids(&first).is_empty());
    let c = &first["changes"][0];
    for field in [
        "id", "type", "ref", "op", "data", "source", "seq", "attempt",
    ] {
        assert!(c.get(field).is_some(), "{field} missing in {c}");
    }
    // Until confirmed, the same message comes back.
    assert_eq!(node.poll(100, 5).await, first);
    // After the lease it is offered again, same changes, a new (larger) number.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let again = node.poll(100, 5).await;
    let m = again["message_no"].as_i64().unwrap();
    assert!(m > n, "{m} > {n}");
    assert_eq!(ids(&again), ids(&first));
    // A number never sent is refused; the first number still confirms the message.
    let (status, body) = node.ack(m + 100, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("never sent"));
    let (status, body) = node.ack(n, None).await;
    assert_eq!(
        (status, body["confirmed"].as_u64().unwrap() as usize),
        (200, ids(&first).len())
    );
    // Confirming it again confirms nothing.
    assert_eq!(node.ack(m, None).await.1, json!({"confirmed": 0}));

    let mut seen: Vec<String> = ids(&first);
    let mut last_no = m;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 250 {
        assert!(
            Instant::now() < deadline,
            "only {} of 250 arrived",
            seen.len()
        );
        let msg = node.poll(100, 2).await;
        if msg["message_no"].is_null() {
            continue;
        }
        let no = msg["message_no"].as_i64().unwrap();
        assert!(no > last_no, "message numbers grow: {no} after {last_no}");
        last_no = no;
        seen.extend(ids(&msg));
        let (status, _) = node.ack(no, None).await;
        assert_eq!(status, 200);
    }
    let distinct: HashSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), 250, "each change once");
    assert_eq!(seen.len(), 250, "nothing twice after an ack");
    assert_eq!(node.poll(100, 1).await["message_no"], Value::Null);
    let (_, object) = bridge.admin_get("/api/v1/objects/p-r7").await;
    assert_eq!(object["targets"][0]["state"], "delivered", "{object}");
    let metrics = bridge.metrics().await;
    assert!(
        metrics.contains("lx_end_to_end_seconds_count{target=\"branch\"} 250"),
        "{metrics}"
    );
    assert!(metrics.contains("lx_inflight{target=\"branch\"} 0"));
    // Wrong credentials and a node that doesn't pull.
    let resp = node
        .http
        .get(format!("http://{}/api/v1/nodes/branch/inbox", bridge.addr))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .expect("a Basic challenge for 1C");
    assert!(challenge.to_str().unwrap().starts_with("Basic "));
    let resp = node
        .http
        .get(format!(
            "http://{}/api/v1/nodes/central/inbox?wait=0",
            bridge.addr
        ))
        .bearer_auth("central-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    bridge.finish().await;
}

async fn per_change_error_in_an_ack_retries_then_dead_letters_and_the_rest_are_done(
    backend: Backend,
) {
    let bridge = Bridge::start(backend, "pullerr", &config("60s")).await;
    let node = Node::new(&format!("http://{}", bridge.addr));
    assert_eq!(
        bridge
            .post_json("central", "central-secret", &changes("e", 5))
            .await
            .0,
        202
    );
    let mut confirmed_ok: HashMap<String, usize> = HashMap::new();
    let mut bad_attempts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "bad change never dead-lettered");
        let msg = node.poll(100, 1).await;
        if msg["message_no"].is_null() {
            let (_, dlq) = bridge.admin_get("/api/v1/dlq/branch").await;
            if dlq["count"] == 1 {
                assert_eq!(dlq["items"][0]["id"], "e-2");
                assert_eq!(dlq["items"][0]["error"], "warehouse is closed");
                assert_eq!(dlq["items"][0]["attempts"], 3);
                break;
            }
            continue;
        }
        let mut results = Vec::new();
        for c in msg["changes"].as_array().unwrap() {
            let id = c["id"].as_str().unwrap().to_string();
            if id == "e-2" {
                bad_attempts.push(c["attempt"].as_i64().unwrap());
                results.push(json!({"id": id, "status": "error", "error": "warehouse is closed", "retry": true}));
            } else {
                *confirmed_ok.entry(id.clone()).or_default() += 1;
                results.push(json!({"id": id, "status": "ok"}));
            }
        }
        let (status, _) = node
            .ack(
                msg["message_no"].as_i64().unwrap(),
                Some(Value::Array(results)),
            )
            .await;
        assert_eq!(status, 200);
    }
    assert_eq!(bad_attempts, vec![1, 2, 3]);
    assert_eq!(confirmed_ok.len(), 4);
    assert!(confirmed_ok.values().all(|&n| n == 1), "{confirmed_ok:?}");
    let (_, object) = bridge.admin_get("/api/v1/objects/e-r2").await;
    let events: Vec<&str> = object["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        vec!["accepted", "failed", "failed", "failed", "dead"]
    );
    bridge.finish().await;
}

async fn two_concurrent_pollers_never_get_one_change_in_two_messages(backend: Backend) {
    let bridge = Bridge::start(backend, "pull2", &config("60s")).await;
    let base = format!("http://{}", bridge.addr);
    assert_eq!(
        bridge
            .post_json("central", "central-secret", &changes("c", 400))
            .await
            .0,
        202
    );
    let poller = |base: String| {
        tokio::spawn(async move {
            let node = Node::new(&base);
            let mut got: Vec<(i64, Vec<String>)> = Vec::new();
            let mut idle = 0;
            while idle < 2 {
                let msg = node.poll(50, 1).await;
                if msg["message_no"].is_null() {
                    idle += 1;
                    continue;
                }
                idle = 0;
                let no = msg["message_no"].as_i64().unwrap();
                got.push((no, ids(&msg)));
                tokio::time::sleep(Duration::from_millis(5)).await;
                let (status, _) = node.ack(no, None).await;
                assert_eq!(status, 200);
            }
            got
        })
    };
    let (a, b) = (poller(base.clone()), poller(base));
    let mut by_change: HashMap<String, HashSet<i64>> = HashMap::new();
    for (no, ids) in a.await.unwrap().into_iter().chain(b.await.unwrap()) {
        for id in ids {
            by_change.entry(id).or_default().insert(no);
        }
    }
    assert_eq!(by_change.len(), 400, "none lost");
    let split: Vec<_> = by_change.iter().filter(|(_, nos)| nos.len() > 1).collect();
    assert!(
        split.is_empty(),
        "changes handed out in two different messages: {split:?}"
    );
    bridge.finish().await;
}

/// lxbridge stopped between poll and ack, by SIGTERM and by kill -9: nothing is lost and
/// nothing confirmed comes again.
async fn restart_between_poll_and_ack_loses_nothing(backend: Backend) {
    let prefix = unique_prefix("pullrestart");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = render(backend, &config("60s"), &prefix, AMQP_URL)
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let path = std::env::temp_dir().join(format!("{prefix}.toml"));
    std::fs::write(&path, &text).unwrap();
    let parsed = lxbridge::config::Config::parse(&text, "t").unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let node = Node::new(&base);
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_lxbridge"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let ready = || async {
        let start = Instant::now();
        loop {
            if let Ok(r) = reqwest::get(format!("{base}/readyz")).await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(30), "not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut child = spawn();
    ready().await;
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/api/v1/nodes/central/changes"))
        .bearer_auth("central-secret")
        .header("content-type", "application/json")
        .body(changes("k", 120).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);

    let mut confirmed: Vec<String> = Vec::new();
    for signal in ["-TERM", "-KILL"] {
        // Poll, don't ack, stop lxbridge.
        let msg = node.poll(50, 5).await;
        let n = msg["message_no"].as_i64().unwrap();
        let unconfirmed = ids(&msg);
        assert!(!unconfirmed.is_empty());
        std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        if signal == "-TERM" {
            assert!(status.success(), "SIGTERM exits 0: {status:?}");
        }
        child = spawn();
        ready().await;
        // The old number confirms nothing: its changes come again under a larger number.
        assert_eq!(node.ack(n, None).await.1, json!({"confirmed": 0}));
        // Its changes come again under larger numbers: in the next message, unless the
        // broker puts the returned ones behind others (RabbitMQ may, under load).
        let mut last = n;
        let mut offered: HashSet<String> = HashSet::new();
        for _ in 0..4 {
            let again = node.poll(50, 5).await;
            let m = again["message_no"].as_i64().unwrap();
            assert!(m > last, "numbers grow across restarts: {m} > {last}");
            last = m;
            let again_ids: Vec<String> = ids(&again);
            let (_, body) = node.ack(m, None).await;
            assert_eq!(
                body["confirmed"].as_u64().unwrap() as usize,
                again_ids.len()
            );
            offered.extend(again_ids.iter().cloned());
            confirmed.extend(again_ids);
            if unconfirmed.iter().all(|id| offered.contains(id)) {
                break;
            }
        }
        assert!(
            unconfirmed.iter().all(|id| offered.contains(id)),
            "unconfirmed changes offered again"
        );
    }
    // The rest, then nothing more.
    loop {
        let msg = node.poll(50, 1).await;
        if msg["message_no"].is_null() {
            break;
        }
        confirmed.extend(ids(&msg));
        node.ack(msg["message_no"].as_i64().unwrap(), None).await;
    }
    let distinct: HashSet<&String> = confirmed.iter().collect();
    assert_eq!(distinct.len(), 120, "nothing lost");
    assert_eq!(confirmed.len(), 120, "nothing confirmed came again");
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    cleanup(&parsed).await;
}

both_backends!(
    node_receives_everything_through_inbox_and_ack_with_lease_and_numbering,
    per_change_error_in_an_ack_retries_then_dead_letters_and_the_rest_are_done,
    two_concurrent_pollers_never_get_one_change_in_two_messages,
    restart_between_poll_and_ack_loses_nothing,
);
