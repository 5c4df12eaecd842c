//! Parallel copies (`[[group]]`): members that apply what they receive and write it back at
//! once, as a 1C base whose event subscription fires on every write would; concurrent
//! updates to the same objects from different members; a member down for part of the run.
//! Every member must end with the same objects, with deliveries bounded and conflicts in
//! the history. On both backends.

use crate::common::*;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MEMBERS: [&str; 3] = ["a", "b", "c"];

fn config(urls: &[String], conflict: &str) -> String {
    let mut text = format!(
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
delays = ["200ms", "1s", "5s"]

[[group]]
name = "copies"
nodes = ["a", "b", "c"]
types = ["Catalog.*"]
conflict = "{conflict}"
"#
    );
    for (name, url) in MEMBERS.iter().zip(urls) {
        text.push_str(&format!(
            "\n[[node]]\nname = \"{name}\"\ntoken = \"{name}-secret\"\n[node.deliver]\nmode = \"push\"\nurl = \"{url}\"\nbatch_max = 50\nconcurrency = 2\ngzip = false\n"
        ));
    }
    text
}

/// A simulated 1C base: objects by ref; it applies every change lxbridge delivers and, as
/// its write subscription would, sends the object back to lxbridge before answering.
struct Member {
    name: &'static str,
    objects: Mutex<BTreeMap<String, Value>>,
    /// Changes lxbridge delivered (answered 200).
    deliveries: AtomicUsize,
    /// While true the base's HTTP service is down: 503, nothing applied.
    down: AtomicBool,
    bridge: Mutex<String>,
    http: reqwest::Client,
    /// Changes the base sent (its users' writes and its echoes), by kind.
    sent_user: AtomicUsize,
    sent_echo: AtomicUsize,
}

impl Member {
    /// Sends one change (its JSON text as given: key order and number spelling kept).
    async fn send(&self, change: String) {
        let url = format!(
            "{}/api/v1/nodes/{}/changes",
            self.bridge.lock().unwrap(),
            self.name
        );
        // Like the 1C module: retried until lxbridge stored it.
        for _ in 0..200 {
            let sent = self
                .http
                .post(&url)
                .bearer_auth(format!("{}-secret", self.name))
                .header("content-type", "application/json")
                .body(change.clone())
                .send()
                .await;
            if let Ok(r) = sent {
                let status = r.status().as_u16();
                if status == 202 {
                    return;
                }
                assert_eq!(status, 503, "{}: {}", self.name, r.text().await.unwrap());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{}: lxbridge never stored a change", self.name);
    }

    /// A user of this base writes an object.
    async fn write(&self, reference: &str, data: Value) {
        self.objects
            .lock()
            .unwrap()
            .insert(reference.to_string(), data.clone());
        self.sent_user.fetch_add(1, Ordering::SeqCst);
        let ts = lxbridge::clock::rfc3339_now();
        self.send(
            json!({"type": "Catalog.Items", "ref": reference, "data": data, "ts": ts}).to_string(),
        )
        .await;
    }
}

async fn receive(State(m): State<Arc<Member>>, body: Bytes) -> Response {
    if m.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "base is down").into_response();
    }
    let batch: Value = serde_json::from_slice(&body).expect("JSON");
    let mut echoes = Vec::new();
    let mut snapshot = false;
    for change in batch["changes"].as_array().unwrap() {
        if change["type"] == "lxbridge.Resync" {
            // As the 1C module does: send every object again, marked initial.
            snapshot = true;
            continue;
        }
        let reference = change["ref"].as_str().unwrap().to_string();
        let data = change["data"].clone();
        m.objects
            .lock()
            .unwrap()
            .insert(reference.clone(), data.clone());
        m.deliveries.fetch_add(1, Ordering::SeqCst);
        echoes.push((change["type"].clone(), reference, data));
    }
    // The write subscription sends each written object before the service answers, the
    // way 1C writes it: its fields in the base's own order, whole numbers as decimals.
    for (kind, reference, data) in echoes {
        m.sent_echo.fetch_add(1, Ordering::SeqCst);
        let ts = lxbridge::clock::rfc3339_now();
        let fields: Vec<String> = data
            .as_object()
            .unwrap()
            .iter()
            .rev()
            .map(|(k, v)| match v.as_i64() {
                Some(n) => format!("{}:{n}.0", Value::String(k.clone())),
                None => format!("{}:{v}", Value::String(k.clone())),
            })
            .collect();
        let echo = format!(
            r#"{{"type":{kind},"ref":{},"ts":"{ts}","data":{{{}}}}}"#,
            Value::String(reference),
            fields.join(",")
        );
        m.send(echo).await;
    }
    if snapshot {
        let objects = m.objects.lock().unwrap().clone();
        for (reference, data) in objects {
            let change =
                json!({"type": "Catalog.Items", "ref": reference, "data": data, "initial": true});
            m.send(change.to_string()).await;
        }
    }
    axum::Json(json!({"results": []})).into_response()
}

