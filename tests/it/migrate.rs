//! `lxbridge export` / `lxbridge import`: pending and dead changes carried from one backend
//! to the other through the real binary, then delivered (pending) or listed and replayed
//! (dead) by an lxbridge on the new backend.

use crate::common::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lxbridge");
const WAIT: Duration = Duration::from_secs(40);

/// One retry step of an hour: a change that fails with `retry: true` waits there for the
/// whole test.
fn template(target_url: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[broker]
url = "{{amqp}}"
prefix = "{{prefix}}"
[store]
redis_url = "{{redis}}"
[admin]
token = "admin-secret"
[retry]
delays = ["1h"]
[[node]]
name = "central"
token = "central-secret"
[[node]]
name = "shop"
token = "shop-secret"
deliver = {{ mode = "push", url = "{target_url}", batch_max = 2, concurrency = 1, timeout = "2s" }}
[[route]]
from = "central"
to = ["shop"]
"#
    )
}

fn change(id: &str) -> Value {
    json!({"id": id, "type": "Catalog.X", "ref": id, "data": {"id": id}})
}

/// Writes the rendered config where the CLI can read it.
fn config_file(backend: Backend, template: &str, prefix: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{prefix}.toml"));
    std::fs::write(&path, render(backend, template, prefix, AMQP_URL)).unwrap();
    path
}

fn lxbridge(args: &[&str], config: &Path, stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("LXBRIDGE_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a blocking CLI call without stalling the runtime that serves the target.
async fn lxbridge_async(args: &[&str], config: &Path, stdin: Option<Vec<u8>>) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lxbridge(&args, &config, stdin.as_deref())
    })
    .await
    .unwrap()
}

