//! Store loss (issue 13): a private redis-server, started and stopped by each test by its
//! PID, is restarted empty under a running lxbridge. Sequence and inbox numbers keep growing
//! (floored by Redis's clock), the newest change to an object stays the newest at the
//! target, the loss is logged once and counted, nothing accepted is lost. Also the short,
//! renewed idempotency reservations (an instance killed mid-publish doesn't block a retry),
//! on both backends.
//!
//! Needs RabbitMQ on 127.0.0.1:5672 and `redis-server` on the PATH: without them the tests
//! fail (they never skip).

use crate::common::*;
use crate::servers::free_port;
use lxbridge::store::{IdState, RedisStore, Store};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Microseconds since the epoch, by this machine's clock (Redis runs on the same one).
fn now_us() -> i64 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()) as i64
}

/// A redis-server of the test's own, without persistence: a restart comes back empty.
/// Stopped by its PID when dropped (a failing test too).
struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    async fn start(name: &str) -> PrivateRedis {
        let dir = std::env::temp_dir()
            .join("lxbridge-tests")
            .join(unique_prefix(name));
        let mut redis = PrivateRedis {
            port: free_port(),
            dir,
            child: None,
        };
        redis.spawn().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn spawn(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on the PATH (apt-get install redis-server)");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .is_ok()
                    {
                        return;
                    }
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "private redis-server on port {} did not answer",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9 by PID and wait for the process.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it and starts it again on the same port, empty.
    async fn restart_empty(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn redis_store(redis: &PrivateRedis, prefix: &str) -> RedisStore {
    let mut config = lxbridge::config::Config::parse("", "test").unwrap();
    config.store.redis_url = redis.url();
    config.broker.prefix = prefix.to_string();
    config.server.dedupe_window = lxbridge::config::Duration(Duration::from_secs(3600));
    config.store.retention = lxbridge::config::Duration(Duration::from_secs(3600));
    config.store.history_max = 50;
    let gauge = prometheus::IntGaugeVec::new(
        prometheus::Opts::new("lx_store_endpoint", "test"),
        &["endpoint", "via"],
    )
    .unwrap();
    RedisStore::new(&config, gauge).unwrap()
}

/// Calls the store until it answers (its shared connection breaks when Redis restarts).
async fn answered<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, lxbridge::store::StoreError>>,
{
    let start = Instant::now();
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(10), "store: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_stay_above_the_clock_and_grow_through_an_empty_restart() {
    let mut redis = PrivateRedis::start("counters").await;
    let prefix = unique_prefix("counters");
    let store = redis_store(&redis, &prefix);
    // A counter left small (by an older lxbridge) is lifted to the clock.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}:seq:central"))
        .arg(41)
        .query_async(&mut conn)
        .await
        .unwrap();
    let before = now_us();
    let a = store.admit("central", &[], 3).await.unwrap().first_seq;
    assert!(a > before, "{a} above the clock {before}");
    assert!(a < 1 << 53, "{a} is exact in a double");
    let b = store.admit("central", &[], 1).await.unwrap().first_seq;
    assert!(
        b >= a + 3,
        "the three numbers of the first call are taken: {b}"
    );
    let m1 = store.next_message_no("branch").await.unwrap();
    let m2 = store.next_message_no("branch").await.unwrap();
    assert!(m1 > before && m2 > m1, "{m1} {m2}");

    redis.restart_empty().await;
    let c = answered(|| store.admit("central", &[], 1)).await.first_seq;
    assert!(c > b, "after an empty restart seq {c} > {b}");
    let m3 = answered(|| store.next_message_no("branch")).await;
    assert!(m3 > m2, "after an empty restart message_no {m3} > {m2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loss_marker_tells_an_empty_restart_once() {
    let mut redis = PrivateRedis::start("marker").await;
    let store = redis_store(&redis, &unique_prefix("marker"));
    assert!(!store.check_loss().await.unwrap(), "first beat");
    assert!(!store.check_loss().await.unwrap(), "second beat");
    redis.restart_empty().await;
    assert!(answered(|| store.check_loss()).await, "the loss is seen");
    assert!(!store.check_loss().await.unwrap(), "and told once");
    assert!(!store.check_loss().await.unwrap(), "and told once");
}

/// A pending reservation expires within seconds unless renewed; a renewal never touches an
/// accepted id.
async fn pending_reservation_is_short_and_renewed(store: &dyn Store) {
    let ttl = Duration::from_secs(lxbridge::store::PENDING_ID_TTL_SECS);
    assert!(ttl <= Duration::from_secs(8), "short: {ttl:?}");
    let admit =
        |id: &'static str| async move { store.admit("central", &[id], 1).await.unwrap().ids[0] };
    assert_eq!(admit("renewed").await, IdState::Fresh);
    assert_eq!(admit("left").await, IdState::Fresh);
    assert_eq!(admit("accepted").await, IdState::Fresh);
    store.commit_ids("central", &["accepted"]).await.unwrap();
    // Renewed every 2 s past its TTL: still being published.
    let start = Instant::now();
    while start.elapsed() < ttl + Duration::from_secs(2) {
        store
            .renew_ids("central", &["renewed", "accepted"])
            .await
            .unwrap();
        tokio::time::sleep(lxbridge::store::PENDING_ID_RENEW).await;
    }
    assert_eq!(admit("renewed").await, IdState::InFlight);
    assert_eq!(
        admit("left").await,
        IdState::Fresh,
        "a reservation nobody renews (its instance died) is gone after {ttl:?}"
    );
    assert_eq!(admit("accepted").await, IdState::Duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pending_reservation_is_short_and_renewed() {
    let redis = PrivateRedis::start("reserve").await;
    let prefix = unique_prefix("reserve");
    let store = redis_store(&redis, &prefix);
    pending_reservation_is_short_and_renewed(&store).await;
    // A renewal keeps an accepted id's dedupe window, not the short TTL.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{prefix}:d:central:accepted"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 3000, "accepted id keeps its window: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_pending_reservation_is_short_renewed_and_gone_after_a_restart() {
    let dir = data_dir(&unique_prefix("reserve-embedded"));
    let db = lxbridge::embedded::Db::open(&dir).unwrap();
    let store = lxbridge::embedded::EmbeddedStore::new(
        db.clone(),
        Duration::from_secs(3600),
        Duration::from_secs(3600),
        50,
    );
    pending_reservation_is_short_and_renewed(&store).await;
    // A process that died mid-publish leaves "renewed" pending; the next one (one process
    // per data_dir) starts without it, and keeps the accepted one.
    drop(store);
    db.close().await;
    drop(db);
    let db = lxbridge::embedded::Db::open(&dir).unwrap();
    let store = lxbridge::embedded::EmbeddedStore::new(
        db.clone(),
        Duration::from_secs(3600),
        Duration::from_secs(3600),
        50,
    );
    let states = store
        .admit("central", &["renewed", "accepted"], 1)
        .await
        .unwrap()
        .ids;
    assert_eq!(states, [IdState::Fresh, IdState::Duplicate]);
    assert!(!store.check_loss().await.unwrap(), "embedded: never a loss");
    db.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------------
// The binary through an empty Redis restart (issue 13, acceptance 4)

/// The lxbridge binary with its log captured.
struct Binary {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
}

impl Binary {
    fn start(config: &std::path::Path) -> Binary {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lxbridge"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("lxbridge binary starts");
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("lxbridge: {line}");
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        Binary { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The value of a metric line (labels exactly as rendered), 0 when absent.
pub(crate) fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_redis_restart_keeps_the_newest_change_and_numbers_growing() {
    let mut redis = PrivateRedis::start("loss").await;
    let shop = Target::start().await;
    // The older change of each object fails the first time: it waits in the retry step
    // (8 s) across the restart.
    let failed: Arc<Mutex<HashSet<String>>> = Arc::default();
    {
        let failed = failed.clone();
        shop.set_verdict(move |c| {
            let id = c["id"].as_str().unwrap().to_string();
            (id.ends_with("-old") && failed.lock().unwrap().insert(id))
                .then(|| ("busy, later please".to_string(), true))
        });
    }
    let prefix = unique_prefix("loss");
    let port = free_port();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "5s"
[broker]
url = "{AMQP_URL}"
prefix = "{prefix}"
[store]
redis_url = "{redis}"
[admin]
token = "admin-secret"
[retry]
delays = ["8s"]
[[node]]
name = "central"
token = "central-secret"
[[node]]
name = "shop"
token = "shop-secret"
deliver = {{ mode = "push", url = "{shop}", batch_max = 20, concurrency = 2 }}
[[node]]
name = "branch"
token = "branch-secret"
deliver = {{ mode = "pull", batch_max = 100, lease = "30s" }}
[[route]]
from = "central"
to = ["shop", "branch"]
"#,
        redis = redis.url(),
        shop = shop.url(),
    );
    let config = lxbridge::config::Config::parse(&text, "t").unwrap();
    let path = std::env::temp_dir().join(format!("{prefix}.toml"));
    std::fs::write(&path, &text).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let bridge = Binary::start(&path);
    let start = Instant::now();
    while !matches!(http.get(format!("{base}/readyz")).send().await, Ok(r) if r.status() == 200) {
        assert!(start.elapsed() < Duration::from_secs(30), "lxbridge ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let post = |changes: Value| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            // 503 while lxbridge reconnects to the restarted Redis: nothing was accepted.
            let start = Instant::now();
            loop {
                let resp = http
                    .post(format!("{base}/api/v1/nodes/central/changes"))
                    .bearer_auth("central-secret")
                    .header("content-type", "application/json")
                    .body(changes.to_string())
                    .send()
                    .await
                    .unwrap();
                let (status, body) = json_of(resp).await;
                if status == 202 {
                    return body;
                }
                assert_eq!(status, 503, "{body}");
                assert!(start.elapsed() < Duration::from_secs(10), "{body}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let change = |id: &str, reference: &str, v: i64| json!({"id": id, "type": "Catalog.X", "ref": reference, "data": {"v": v}});
    let poll = || {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let resp = http
                .get(format!("{base}/api/v1/nodes/branch/inbox?limit=100&wait=2"))
                .bearer_auth("branch-secret")
                .send()
                .await
                .unwrap();
            json_of(resp).await.1
        }
    };
    let ack = |n: i64| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let resp = http
                .post(format!("{base}/api/v1/nodes/branch/inbox/ack"))
                .bearer_auth("branch-secret")
                .header("content-type", "application/json")
                .body(json!({ "message_no": n }).to_string())
                .send()
                .await
                .unwrap();
            json_of(resp).await
        }
    };
    // The branch takes messages until it has the ids wanted; returns the ids received and
    // the numbers seen.
    let drain = |want: &'static [&'static str]| async move {
        let mut got = Vec::new();
        let mut numbers = Vec::new();
        let start = Instant::now();
        while !want.iter().all(|w| got.iter().any(|g| g == w)) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "branch got {got:?}"
            );
            let msg = poll().await;
            let Some(n) = msg["message_no"].as_i64() else {
                continue;
            };
            numbers.push(n);
            for c in msg["changes"].as_array().unwrap() {
                got.push(c["id"].as_str().unwrap().to_string());
            }
            let (status, body) = ack(n).await;
            assert_eq!(status, 200, "{body}");
        }
        (got, numbers)
    };

    // Object a: its older change waits in the retry step. Object b: the same, and its newer
    // change is delivered before the restart (its mark then lives only in lxbridge's memory).
    let mut accepted = Vec::new();
    let body = post(json!([change("a-old", "a", 1), change("b-old", "b", 1)])).await;
    assert_eq!(body["accepted"], 2, "{body}");
    accepted.extend(["a-old", "b-old"]);
    eventually(
        Duration::from_secs(10),
        "both older changes failed once",
        || failed.lock().unwrap().len() == 2,
    )
    .await;
    post(json!([change("b-new", "b", 2)])).await;
    accepted.push("b-new");
    eventually(Duration::from_secs(10), "b-new at the shop", || {
        shop.distinct_ids().contains("b-new")
    })
    .await;
    // (b-old may be superseded by b-new in the same inbox message.)
    let (branch_before, numbers_before) = drain(&["a-old", "b-new"]).await;
    let seq_before = shop
        .received()
        .iter()
        .map(|r| r.change["seq"].as_i64().unwrap())
        .max()
        .unwrap();

    redis.restart_empty().await;
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "the restart is inside the retry step"
    );
    // A newer change of a, without a client seq.
    post(json!([change("a-new", "a", 2)])).await;
    accepted.push("a-new");
    eventually(Duration::from_secs(10), "a-new at the shop", || {
        shop.distinct_ids().contains("a-new")
    })
    .await;
    let (branch_after, numbers_after) = drain(&["a-new"]).await;
    assert_eq!(branch_after, ["a-new"]);
    let highest_before = numbers_before.iter().max().unwrap();
    assert!(
        numbers_after.iter().all(|n| n > highest_before),
        "inbox numbers after the restart {numbers_after:?} > before {numbers_before:?}"
    );

    // Both older changes come back from their retry step and are superseded.
    let metrics = || {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.get(format!("{base}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let superseded = "lx_deliveries_total{result=\"superseded\",target=\"shop\"}";
    let wait = Instant::now();
    while metric(&metrics().await, superseded) < 2.0 {
        assert!(
            wait.elapsed() < Duration::from_secs(30),
            "both older changes superseded: {}",
            metrics().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let received = shop.received();
    let last = |reference: &str| {
        received
            .iter()
            .rev()
            .find(|r| r.change["ref"] == reference)
            .map(|r| r.change["id"].as_str().unwrap().to_string())
    };
    assert_eq!(last("a").as_deref(), Some("a-new"), "a ends on its newest");
    assert_eq!(last("b").as_deref(), Some("b-new"), "b ends on its newest");
    let a_new_seq = received
        .iter()
        .find(|r| r.change["id"] == "a-new")
        .unwrap()
        .change["seq"]
        .as_i64()
        .unwrap();
    assert!(
        a_new_seq > seq_before,
        "seq after the restart {a_new_seq} > {seq_before}"
    );
    // Nothing accepted is lost: every change is at the branch; at the shop each object's
    // newest arrived and the older ones were superseded; nothing in the DLQ.
    let ids = shop.distinct_ids();
    assert!(ids.contains("a-new") && ids.contains("b-new"), "{ids:?}");
    assert!(!ids.contains("a-old") && !ids.contains("b-old"), "{ids:?}");
    // At the branch, each change was received or superseded by its object's newer one.
    let all_branch: HashSet<String> = branch_before.into_iter().chain(branch_after).collect();
    for id in ["a-old", "b-new", "a-new"] {
        assert!(
            all_branch.contains(id),
            "{id} at the branch: {all_branch:?}"
        );
    }
    let branch_superseded = metric(
        &metrics().await,
        "lx_deliveries_total{result=\"superseded\",target=\"branch\"}",
    );
    assert_eq!(
        all_branch.len() + branch_superseded as usize,
        accepted.len(),
        "at the branch {all_branch:?}, {branch_superseded} superseded"
    );
    assert_eq!(queue_len(&format!("{prefix}.dlq.shop")).await, 0);
    assert_eq!(queue_len(&format!("{prefix}.dlq.branch")).await, 0);

    // The loss: counted once, logged once at ERROR.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = metrics().await;
    assert_eq!(metric(&text, "lx_store_losses_total"), 1.0, "{text}");
    let log = bridge.log();
    let told: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the store lost data"))
        .collect();
    assert_eq!(told.len(), 1, "logged once: {log}");
    assert!(told[0].contains("ERROR"), "{}", told[0]);

    drop(bridge);
    cleanup(&config).await;
    let _ = std::fs::remove_file(path);
}
