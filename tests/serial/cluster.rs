//! Cluster-ready connections (issue 14), on servers each test starts for itself and stops:
//! none of them touches the machine's RabbitMQ (5672) or Redis (6379).
//!
//! - a 3-node RabbitMQ cluster and two lxbridge processes given the three URLs: under load,
//!   kill -9 of the node their connections are on, then (after it is back) of the node that
//!   leads the target's queue: every change answered 202 arrives, in order per object, and
//!   ingress answers 503 + Retry-After only while the failover lasts;
//! - amqps:// and rediss:// with a CA the test made: changes flow; with another CA, a clear
//!   error naming the URL, at `validate --connect` and in `/readyz`, within the connect timeout;
//! - Redis Sentinel: kill -9 of the master under load; lxbridge follows the promoted replica,
//!   nothing accepted is lost, sequence and inbox numbers never go back.
//!
//! The servers are heavy for 2 cores: the tests take turns ([`crate::TURN`], shared with
//! `broker_restart`).

use crate::fleet::*;
use crate::servers::{self, RabbitCluster, RedisServer, Sentinels, TestCa};
use crate::TURN;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs blocking harness work (starting, killing servers) off the test's runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("harness call")
}

/// Runs `f` on the cluster off the test's runtime, handing the cluster back.
async fn on_cluster<T: Send + 'static>(
    mut rabbit: RabbitCluster,
    f: impl FnOnce(&mut RabbitCluster) -> T + Send + 'static,
) -> (RabbitCluster, T) {
    blocking(move || {
        let out = f(&mut rabbit);
        (rabbit, out)
    })
    .await
}

/// The queues as a live node sees them: type, leader, members, online members, depth.
fn queue_state(r: &mut RabbitCluster) -> String {
    let live = r.running().first().copied().unwrap_or(0);
    let args = [
        "list_queues",
        "name",
        "type",
        "leader",
        "members",
        "online",
        "messages",
    ];
    r.try_ctl(live, &args).unwrap_or_else(|e| e)
}

/// Ready and unacked per queue, and each consumer with whether it is the active one.
fn consumer_state(r: &mut RabbitCluster) -> String {
    let live = r.running().first().copied().unwrap_or(0);
    let queues = [
        "list_queues",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "consumers",
    ];
    let consumers = [
        "list_consumers",
        "queue_name",
        "channel_pid",
        "consumer_tag",
        "active",
        "activity_status",
    ];
    format!(
        "{}\n{}",
        r.try_ctl(live, &queues).unwrap_or_else(|e| e),
        r.try_ctl(live, &consumers).unwrap_or_else(|e| e)
    )
}