async fn start_member(name: &'static str) -> (Arc<Member>, String) {
    let member = Arc::new(Member {
        name,
        objects: Mutex::new(BTreeMap::new()),
        deliveries: AtomicUsize::new(0),
        down: AtomicBool::new(false),
        bridge: Mutex::new(String::new()),
        http: reqwest::Client::new(),
        sent_user: AtomicUsize::new(0),
        sent_echo: AtomicUsize::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/receive", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/receive", post(receive))
        .with_state(member.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (member, url)
}

async fn start_group(backend: Backend, name: &str, conflict: &str) -> (Bridge, Vec<Arc<Member>>) {
    let mut members = Vec::new();
    let mut urls = Vec::new();
    for name in MEMBERS {
        let (m, url) = start_member(name).await;
        members.push(m);
        urls.push(url);
    }
    let bridge = Bridge::start(backend, name, &config(&urls, conflict)).await;
    for m in &members {
        *m.bridge.lock().unwrap() = bridge.url("");
    }
    (bridge, members)
}

fn snapshot(members: &[Arc<Member>]) -> Vec<BTreeMap<String, Value>> {
    members
        .iter()
        .map(|m| m.objects.lock().unwrap().clone())
        .collect()
}

/// Waits until nothing has moved for `quiet` (no delivery, no change sent).
async fn settle(members: &[Arc<Member>], quiet: Duration, timeout: Duration) {
    let activity = || -> usize {
        members
            .iter()
            .map(|m| {
                m.deliveries.load(Ordering::SeqCst)
                    + m.sent_echo.load(Ordering::SeqCst)
                    + m.sent_user.load(Ordering::SeqCst)
            })
            .sum()
    };
    let start = Instant::now();
    let mut last = activity();
    let mut since = Instant::now();
    while since.elapsed() < quiet {
        assert!(start.elapsed() < timeout, "the group never went quiet");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = activity();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
}

/// xorshift: the test's randomness, seeded so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

async fn three_members_converge_after_1000_concurrent_updates(backend: Backend) {
    let (bridge, members) = start_group(backend, "copies", "last_writer_wins").await;
    const UPDATES: usize = 1000;
    const OBJECTS: u64 = 25;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    // Each member's users write in turns of their own; c's base goes down for part of it.
    let counter = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for (k, m) in members.iter().enumerate() {
        let (m, counter) = (m.clone(), counter.clone());
        let mut rng = Rng(seed.wrapping_add((k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
        writers.push(tokio::spawn(async move {
            loop {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                if n >= UPDATES {
                    break;
                }
                if m.name == "c" && n == UPDATES / 4 {
                    m.down.store(true, Ordering::SeqCst);
                }
                if m.name == "c" && m.down.load(Ordering::SeqCst) {
                    // A base that is down writes nothing either; it is back at 3/4.
                    while counter.load(Ordering::SeqCst) < UPDATES * 3 / 4 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    m.down.store(false, Ordering::SeqCst);
                }
                let reference = format!("item-{}", rng.below(OBJECTS));
                let data =
                    json!({"Description": format!("{} wrote #{n}", m.name), "n": n, "by": m.name});
                m.write(&reference, data).await;
                tokio::time::sleep(Duration::from_millis(rng.below(4))).await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(!members[2].down.load(Ordering::SeqCst), "c is back");
    settle(&members, Duration::from_secs(3), Duration::from_secs(120)).await;

    // 1. Identical object states.
    let states = snapshot(&members);
    let objects: Vec<&String> = states[0].keys().collect();
    assert!(objects.len() as u64 > OBJECTS / 2, "{objects:?}");
    for (m, state) in members.iter().zip(&states) {
        assert_eq!(
            state.keys().collect::<Vec<_>>(),
            objects,
            "{} has other objects",
            m.name
        );
        for (reference, data) in state {
            if data != &states[0][reference] {
                let (_, object) = bridge
                    .admin_get(&format!("/api/v1/objects/{reference}"))
                    .await;
                let all: Vec<(&str, Option<&Value>)> = members
                    .iter()
                    .zip(&states)
                    .map(|(m, s)| (m.name, s.get(reference)))
                    .collect();
                panic!(
                    "{reference}: {} and a disagree: {all:?}\nhistory: {:#}",
                    m.name, object["history"]
                );
            }
        }
    }
    // 2. No echo storm.
    let user_changes: usize = members
        .iter()
        .map(|m| m.sent_user.load(Ordering::SeqCst))
        .sum();
    assert_eq!(user_changes, UPDATES);
    let deliveries: usize = members
        .iter()
        .map(|m| m.deliveries.load(Ordering::SeqCst))
        .sum();
    let metrics = bridge.metrics().await;
    let count = |result: &str| -> usize {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("lx_group_changes_total{")
                    && l.contains(&format!("result=\"{result}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse::<f64>().unwrap() as usize)
            .unwrap_or(0)
    };
    let conflicts = count("conflict_won") + count("conflict_lost");
    let echoes = count("echo");
    println!(
        "{user_changes} changes, {deliveries} deliveries, {conflicts} conflicts, {echoes} echoes, published {}",
        count("published") + count("conflict_won")
    );
    assert!(
        deliveries <= UPDATES * (MEMBERS.len() - 1) + conflicts,
        "{deliveries} deliveries for {UPDATES} changes and {conflicts} conflicts"
    );
    let echoed: usize = members
        .iter()
        .map(|m| m.sent_echo.load(Ordering::SeqCst))
        .sum();
    assert_eq!(echoed, deliveries, "every delivery was written back");
    assert!(
        echoes > 0 && echoes <= echoed,
        "{echoes} echoes of {echoed}"
    );
    assert!(
        conflicts > 0,
        "concurrent updates to 25 objects made conflicts"
    );
    assert_eq!(count("loop"), 0);
    // 3. Conflicts are in the objects' history, naming both sides.
    let mut seen_conflict = false;
    let mut seen_lost = false;
    for reference in &objects {
        let (status, object) = bridge
            .admin_get(&format!("/api/v1/objects/{reference}"))
            .await;
        assert_eq!(status, 200);
        for e in object["history"].as_array().unwrap() {
            if e["event"] == "conflict" {
                // Two versions, the loser named first; or a change that crossed a
                // delivery to its author.
                let detail = e["detail"].as_str().unwrap();
                assert!(
                    (detail.matches("'s change").count() == 2
                        && detail.contains("lost to")
                        && detail.contains("last_writer_wins"))
                        || detail.contains("crossed a delivery to"),
                    "{detail}"
                );
                seen_conflict = true;
                seen_lost |= detail.contains("lost to");
            }
        }
    }
    assert!(
        seen_conflict && seen_lost,
        "a conflict between two members' versions in some object's history"
    );
    bridge.finish().await;
}

/// Two members write one object concurrently: the policy picks the same winner whatever
/// order the changes arrive in, every member ends with it, and the history names both.
async fn the_policy_decides_concurrent_writes_deterministically(backend: Backend) {
    for (policy, winner) in [("last_writer_wins", "b"), ("priority", "a")] {
        for b_first in [true, false] {
            let (bridge, members) = start_group(backend, "policy", policy).await;
            // Both written a minute ago, before either base got the other's: concurrent.
            let base = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
            let stamp = |ms: i64| {
                (base + time::Duration::milliseconds(ms))
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap()
            };
            let from_a =
                json!({"type": "Catalog.Items", "ref": "x", "data": {"by": "a"}, "ts": stamp(0)});
            let from_b =
                json!({"type": "Catalog.Items", "ref": "x", "data": {"by": "b"}, "ts": stamp(5)});
            let (first, second) = if b_first {
                ((&members[1], from_b), (&members[0], from_a))
            } else {
                ((&members[0], from_a), (&members[1], from_b))
            };
            first
                .0
                .objects
                .lock()
                .unwrap()
                .insert("x".into(), first.1["data"].clone());
            second
                .0
                .objects
                .lock()
                .unwrap()
                .insert("x".into(), second.1["data"].clone());
            first.0.send(first.1.to_string()).await;
            second.0.send(second.1.to_string()).await;
            settle(&members, Duration::from_secs(2), Duration::from_secs(60)).await;
            for m in &members {
                assert_eq!(
                    m.objects.lock().unwrap().get("x"),
                    Some(&json!({"by": winner})),
                    "{policy}, b first {b_first}: {}",
                    m.name
                );
            }
            let (_, object) = bridge.admin_get("/api/v1/objects/x").await;
            let conflict: Vec<&Value> = object["history"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["event"] == "conflict")
                .collect();
            assert_eq!(conflict.len(), 1, "{object}");
            let detail = conflict[0]["detail"].as_str().unwrap();
            assert!(
                detail.contains("a's change")
                    && detail.contains("b's change")
                    && detail.contains(policy),
                "{detail}"
            );
            let loser = if winner == "a" { "b" } else { "a" };
            let (lost, to) = (
                detail.find(&format!("{loser}'s change")),
                detail.find(&format!("lost to {winner}'s change")),
            );
            assert!(
                lost.is_some() && to.is_some() && lost < to,
                "{loser} lost to {winner}: {detail}"
            );
            bridge.finish().await;
        }
    }
}

/// A member's own write of what it received is dropped as `echo`, answered accepted, and
/// goes nowhere.
async fn an_echo_is_answered_accepted_recorded_and_not_passed_on(backend: Backend) {
    let (bridge, members) = start_group(backend, "echo", "last_writer_wins").await;
    members[0]
        .write("e-1", json!({"Description": "chair", "Price": 10}))
        .await;
    eventually(Duration::from_secs(20), "b and c got it", || {
        members[1..]
            .iter()
            .all(|m| m.deliveries.load(Ordering::SeqCst) == 1)
    })
    .await;
    settle(&members, Duration::from_secs(1), Duration::from_secs(30)).await;
    // b and c got it once, wrote it back (key order changed), and a got nothing back.
    assert_eq!(members[0].deliveries.load(Ordering::SeqCst), 0);
    assert_eq!(members[1].deliveries.load(Ordering::SeqCst), 1);
    assert_eq!(members[2].deliveries.load(Ordering::SeqCst), 1);
    let (_, object) = bridge.admin_get("/api/v1/objects/e-1").await;
    let echoes = object["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "echo")
        .count();
    assert_eq!(echoes, 2, "{object}");
    // The answer to an echo.
    let (status, answer) = bridge
        .post_json(
            "b",
            "b-secret",
            &json!({"type": "Catalog.Items", "ref": "e-1", "data": {"Price": 10, "Description": "chair"}}),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["results"][0]["status"], "accepted");
    assert_eq!(answer["results"][0]["dropped"], "echo", "{answer}");
    bridge.finish().await;
}

/// A copy restored empty is fed again: `POST /api/v1/groups/{group}/resync` asks another
/// member for its snapshot (`"initial": true` changes), which reaches the empty copy; an
/// initial change never displaces the current version.
async fn resync_feeds_an_emptied_member_again(backend: Backend) {
    let (bridge, members) = start_group(backend, "resync", "last_writer_wins").await;
    for i in 0..5 {
        members[0]
            .write(
                &format!("r-{i}"),
                json!({"Description": format!("item {i}")}),
            )
            .await;
    }
    eventually(Duration::from_secs(20), "c has the 5 objects", || {
        members[2].objects.lock().unwrap().len() == 5
    })
    .await;
    settle(&members, Duration::from_secs(1), Duration::from_secs(30)).await;
    // c is restored from an empty backup.
    members[2].objects.lock().unwrap().clear();
    let (status, answer) = admin(
        &bridge,
        reqwest::Method::POST,
        "/api/v1/groups/copies/resync",
        Some(json!({"node": "c", "from": "a"})),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["from"], "a");
    eventually(Duration::from_secs(20), "c has the 5 objects again", || {
        members[2].objects.lock().unwrap().len() == 5
    })
    .await;
    settle(&members, Duration::from_secs(1), Duration::from_secs(30)).await;
    let states = snapshot(&members);
    assert_eq!(states[2], states[0]);
    assert_eq!(states[1], states[0]);
    // Bad requests name the problem.
    for (body, want) in [
        (json!({"node": "zz"}), "node"),
        (json!({"node": "c", "from": "c"}), "from"),
        (json!({"node": "c", "from": "x"}), "from"),
    ] {
        let (status, answer) = admin(
            &bridge,
            reqwest::Method::POST,
            "/api/v1/groups/copies/resync",
            Some(body),
        )
        .await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().starts_with(want),
            "{answer}"
        );
    }
    let (status, _) = admin(
        &bridge,
        reqwest::Method::POST,
        "/api/v1/groups/nope/resync",
        Some(json!({"node": "c"})),
    )
    .await;
    assert_eq!(status, 404);
    bridge.finish().await;
}

both_backends!(
    resync_feeds_an_emptied_member_again,
    three_members_converge_after_1000_concurrent_updates,
    the_policy_decides_concurrent_writes_deterministically,
    an_echo_is_answered_accepted_recorded_and_not_passed_on,
);
