//! Bad input at `POST /api/v1/nodes/{node}/changes` (API.md "Publishing changes"): every
//! malformed, oversized, unauthenticated or unroutable request gets the documented status
//! and a JSON `{"error": …}` naming what is wrong, and nothing it rejected reaches a target.

use crate::common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::time::Duration;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
max_body_bytes = 65536
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
gzip = false

[[route]]
from = "central"
to = ["shop"]
types = ["Catalog.*"]
"#;

const WAIT: Duration = Duration::from_secs(15);
const MAX_BODY: usize = 65536;
const BEARER: Option<&str> = Some("Bearer central-secret");

async fn setup(backend: Backend, name: &str) -> (Bridge, Target) {
    let shop = Target::start().await;
    let bridge = Bridge::start(backend, name, &CONFIG.replace("{shop}", &shop.url())).await;
    (bridge, shop)
}

fn good(id: &str, reference: &str) -> Value {
    json!({"id": id, "type": "Catalog.Products", "ref": reference, "data": {"Name": id}})
}

/// The answer is `{"error": "<text>"}` and the text mentions every one of `words`
/// (case-insensitive).
fn assert_error_mentions(answer: &Value, words: &[&str]) {
    let error = answer["error"]
        .as_str()
        .unwrap_or_else(|| panic!("answer has no \"error\" string: {answer}"));
    assert!(!error.is_empty(), "empty error in {answer}");
    let lower = error.to_lowercase();
    for word in words {
        assert!(
            lower.contains(&word.to_lowercase()),
            "error {error:?} does not mention {word:?}"
        );
    }
}

/// Gives a wrongly accepted change time to be delivered, then checks none was.
async fn assert_nothing_delivered(shop: &Target) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        shop.count(),
        0,
        "a rejected request reached the target: {:?}",
        shop.received()
    );
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A `kB` line of /proc/self/status, in bytes.
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    kb * 1024
}

/// Deterministic bytes that are not gzip (no 1f 8b magic at the start).
fn noise(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    let mut out: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect();
    out[0] = b'x';
    out
}

