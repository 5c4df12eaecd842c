//! Per-object failure handling: retry steps, the DLQ and its admin API, the circuit breaker,
//! poison changes, and the store going away.

use crate::common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

fn config(target_url: &str) -> String {
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
delays = ["100ms", "200ms", "400ms"]
[[node]]
name = "central"
token = "central-secret"
[[node]]
name = "shop"
token = "shop-secret"
deliver = {{ mode = "push", url = "{target_url}", batch_max = 20, concurrency = 2, timeout = "2s" }}
[[route]]
from = "central"
to = ["shop"]
"#
    )
}

fn change(id: &str, reference: &str) -> Value {
    json!({"id": id, "type": "Catalog.X", "ref": reference, "data": {"id": id}})
}

fn events_for(object: &Value, target: &str) -> Vec<String> {
    object["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["target"] == target)
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect()
}

async fn always_failing_change_dies_with_its_error_then_replay_delivers_it(backend: Backend) {
    let target = Target::start().await;
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    target.set_verdict(move |c| {
        (c["ref"] == "x" && b.load(Ordering::SeqCst))
            .then(|| ("no such warehouse 42".to_string(), true))
    });
    let bridge = Bridge::start(backend, "dlq", &config(&target.url())).await;
    let (status, _) = bridge
        .post_json(
            "central",
            "central-secret",
            &json!([change("x-1", "x"), change("ok-1", "ok")]),
        )
        .await;
    assert_eq!(status, 202);

    let mut listed = Value::Null;
    let start = Instant::now();
    while start.elapsed() < WAIT {
        let (s, body) = admin(
            &bridge,
            reqwest::Method::GET,
            "/api/v1/dlq/shop?limit=10",
            None,
        )
        .await;
        assert_eq!(s, 200, "{body}");
        if body["count"] == 1 {
            listed = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        listed["target"], "shop",
        "X never reached the DLQ: {listed}"
    );
    let item = &listed["items"][0];
    assert_eq!(item["id"], "x-1");
    assert_eq!(item["ref"], "x");
    assert_eq!(item["type"], "Catalog.X");
    assert_eq!(item["source"], "central");
    assert_eq!(item["attempts"], 4, "3 retry steps + the first attempt");
    assert_eq!(item["error"], "no such warehouse 42");
    assert!(item["dead_at"].as_str().unwrap().ends_with('Z'));
    // Listing leaves the item in place.
    assert_eq!(bridge.dlq_len("shop").await, 1);
    assert_eq!(target.distinct_ids(), HashSet::from(["ok-1".to_string()]));

    let (_, object) = bridge.admin_get("/api/v1/objects/x").await;
    assert_eq!(
        events_for(&object, "shop"),
        vec!["failed", "failed", "failed", "failed", "dead"],
        "{object}"
    );
    assert_eq!(object["targets"][0]["state"], "dead");
    assert_eq!(object["targets"][0]["last_error"], "no such warehouse 42");
    eventually(Duration::from_secs(15), "lx_dlq_messages shows 1", || {
        let m = futures_lite_block(bridge.metrics());
        m.contains("lx_dlq_messages{target=\"shop\"} 1")
    })
    .await;

    // The operator fixes the target and replays everything.
    broken.store(false, Ordering::SeqCst);
    let (s, body) = admin(
        &bridge,
        reqwest::Method::POST,
        "/api/v1/dlq/shop/replay",
        Some(json!({})),
    )
    .await;
    assert_eq!((s, body.clone()), (200, json!({"replayed": 1})), "{body}");
    eventually(WAIT, "x delivered after replay", || {
        target.distinct_ids().contains("x-1")
    })
    .await;
    let x = target
        .received()
        .into_iter()
        .find(|r| r.change["id"] == "x-1")
        .unwrap();
    assert_eq!(x.change["attempt"], 1, "replay starts again at attempt 1");
    let (_, body) = admin(&bridge, reqwest::Method::GET, "/api/v1/dlq/shop", None).await;
    assert_eq!(body["count"], 0);
    let (_, object) = bridge.admin_get("/api/v1/objects/x").await;
    let events = events_for(&object, "shop");
    assert_eq!(
        &events[events.len() - 2..],
        ["replayed", "delivered"],
        "history kept: {events:?}"
    );
    assert_eq!(object["targets"][0]["state"], "delivered");

    // Bad admin calls.
    let (s, _) = admin(&bridge, reqwest::Method::GET, "/api/v1/dlq/central", None).await;
    assert_eq!(s, 404, "central receives nothing");
    let (s, body) = admin(
        &bridge,
        reqwest::Method::POST,
        "/api/v1/dlq/shop/replay",
        Some(json!({"idz": []})),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    let resp = bridge
        .http
        .get(bridge.url("/api/v1/dlq/shop"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    bridge.finish().await;
}

/// Blocks on a future from a sync closure (for `eventually`).
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

async fn retry_false_dead_letters_at_once_and_purge_by_id_removes_exactly_that_one(
    backend: Backend,
) {
    let target = Target::start().await;
    target.set_verdict(|c| {
        c["ref"]
            .as_str()
            .unwrap()
            .starts_with("reject")
            .then(|| ("INN is invalid".to_string(), false))
    });
    let bridge = Bridge::start(backend, "noretry", &config(&target.url())).await;
    let (status, _) = bridge
        .post_json(
            "central",
            "central-secret",
            &json!([
                change("r-1", "reject-1"),
                change("r-2", "reject-2"),
                change("g-1", "good")
            ]),
        )
        .await;
    assert_eq!(status, 202);
    let start = Instant::now();
    while bridge.dlq_len("shop").await < 2 {
        assert!(start.elapsed() < WAIT, "two changes never reached the DLQ");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = admin(&bridge, reqwest::Method::GET, "/api/v1/dlq/shop", None).await;
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert!(
        items
            .iter()
            .all(|i| i["attempts"] == 1 && i["error"] == "INN is invalid"),
        "{body}"
    );
    let (_, object) = bridge.admin_get("/api/v1/objects/reject-1").await;
    assert_eq!(events_for(&object, "shop"), vec!["failed", "dead"]);

    let (s, body) = admin(
        &bridge,
        reqwest::Method::DELETE,
        "/api/v1/dlq/shop",
        Some(json!({"ids": ["r-1"]})),
    )
    .await;
    assert_eq!((s, body), (200, json!({"purged": 1})));
    let (_, body) = admin(&bridge, reqwest::Method::GET, "/api/v1/dlq/shop", None).await;
    assert_eq!(body["count"], 1);
    assert_eq!(body["items"][0]["id"], "r-2", "only r-1 was purged");
    // The CLI prints what the API returns.
    let config_path = std::env::temp_dir().join(format!("{}.toml", bridge.prefix));
    std::fs::write(
        &config_path,
        format!("[server]\nlisten = \"{}\"\n[admin]\ntoken = \"admin-secret\"\n[[node]]\nname = \"a\"\ntoken = \"t\"\n", bridge.addr),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lxbridge"))
        .args(["dlq", "list", "--target", "shop", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, body);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lxbridge"))
        .args(["dlq", "purge", "--target", "shop", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!({"purged": 1})
    );
    let _ = std::fs::remove_file(&config_path);
    assert_eq!(bridge.dlq_len("shop").await, 0);
    bridge.finish().await;
}

async fn poison_change_cannot_block_the_changes_behind_it(backend: Backend) {
    let target = Target::start().await;
    // The target chokes on the whole batch (HTTP 500) whenever the poison is in it.
    let choking = ChokingTarget::start(target.clone()).await;
    let bridge = Bridge::start(backend, "poison", &config(&choking.url())).await;
    let mut batch: Vec<Value> = (0..10)
        .map(|i| change(&format!("a-{i}"), &format!("a-{i}")))
        .collect();
    batch.insert(3, change("p-1", "poison"));
    assert_eq!(
        bridge
            .post_json("central", "central-secret", &Value::Array(batch))
            .await
            .0,
        202
    );
    // Changes sent after the poison keep flowing while it retries.
    for round in 0..5 {
        let more: Vec<Value> = (0..10)
            .map(|i| change(&format!("b-{round}-{i}"), &format!("b-{round}-{i}")))
            .collect();
        assert_eq!(
            bridge
                .post_json("central", "central-secret", &Value::Array(more))
                .await
                .0,
            202
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(WAIT, "all 60 good changes delivered", || {
        target.distinct_ids().len() == 60
    })
    .await;
    assert!(!target.distinct_ids().contains("p-1"));
    let start = Instant::now();
    while bridge.dlq_len("shop").await < 1 {
        assert!(start.elapsed() < WAIT, "poison never reached the DLQ");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = admin(&bridge, reqwest::Method::GET, "/api/v1/dlq/shop", None).await;
    assert_eq!(body["items"][0]["id"], "p-1");
    assert!(
        body["items"][0]["error"]
            .as_str()
            .unwrap()
            .contains("HTTP 500"),
        "{body}"
    );
    bridge.finish().await;
}

/// An HTTP target that answers 500 to a batch containing ref "poison", else forwards to
/// the recording target.
struct ChokingTarget {
    addr: std::net::SocketAddr,
}

impl ChokingTarget {
    async fn start(inner: Target) -> ChokingTarget {
        use axum::routing::post;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = reqwest::Client::new();
        let url = inner.url();
        let app = axum::Router::new().route(
            "/receive",
            post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let client = client.clone();
                    let url = url.clone();
                    async move {
                        let gz = headers.get("content-encoding").is_some_and(|v| v == "gzip");
                        let raw = if gz {
                            use std::io::Read;
                            let mut out = Vec::new();
                            flate2::read::GzDecoder::new(&body[..])
                                .read_to_end(&mut out)
                                .unwrap();
                            out
                        } else {
                            body.to_vec()
                        };
                        if String::from_utf8_lossy(&raw).contains("\"ref\":\"poison\"") {
                            return (
                                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                                "cannot parse".to_string(),
                            );
                        }
                        let resp = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(raw)
                            .send()
                            .await
                            .unwrap();
                        (axum::http::StatusCode::OK, resp.text().await.unwrap())
                    }
                },
            ),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ChokingTarget { addr }
    }

    fn url(&self) -> String {
        format!("http://{}/receive", self.addr)
    }
}

async fn target_down_30s_under_load_opens_the_breaker_and_loses_nothing(backend: Backend) {
    let target = Target::start().await;
    let proxy = Proxy::start(&target.addr.to_string()).await;
    let url = format!("http://{}/receive", proxy.addr);
    let bridge = Bridge::start(backend, "down", &config(&url)).await;
    let accepted = Arc::new(Mutex::new(HashSet::<String>::new()));
    let mut breaker_opened = false;
    let start = Instant::now();
    let mut i = 0;
    let mut up_again = false;
    // Steady load: 10 changes every 100 ms for 36 s; the target is down from 3 s to 33 s.
    proxy.restore();
    while start.elapsed() < Duration::from_secs(36) {
        let t = start.elapsed();
        if t > Duration::from_secs(3) && t < Duration::from_secs(33) {
            proxy.cut();
        } else if t >= Duration::from_secs(33) && !up_again {
            proxy.restore();
            up_again = true;
        }
        let items: Vec<Value> = (i..i + 10)
            .map(|n| change(&format!("d-{n}"), &format!("d-{n}")))
            .collect();
        i += 10;
        let (status, body) = bridge
            .post_json("central", "central-secret", &Value::Array(items))
            .await;
        assert_eq!(status, 202, "{body}");
        for r in body["results"].as_array().unwrap() {
            accepted
                .lock()
                .unwrap()
                .insert(r["id"].as_str().unwrap().to_string());
        }
        if !breaker_opened
            && bridge
                .metrics()
                .await
                .contains("lx_breaker_open{target=\"shop\"} 1")
        {
            breaker_opened = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        breaker_opened,
        "the breaker opened while the target was down"
    );
    let want = accepted.lock().unwrap().clone();
    eventually(
        Duration::from_secs(60),
        "every accepted change delivered",
        || {
            let got = target.distinct_ids();
            want.iter().all(|id| got.contains(id))
        },
    )
    .await;
    assert_eq!(bridge.dlq_len("shop").await, 0, "nothing died");
    let metrics = bridge.metrics().await;
    assert!(
        metrics.contains("lx_breaker_open{target=\"shop\"} 0"),
        "closed again"
    );
    assert!(!metrics.contains("lx_deliveries_total{result=\"dead\",target=\"shop\"} 1"));
    bridge.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_cut_mid_load_gives_503_and_loses_nothing_accepted() {
    let target = Target::start().await;
    let proxy = Proxy::start("127.0.0.1:6379").await;
    let template = config(&target.url()).replace("{redis}", &format!("redis://{}/0", proxy.addr));
    let bridge = Bridge::start(Backend::Rabbit, "storecut", &template).await;
    let mut accepted = HashSet::new();
    let mut saw_503 = false;
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(6) {
        let t = start.elapsed();
        if t > Duration::from_secs(1) && t < Duration::from_secs(3) {
            proxy.cut();
        } else {
            proxy.restore();
        }
        let items: Vec<Value> = (i..i + 10)
            .map(|n| change(&format!("s-{n}"), &format!("s-{n}")))
            .collect();
        i += 10;
        let (status, body) = bridge
            .post_json("central", "central-secret", &Value::Array(items))
            .await;
        match status {
            202 => {
                for r in body["results"].as_array().unwrap() {
                    accepted.insert(r["id"].as_str().unwrap().to_string());
                }
            }
            503 => {
                saw_503 = true;
                assert!(body["error"].as_str().unwrap().contains("store"), "{body}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_503, "ingress answered 503 while the store was away");
    eventually(
        Duration::from_secs(60),
        "every accepted change delivered",
        || {
            let got = target.distinct_ids();
            accepted.iter().all(|id| got.contains(id))
        },
    )
    .await;
    // The cleanup talks to Redis directly, not through the proxy.
    bridge.finish().await;
}

/// A push target with 4 partitions: each change waits in its ref's partition, and the retry
/// step, the DLQ and a replay bring it back into that partition, delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_target_keeps_each_change_in_its_partition_through_retry_and_replay() {
    // Printed only when the test fails: what the consumers did.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("lxbridge=debug")
        .with_test_writer()
        .try_init();
    let target = Target::start().await;
    let template = config(&target.url()).replace(
        "prefix = \"{prefix}\"",
        "prefix = \"{prefix}\"\npartitions = 4",
    );
    let prefix = unique_prefix("parts");
    let text = render(Backend::Rabbit, &template, &prefix, AMQP_URL);
    let config = lxbridge::config::Config::parse(&text, "test config").unwrap();
    let refs: Vec<String> = (0..40)
        .map(|i| format!("{i:08x}-9f2c-11ee-8c90-0242ac120002"))
        .collect();
    // Published as ingress does, by a broker that consumes nothing: the changes stay where
    // the broker routed them.
    {
        use lxbridge::broker::{Broker, Outgoing, PublishOutcome};
        let (cancel, tasks) = (
            tokio_util::sync::CancellationToken::new(),
            tokio_util::task::TaskTracker::new(),
        );
        let routes = lxbridge::route::Routes::from_config(&config);
        let metrics = lxbridge::metrics::Metrics::new();
        let broker = lxbridge::broker::RabbitBroker::start(
            &config,
            &routes,
            cancel.clone(),
            &tasks,
            &metrics,
        )
        .unwrap();
        eventually(WAIT, "the broker connected", || broker.ready()).await;
        let messages: Vec<Outgoing> = refs
            .iter()
            .enumerate()
            .map(|(i, r)| Outgoing {
                kind: "Catalog.X".into(),
                id: format!("id-{r}"),
                partition: lxbridge::route::partition(r, 4),
                body: json!({"id": format!("id-{r}"), "type": "Catalog.X", "ref": r,
                    "op": "upsert", "data": {"n": i}, "source": "central", "seq": i + 1,
                    "accepted_ms": 0})
                .to_string()
                .into_bytes(),
            })
            .collect();
        let outcomes = broker.publish("central", &messages).await.unwrap();
        assert!(
            outcomes.iter().all(|o| *o == PublishOutcome::Confirmed),
            "{outcomes:?}"
        );
        cancel.cancel();
        tasks.close();
        tasks.wait().await;
    }
    let names = lxbridge::broker::Names {
        prefix: prefix.clone(),
    };
    let mut expected = [0u32; 4];
    for r in &refs {
        expected[usize::from(lxbridge::route::partition(r, 4))] += 1;
    }
    assert!(
        expected.iter().all(|&n| n > 0),
        "40 refs over 4 partitions: {expected:?}"
    );
    let mut counts = [0u32; 4];
    for (p, count) in counts.iter_mut().enumerate() {
        *count = queue_len(&names.partition("shop", p as u16)).await;
    }
    assert_eq!(counts, expected, "each change waits in its ref's partition");

    // Delivered: one change fails once (a retry step), one is refused for good (the DLQ).
    let (retried, refused) = (format!("id-{}", refs[3]), format!("id-{}", refs[7]));
    let failed_once = Arc::new(Mutex::new(HashSet::new()));
    let fixed = Arc::new(AtomicBool::new(false));
    let (r, f, once) = (retried.clone(), refused.clone(), failed_once.clone());
    let fix = fixed.clone();
    target.set_verdict(move |c| {
        let id = c["id"].as_str().unwrap_or_default();
        if id == r && once.lock().unwrap().insert(id.to_string()) {
            return Some(("try again".to_string(), true));
        }
        (id == f && !fix.load(Ordering::SeqCst)).then(|| ("never".to_string(), false))
    });
    let bridge = Bridge::start_with(Backend::Rabbit, &prefix, &template, AMQP_URL, true).await;
    eventually(WAIT, "all but the refused one delivered", || {
        target.distinct_ids().len() == 39
    })
    .await;
    eventually(WAIT, "the refused one in the DLQ", || {
        futures_lite_block(bridge.dlq_len("shop")) == 1
    })
    .await;
    fixed.store(true, Ordering::SeqCst);
    let (s, body) = admin(
        &bridge,
        reqwest::Method::POST,
        "/api/v1/dlq/shop/replay",
        Some(json!({})),
    )
    .await;
    assert_eq!((s, body.clone()), (200, json!({"replayed": 1})), "{body}");
    eventually(WAIT, "the replayed one delivered", || {
        target.distinct_ids().contains(&refused)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The target records what it took: every change once, the retried one at attempt 2.
    let twice: Vec<(String, usize)> = target
        .id_counts()
        .into_iter()
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(target.distinct_ids().len(), 40);
    let retried_attempt = target
        .received()
        .into_iter()
        .filter(|g| g.change["id"] == retried.as_str())
        .map(|g| g.change["attempt"].as_u64().unwrap())
        .max();
    assert_eq!(retried_attempt, Some(2));
    for p in 0..4 {
        assert_eq!(
            queue_len(&names.partition("shop", p)).await,
            0,
            "partition {p} drained"
        );
    }
    bridge.finish().await;
}

both_backends!(
    always_failing_change_dies_with_its_error_then_replay_delivers_it,
    retry_false_dead_letters_at_once_and_purge_by_id_removes_exactly_that_one,
    poison_change_cannot_block_the_changes_behind_it,
    target_down_30s_under_load_opens_the_breaker_and_loses_nothing,
);
