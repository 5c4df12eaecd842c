//! The core pipeline end to end: ingress → broker → push delivery to real HTTP targets, on
//! both backends.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[broker]
url = "{amqp}"
prefix = "{prefix}"
[store]
redis_url = "{redis}"
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
[node.deliver]
mode = "push"
url = "{shop}"
auth = { bearer = "shop-inbound" }
batch_max = 50
gzip = true
concurrency = 4

[[node]]
name = "erp"
token = "erp-secret"
[node.deliver]
mode = "push"
url = "{erp}"
auth = { basic = { user = "lx", password = "erp-inbound" } }
gzip = false

[[route]]
from = "central"
to = ["shop", "erp"]
types = ["Catalog.*", "Document.ЗаказКлиента", "InformationRegister.*"]

[[route]]
from = "central"
to = ["erp"]
types = ["Document.*"]
"#;

async fn setup(backend: Backend, name: &str) -> (Bridge, Target, Target) {
    let shop = Target::start().await;
    let erp = Target::start().await;
    let template = CONFIG
        .replace("{shop}", &shop.url())
        .replace("{erp}", &erp.url());
    let bridge = Bridge::start(backend, name, &template).await;
    (bridge, shop, erp)
}

const WAIT: Duration = Duration::from_secs(20);

async fn change_fans_out_to_routed_targets_only_with_the_contract_body(backend: Backend) {
    let (bridge, shop, erp) = setup(backend, "fanout").await;
    let changes = json!([
        {"id": "c1", "type": "Catalog.Products", "ref": "p-1", "data": {"Name": "Table"}, "ts": "2026-11-20T14:30:00+03:00"},
        {"id": "c2", "type": "Document.Invoice", "ref": "inv-1", "data": {"Number": "7"}},
    ]);
    let (status, answer) = bridge
        .post_json("central", "central-secret", &changes)
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 2);
    assert_eq!(answer["results"][0]["status"], "accepted");
    assert_eq!(answer["results"][0]["id"], "c1");

    eventually(WAIT, "shop gets c1 and erp gets c1, c2", || {
        shop.count() == 1 && erp.count() == 2
    })
    .await;
    // Document.Invoice is not in the central->shop globs: it must never reach the shop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(shop.count(), 1);
    let got = &shop.received()[0];
    assert_eq!(got.node, "shop");
    assert!(got.gzip, "shop asked for gzip bodies");
    assert_eq!(got.authorization.as_deref(), Some("Bearer shop-inbound"));
    let c = &got.change;
    for field in [
        "id", "type", "ref", "op", "data", "source", "seq", "attempt",
    ] {
        assert!(c.get(field).is_some(), "field {field} missing in {c}");
    }
    assert_eq!(c["id"], "c1");
    assert_eq!(c["type"], "Catalog.Products");
    assert_eq!(c["ref"], "p-1");
    assert_eq!(c["op"], "upsert");
    assert_eq!(c["data"], json!({"Name": "Table"}));
    assert_eq!(c["source"], "central");
    assert_eq!(c["attempt"], 1);
    assert!(c["seq"].is_i64());

    let erp_got = erp.received();
    assert!(!erp_got[0].gzip);
    let basic = format!("Basic {}", base64_encode("lx:erp-inbound"));
    assert_eq!(erp_got[0].authorization.as_deref(), Some(basic.as_str()));
    let mut erp_ids: Vec<String> = erp_got
        .iter()
        .map(|r| r.change["id"].as_str().unwrap().to_string())
        .collect();
    erp_ids.sort();
    assert_eq!(erp_ids, vec!["c1", "c2"]);

    // The object's status and history show accepted and delivered per target.
    let (status, object) = bridge.admin_get("/api/v1/objects/p-1").await;
    assert_eq!(status, 200, "{object}");
    let states: Vec<(String, String)> = object["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["target"].as_str().unwrap().to_string(),
                t["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("erp".into(), "delivered".into()),
            ("shop".into(), "delivered".into())
        ]
    );
    let events: Vec<&str> = object["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events[0], "accepted");
    assert_eq!(
        events.iter().filter(|e| **e == "delivered").count(),
        2,
        "{events:?}"
    );
    assert_eq!(object["history"][0]["target"], "central");
    let (status, _) = bridge.admin_get("/api/v1/objects/never-seen").await;
    assert_eq!(status, 404);

    let metrics = bridge.metrics().await;
    assert!(
        metrics.contains("lx_changes_accepted_total{node=\"central\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lx_deliveries_total{result=\"ok\",target=\"shop\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lx_ingress_requests_total{code=\"202\",node=\"central\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lx_end_to_end_seconds_count{target=\"erp\"} 2"),
        "{metrics}"
    );
    bridge.finish().await;
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

async fn thousand_changes_in_one_gzip_ndjson_batch_arrive_exactly_once(backend: Backend) {
    let (bridge, shop, erp) = setup(backend, "ndjson1000").await;
    let mut body = String::new();
    for i in 0..1000 {
        body.push_str(&json!({"id": format!("n-{i}"), "type": "Catalog.Номенклатура", "ref": format!("ref-{i}"), "data": {"i": i}}).to_string());
        body.push('\n');
    }
    let (status, answer) = bridge
        .post_with(
            "central",
            Some("Bearer central-secret"),
            "application/x-ndjson",
            Some("gzip"),
            gzip(body.as_bytes()),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 1000);
    // 202 means confirmed: the changes are in the queues (or already delivered) right now.
    eventually(WAIT, "1000 distinct ids at shop and erp", || {
        shop.distinct_ids().len() == 1000 && erp.distinct_ids().len() == 1000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, target) in [("shop", &shop), ("erp", &erp)] {
        let counts = target.id_counts();
        assert_eq!(counts.len(), 1000, "{name}");
        assert!(
            counts.values().all(|&n| n == 1),
            "{name} got a change twice"
        );
    }
    // Batches were used (batch_max = 50 at the shop).
    let batches = shop.inner.batches.lock().unwrap().clone();
    assert!(batches.iter().all(|b| b.len() <= 50));
    assert!(batches.len() < 1000, "changes were batched");
    bridge.finish().await;
}

async fn xdto_forms_are_normalised_and_delivered(backend: Backend) {
    let (bridge, _shop, erp) = setup(backend, "xdto").await;
    let dir = format!("{}/tests/fixtures/1c", env!("CARGO_MANIFEST_DIR"));
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/expected.json")).unwrap())
            .unwrap();
    let mut files: Vec<&String> = expected.as_object().unwrap().keys().collect();
    files.sort();
    let items: Vec<Value> = files
        .iter()
        .map(|f| {
            serde_json::from_str(&std::fs::read_to_string(format!("{dir}/{f}")).unwrap()).unwrap()
        })
        .collect();
    let (status, answer) = bridge
        .post_json("central", "central-secret", &Value::Array(items))
        .await;
    assert_eq!(status, 202, "{answer}");
    eventually(WAIT, "all XDTO changes at erp", || {
        erp.count() == files.len()
    })
    .await;
    let received = erp.received();
    for file in files {
        let want = &expected[file.as_str()];
        let got = received
            .iter()
            .find(|r| r.change["ref"] == want["ref"])
            .unwrap_or_else(|| panic!("{file} not delivered"));
        assert_eq!(got.change["type"], want["type"], "{file}");
        assert_eq!(got.change["op"], want["op"], "{file}");
        if want["op"] == "upsert" {
            assert!(got.change["data"].is_object(), "{file}");
        } else {
            assert!(got.change["data"].is_null(), "{file}");
        }
    }
    let order = received
        .iter()
        .find(|r| r.change["type"] == "Document.ЗаказКлиента")
        .unwrap();
    assert_eq!(order.change["data"]["Товары"][1]["Количество"], 3);
    bridge.finish().await;
}

async fn same_id_twice_is_a_duplicate_and_delivered_once(backend: Backend) {
    let (bridge, shop, _erp) = setup(backend, "dedupe").await;
    let change = json!({"id": "dup-1", "type": "Catalog.X", "ref": "x-1", "data": {"v": 1}});
    let (s1, a1) = bridge.post_json("central", "central-secret", &change).await;
    assert_eq!(s1, 202, "{a1}");
    assert_eq!(a1["results"][0]["status"], "accepted");
    let (s2, a2) = bridge.post_json("central", "central-secret", &change).await;
    assert_eq!(s2, 202, "{a2}");
    assert_eq!(a2["results"][0]["status"], "duplicate");
    // The same id twice in one request: the second is a duplicate too.
    let twice = json!([
        {"id": "dup-2", "type": "Catalog.X", "ref": "x-2", "data": {}},
        {"id": "dup-2", "type": "Catalog.X", "ref": "x-2", "data": {}},
    ]);
    let (_, a3) = bridge.post_json("central", "central-secret", &twice).await;
    assert_eq!(a3["results"][0]["status"], "accepted");
    assert_eq!(a3["results"][1]["status"], "duplicate");
    eventually(WAIT, "both ids at shop", || shop.distinct_ids().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(shop.count(), 2, "each id delivered once");
    // An id another request is still publishing (its key reserved, not yet confirmed) is
    // not answered "duplicate" (that request may still fail): it is rejected, to retry.
    let reserved = bridge
        .state()
        .store
        .admit("central", &["in-flight-1"], 0)
        .await
        .expect("store answers");
    assert_eq!(reserved.ids, [lxbridge::store::IdState::Fresh]);
    let change = json!({"id": "in-flight-1", "type": "Catalog.X", "ref": "x-3", "data": {}});
    let (status, answer) = bridge.post_json("central", "central-secret", &change).await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["results"][0]["error"]
            .as_str()
            .unwrap()
            .contains("being accepted"),
        "{answer}"
    );
    bridge.finish().await;
}

async fn updates_to_one_object_never_end_older_than_the_last_accepted(backend: Backend) {
    let (bridge, shop, _erp) = setup(backend, "order").await;
    // Slow the target a little so updates queue up behind each other.
    shop.inner
        .delay_ms
        .store(30, std::sync::atomic::Ordering::SeqCst);
    for round in 0..3 {
        for v in 1..=3 {
            let change =
                json!({"type": "Catalog.X", "ref": format!("obj-{round}"), "data": {"v": v}});
            let (status, answer) = bridge.post_json("central", "central-secret", &change).await;
            assert_eq!(status, 202, "{answer}");
        }
    }
    // Also three updates in one request.
    let batch = json!([
        {"type": "Catalog.X", "ref": "obj-b", "data": {"v": 1}},
        {"type": "Catalog.X", "ref": "obj-b", "data": {"v": 2}},
        {"type": "Catalog.X", "ref": "obj-b", "data": {"v": 3}},
    ]);
    assert_eq!(
        bridge
            .post_json("central", "central-secret", &batch)
            .await
            .0,
        202
    );
    let last_state = |r: &str| -> Option<i64> {
        shop.received()
            .iter()
            .rev()
            .find(|x| x.change["ref"] == r)
            .map(|x| x.change["data"]["v"].as_i64().unwrap())
    };
    let start = std::time::Instant::now();
    while !["obj-0", "obj-1", "obj-2", "obj-b"]
        .iter()
        .all(|r| last_state(r) == Some(3))
    {
        if start.elapsed() > WAIT {
            let got: Vec<(String, i64)> = shop
                .received()
                .iter()
                .map(|x| {
                    (
                        x.change["ref"].as_str().unwrap_or("").to_string(),
                        x.change["data"]["v"].as_i64().unwrap_or(0),
                    )
                })
                .collect();
            let (_, object) = bridge.admin_get("/api/v1/objects/obj-2").await;
            panic!(
                "last states never reached the shop in {WAIT:?}; it got {got:?}; obj-2: {object}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in ["obj-0", "obj-1", "obj-2", "obj-b"] {
        // What arrived for the object is in ascending order, ending with the last accepted.
        let seen: Vec<i64> = shop
            .received()
            .iter()
            .filter(|x| x.change["ref"] == r)
            .map(|x| x.change["data"]["v"].as_i64().unwrap())
            .collect();
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "{r} arrived out of order: {seen:?}"
        );
        assert_eq!(seen.last(), Some(&3), "{r}");
    }
    bridge.finish().await;
}

async fn per_change_error_retries_then_delivers_and_others_go_once(backend: Backend) {
    let (bridge, shop, _erp) = setup(backend, "retry").await;
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let f = failures.clone();
    shop.set_verdict(move |c| {
        if c["ref"] == "bad" && f.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
            Some(("price is missing".into(), true))
        } else {
            None
        }
    });
    let changes = json!([
        {"type": "Catalog.X", "ref": "good-1", "data": {}},
        {"type": "Catalog.X", "ref": "bad", "data": {}},
        {"type": "Catalog.X", "ref": "good-2", "data": {}},
    ]);
    assert_eq!(
        bridge
            .post_json("central", "central-secret", &changes)
            .await
            .0,
        202
    );
    eventually(WAIT, "bad delivered after retries", || shop.count() == 3).await;
    let bad = shop
        .received()
        .into_iter()
        .find(|r| r.change["ref"] == "bad")
        .unwrap();
    assert_eq!(bad.change["attempt"], 3, "delivered on attempt 3");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = shop.id_counts();
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    let (_, object) = bridge.admin_get("/api/v1/objects/bad").await;
    let shop_events: Vec<(String, String)> = object["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["target"] == "shop")
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["detail"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let names: Vec<&str> = shop_events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, vec!["failed", "failed", "delivered"], "{object}");
    assert_eq!(shop_events[0].1, "price is missing");
    let shop_state = object["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == "shop")
        .unwrap()
        .clone();
    assert_eq!(shop_state["state"], "delivered");
    assert_eq!(shop_state["attempts"], 3);
    bridge.finish().await;
}

async fn history_is_bounded_and_status_keys_expire(backend: Backend) {
    let shop = Target::start().await;
    let erp = Target::start().await;
    let template = CONFIG
        .replace("{shop}", &shop.url())
        .replace("{erp}", &erp.url())
        .replace(
            "redis_url = \"{redis}\"\n",
            "redis_url = \"{redis}\"\nhistory_max = 3\nretention = \"1h\"\n",
        );
    let bridge = Bridge::start(backend, "bounded", &template).await;
    for v in 0..5 {
        let change = json!({"type": "Document.Invoice", "ref": "inv-b", "data": {"v": v}});
        assert_eq!(
            bridge
                .post_json("central", "central-secret", &change)
                .await
                .0,
            202
        );
        let want = v + 1;
        eventually(WAIT, "update delivered", || erp.count() == want).await;
    }
    // The target has the last update; its `delivered` is recorded once the answer is in.
    let start = std::time::Instant::now();
    let object = loop {
        let (_, object) = bridge.admin_get("/api/v1/objects/inv-b").await;
        let last = object["history"].as_array().and_then(|h| h.last().cloned());
        if last.is_some_and(|e| e["event"] == "delivered") || start.elapsed() > WAIT {
            break object;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let history = object["history"].as_array().unwrap();
    assert_eq!(
        history.len(),
        3,
        "history_max = 3 keeps the last 3 events: {object}"
    );
    assert_eq!(history[2]["event"], "delivered");
    match backend {
        Backend::Rabbit => {
            let mut redis = redis_conn().await;
            for key in [
                format!("{}:h:{{inv-b}}", bridge.prefix),
                format!("{}:o:{{inv-b}}", bridge.prefix),
            ] {
                let ttl: i64 = redis::cmd("TTL")
                    .arg(&key)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                assert!(
                    ttl > 3500 && ttl <= 3600,
                    "{key} expires within the 1h retention: ttl {ttl}"
                );
            }
        }
        Backend::Embedded => {
            let mut bridge = bridge;
            bridge.stop().await;
            let db =
                rusqlite::Connection::open(lxbridge::embedded::db_path(&bridge.config.data_dir()))
                    .unwrap();
            let expires: i64 = db
                .query_row("SELECT expires FROM objects WHERE ref = 'inv-b'", [], |r| {
                    r.get(0)
                })
                .unwrap();
            let ttl = (expires - lxbridge::clock::unix_ms_now()) / 1000;
            assert!(
                ttl > 3500 && ttl <= 3600,
                "inv-b expires within the 1h retention: ttl {ttl}"
            );
            drop(db);
            bridge.finish().await;
            return;
        }
    }
    bridge.finish().await;
}

both_backends!(
    change_fans_out_to_routed_targets_only_with_the_contract_body,
    thousand_changes_in_one_gzip_ndjson_batch_arrive_exactly_once,
    xdto_forms_are_normalised_and_delivered,
    same_id_twice_is_a_duplicate_and_delivered_once,
    updates_to_one_object_never_end_older_than_the_last_accepted,
    per_change_error_retries_then_delivers_and_others_go_once,
    history_is_bounded_and_status_keys_expire,
);
