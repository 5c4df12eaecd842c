//! lxbridge processes on one config, and what tests of several instances need around them:
//! a jittery push target that records per object the seqs it took, the order check, the
//! clients that post until every change is taken, and metric reading.
#![allow(dead_code)]

use crate::common::{self, AMQP_URL, REDIS_URL};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------
// A jittery push target that records, per object, the seqs it received in order

#[derive(Clone, Debug)]
pub struct Got {
    pub id: String,
    pub seq: i64,
    /// `data.seq` of the delivered change (what the object holds at the target after it).
    pub data_seq: i64,
}

#[derive(Default)]
pub struct JitterInner {
    /// Per ref, every change taken, in the order the target took them.
    by_ref: Mutex<HashMap<String, Vec<Got>>>,
    total: AtomicUsize,
    rng: AtomicU64,
    max_delay_ms: u64,
}

#[derive(Clone)]
pub struct JitterTarget {
    addr: SocketAddr,
    inner: Arc<JitterInner>,
}

impl JitterTarget {
    /// A target answering each POST after a random 0..=`max_delay_ms` ms.
    pub async fn start(max_delay_ms: u64) -> JitterTarget {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        let inner = Arc::new(JitterInner {
            rng: AtomicU64::new(seed),
            max_delay_ms,
            ..Default::default()
        });
        let app = axum::Router::new()
            .route("/receive", axum::routing::post(jitter_receive))
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        JitterTarget { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}/receive", self.addr)
    }

    pub fn snapshot(&self) -> HashMap<String, Vec<Got>> {
        self.inner.by_ref.lock().unwrap().clone()
    }

    pub fn total(&self) -> usize {
        self.inner.total.load(Ordering::SeqCst)
    }

    pub fn ids(&self) -> HashSet<String> {
        self.snapshot()
            .values()
            .flatten()
            .map(|g| g.id.clone())
            .collect()
    }

    /// Waits until nothing arrived for `quiet` (at most `timeout`).
    pub async fn settle(&self, quiet: Duration, timeout: Duration) {
        let start = Instant::now();
        let mut last = self.total();
        let mut since = Instant::now();
        while start.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.total();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
    }
}

/// xorshift64: jitter needs no better randomness.
pub fn next_random(state: &AtomicU64) -> u64 {
    let mut x = state.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    state.store(x, Ordering::Relaxed);
    x
}