async fn broken_json_is_400(backend: Backend) {
    let (bridge, shop) = setup(backend, "badjson").await;
    let body = br#"[{"id": "j1", "type": "Catalog.Products", "ref": "j-1", "data": {"#.to_vec();
    let (status, answer) = bridge
        .post_with("central", BEARER, "application/json", None, body)
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_error_mentions(&answer, &["json"]);
    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

async fn corrupt_gzip_is_400(backend: Backend) {
    let (bridge, shop) = setup(backend, "badgzip").await;
    // Bytes that are not gzip at all.
    let (status, answer) = bridge
        .post_with(
            "central",
            BEARER,
            "application/json",
            Some("gzip"),
            noise(2048),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_error_mentions(&answer, &["gzip"]);

    // A real gzip of a valid body, cut in the middle of the deflate stream.
    let valid = serde_json::to_vec(&json!([good("g1", "g-1"), good("g2", "g-2")])).unwrap();
    let whole = gzip(&valid);
    let (status, answer) = bridge
        .post_with(
            "central",
            BEARER,
            "application/json",
            Some("gzip"),
            whole[..whole.len() / 2].to_vec(),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_error_mentions(&answer, &["gzip"]);

    // The same gzip with only its CRC/length trailer cut off: the deflate data inflates to
    // the complete, valid JSON, so only a decoder that checks the trailer notices.
    let (status, answer) = bridge
        .post_with(
            "central",
            BEARER,
            "application/json",
            Some("gzip"),
            whole[..whole.len() - 8].to_vec(),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_error_mentions(&answer, &["gzip"]);

    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

async fn body_over_the_limit_is_413(backend: Backend) {
    let (bridge, shop) = setup(backend, "toolarge").await;
    // A valid JSON array of ~100 KB: over max_body_bytes = 65536.
    let items: Vec<Value> = (0..1000)
        .map(|i| good(&format!("big-{i}"), &format!("big-ref-{i:04}")))
        .collect();
    let mut body = serde_json::to_vec(&Value::Array(items)).unwrap();
    while body.len() < 100 * 1024 {
        // Pad with whitespace (still valid JSON) up to 100 KB.
        body.push(b' ');
    }
    assert!(body.len() > MAX_BODY);
    let (status, answer) = bridge
        .post_with("central", BEARER, "application/json", None, body)
        .await;
    assert_eq!(status, 413, "{answer}");
    assert_error_mentions(&answer, &["max_body_bytes"]);
    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

async fn gzip_bomb_is_413_and_memory_stays_bounded(backend: Backend) {
    let (bridge, shop) = setup(backend, "gzbomb").await;
    // 60 MiB of zeros compress to ~60 KB: under the limit on the wire, ~1000x over it inflated.
    let inflated: usize = 60 << 20;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..inflated / chunk.len() {
        enc.write_all(&chunk).unwrap();
    }
    let bomb = enc.finish().unwrap();
    drop(chunk);
    assert!(bomb.len() < MAX_BODY, "bomb is {} bytes", bomb.len());

    // Reset the peak-RSS mark (Linux >= 4.0), so VmHWM afterwards is the peak of this request.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = proc_status_bytes("VmRSS");
    let (status, answer) = bridge
        .post_with("central", BEARER, "application/json", Some("gzip"), bomb)
        .await;
    let rss_after = proc_status_bytes("VmRSS");
    let peak_after = proc_status_bytes("VmHWM");
    assert_eq!(status, 413, "{answer}");
    assert_error_mentions(&answer, &["max_body_bytes"]);
    const BOUND: u64 = 50 << 20;
    assert!(
        rss_after.saturating_sub(rss_before) < BOUND,
        "VmRSS grew from {rss_before} to {rss_after} bytes"
    );
    assert!(
        peak_after.saturating_sub(rss_before) < BOUND,
        "peak RSS reached {peak_after} bytes from {rss_before}: the bomb was inflated"
    );
    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

async fn wrong_bearer_token_is_401(backend: Backend) {
    let (bridge, shop) = setup(backend, "wrongbearer").await;
    let body = serde_json::to_vec(&good("wb1", "wb-1")).unwrap();
    let (status, answer) = bridge
        .post_with(
            "central",
            Some("Bearer shop-secret"),
            "application/json",
            None,
            body,
        )
        .await;
    assert_eq!(status, 401, "{answer}");
    assert_error_mentions(&answer, &["token"]);
    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

async fn missing_authorization_is_401(backend: Backend) {
    let (bridge, shop) = setup(backend, "noauth").await;
    let body = serde_json::to_vec(&good("na1", "na-1")).unwrap();
    let (status, answer) = bridge
        .post_with("central", None, "application/json", None, body)
        .await;
    assert_eq!(status, 401, "{answer}");
    assert_error_mentions(&answer, &["authorization"]);
    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

async fn basic_auth_with_node_name_and_token_is_202(backend: Backend) {
    let (bridge, shop) = setup(backend, "basicok").await;
    let body = serde_json::to_vec(&good("ba1", "ba-1")).unwrap();
    let auth = basic("central", "central-secret");
    let (status, answer) = bridge
        .post_with("central", Some(&auth), "application/json", None, body)
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert_eq!(answer["rejected"], 0, "{answer}");
    assert_eq!(answer["results"][0]["status"], "accepted", "{answer}");
    eventually(WAIT, "the Basic-authenticated change at the shop", || {
        shop.count() == 1
    })
    .await;
    assert_eq!(shop.received()[0].change["ref"], "ba-1");
    bridge.finish().await;
}

async fn basic_auth_with_wrong_user_is_401(backend: Backend) {
    let (bridge, shop) = setup(backend, "basicbad").await;
    let body = serde_json::to_vec(&good("bb1", "bb-1")).unwrap();
    // The right password, but the user must be the node's name.
    let auth = basic("shop", "central-secret");
    let (status, answer) = bridge
        .post_with("central", Some(&auth), "application/json", None, body)
        .await;
    assert_eq!(status, 401, "{answer}");
    assert_error_mentions(&answer, &["basic"]);
    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

async fn unknown_node_is_404_before_credentials(backend: Backend) {
    let (bridge, shop) = setup(backend, "unknownnode").await;
    let body = serde_json::to_vec(&good("un1", "un-1")).unwrap();
    // No credentials at all: the node is checked first.
    let (status, answer) = bridge
        .post_with("nowhere", None, "application/json", None, body.clone())
        .await;
    assert_eq!(status, 404, "{answer}");
    assert_error_mentions(&answer, &["nowhere"]);
    // Another node's valid credentials do not help either.
    let (status, answer) = bridge
        .post_with("nowhere", BEARER, "application/json", None, body)
        .await;
    assert_eq!(status, 404, "{answer}");
    assert_error_mentions(&answer, &["nowhere"]);
    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

async fn text_plain_is_415(backend: Backend) {
    let (bridge, shop) = setup(backend, "textplain").await;
    let body = serde_json::to_vec(&good("tp1", "tp-1")).unwrap();
    let (status, answer) = bridge
        .post_with("central", BEARER, "text/plain", None, body)
        .await;
    assert_eq!(status, 415, "{answer}");
    assert_error_mentions(&answer, &["content-type", "text/plain"]);
    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

async fn array_with_two_bad_items_is_207_and_only_the_good_ones_arrive(backend: Backend) {
    let (bridge, shop) = setup(backend, "partial").await;
    let changes = json!([
        good("p0", "part-0"),
        {"id": "p1", "type": "Catalog.Products", "data": {"Name": "no ref"}},
        good("p2", "part-2"),
        {"id": "p3", "type": "Catalog.Products", "ref": "part-3", "op": "merge", "data": {}},
        good("p4", "part-4"),
    ]);
    let (status, answer) = bridge
        .post_json("central", "central-secret", &changes)
        .await;
    assert_eq!(status, 207, "{answer}");
    assert_eq!(answer["accepted"], 3, "{answer}");
    assert_eq!(answer["rejected"], 2, "{answer}");
    let results = answer["results"].as_array().expect("results array");
    assert_eq!(results.len(), 5, "{answer}");
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["index"], i, "{answer}");
    }
    for i in [0, 2, 4] {
        assert_eq!(results[i]["status"], "accepted", "{answer}");
        assert_eq!(results[i]["id"], format!("p{i}"), "{answer}");
    }
    for (i, field) in [(1, "ref"), (3, "op")] {
        assert_eq!(results[i]["status"], "rejected", "{answer}");
        let error = results[i]["error"]
            .as_str()
            .unwrap_or_else(|| panic!("results[{i}] has no error: {answer}"));
        assert!(
            error.contains(field),
            "results[{i}].error {error:?} does not name {field:?}"
        );
    }

    eventually(WAIT, "the 3 good changes at the shop", || shop.count() >= 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut refs: Vec<String> = shop
        .received()
        .iter()
        .map(|r| r.change["ref"].as_str().unwrap().to_string())
        .collect();
    refs.sort();
    assert_eq!(refs, vec!["part-0", "part-2", "part-4"]);
    bridge.finish().await;
}

async fn ndjson_with_a_non_json_line_is_207_with_that_line_rejected(backend: Backend) {
    let (bridge, shop) = setup(backend, "ndjsonline").await;
    // Blank lines do not count: "this is not json" is item 1.
    let body = format!(
        "{}\n\n   \nthis is not json\n{}\n\n",
        good("nd0", "nd-0"),
        good("nd2", "nd-2")
    );
    let (status, answer) = bridge
        .post_with(
            "central",
            BEARER,
            "application/x-ndjson",
            None,
            body.into_bytes(),
        )
        .await;
    assert_eq!(status, 207, "{answer}");
    assert_eq!(answer["accepted"], 2, "{answer}");
    assert_eq!(answer["rejected"], 1, "{answer}");
    let results = answer["results"].as_array().expect("results array");
    assert_eq!(results.len(), 3, "{answer}");
    assert_eq!(results[0]["status"], "accepted", "{answer}");
    assert_eq!(results[0]["id"], "nd0", "{answer}");
    assert_eq!(results[1]["index"], 1, "{answer}");
    assert_eq!(results[1]["status"], "rejected", "{answer}");
    let error = results[1]["error"].as_str().expect("rejected line's error");
    assert!(error.to_lowercase().contains("json"), "{error:?}");
    assert_eq!(results[2]["index"], 2, "{answer}");
    assert_eq!(results[2]["status"], "accepted", "{answer}");
    assert_eq!(results[2]["id"], "nd2", "{answer}");

    eventually(WAIT, "the 2 good lines at the shop", || shop.count() >= 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut refs: Vec<String> = shop
        .received()
        .iter()
        .map(|r| r.change["ref"].as_str().unwrap().to_string())
        .collect();
    refs.sort();
    assert_eq!(refs, vec!["nd-0", "nd-2"]);
    bridge.finish().await;
}

async fn ndjson_with_no_json_line_is_400(backend: Backend) {
    let (bridge, shop) = setup(backend, "ndjsonnone").await;
    let body = b"not json\n\n{broken\n<xml/>\n".to_vec();
    let (status, answer) = bridge
        .post_with("central", BEARER, "application/x-ndjson", None, body)
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_error_mentions(&answer, &["json"]);
    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

async fn unroutable_type_is_422_and_recorded_in_history(backend: Backend) {
    let (bridge, shop) = setup(backend, "unroutable").await;
    let changes = json!([
        {"id": "u1", "type": "Document.Unknown", "ref": "unroutable-1", "data": {"Number": "1"}}
    ]);
    let (status, answer) = bridge
        .post_json("central", "central-secret", &changes)
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["accepted"], 0, "{answer}");
    assert_eq!(answer["rejected"], 1, "{answer}");
    assert_eq!(answer["results"][0]["status"], "rejected", "{answer}");
    let error = answer["results"][0]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error for the unroutable change: {answer}"));
    assert!(error.contains("no route"), "{error:?}");

    let (status, object) = bridge.admin_get("/api/v1/objects/unroutable-1").await;
    assert_eq!(status, 200, "{object}");
    assert_eq!(object["ref"], "unroutable-1", "{object}");
    let history = object["history"].as_array().expect("history array");
    let event = history
        .iter()
        .find(|e| e["event"] == "unroutable")
        .unwrap_or_else(|| panic!("no unroutable event in {object}"));
    assert_eq!(event["target"], "central", "{object}");
    assert!(
        !history.iter().any(|e| e["event"] == "accepted"),
        "{object}"
    );
    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

async fn every_change_rejected_is_422(backend: Backend) {
    let (bridge, shop) = setup(backend, "allrejected").await;
    let changes = json!([
        {"id": "r0", "ref": "rej-0", "data": {}},
        {"id": "r1", "type": "Catalog.Products", "ref": "rej-1"},
    ]);
    let (status, answer) = bridge
        .post_json("central", "central-secret", &changes)
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["accepted"], 0, "{answer}");
    assert_eq!(answer["rejected"], 2, "{answer}");
    for (i, field) in [(0, "type"), (1, "data")] {
        assert_eq!(answer["results"][i]["status"], "rejected", "{answer}");
        let error = answer["results"][i]["error"]
            .as_str()
            .unwrap_or_else(|| panic!("results[{i}] has no error: {answer}"));
        assert!(error.contains(field), "{error:?} does not name {field:?}");
    }
    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

/// API.md: "Every 4xx/5xx answer anywhere in the API has a JSON body {"error": …}", and a 422
/// has the 202 shape besides (adding fields is allowed). Ingress answers 422 with only
/// `accepted`/`rejected`/`results`: no top-level "error".
async fn answer_422_also_has_a_top_level_error(backend: Backend) {
    let (bridge, shop) = setup(backend, "err422").await;
    let changes = json!([{"id": "e0", "type": "Document.Unknown", "ref": "e-0", "data": {}}]);
    let (status, answer) = bridge
        .post_json("central", "central-secret", &changes)
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["rejected"], 1, "{answer}");
    assert_error_mentions(&answer, &[]);
    assert_nothing_delivered(&shop).await;
    bridge.finish().await;
}

async fn every_error_answer_is_json_even_from_the_framework(backend: Backend) {
    let (bridge, _shop) = setup(backend, "jsonerrors").await;
    let cases = [
        (reqwest::Method::GET, "/api/v1/objects/%FF", 400),
        (reqwest::Method::GET, "/api/v1/dlq/shop?limit=abc", 400),
        (reqwest::Method::GET, "/api/v1/nodes/central/changes", 405),
        (reqwest::Method::GET, "/no/such/thing", 404),
    ];
    for (method, path, want) in cases {
        let (status, body) = admin(&bridge, method, path, None).await;
        assert_eq!(status, want, "{path}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {body}"
        );
    }
    bridge.finish().await;
}

both_backends!(
    broken_json_is_400,
    corrupt_gzip_is_400,
    body_over_the_limit_is_413,
    gzip_bomb_is_413_and_memory_stays_bounded,
    wrong_bearer_token_is_401,
    missing_authorization_is_401,
    basic_auth_with_node_name_and_token_is_202,
    basic_auth_with_wrong_user_is_401,
    unknown_node_is_404_before_credentials,
    text_plain_is_415,
    array_with_two_bad_items_is_207_and_only_the_good_ones_arrive,
    ndjson_with_a_non_json_line_is_207_with_that_line_rejected,
    ndjson_with_no_json_line_is_400,
    unroutable_type_is_422_and_recorded_in_history,
    every_change_rejected_is_422,
    answer_422_also_has_a_top_level_error,
    every_error_answer_is_json_even_from_the_framework,
);
