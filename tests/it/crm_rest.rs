//! The REST target (docs/integrations.md "REST target: `mode = "http"`"): a 1C base's orders
//! (`central`, type `Document.ЗаказКлиента`, renamed `Bitrix24.Deal` by the route's mapping)
//! delivered to the fake Bitrix24 of [`crate::crm`] as `crm.deal.add`, then, with the id it
//! answered, as `crm.deal.update`; at `rate = "2/s"` through two instances; a `429`/`503`
//! with `Retry-After` honoured without spending a retry step; an `{"error": …}` in a 200
//! answer a failure named in the DLQ and the history.

use crate::common::*;
use crate::crm::{history, rate_violations, wait_state, Bitrix24, Call, B24_CODE, WAIT};
use crate::fleet::{self, guid, metric_sum, Cluster, INSTANCES_HEAD};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The 1C base and the Bitrix24 node, after a head (`[server]` … `[retry]`).
const NODES: &str = r#"
[[node]]
name = "central"
token = "central-secret"

[[node]]
name = "bitrix24"
token = "b24-node-secret"
[node.deliver]
mode = "http"
url = "@B24@"
rate = "2/s"
concurrency = 2
[node.deliver.requests."Bitrix24.Deal"]
method = "POST"
url = "{url}/crm.deal.add.json"
body = { fields = "{data}" }
id = "result"
error = "error"
[node.deliver.requests."Bitrix24.Deal".update]
url = "{url}/crm.deal.update.json"
body = { id = "{target_ref}", fields = "{data}" }

[[route]]
from = "central"
to = ["bitrix24"]
[route.mapping.types."Document.ЗаказКлиента"]
rename = "Bitrix24.Deal"
"#;

/// One lxbridge (either backend), one retry step of 300 ms.
const HEAD: &str = r#"
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
delays = ["300ms"]
"#;

const TARGET: &str = "bitrix24";

fn title(n: u64, v: i64) -> String {
    format!("Заказ {n} v{v}")
}

/// Version `v` of order `n` (ref `guid(n)`) as 1C posts it.
fn order(n: u64, v: i64) -> Value {
    json!({"id": format!("order-{n}-v{v}"), "type": "Document.ЗаказКлиента", "ref": guid(n),
           "seq": v, "data": {"TITLE": title(n, v), "OPPORTUNITY": n * 100, "v": v}})
}

fn orders(ns: impl IntoIterator<Item = u64>, v: i64) -> Value {
    Value::Array(ns.into_iter().map(|n| order(n, v)).collect())
}

async fn start(backend: Backend, name: &str, b24: &Bitrix24) -> Bridge {
    let config = format!("{HEAD}{}", NODES.replace("@B24@", &b24.url()));
    Bridge::start(backend, name, &config).await
}

async fn post(bridge: &Bridge, changes: &Value) {
    let (status, body) = bridge.post_json("central", "central-secret", changes).await;
    assert_eq!(status, 202, "{body}");
}