async fn wait_metric(bridge: &Bridge, line: &str) {
    let start = Instant::now();
    loop {
        if bridge.metrics().await.lines().any(|l| l == line) {
            return;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {line}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn by_id(lines: &[Value]) -> HashMap<String, Value> {
    lines
        .iter()
        .map(|l| (l["body"]["id"].as_str().unwrap().to_string(), l.clone()))
        .collect()
}

/// Changes wait in every place a backend holds them: dead (`retry: false`), in the retry
/// step (`retry: true`, then the whole batch failing with 503 before the breaker opens), and
/// in the delivery queue (held by the open breaker). Exported from `from`, imported into
/// `to`, each pending change arrives exactly once and the dead ones are in the new DLQ.
async fn carry(from: Backend, to: Backend) {
    let target = Target::start().await;
    target.set_verdict(|c| {
        let id = c["id"].as_str().unwrap();
        if id.starts_with("dead") {
            Some(("INN is invalid".to_string(), false))
        } else if id.starts_with("later") {
            Some(("warehouse busy".to_string(), true))
        } else {
            None
        }
    });
    let template = template(&target.url());
    let from_prefix = unique_prefix("migrate-from");
    let mut source = Bridge::start_with(from, &from_prefix, &template, AMQP_URL, true).await;
    let (status, body) = source
        .post_json(
            "central",
            "central-secret",
            &json!([
                change("dead-1"),
                change("later-1"),
                change("ok-1"),
                change("dead-2"),
                change("later-2")
            ]),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    wait_metric(&source, "lx_dlq_messages{target=\"shop\"} 2").await;
    wait_metric(&source, "lx_retry_messages{target=\"shop\"} 2").await;
    assert_eq!(target.distinct_ids(), HashSet::from(["ok-1".to_string()]));

    // The target goes down: the first batches walk to the retry step, then the breaker
    // opens and holds the rest in the delivery queue.
    target.set_status(503);
    let pending: Vec<Value> = (0..20).map(|i| change(&format!("pend-{i:02}"))).collect();
    let (status, body) = source
        .post_json("central", "central-secret", &Value::Array(pending))
        .await;
    assert_eq!(status, 202, "{body}");
    wait_metric(&source, "lx_breaker_open{target=\"shop\"} 1").await;

    // Export refuses while lxbridge runs.
    let from_file = config_file(from, &template, &from_prefix);
    let out = lxbridge_async(&["export"], &from_file, None).await;
    assert!(
        !out.status.success(),
        "export ran beside a running lxbridge"
    );
    let why = stderr(&out);
    match from {
        Backend::Rabbit => assert!(why.contains("stop lxbridge before exporting"), "{why}"),
        Backend::Embedded => assert!(why.contains("in use by another process"), "{why}"),
    }
    source.stop().await;

    // Export: RabbitMQ to a file, embedded to stdout.
    let export_path = std::env::temp_dir().join(format!("{from_prefix}.ndjson"));
    let out = match from {
        Backend::Rabbit => {
            let out = lxbridge_async(
                &["export", "--out", export_path.to_str().unwrap()],
                &from_file,
                None,
            )
            .await;
            assert!(out.stdout.is_empty());
            out
        }
        Backend::Embedded => lxbridge_async(&["export"], &from_file, None).await,
    };
    assert!(out.status.success(), "export failed: {}", stderr(&out));
    let exported = match from {
        Backend::Rabbit => std::fs::read_to_string(&export_path).unwrap(),
        Backend::Embedded => String::from_utf8(out.stdout.clone()).unwrap(),
    };
    let lines = parse_lines(&exported);
    let count = |q: &str| lines.iter().filter(|l| l["queue"] == q).count();
    let (deliver, retry, dlq) = (count("deliver"), count("retry"), count("dlq"));
    assert_eq!(deliver + retry + dlq, 24, "{exported}");
    assert_eq!(dlq, 2, "{exported}");
    assert!(
        retry >= 4,
        "later-1, later-2 and the pend batches before the breaker opened: {exported}"
    );
    assert!(
        deliver >= 1,
        "the breaker held some in the delivery queue: {exported}"
    );
    let summary = format!("shop: exported 24 changes: {deliver} deliver, {retry} retry, 2 dlq");
    assert!(stderr(&out).contains(&summary), "{}", stderr(&out));
    assert!(lines.iter().all(|l| l["target"] == "shop"));
    let lines_by_id = by_id(&lines);
    let later = &lines_by_id["later-1"];
    assert_eq!(later["queue"], "retry", "{later}");
    assert_eq!(later["attempt"], 2, "{later}");
    assert_eq!(later["error"], "warehouse busy", "{later}");
    assert_eq!(later["alone"], false, "{later}");
    assert!(later["first_failed_ms"].as_i64().unwrap() > 0, "{later}");
    assert_eq!(
        later["body"]["data"],
        json!({"id": "later-1"}),
        "the envelope as JSON"
    );
    let walked: Vec<&Value> = lines
        .iter()
        .filter(|l| l["queue"] == "retry" && l["body"]["id"].as_str().unwrap().starts_with("pend"))
        .collect();
    assert!(!walked.is_empty());
    for l in &walked {
        assert_eq!(l["alone"], true, "its whole batch failed: {l}");
        assert!(l["error"].as_str().unwrap().contains("HTTP 503"), "{l}");
    }
    let dead = &lines_by_id["dead-1"];
    assert_eq!(dead["queue"], "dlq");
    assert_eq!(dead["attempt"], 1);
    assert_eq!(dead["error"], "INN is invalid");
    assert_eq!(dead["source"], "central");
    assert_eq!(dead["type"], "Catalog.X");
    assert_eq!(dead["ref"], "dead-1");
    assert!(dead["dead_at_ms"].as_i64().unwrap() > 0, "{dead}");
    assert!(dead["first_failed_ms"].as_i64().unwrap() > 0, "{dead}");
    for l in lines.iter().filter(|l| l["queue"] == "deliver") {
        assert_eq!(l["attempt"], 1, "{l}");
        assert_eq!(l["first_failed_ms"], Value::Null, "{l}");
    }

    // Exporting copies: a second export finds the same.
    let again = lxbridge_async(&["export"], &from_file, None).await;
    assert!(again.status.success(), "{}", stderr(&again));
    let sorted = |text: &str| {
        let mut v: Vec<String> = text.lines().map(str::to_string).collect();
        v.sort();
        v
    };
    assert_eq!(
        sorted(&String::from_utf8(again.stdout).unwrap()),
        sorted(&exported),
        "export changed what it exported"
    );

    // Import into a fresh backend of the other kind: embedded from a file, RabbitMQ from
    // stdin.
    let to_prefix = unique_prefix("migrate-to");
    let to_file = config_file(to, &template, &to_prefix);
    let out = match to {
        Backend::Embedded => {
            lxbridge_async(
                &["import", "--in", export_path.to_str().unwrap()],
                &to_file,
                None,
            )
            .await
        }
        Backend::Rabbit => {
            lxbridge_async(&["import"], &to_file, Some(exported.clone().into_bytes())).await
        }
    };
    assert!(out.status.success(), "import failed: {}", stderr(&out));
    let summary = format!("shop: imported 24 changes: {deliver} deliver, {retry} retry, 2 dlq");
    assert!(stderr(&out).contains(&summary), "{}", stderr(&out));

    // The target is back; lxbridge runs on the new backend.
    target.set_status(0);
    target.set_verdict(|_| None);
    let dest = Bridge::start_with(to, &to_prefix, &template, AMQP_URL, true).await;
    let mut expected: HashSet<String> = (0..20).map(|i| format!("pend-{i:02}")).collect();
    expected.insert("later-1".into());
    expected.insert("later-2".into());
    eventually(WAIT, "every pending change delivered", || {
        expected.is_subset(&target.distinct_ids())
    })
    .await;
    let (status, listed) = dest.admin_get("/api/v1/dlq/shop?limit=10").await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["count"], 2, "{listed}");
    let items = listed["items"].as_array().unwrap();
    let dead_ids: HashSet<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(dead_ids, HashSet::from(["dead-1", "dead-2"]));
    for item in items {
        assert_eq!(item["error"], "INN is invalid", "{item}");
        assert_eq!(item["source"], "central", "{item}");
        assert_eq!(item["type"], "Catalog.X", "{item}");
        assert_eq!(item["ref"], item["id"], "{item}");
        assert_eq!(item["attempts"], 1, "{item}");
        assert!(item["dead_at"].as_str().unwrap().ends_with('Z'), "{item}");
    }
    // No duplicates, nothing redelivered that was delivered before the move.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let counts = target.id_counts();
    for id in &expected {
        assert_eq!(counts[id], 1, "{id} arrived {} times", counts[id]);
    }
    assert_eq!(
        counts["ok-1"], 1,
        "ok-1 was delivered once, before the move"
    );
    let later = target
        .received()
        .into_iter()
        .find(|r| r.change["id"] == "later-1")
        .unwrap();
    assert_eq!(later.change["attempt"], 2, "the attempt travelled with it");

    // The dead changes replay on the new backend.
    let (status, body) = admin(
        &dest,
        reqwest::Method::POST,
        "/api/v1/dlq/shop/replay",
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (status, body.clone()),
        (200, json!({"replayed": 2})),
        "{body}"
    );
    eventually(WAIT, "the dead changes delivered after replay", || {
        let ids = target.distinct_ids();
        ids.contains("dead-1") && ids.contains("dead-2")
    })
    .await;

    dest.finish().await;
    cleanup(&source.config).await;
    for f in [&from_file, &to_file, &export_path] {
        let _ = std::fs::remove_file(f);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_to_embedded_carries_pending_and_dead_changes() {
    carry(Backend::Rabbit, Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_to_rabbitmq_carries_pending_and_dead_changes() {
    carry(Backend::Embedded, Backend::Rabbit).await;
}

/// A file with bad lines is refused, every bad line named, and nothing of it is imported.
async fn malformed_import_is_refused_naming_the_line_and_imports_nothing(backend: Backend) {
    let target = Target::start().await;
    let template = template(&target.url());
    let prefix = unique_prefix("migrate-bad");
    let file = config_file(backend, &template, &prefix);
    let good = |id: &str| {
        json!({"target": "shop", "queue": "deliver", "attempt": 1, "first_failed_ms": null,
               "alone": false, "error": null,
               "body": {"id": id, "type": "Catalog.X", "ref": id, "op": "upsert",
                        "data": {}, "source": "central", "seq": 1, "accepted_ms": 1}})
        .to_string()
    };
    let text = [
        good("g-1"),
        json!({"target": "nowhere", "queue": "deliver", "attempt": 1, "body": {}}).to_string(),
        good("g-2"),
        "{\"target\": \"shop\", \"queue\": ".to_string(),
        json!({"target": "shop", "queue": "dlq", "attempt": 1, "error": "x", "body": {}})
            .to_string(),
    ]
    .join("\n");
    let out = lxbridge_async(&["import"], &file, Some(text.into_bytes())).await;
    assert!(!out.status.success(), "a malformed file was imported");
    let why = stderr(&out);
    assert!(why.contains("nothing imported"), "{why}");
    assert!(
        why.contains("line 2: unknown target \"nowhere\" (this config's targets: shop)"),
        "{why}"
    );
    assert!(why.contains("line 4: not an export line"), "{why}");
    assert!(
        why.contains("line 5: a dlq line needs source, type, ref, dead_at_ms"),
        "{why}"
    );
    assert!(!why.contains("line 1") && !why.contains("line 3"), "{why}");

    // Nothing arrived: an lxbridge on that backend delivers nothing and has no dead change.
    let mut bridge = Bridge::start_with(backend, &prefix, &template, AMQP_URL, true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(target.count(), 0, "{:?}", target.received());
    let (status, listed) = bridge.admin_get("/api/v1/dlq/shop").await;
    assert_eq!(
        (status, listed["count"].clone()),
        (200, json!(0)),
        "{listed}"
    );
    bridge.stop().await;
    let out = lxbridge_async(&["export"], &file, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr(&out).contains("shop: exported 0 changes: 0 deliver, 0 retry, 0 dlq"),
        "{}",
        stderr(&out)
    );
    cleanup(&bridge.config).await;
    let _ = std::fs::remove_file(&file);
}

both_backends!(malformed_import_is_refused_naming_the_line_and_imports_nothing);