/// Waits until every quorum queue under `prefix` has all `n` members online: a queue killed
/// in its first seconds may have a member that never started (what a cluster in service,
/// whose queues are older, doesn't see).
fn wait_replicated(r: &mut RabbitCluster, prefix: &str, n: usize) -> String {
    let started = Instant::now();
    loop {
        let state = queue_state(r);
        let short: Vec<&str> = state
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter(|l| {
                let cols: Vec<&str> = l.split('\t').collect();
                cols.get(1) == Some(&"quorum")
                    && cols.get(4).map_or(0, |c| c.matches("@localhost").count()) < n
            })
            .collect();
        if short.is_empty() && state.contains(prefix) {
            return state;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "quorum queues without {n} online members after 60 s: {short:?}\n{state}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The warnings and errors of every node's log, the last of each (for a stall's report).
fn node_log_warnings(r: &RabbitCluster) -> String {
    let mut out = Vec::new();
    let Ok(nodes) = std::fs::read_dir(r.dir()) else {
        return String::new();
    };
    for node in nodes.flatten() {
        let Ok(logs) = std::fs::read_dir(node.path().join("log")) else {
            continue;
        };
        for log in logs.flatten() {
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            let bad: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("[warning]") || l.contains("[error]"))
                .collect();
            let tail = &bad[bad.len().saturating_sub(15)..];
            out.push(format!("{}:\n{}", log.path().display(), tail.join("\n")));
        }
    }
    out.join("\n")
}

fn toml_list(urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(|u| toml_string(u)).collect();
    format!("[{}]", quoted.join(", "))
}

// ---------------------------------------------------------------------------------------
// Load: batches of one change per object, posted until each is taken

/// What the load saw: the ids taken, the non-202 answers with when they came.
#[derive(Default)]
struct Seen {
    taken: HashSet<String>,
    /// (since start, status, Retry-After present) of each answer that was not 202.
    refusals: Vec<(Duration, u16, bool, String)>,
    /// The highest seq taken per object.
    last_seq: HashMap<String, i64>,
}

struct Load {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    batches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    started: Instant,
}

impl Load {
    /// Posts `objects` changes per batch (seq = batch number, or none so lxbridge numbers
    /// them), alternating between `bases`, each batch until all of it is taken.
    fn start(bases: Vec<String>, objects: usize, with_seq: bool) -> Load {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let batches = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let (s, halt, count) = (seen.clone(), stop.clone(), batches.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            let mut k = 0usize;
            while !halt.load(Ordering::SeqCst) {
                k += 1;
                let batch: Vec<Value> = (0..objects)
                    .map(|o| {
                        let mut c = json!({"id": format!("c{o}-{k}"), "type": "Catalog.X",
                            "ref": guid(o as u64), "data": {"seq": k}});
                        if with_seq {
                            c["seq"] = json!(k);
                        }
                        c
                    })
                    .collect();
                post_all(&http, &bases, k, batch, &s, started).await;
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        Load {
            seen,
            stop,
            batches,
            task,
            started,
        }
    }

    fn batches(&self) -> usize {
        self.batches.load(Ordering::SeqCst)
    }

    /// Waits until `n` more batches were taken (at most `timeout`).
    async fn advance(&self, n: usize, timeout: Duration, what: &str) {
        if let Err(stalled) = self.try_advance(n, timeout).await {
            panic!("{what}: {stalled}");
        }
    }

    /// Waits until `n` more batches were taken; an error saying where it stalled after
    /// `timeout`.
    async fn try_advance(&self, n: usize, timeout: Duration) -> Result<(), String> {
        let goal = self.batches() + n;
        let start = Instant::now();
        while self.batches() < goal {
            if start.elapsed() > timeout {
                let last = self.seen.lock().unwrap().refusals.last().cloned();
                return Err(format!(
                    "the load stalled at batch {} for {timeout:?}; last refusal: {last:?}",
                    self.batches()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        Arc::try_unwrap(self.seen)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }

    fn since_start(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Posts one batch until every change of it is taken, moving to the next instance after
/// any answer but 202.
async fn post_all(
    http: &reqwest::Client,
    bases: &[String],
    k: usize,
    batch: Vec<Value>,
    seen: &Mutex<Seen>,
    started: Instant,
) {
    let mut rest = batch;
    let mut i = k;
    let began = Instant::now();
    while !rest.is_empty() {
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "batch {k} not taken in 120 s"
        );
        let base = &bases[i % bases.len()];
        i += 1;
        let resp = http
            .post(format!("{base}/api/v1/nodes/central/changes"))
            .bearer_auth("central-secret")
            .header("content-type", "application/json")
            .body(Value::Array(rest.clone()).to_string())
            .send()
            .await;
        let Ok(resp) = resp else {
            seen.lock()
                .unwrap()
                .refusals
                .push((started.elapsed(), 0, false, "no answer".into()));
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let status = resp.status().as_u16();
        let retry_after = resp.headers().contains_key("retry-after");
        let body: Value = resp
            .text()
            .await
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let taken = taken_ids(&body);
        let why = body["error"].as_str().map(str::to_string).or_else(|| {
            body["results"].as_array().and_then(|r| {
                r.iter()
                    .find_map(|x| x["error"].as_str().map(str::to_string))
            })
        });
        record(
            seen,
            started,
            (status, retry_after, why.unwrap_or_default()),
            &rest,
            &taken,
            k,
        );
        rest.retain(|c| !taken.contains(c["id"].as_str().unwrap()));
        if !rest.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Notes an answer: a refusal, and the changes it took.
fn record(
    seen: &Mutex<Seen>,
    started: Instant,
    (status, retry_after, why): (u16, bool, String),
    sent: &[Value],
    taken: &HashSet<String>,
    k: usize,
) {
    let mut s = seen.lock().unwrap();
    if status != 202 {
        s.refusals
            .push((started.elapsed(), status, retry_after, why));
    }
    for c in sent
        .iter()
        .filter(|c| taken.contains(c["id"].as_str().unwrap()))
    {
        let r = c["ref"].as_str().unwrap().to_string();
        s.last_seq.insert(r, k as i64);
    }
    s.taken.extend(taken.iter().cloned());
}

/// The longest run of refusals with no more than `gap` between two of them.
fn longest_refusal(refusals: &[(Duration, u16, bool, String)], gap: Duration) -> Duration {
    let mut longest = Duration::ZERO;
    let mut run: Option<(Duration, Duration)> = None;
    for &(at, ..) in refusals {
        run = match run {
            Some((first, last)) if at.saturating_sub(last) <= gap => Some((first, at)),
            _ => Some((at, at)),
        };
        let (first, last) = run.unwrap();
        longest = longest.max(last - first);
    }
    longest
}

/// `/readyz` of an instance as JSON (status, body).
async fn readyz(http: &reqwest::Client, base: &str) -> (u16, Value) {
    match http.get(format!("{base}/readyz")).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// Every change taken arrived unless a newer one of its object did (an older change waiting
/// behind a newer one is superseded, by design), per object in order, each object ending on
/// its last; a change lost is shown with what the target got of its object and its history.
async fn assert_all_arrived_in_order(
    fleet: &Cluster,
    target: &JitterTarget,
    seen: &Seen,
    what: &str,
) {
    let snapshot = target.snapshot();
    let got = target.ids();
    let newest = |r: &str| {
        snapshot
            .get(r)
            .and_then(|g| g.iter().map(|g| g.data_seq).max())
    };
    let lost: Vec<&String> = seen
        .taken
        .iter()
        .filter(|id| !got.contains(*id))
        .filter(|id| {
            let (object, k) = id[1..].split_once('-').unwrap();
            let r = guid(object.parse().unwrap());
            newest(&r).is_none_or(|n| n <= k.parse().unwrap())
        })
        .collect();
    if let Some(id) = lost.first() {
        let object: u64 = id[1..id.find('-').unwrap()].parse().unwrap();
        let r = guid(object);
        let received: Vec<i64> = snapshot
            .get(&r)
            .map(|g| g.iter().map(|g| g.data_seq).collect())
            .unwrap_or_default();
        let (_, history) = fleet.admin_get(0, &format!("/api/v1/objects/{r}")).await;
        panic!(
            "{what}: {} of {} taken changes never arrived and nothing newer of their object did, e.g. {:?}; object {r} got {received:?}; its history: {history}",
            lost.len(),
            seen.taken.len(),
            &lost[..lost.len().min(5)]
        );
    }
    let superseded = seen.taken.iter().filter(|id| !got.contains(*id)).count();
    eprintln!(
        "{what}: {} taken, {superseded} superseded by a newer change of their object",
        seen.taken.len()
    );
    let (total, objects, examples) = regressions(&snapshot);
    assert_eq!(
        total, 0,
        "{what}: {total} seq regressions on {objects} objects: {examples:?}"
    );
    for (r, last) in &seen.last_seq {
        let held = snapshot[r].last().map(|g| g.data_seq);
        assert_eq!(held, Some(*last), "{what}: object {r} ends on {held:?}");
    }
}

/// A push target `shop` and a pull node `branch` fed from `central`; `broker` and `store`
/// are lines added to those sections.
fn push_template(target: &str, broker: &str, store: &str) -> String {
    format!(
        r#"
[server]
listen = "{{listen}}"
shutdown_grace = "5s"
[broker]
url = {{amqp}}
prefix = "{{prefix}}"
{{partitions}}
{broker}
[store]
{store}
[admin]
token = "admin-secret"
[retry]
delays = ["1s", "1s"]
[[node]]
name = "central"
token = "central-secret"
[[node]]
name = "shop"
token = "shop-secret"
deliver = {{ mode = "push", url = "{target}", batch_max = 20, concurrency = 4 }}
[[node]]
name = "branch"
token = "branch-secret"
deliver = {{ mode = "pull", batch_max = 50, lease = "5s" }}
[[route]]
from = "central"
to = ["shop", "branch"]
"#
    )
}

// ---------------------------------------------------------------------------------------
// 1. A RabbitMQ cluster loses a node, twice

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_cluster_node_loss_loses_nothing_and_keeps_order() {
    let _turn = TURN.lock().await;
    let mut rabbit = blocking(|| RabbitCluster::start(3, None)).await;
    let redis = blocking(|| RedisServer::start(&[])).await;
    let urls: Vec<String> = (0..3).map(|i| rabbit.amqp_url(i)).collect();
    let target = JitterTarget::start(20).await;
    let store = format!("redis_url = {:?}", redis.url());
    let template = push_template(&target.url(), "", &store)
        .replace("to = [\"shop\", \"branch\"]", "to = [\"shop\"]");
    let mut fleet =
        Cluster::new("cl-nodes", &template).on_own_servers(&toml_list(&urls), &redis.url());
    fleet.start().await;
    fleet.start().await;
    let http = fleet.http.clone();
    let bases = vec![fleet.base(0).to_string(), fleet.base(1).to_string()];

    // Replicated on every node of the cluster.
    let queue = format!("{}.deliver.shop", fleet.prefix);
    let (r, members) = on_cluster(rabbit, |r| {
        r.ctl(
            0,
            &[
                "list_queues",
                "name",
                "members",
                "--quiet",
                "--no-table-headers",
            ],
        )
    })
    .await;
    rabbit = r;
    let line = members
        .lines()
        .find(|l| l.starts_with(&format!("{queue}\t")) || l.starts_with(&format!("{queue} ")))
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        line.matches("@localhost").count(),
        3,
        "{queue} on 3 nodes: {members}"
    );

    let p = fleet.prefix.clone();
    rabbit = on_cluster(rabbit, move |r| wait_replicated(r, &p, 3))
        .await
        .0;
    let load = Load::start(bases.clone(), 40, true);
    // A cluster in service: its queues have run a while before a node is lost (killed in
    // their first seconds, a queue's followers may not have caught up yet, and RabbitMQ
    // 3.10 was seen refusing publishes or not delivering until the dead node came back).
    load.advance(10, Duration::from_secs(60), "before any node is lost")
        .await;
    tokio::time::sleep(Duration::from_secs(10)).await;

    // kill -9 of the node the connections are on.
    let (_, ready) = readyz(&http, &bases[0]).await;
    let on = ready["broker_endpoints"]["publish"]
        .as_str()
        .unwrap()
        .to_string();
    let victim = (0..3)
        .find(|&i| on.ends_with(&format!(":{}", rabbit.amqp_port(i))))
        .unwrap_or_else(|| panic!("{on} is none of the nodes: {ready}"));
    let killed_at = load.since_start();
    rabbit = on_cluster(rabbit, move |r| r.kill(victim)).await.0;
    let advanced = load.try_advance(20, Duration::from_secs(90)).await;
    let (r, state) = on_cluster(rabbit, queue_state).await;
    rabbit = r;
    if let Err(stalled) = advanced {
        let logs = node_log_warnings(&rabbit);
        panic!("after the connections' node died: {stalled}\n{state}\n{logs}");
    }
    for (i, base) in bases.iter().enumerate() {
        let (status, ready) = readyz(&http, base).await;
        assert_eq!(status, 200, "{base}: {ready}");
        for role in ["publish", "consume"] {
            let now = ready["broker_endpoints"][role].as_str().unwrap_or_default();
            assert_ne!(now, on, "{base} {role} moved off the dead node: {ready}");
        }
        let metrics = fleet.metrics(i).await;
        let shown: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("lx_broker_endpoint{"))
            .collect();
        assert_eq!(shown.len(), 2, "one node per connection: {shown:?}");
        for line in shown {
            assert!(
                !line.contains(&on) && line.ends_with(" 1"),
                "the dashboard sees the move: {line}"
            );
        }
    }
    rabbit = on_cluster(rabbit, move |r| r.restart(victim)).await.0;

    // kill -9 of the node that leads the target's queue.
    let q = queue.clone();
    let (r, leader) = on_cluster(rabbit, move |r| r.leader(&q)).await;
    rabbit = r;
    let second_at = load.since_start();
    rabbit = on_cluster(rabbit, move |r| r.kill(leader)).await.0;
    load.advance(20, Duration::from_secs(90), "after the queue leader died")
        .await;
    let seen = load.finish().await;
    target
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    let (r, state) = on_cluster(rabbit, consumer_state).await;
    rabbit = r;
    eprintln!("queues after the load:\n{state}");

    assert_all_arrived_in_order(&fleet, &target, &seen, "cluster").await;
    for (at, status, retry_after, why) in &seen.refusals {
        // 503 + Retry-After, or (some of a request refused by a queue changing leader) the
        // per-change answer to retry it.
        let transient = match status {
            503 => *retry_after,
            207 | 422 => why.ends_with("retry it"),
            _ => false,
        };
        assert!(
            transient,
            "at {at:?} ingress answered {status} (Retry-After: {retry_after}): {why}"
        );
    }
    let longest = longest_refusal(&seen.refusals, Duration::from_secs(2));
    eprintln!(
        "cluster: {} changes taken in {} batches; kills at {killed_at:?} and {second_at:?}; {} refusals, longest run {longest:?}",
        seen.taken.len(),
        seen.taken.len() / 40,
        seen.refusals.len()
    );
    assert!(
        // Measured 0.4–20.5 s on 2 cores shared by three nodes, two instances and the load.
        longest <= Duration::from_secs(30),
        "503s for {longest:?} in a row: longer than a failover takes"
    );
    drop(fleet);
    drop(rabbit);
    drop(redis);
}

// ---------------------------------------------------------------------------------------
// 2. TLS with a private CA, and with the wrong one

/// `lxbridge validate [--connect]` of a config text: (exit code, output, time taken).
fn validate(text: &str, connect: bool) -> (i32, String, Duration) {
    let path = std::env::temp_dir().join(format!("lxt-validate-{}.toml", servers::tag()));
    std::fs::write(&path, text).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_lxbridge"));
    cmd.arg("validate").arg("--config").arg(&path);
    if connect {
        cmd.arg("--connect");
    }
    let started = Instant::now();
    let out = cmd.output().expect("lxbridge validate runs");
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), text, started.elapsed())
}

/// The TLS lines of `[broker]` and `[store]` trusting `ca_file`.
fn tls_lines(ca_file: &std::path::Path) -> String {
    format!("tls = {{ ca_file = {:?} }}", ca_file.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_works_and_a_wrong_ca_is_named() {
    let _turn = TURN.lock().await;
    let (ca, other) = blocking(|| (TestCa::new(), TestCa::other())).await;
    let (rabbit, ca) = blocking(move || (RabbitCluster::start(1, Some(&ca)), ca)).await;
    let (redis, ca) = blocking(move || (RedisServer::tls(&ca), ca)).await;
    let amqps = toml_list(&[rabbit.amqps_url(0)]);
    let target = JitterTarget::start(0).await;
    let config = |ca_file: &std::path::Path| {
        let tls = tls_lines(ca_file);
        let store = format!("redis_url = {:?}\n{tls}", redis.url());
        push_template(&target.url(), &tls, &store)
            .replace("to = [\"shop\", \"branch\"]", "to = [\"shop\"]")
    };

    // The right CA: validate --connect reaches both, and changes flow.
    let good = config(&ca.ca_file());
    let text = render(&good, "127.0.0.1:0", &amqps, "lxt-tls", &redis.url());
    let (code, out, _) = validate(&text, true);
    assert_eq!(code, 0, "validate --connect with the right CA: {out}");
    let mut fleet = Cluster::new("cl-tls", &good).on_own_servers(&amqps, &redis.url());
    fleet.start().await;
    let base = fleet.base(0).to_string();
    let (status, ready) = readyz(&fleet.http, &base).await;
    assert_eq!(status, 200, "{ready}");
    let tls_port = rabbit.tls_port(0);
    assert_eq!(
        ready["broker_endpoints"]["publish"],
        format!("localhost:{tls_port}"),
        "{ready}"
    );
    assert_eq!(
        ready["store_endpoint"],
        format!("localhost:{}", redis.tls_port()),
        "{ready}"
    );
    let load = Load::start(vec![base.clone()], 10, true);
    load.advance(5, Duration::from_secs(60), "over TLS").await;
    let seen = load.finish().await;
    target
        .settle(Duration::from_secs(2), Duration::from_secs(60))
        .await;
    assert_all_arrived_in_order(&fleet, &target, &seen, "TLS").await;
    drop(fleet);

    // Another CA: named with the URL and the reason, within the connect timeout.
    let wrong = config(&other.ca_file());
    let text = render(&wrong, "127.0.0.1:0", &amqps, "lxt-tls", &redis.url());
    let (code, out, took) = validate(&text, false);
    assert_eq!(code, 0, "the other CA is a readable CA file: {out}");
    let (code, out, took_connect) = validate(&text, true);
    assert_eq!(code, 64, "{out}");
    let amqps_shown = format!("amqps://guest:***@localhost:{tls_port}/%2f");
    let broker_line = out
        .lines()
        .find(|l| l.contains(&amqps_shown))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(broker_line.contains("certificate"), "{broker_line}");
    let rediss_shown = format!("rediss://localhost:{}", redis.tls_port());
    let store_line = out
        .lines()
        .find(|l| l.contains(&rediss_shown))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(store_line.contains("certificate"), "{store_line}");
    let bound = lxbridge::broker::CONNECT_TIMEOUT + Duration::from_secs(5);
    assert!(
        took_connect < bound,
        "validate --connect took {took_connect:?} (file checks {took:?})"
    );

    // And a running lxbridge says so in /readyz, never ready, never in plain text.
    let port = servers::free_port();
    let text = render(
        &wrong,
        &format!("127.0.0.1:{port}"),
        &amqps,
        "lxt-tls",
        &redis.url(),
    );
    let path = std::env::temp_dir().join(format!("lxt-wrong-ca-{}.toml", servers::tag()));
    std::fs::write(&path, &text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lxbridge"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "error")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let started = Instant::now();
    let ready = loop {
        let (status, ready) = readyz(&http, &format!("http://127.0.0.1:{port}")).await;
        assert_ne!(
            status, 200,
            "ready with a CA that did not sign the server: {ready}"
        );
        if ready["broker_endpoints"]["error"].is_string() {
            break ready;
        }
        assert!(
            started.elapsed() < bound,
            "no error in /readyz after {bound:?}: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    let error = ready["broker_endpoints"]["error"].as_str().unwrap();
    assert!(
        error.contains(&amqps_shown) && error.contains("certificate"),
        "{error}"
    );
    assert_eq!(ready["store"], false, "{ready}");
    let error = ready["store_error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&rediss_shown) && error.contains("certificate"),
        "{ready}"
    );
    drop(rabbit);
    drop(redis);
}

// ---------------------------------------------------------------------------------------
// 3. Redis Sentinel fails over under load

/// Polls and acks node `branch`'s inbox through the instances in turn until stopped: the
/// message numbers in the order they came, and the ids received.
struct Puller {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<i64>, HashSet<String>)>,
}

impl Puller {
    fn start(bases: Vec<String>) -> Puller {
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            let (mut numbers, mut ids) = (Vec::new(), HashSet::new());
            let mut quiet_since = Instant::now();
            for i in 0.. {
                let base = &bases[i % bases.len()];
                let Ok(msg) = poll(&http, base, 1).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let got = message_ids(&msg);
                if got.is_empty() {
                    // Stopped, and nothing more came for a while: all is in.
                    if halt.load(Ordering::SeqCst) && quiet_since.elapsed() > Duration::from_secs(5)
                    {
                        break;
                    }
                    continue;
                }
                quiet_since = Instant::now();
                let n = msg["message_no"].as_i64().unwrap();
                let other = &bases[(i + 1) % bases.len()];
                if ack(&http, other, n, Vec::new()).await.0 == 200 {
                    numbers.push(n);
                    ids.extend(got);
                }
            }
            (numbers, ids)
        });
        Puller { stop, task }
    }

    async fn finish(self) -> (Vec<i64>, HashSet<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed_and_numbers_never_go_back() {
    let _turn = TURN.lock().await;
    let rabbit = blocking(|| RabbitCluster::start(1, None)).await;
    let mut sentinels = blocking(Sentinels::start).await;
    let amqp = toml_list(&[rabbit.amqp_url(0)]);
    let target = JitterTarget::start(10).await;
    let store = format!(
        "sentinels = {}\nmaster_name = {:?}",
        toml_list(&sentinels.sentinel_urls()),
        sentinels.master_name()
    );
    let template = push_template(&target.url(), "", &store);
    let mut fleet = Cluster::new("cl-sentinel", &template).on_own_servers(&amqp, "unused");
    fleet.start().await;
    fleet.start().await;
    let bases = vec![fleet.base(0).to_string(), fleet.base(1).to_string()];
    let first = sentinels.master_port();
    let (_, ready) = readyz(&fleet.http, &bases[0]).await;
    assert_eq!(
        ready["store_endpoint"],
        format!("127.0.0.1:{first}"),
        "{ready}"
    );

    // lxbridge numbers the changes (no seq given): the numbers must keep growing.
    let load = Load::start(bases.clone(), 20, false);
    let puller = Puller::start(bases.clone());
    load.advance(10, Duration::from_secs(60), "before the failover")
        .await;
    let (s, old) = blocking(move || {
        let old = sentinels.kill_master();
        (sentinels, old)
    })
    .await;
    sentinels = s;
    let (s, new) = blocking(move || {
        let new = sentinels.wait_failover(old, Duration::from_secs(60));
        (sentinels, new)
    })
    .await;
    sentinels = s;
    load.advance(20, Duration::from_secs(90), "after the failover")
        .await;
    let seen = load.finish().await;
    target
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    let (numbers, pulled) = puller.finish().await;

    for base in &bases {
        let (status, ready) = readyz(&fleet.http, base).await;
        assert_eq!(status, 200, "{ready}");
        assert_eq!(
            ready["store_endpoint"],
            format!("127.0.0.1:{new}"),
            "{base}: {ready}"
        );
    }
    let metrics = fleet.metrics(0).await;
    let on_new = format!("lx_store_endpoint{{endpoint=\"127.0.0.1:{new}\",via=\"sentinel\"}} 1");
    assert!(metrics.contains(&on_new), "{on_new} in:\n{metrics}");

    // Shown when something is missing: where the changes are, and what delivery counted.
    let (rabbit, queues) = on_cluster(rabbit, |r| {
        r.ctl(
            0,
            &[
                "list_queues",
                "name",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ],
        )
    })
    .await;
    for i in 0..2 {
        let m = fleet.metrics(i).await;
        let counts: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("lx_deliveries_total") || l.starts_with("lx_changes_"))
            .collect();
        eprintln!("instance {i}: {counts:?}");
    }
    eprintln!("queues:\n{queues}");
    // The push target: everything, in lxbridge's order (its seq), each object's last.
    assert_all_arrived_in_order(&fleet, &target, &seen, "sentinel").await;
    // The pull node: everything, under numbers that only grow.
    // (An older change waiting behind a newer one of its object is superseded there too.)
    let parse = |id: &str| {
        let (o, k) = id[1..].split_once('-').unwrap();
        (o.to_string(), k.parse::<i64>().unwrap())
    };
    let mut newest: HashMap<String, i64> = HashMap::new();
    for (o, k) in pulled.iter().map(|id| parse(id)) {
        let n = newest.entry(o).or_default();
        *n = (*n).max(k);
    }
    let lost: Vec<&String> = seen
        .taken
        .iter()
        .filter(|id| !pulled.contains(*id))
        .filter(|id| {
            let (o, k) = parse(id);
            newest.get(&o).is_none_or(|&n| n <= k)
        })
        .collect();
    assert!(
        lost.is_empty(),
        "{} taken changes never reached branch, nor anything newer of their objects: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        numbers.windows(2).all(|w| w[1] > w[0]),
        "inbox numbers went back: {numbers:?}"
    );
    eprintln!(
        "sentinel: master {old} -> {new}; {} changes taken, {} refusals, longest run {:?}; {} inbox messages",
        seen.taken.len(),
        seen.refusals.len(),
        longest_refusal(&seen.refusals, Duration::from_secs(2)),
        numbers.len()
    );
    drop(fleet);
    drop(sentinels);
    drop(rabbit);
}

// ---------------------------------------------------------------------------------------
// 4. The example config for running at scale validates

#[test]
fn the_cluster_example_config_validates_with_its_certificates_in_place() {
    // Light (openssl and `lxbridge validate`), but it takes its turn like every test here.
    let _turn = TURN.blocking_lock();
    let ca = TestCa::new();
    let dir = std::env::temp_dir().join(format!("lxt-example-{}", servers::tag()));
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/lxbridge.cluster.toml");
    let config = dir.join("lxbridge.toml");
    std::fs::copy(example, &config).unwrap();
    for (from, to) in [
        (ca.ca_file(), "ca.pem"),
        (ca.client_cert(), "client.pem"),
        (ca.client_key(), "client.key"),
    ] {
        std::fs::copy(from, dir.join("certs").join(to)).unwrap();
    }
    let run = |with_certs: bool| {
        if !with_certs {
            let _ = std::fs::remove_file(dir.join("certs/client.key"));
        }
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_lxbridge"));
        cmd.args(["validate", "--config"]).arg(&config);
        for name in ["AMQP_PASSWORD", "REDIS_PASSWORD", "ADMIN_TOKEN"] {
            cmd.env(format!("LXBRIDGE_{name}"), "secret");
        }
        for node in ["CENTRAL", "SHOP", "BRANCH"] {
            cmd.env(format!("LXBRIDGE_{node}_TOKEN"), "secret");
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(true);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = run(false);
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("broker.tls.key_file"),
        "a missing key is named: {out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