pub async fn jitter_receive(
    axum::extract::State(t): axum::extract::State<Arc<JitterInner>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::Json<Value> {
    let delay = next_random(&t.rng) % (t.max_delay_ms + 1);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    let raw = if headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip")
    {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    } else {
        body.to_vec()
    };
    let parsed: Value = serde_json::from_slice(&raw).expect("lxbridge sent JSON");
    let mut results = Vec::new();
    let mut by_ref = t.by_ref.lock().unwrap();
    for c in parsed["changes"].as_array().expect("changes array") {
        let got = Got {
            id: c["id"].as_str().unwrap_or_default().to_string(),
            seq: c["seq"].as_i64().unwrap_or(-1),
            data_seq: c["data"]["seq"].as_i64().unwrap_or(-1),
        };
        let r = c["ref"].as_str().unwrap_or_default().to_string();
        by_ref.entry(r).or_default().push(got);
        t.total.fetch_add(1, Ordering::SeqCst);
        results.push(json!({"id": c["id"], "status": "ok"}));
    }
    axum::Json(json!({ "results": results }))
}

/// Per object: how many times a received seq was lower than the one before it.
pub fn regressions(got: &HashMap<String, Vec<Got>>) -> (usize, usize, Vec<String>) {
    let mut total = 0;
    let mut objects = 0;
    let mut examples = Vec::new();
    let mut refs: Vec<&String> = got.keys().collect();
    refs.sort();
    for r in refs {
        let seqs: Vec<i64> = got[r].iter().map(|g| g.seq).collect();
        let n = seqs.windows(2).filter(|w| w[1] < w[0]).count();
        if n > 0 {
            total += n;
            objects += 1;
            if examples.len() < 3 {
                // A few seqs either side of the first regression.
                let at = seqs.windows(2).position(|w| w[1] < w[0]).unwrap() + 1;
                let window: Vec<String> = seqs[at.saturating_sub(3)..(at + 3).min(seqs.len())]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                examples.push(format!("{r}: …{}…", window.join(",")));
            }
        }
    }
    (total, objects, examples)
}

// ---------------------------------------------------------------------------------------
// A cluster of lxbridge processes on one config

/// The config for every instance of a cluster: `{listen}`, `{amqp}` (a TOML value: a string
/// or a list), `{prefix}`, `{redis}` and `{partitions}` (a whole line) are filled in per
/// instance.
pub fn render(template: &str, listen: &str, amqp: &str, prefix: &str, redis: &str) -> String {
    template
        .replace("{listen}", listen)
        .replace("{amqp}", amqp)
        .replace("{prefix}", prefix)
        .replace("{redis}", redis)
        .replace("{partitions}", "partitions = 4")
}

/// A URL as a TOML string.
pub fn toml_string(url: &str) -> String {
    format!("{url:?}")
}

pub struct Instance {
    base: String,
    child: Option<std::process::Child>,
    config_path: PathBuf,
    log_path: PathBuf,
}

/// N lxbridge processes of the binary on one config; killed (kill -9) and cleaned up (the
/// prefix's queues, exchanges and Redis keys) when dropped, whether the test passed or not.
pub struct Cluster {
    name: String,
    pub prefix: String,
    template: String,
    instances: Vec<Instance>,
    pub http: reqwest::Client,
    /// `broker.url` as TOML: the machine's RabbitMQ unless the test runs its own.
    amqp: String,
    redis: String,
    /// On the machine's RabbitMQ and Redis, whose names under the prefix are removed at
    /// the end; a test's own servers go away whole.
    shared_servers: bool,
}

impl Cluster {
    pub fn new(name: &str, template: &str) -> Cluster {
        Cluster {
            name: name.to_string(),
            prefix: common::unique_prefix(name),
            template: template.to_string(),
            instances: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            amqp: toml_string(AMQP_URL),
            redis: REDIS_URL.to_string(),
            shared_servers: true,
        }
    }

    /// The instances connect to a test's own servers: `broker.url` is `amqp` (a TOML
    /// value) and the store `redis`; nothing is cleaned up on them.
    pub fn on_own_servers(mut self, amqp: &str, redis: &str) -> Cluster {
        self.amqp = amqp.to_string();
        self.redis = redis.to_string();
        self.shared_servers = false;
        self
    }

    /// Starts one more instance and waits until it is ready; its index.
    pub async fn start(&mut self) -> usize {
        let amqp = self.amqp.clone();
        self.start_on(&amqp).await
    }

    /// Starts one more instance connecting to RabbitMQ at `amqp` (a proxy in front of it).
    pub async fn start_with(&mut self, amqp: &str) -> usize {
        self.start_on(&toml_string(amqp)).await
    }

    async fn start_on(&mut self, amqp: &str) -> usize {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let i = self.instances.len();
        let text = render(
            &self.template,
            &format!("127.0.0.1:{port}"),
            amqp,
            &self.prefix,
            &self.redis,
        );
        let dir = std::env::temp_dir().join("lxbridge-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join(format!("{}-{i}.toml", self.prefix));
        let log_path = dir.join(format!("{}-{i}.log", self.prefix));
        std::fs::write(&config_path, &text).unwrap();
        let log = std::fs::File::create(&log_path).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_lxbridge"))
            .args(["run", "--config"])
            .arg(&config_path)
            // LXT_RUST_LOG=info (say) to see more of what the instances did.
            .env(
                "RUST_LOG",
                std::env::var("LXT_RUST_LOG").unwrap_or("warn".into()),
            )
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("lxbridge binary starts");
        self.instances.push(Instance {
            base: format!("http://127.0.0.1:{port}"),
            child: Some(child),
            config_path,
            log_path,
        });
        self.wait_ready(i).await;
        i
    }

    pub async fn wait_ready(&mut self, i: usize) {
        let start = Instant::now();
        loop {
            if let Ok(r) = self
                .http
                .get(format!("{}/readyz", self.instances[i].base))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            let inst = &mut self.instances[i];
            if let Some(status) = inst.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                inst.child = None;
                panic!(
                    "{}: instance {i} exited at start ({status}):\n{}",
                    self.name,
                    log_tail(&inst.log_path, 20)
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{}: instance {i} not ready after 30 s: are RabbitMQ ({AMQP_URL}) and Redis \
                 ({REDIS_URL}) running?\n{}",
                self.name,
                log_tail(&inst.log_path, 20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn base(&self, i: usize) -> &str {
        &self.instances[i].base
    }

    /// kill -9 of one instance; returns once it is gone.
    pub fn kill9(&mut self, i: usize) {
        let mut child = self.instances[i].child.take().expect("instance is running");
        let kill = std::process::Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = child.wait().unwrap();
        assert!(!status.success(), "killed, not exited: {status:?}");
    }

    pub async fn metrics(&self, i: usize) -> String {
        self.http
            .get(format!("{}/metrics", self.base(i)))
            .send()
            .await
            .expect("/metrics answers")
            .text()
            .await
            .unwrap()
    }

    /// `lx_deliveries_total{target, result="ok"}` on instance `i`'s own /metrics.
    pub async fn delivered_ok(&self, i: usize, target: &str) -> f64 {
        metric_sum(
            &self.metrics(i).await,
            "lx_deliveries_total",
            &[("target", target), ("result", "ok")],
        )
    }

    pub async fn admin_get(&self, i: usize, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base(i)))
            .bearer_auth("admin-secret")
            .send()
            .await
            .expect("admin API answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// The config the instances run (for cleanup: only its names matter).
    pub fn cleanup_config(&self) -> Option<lxbridge::config::Config> {
        let amqp = toml_string(AMQP_URL);
        let text = render(
            &self.template,
            "127.0.0.1:0",
            &amqp,
            &self.prefix,
            REDIS_URL,
        );
        lxbridge::config::Config::parse(&text, "test config")
            .or_else(|_| {
                let stripped: String = text
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("partitions"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                lxbridge::config::Config::parse(&stripped, "test config")
            })
            .ok()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (i, inst) in self.instances.iter_mut().enumerate() {
            if let Some(mut child) = inst.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let tail = log_tail(&inst.log_path, 60);
            if std::thread::panicking() && !tail.is_empty() {
                eprintln!(
                    "--- {} instance {i} log ({}):\n{}",
                    self.name,
                    inst.log_path.display(),
                    tail
                );
            } else {
                let _ = std::fs::remove_file(&inst.log_path);
            }
            let _ = std::fs::remove_file(&inst.config_path);
        }
        if !self.shared_servers {
            return;
        }
        let config = self.cleanup_config();
        let prefix = self.prefix.clone();
        // Drop runs inside the test's runtime: clean up on a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Some(config) = config {
                    common::cleanup(&config).await;
                }
                sweep_prefix(&prefix).await;
            });
        })
        .join();
    }
}

pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Deletes whatever queues and exchanges under `<prefix>.` are left (e.g. the partitions of
/// a delivery queue, whose names the config alone doesn't give), as listed by rabbitmqctl
/// where it is installed.
pub async fn sweep_prefix(prefix: &str) {
    let list = |what: &str| -> Vec<String> {
        std::process::Command::new("rabbitmqctl")
            .args([what, "name", "--quiet", "--no-table-headers"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| l.starts_with(&format!("{prefix}.")))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (queues, exchanges) = (list("list_queues"), list("list_exchanges"));
    if queues.is_empty() && exchanges.is_empty() {
        return;
    }
    let Ok(conn) =
        lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    let ch = conn.create_channel().await.unwrap();
    for q in queues {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    for e in exchanges {
        let _ = ch
            .exchange_delete(e.as_str().into(), Default::default())
            .await;
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

/// The sum of a metric's samples whose labels include every given pair.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix('{') else {
            continue;
        };
        let Some((label_text, value)) = rest.split_once('}') else {
            continue;
        };
        let have: HashMap<&str, &str> = label_text
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        if labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

// ---------------------------------------------------------------------------------------
// Configs and clients

/// The start of an instances test's config: server, broker (the placeholders
/// [`Cluster`] fills in), store, admin token, two quick retry steps.
pub const INSTANCES_HEAD: &str = r#"
[server]
listen = "{listen}"
shutdown_grace = "5s"
[broker]
url = {amqp}
prefix = "{prefix}"
{partitions}
[store]
redis_url = "{redis}"
[admin]
token = "admin-secret"
[retry]
delays = ["1s", "1s"]
"#;

pub fn push_config(target: &str, batch_max: usize) -> String {
    format!(
        r#"{INSTANCES_HEAD}[[node]]
name = "central"
token = "central-secret"
[[node]]
name = "shop"
token = "shop-secret"
deliver = {{ mode = "push", url = "{target}", batch_max = {batch_max}, concurrency = 4 }}
[[route]]
from = "central"
to = ["shop"]
"#
    )
}

pub fn pull_config() -> String {
    INSTANCES_HEAD.to_string()
        + r#"[[node]]
name = "central"
token = "central-secret"
[[node]]
name = "branch"
token = "branch-secret"
deliver = { mode = "pull", batch_max = 10, lease = "2s" }
[[route]]
from = "central"
to = ["branch"]
"#
}

/// A GUID-shaped ref (1C's refs are GUIDs), the same for the same `n`.
pub fn guid(n: u64) -> String {
    // splitmix64
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let (hi, lo) = (z ^ (z >> 31), z.rotate_left(17) ^ n);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

pub fn change(id: &str, r: &str, seq: i64) -> Value {
    json!({"id": id, "type": "Catalog.X", "ref": r, "seq": seq, "data": {"seq": seq}})
}

/// POSTs changes from `central`; `Err` for a connection error or a body that is not JSON.
pub async fn post(
    http: &reqwest::Client,
    base: &str,
    changes: &Value,
) -> Result<(u16, Value), String> {
    let resp = http
        .post(format!("{base}/api/v1/nodes/central/changes"))
        .bearer_auth("central-secret")
        .header("content-type", "application/json")
        .body(changes.to_string())
        .send()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(|e| format!("body: {e}"))?;
    let body = serde_json::from_str(&text).map_err(|_| format!("{status}: {text}"))?;
    Ok((status, body))
}

/// Ids an answer took (accepted now, or a duplicate of one accepted before).
pub fn taken_ids(answer: &Value) -> HashSet<String> {
    answer["results"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter(|i| i["status"] == "accepted" || i["status"] == "duplicate")
                .filter_map(|i| i["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Posts `changes` until every one is taken, through `bases[first]` and then, after a
/// connection error, a 503 or a rejected item, through the next live one (every 250 ms, for
/// at most `patience`). The ids answered `accepted`/`duplicate`.
pub async fn post_until_taken(
    http: &reqwest::Client,
    bases: &[String],
    alive: &[Arc<AtomicBool>],
    first: usize,
    changes: &Value,
    patience: Duration,
) -> Result<HashSet<String>, String> {
    let want: HashSet<String> = changes
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    let mut taken = HashSet::new();
    let start = Instant::now();
    let mut i = first;
    let mut last;
    assert!(
        alive.iter().any(|a| a.load(Ordering::SeqCst)),
        "no live instance to post to"
    );
    loop {
        if !alive[i % bases.len()].load(Ordering::SeqCst) {
            i += 1;
            continue;
        }
        let rest: Vec<Value> = changes
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| !taken.contains(c["id"].as_str().unwrap()))
            .cloned()
            .collect();
        match post(http, &bases[i % bases.len()], &Value::Array(rest)).await {
            Ok((status @ (202 | 207 | 422), body)) => {
                taken.extend(taken_ids(&body));
                let refused = body["results"].as_array().and_then(|r| {
                    r.iter()
                        .find(|i| i["status"] == "rejected")
                        .and_then(|i| i["error"].as_str())
                });
                last = format!("{status}, {}", refused.unwrap_or("nothing refused"));
            }
            Ok((status, body)) => last = format!("{status}: {body}"),
            Err(e) => last = e,
        }
        if want.iter().all(|id| taken.contains(id)) {
            return Ok(taken);
        }
        if start.elapsed() > patience {
            return Err(format!(
                "{} of {} changes not taken after {patience:?}; last answer: {last}",
                want.len() - taken.len(),
                want.len()
            ));
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls node `branch`'s inbox (up to 10 changes, waiting up to `wait` s).
pub async fn poll(http: &reqwest::Client, base: &str, wait: u64) -> Result<Value, String> {
    let resp = http
        .get(format!(
            "{base}/api/v1/nodes/branch/inbox?limit=10&wait={wait}"
        ))
        .basic_auth("branch", Some("branch-secret"))
        .send()
        .await
        .map_err(|e| format!("poll: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    if status != 200 {
        return Err(format!("poll answered {status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|_| format!("poll answered {text}"))
}

/// Acks a message of node `branch`'s inbox with per-change `results` (none: all done).
pub async fn ack(
    http: &reqwest::Client,
    base: &str,
    message_no: i64,
    results: Vec<Value>,
) -> (u16, Value) {
    let resp = http
        .post(format!("{base}/api/v1/nodes/branch/inbox/ack"))
        .bearer_auth("branch-secret")
        .header("content-type", "application/json")
        .body(json!({"message_no": message_no, "results": results}).to_string())
        .send()
        .await
        .expect("ack answers");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The ids of a polled message's changes.
pub fn message_ids(msg: &Value) -> Vec<String> {
    msg["changes"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|c| c["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