/// Waits until `done` holds of the fake's calls; shows the calls if it never does.
async fn wait_calls(b24: &Bitrix24, timeout: Duration, what: &str, done: impl Fn(&[Call]) -> bool) {
    let deadline = Instant::now() + timeout;
    while !done(&b24.calls()) {
        assert!(
            Instant::now() < deadline,
            "{what}: not after {timeout:?}; the fake's last calls:\n{}",
            b24.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count(calls: &[Call], api: &str) -> usize {
    calls.iter().filter(|c| c.api == api).count()
}

/// Every call's shape is a Bitrix24 REST call: POST of JSON to `/rest/1/<code>/<method>.json`.
fn assert_rest_calls(calls: &[Call]) {
    for c in calls {
        assert_eq!(c.method, "POST", "{c:?}");
        assert_eq!(
            c.path,
            format!("/rest/1/{B24_CODE}/{}.json", c.api),
            "{c:?}"
        );
        assert!(c.content_type.starts_with("application/json"), "{c:?}");
    }
}

/// The updates are one per object of `ns`, each naming the id the fake gave its object
/// when version 1 created it, with version `v`'s data.
fn assert_updates_by_given_id(b24: &Bitrix24, ns: &[u64], v: i64) {
    let created = b24.created_by_title();
    let calls = b24.calls();
    for n in ns {
        let id = created[&title(*n, 1)];
        let updates: Vec<&Call> = calls
            .iter()
            .filter(|c| c.api == "crm.deal.update" && c.title() == title(*n, v))
            .collect();
        assert_eq!(updates.len(), 1, "order {n}: {updates:?}");
        let u = updates[0];
        assert_eq!(u.updated(), Some(id), "order {n}: the given id: {u:?}");
        assert_eq!(u.body["fields"], order(*n, v)["data"], "{u:?}");
        let deal = b24.deal(id).expect("the deal is there");
        assert_eq!(deal["TITLE"], title(*n, v), "the deal took the update");
    }
}

async fn created_ids_turn_the_next_change_into_an_update(backend: Backend) {
    let b24 = Bitrix24::start().await;
    let bridge = start(backend, "crm-upd", &b24).await;
    let base = bridge.url("");
    post(&bridge, &orders(1..=3, 1)).await;
    for n in 1..=3 {
        wait_state(&bridge.http, &base, &guid(n), TARGET, "delivered").await;
    }
    let calls = b24.calls();
    assert_eq!(count(&calls, "crm.deal.add"), 3, "{}", b24.log_tail(10));
    for c in &calls {
        let n: u64 = c.title().split(' ').nth(1).unwrap().parse().unwrap();
        assert_eq!(
            c.body,
            json!({"fields": order(n, 1)["data"]}),
            "the add's body: {c:?}"
        );
        assert!(c.created().is_some(), "{c:?}");
    }

    post(&bridge, &orders(1..=3, 2)).await;
    wait_calls(&b24, WAIT, "3 updates", |c| {
        count(c, "crm.deal.update") == 3
    })
    .await;
    for n in 1..=3 {
        wait_state(&bridge.http, &base, &guid(n), TARGET, "delivered").await;
    }
    assert_updates_by_given_id(&b24, &[1, 2, 3], 2);
    let calls = b24.calls();
    assert_eq!(count(&calls, "crm.deal.add"), 3, "no deal created twice");
    assert_eq!(calls.len(), 6, "{}", b24.log_tail(10));
    assert_rest_calls(&calls);

    // A deal deleted at Bitrix24: its update is answered NOT_FOUND, a failure, then dead.
    let gone = b24.created_by_title()[&title(3, 1)];
    b24.forget(gone);
    post(&bridge, &orders([3], 3)).await;
    let (entry, obj) = wait_state(&bridge.http, &base, &guid(3), TARGET, "dead").await;
    let error = entry["last_error"].as_str().unwrap_or("");
    assert!(error.contains("NOT_FOUND"), "{entry}");
    let events = history(&obj, TARGET);
    let failed = events.iter().filter(|(e, _)| e == "failed").count();
    assert_eq!(failed, 2, "two attempts of v3, one retry step: {events:?}");
    bridge.finish().await;
}

async fn an_error_in_a_200_answer_is_a_failure_named_in_the_dlq_and_history(backend: Backend) {
    let b24 = Bitrix24::start().await;
    let bridge = start(backend, "crm-err", &b24).await;
    let base = bridge.url("");
    let mut failing = order(1, 1);
    failing["data"]["TITLE"] = json!("Заказ 1 FAIL");
    post(&bridge, &json!([failing, order(2, 1)])).await;

    let (entry, obj) = wait_state(&bridge.http, &base, &guid(1), TARGET, "dead").await;
    let description = "Deal title is not allowed: FAIL";
    let named = |text: &str| text.contains("ERROR_CORE") && text.contains(description);
    let last_error = entry["last_error"].as_str().unwrap_or("");
    assert!(named(last_error), "last_error names the answer: {entry}");
    assert!(last_error.contains("200"), "and the status: {entry}");
    let events = history(&obj, TARGET);
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds, ["failed", "failed", "dead"], "{events:?}");
    for (event, detail) in events.iter().filter(|(e, _)| e == "failed") {
        assert!(named(detail), "{event}: {detail}");
    }

    let (status, dlq) = bridge
        .admin_get(&format!("/api/v1/dlq/{TARGET}?limit=10"))
        .await;
    assert_eq!(status, 200, "{dlq}");
    assert_eq!(dlq["count"], 1, "{dlq}");
    let item = &dlq["items"][0];
    assert_eq!(
        (&item["id"], &item["ref"]),
        (&json!("order-1-v1"), &json!(guid(1))),
        "{item}"
    );
    assert_eq!(item["attempts"], 2, "{item}");
    assert!(named(item["error"].as_str().unwrap_or("")), "{item}");

    wait_state(&bridge.http, &base, &guid(2), TARGET, "delivered").await;
    let calls = b24.calls();
    let failed_calls = calls.iter().filter(|c| c.title().contains("FAIL")).count();
    assert_eq!(failed_calls, 2, "{}", b24.log_tail(10));
    assert_eq!(b24.created_by_title().len(), 1, "only order 2 created");
    bridge.finish().await;
}

async fn a_429_or_503_with_retry_after_pauses_and_spends_no_retry_step(backend: Backend) {
    let b24 = Bitrix24::start().await;
    let bridge = start(backend, "crm-429", &b24).await;
    let base = bridge.url("");
    let limit = json!({"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"});
    let cases = [(1, 429, "a 429"), (2, 503, "a 503")];
    for (n, status, what) in cases {
        b24.force(status, Some("1"), limit.clone());
        post(&bridge, &orders([n], 1)).await;
        let (entry, obj) = wait_state(&bridge.http, &base, &guid(n), TARGET, "delivered").await;
        assert_eq!(entry["attempts"], 1, "{what}: no retry step spent: {entry}");
        let events = history(&obj, TARGET);
        let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
        assert!(kinds.contains(&"delivered"), "{what}: {events:?}");
        assert!(
            !kinds.contains(&"failed"),
            "{what}: no failed attempt: {events:?}"
        );
        let calls: Vec<Call> = b24
            .calls()
            .into_iter()
            .filter(|c| c.title() == title(n, 1))
            .collect();
        assert_eq!(
            calls.len(),
            2,
            "{what}: refused, then sent again\n{}",
            b24.log_tail(10)
        );
        assert_eq!(calls[0].status, status);
        let pause = calls[1].at.duration_since(calls[0].at);
        assert!(
            pause >= Duration::from_secs(1),
            "{what}: sent again after {pause:?}, before Retry-After's 1 s"
        );
        assert!(calls[1].created().is_some(), "{:?}", calls[1]);
    }
    let metrics = bridge.metrics().await;
    let http = |outcome: &str| {
        metric_sum(
            &metrics,
            "lx_http_requests_total",
            &[("target", TARGET), ("outcome", outcome)],
        )
    };
    assert_eq!(http("throttled"), 2.0, "lx_http_requests_total throttled");
    assert_eq!(http("ok"), 2.0, "lx_http_requests_total ok");
    let retries = metric_sum(
        &metrics,
        "lx_deliveries_total",
        &[("target", TARGET), ("result", "retry")],
    );
    assert_eq!(retries, 0.0, "lx_deliveries_total retry");
    bridge.finish().await;
}

both_backends!(
    created_ids_turn_the_next_change_into_an_update,
    an_error_in_a_200_answer_is_a_failure_named_in_the_dlq_and_history,
    a_429_or_503_with_retry_after_pauses_and_spends_no_retry_step,
);

// ---------------------------------------------------------------------------------------
// Two instances, one rate

const CREATES: u64 = 150;
const UPDATES: u64 = 50;

/// Posts `changes` half through each instance.
async fn post_halves(cluster: &Cluster, changes: Value) {
    let all = changes.as_array().unwrap();
    let (first, second) = all.split_at(all.len() / 2);
    for (i, part) in [first, second].into_iter().enumerate() {
        let answer =
            fleet::post(&cluster.http, cluster.base(i), &Value::Array(part.to_vec())).await;
        let (status, body) = answer.unwrap_or_else(|e| panic!("instance {i}: {e}"));
        assert_eq!(status, 202, "instance {i}: {body}");
    }
}

/// Sums a series over both instances' /metrics; and each instance's share.
async fn summed(cluster: &Cluster, name: &str, labels: &[(&str, &str)]) -> (f64, Vec<f64>) {
    let mut each = Vec::new();
    for i in 0..2 {
        each.push(metric_sum(&cluster.metrics(i).await, name, labels));
    }
    (each.iter().sum(), each)
}

/// The fake's calls over the whole run: no more than 2 in any second, none refused, 150
/// adds and 50 updates, nothing else.
fn assert_rate_kept(b24: &Bitrix24) {
    let calls = b24.calls();
    let violations = rate_violations(&calls);
    assert!(
        violations.is_empty(),
        "{} places over 2 requests/s, first: {:?}\n{}",
        violations.len(),
        &violations[..violations.len().min(5)],
        b24.log_tail(30)
    );
    assert_eq!(b24.limit_exceeded(), 0, "QUERY_LIMIT_EXCEEDED answered");
    assert_eq!(count(&calls, "crm.deal.add") as u64, CREATES, "adds");
    assert_eq!(count(&calls, "crm.deal.update") as u64, UPDATES, "updates");
    assert_eq!(
        calls.len() as u64,
        CREATES + UPDATES,
        "{}",
        b24.log_tail(10)
    );
    assert!(
        calls.iter().all(|c| c.status == 200),
        "{}",
        b24.log_tail(10)
    );
    assert_eq!(
        b24.created_by_title().len() as u64,
        CREATES,
        "each order created once"
    );
    assert_rest_calls(&calls);
}

/// 150 orders created through two instances at `rate = "2/s"` (about 75 s), then 50 of them
/// changed again (25 s): the fake never sees more than 2 requests in a second, every change
/// is delivered at its first attempt, and each second change updates the deal its first
/// created, by the id Bitrix24 gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_keep_bitrix24s_rate_and_update_by_the_given_id() {
    let b24 = Bitrix24::start().await;
    let config = format!("{INSTANCES_HEAD}{}", NODES.replace("@B24@", &b24.url()));
    assert!(
        INSTANCES_HEAD.contains("{partitions}"),
        "the instances share partitions"
    );
    let mut cluster = Cluster::new("crm-rate", &config);
    cluster.start().await;
    cluster.start().await;

    post_halves(&cluster, orders(1..=CREATES, 1)).await;
    let patience = Duration::from_secs(CREATES / 2 + 60);
    let want = CREATES as usize;
    wait_calls(&b24, patience, "150 deals created", |c| {
        count(c, "crm.deal.add") >= want
    })
    .await;
    let base = cluster.base(0).to_string();
    for n in 1..=CREATES {
        let (entry, _) = wait_state(&cluster.http, &base, &guid(n), TARGET, "delivered").await;
        assert_eq!(entry["attempts"], 1, "order {n}: {entry}");
    }

    post_halves(&cluster, orders(1..=UPDATES, 2)).await;
    let patience = Duration::from_secs(UPDATES / 2 + 60);
    let want = UPDATES as usize;
    wait_calls(&b24, patience, "50 deals updated", |c| {
        count(c, "crm.deal.update") >= want
    })
    .await;
    let mut attempts: HashMap<String, usize> = HashMap::new();
    for n in 1..=UPDATES {
        let (entry, _) = wait_state(&cluster.http, &base, &guid(n), TARGET, "delivered").await;
        *attempts.entry(entry["attempts"].to_string()).or_default() += 1;
    }
    assert_eq!(
        attempts,
        HashMap::from([("1".to_string(), UPDATES as usize)]),
        "attempts"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_rate_kept(&b24);
    let ns: Vec<u64> = (1..=UPDATES).collect();
    assert_updates_by_given_id(&b24, &ns, 2);
    let ok = [("target", TARGET), ("outcome", "ok")];
    let (sent, each) = summed(&cluster, "lx_http_requests_total", &ok).await;
    assert_eq!(
        sent,
        (CREATES + UPDATES) as f64,
        "lx_http_requests_total ok: {each:?}"
    );
    assert!(
        each.iter().all(|n| *n > 0.0),
        "both instances sent: {each:?}"
    );
    let retry = [("target", TARGET), ("result", "retry")];
    let (retries, each) = summed(&cluster, "lx_deliveries_total", &retry).await;
    assert_eq!(retries, 0.0, "lx_deliveries_total retry: {each:?}");
    let (waited, each) = summed(&cluster, "lx_rate_waits_total", &[("target", TARGET)]).await;
    assert!(waited > 0.0, "requests waited for a rate slot: {each:?}");
}
