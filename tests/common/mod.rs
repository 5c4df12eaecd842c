//! Test harness: a real lxbridge on port 0, on either backend: the real RabbitMQ and Redis
//! under a unique broker prefix per test, or the embedded backend in a data folder of its
//! own; a real HTTP target server that records what it received and can be told to fail; a
//! TCP proxy that cuts connections (the Toxiproxy idea).
//!
//! [`both_backends!`] turns `async fn test(backend: Backend)` functions into one test per
//! backend (`rabbitmq::test` and `embedded::test`), so behaviour can't diverge.
//!
//! The services must be up: a test that can't reach them fails (it never skips).
#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

/// Which backend a test runs lxbridge on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// RabbitMQ + Redis.
    Rabbit,
    /// The embedded SQLite backend.
    Embedded,
}

/// `both_backends!(a, b)`: tests `rabbitmq::a`, `embedded::a`, … each calling
/// `a(Backend::…)` on a two-thread runtime.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {
        mod rabbitmq {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Rabbit).await
                }
            )+
        }
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Embedded).await
                }
            )+
        }
    };
}

/// The embedded backend's data folder for a prefix (kept across restarts in one test).
pub fn data_dir(prefix: &str) -> std::path::PathBuf {
    std::env::temp_dir().join("lxbridge-tests").join(prefix)
}

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// A broker prefix no other test (or earlier run) uses.
pub fn unique_prefix(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "lxt-{name}-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Waits until `check` is true or panics with `what` after `timeout`.
pub async fn eventually<F: FnMut() -> bool>(timeout: Duration, what: &str, mut check: F) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

// ---------------------------------------------------------------------------------------
// The HTTP target

/// What the target answers for one change: None = ok, Some((error, retry)).
pub type Verdict = Arc<dyn Fn(&Value) -> Option<(String, bool)> + Send + Sync>;

#[derive(Clone, Debug)]
pub struct Received {
    pub change: Value,
    pub authorization: Option<String>,
    pub gzip: bool,
    pub node: String,
}

pub struct TargetInner {
    pub received: Mutex<Vec<Received>>,
    /// Batches (POSTs) received, each as its list of change ids.
    pub batches: Mutex<Vec<Vec<String>>>,
    pub verdict: Mutex<Option<Verdict>>,
    /// Answer every POST with this status instead (0 = normal).
    pub status: AtomicUsize,
    pub delay_ms: AtomicU64,
    /// The target's own ref to answer for a change it takes (for remapping).
    pub target_ref: Mutex<Option<TargetRef>>,
}

pub type TargetRef = Arc<dyn Fn(&Value) -> Option<String> + Send + Sync>;

#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub inner: Arc<TargetInner>,
}

impl Target {
    pub async fn start() -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener).await
    }

    /// Serves on a given listener (to come back on the same port after `Target::stop`).
    pub async fn serve(listener: TcpListener) -> Target {
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(TargetInner {
            received: Mutex::new(Vec::new()),
            batches: Mutex::new(Vec::new()),
            verdict: Mutex::new(None),
            status: AtomicUsize::new(0),
            delay_ms: AtomicU64::new(0),
            target_ref: Mutex::new(None),
        });
        let app = Router::new()
            .route("/receive", post(receive))
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Target { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}/receive", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.inner.received.lock().unwrap().len()
    }

    /// Distinct change ids received.
    pub fn distinct_ids(&self) -> std::collections::HashSet<String> {
        self.received()
            .iter()
            .map(|r| r.change["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// How many times each id arrived.
    pub fn id_counts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for r in self.received() {
            *m.entry(r.change["id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        m
    }

    pub fn set_verdict(
        &self,
        f: impl Fn(&Value) -> Option<(String, bool)> + Send + Sync + 'static,
    ) {
        *self.inner.verdict.lock().unwrap() = Some(Arc::new(f));
    }

    pub fn set_target_ref(&self, f: impl Fn(&Value) -> Option<String> + Send + Sync + 'static) {
        *self.inner.target_ref.lock().unwrap() = Some(Arc::new(f));
    }

    pub fn set_status(&self, status: u16) {
        self.inner.status.store(status as usize, Ordering::SeqCst);
    }
}

async fn receive(State(t): State<Arc<TargetInner>>, headers: HeaderMap, body: Bytes) -> Response {
    let delay = t.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = t.status.load(Ordering::SeqCst);
    if status != 0 {
        return (
            StatusCode::from_u16(status as u16).unwrap(),
            "target is failing on purpose",
        )
            .into_response();
    }
    let gz = headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let raw = if gz {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    } else {
        body.to_vec()
    };
    let parsed: Value = serde_json::from_slice(&raw).expect("lxbridge sent JSON");
    let node = parsed["node"].as_str().unwrap_or_default().to_string();
    let authorization = headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_string());
    let verdict = t.verdict.lock().unwrap().clone();
    let target_ref = t.target_ref.lock().unwrap().clone();
    let mut results = Vec::new();
    let mut ids = Vec::new();
    for change in parsed["changes"].as_array().expect("changes array") {
        ids.push(change["id"].as_str().unwrap_or_default().to_string());
        let outcome = verdict.as_ref().and_then(|v| v(change));
        match outcome {
            None => {
                t.received.lock().unwrap().push(Received {
                    change: change.clone(),
                    authorization: authorization.clone(),
                    gzip: gz,
                    node: node.clone(),
                });
                let mut ok = serde_json::json!({"id": change["id"], "status": "ok"});
                if let Some(r) = target_ref.as_ref().and_then(|f| f(change)) {
                    ok["target_ref"] = Value::String(r);
                }
                results.push(ok);
            }
            Some((error, retry)) => results.push(
                serde_json::json!({"id": change["id"], "status": "error", "error": error, "retry": retry}),
            ),
        }
    }
    t.batches.lock().unwrap().push(ids);
    axum::Json(serde_json::json!({ "results": results })).into_response()
}

// ---------------------------------------------------------------------------------------
// lxbridge under test

pub struct Bridge {
    pub prefix: String,
    pub addr: SocketAddr,
    pub config: lxbridge::config::Config,
    pub http: reqwest::Client,
    running: Option<lxbridge::app::Running>,
}

/// A config template for a backend: `{prefix}`, `{amqp}` and `{redis}` replaced (RabbitMQ),
/// or the lines holding them dropped and an `[embedded]` section in [`data_dir`] added.
pub fn render(backend: Backend, template: &str, prefix: &str, amqp: &str) -> String {
    match backend {
        Backend::Rabbit => template
            .replace("{prefix}", prefix)
            .replace("{amqp}", amqp)
            .replace("{redis}", REDIS_URL),
        Backend::Embedded => {
            let mut text: String = template
                .lines()
                .filter(|l| {
                    let l = l.trim();
                    l != "[broker]"
                        && !l.contains("{amqp}")
                        && !l.contains("{redis}")
                        && !l.contains("{prefix}")
                })
                .map(|l| format!("{l}\n"))
                .collect();
            text.push_str(&format!(
                "\n[embedded]\ndata_dir = {:?}\n",
                data_dir(prefix).display().to_string()
            ));
            text
        }
    }
}

impl Bridge {
    /// Starts lxbridge with a config template and waits until it is ready.
    pub async fn start(backend: Backend, name: &str, template: &str) -> Bridge {
        Self::start_with(backend, &unique_prefix(name), template, AMQP_URL, true).await
    }

    pub async fn start_with(
        backend: Backend,
        prefix: &str,
        template: &str,
        amqp: &str,
        wait_ready: bool,
    ) -> Bridge {
        let text = render(backend, template, prefix, amqp);
        let config =
            lxbridge::config::Config::parse(&text, "test config").expect("test config parses");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = lxbridge::app::start(config.clone(), listener)
            .await
            .expect("lxbridge starts");
        let bridge = Bridge {
            prefix: prefix.to_string(),
            addr: running.addr,
            config,
            http: reqwest::Client::new(),
            running: Some(running),
        };
        if wait_ready {
            bridge.wait_ready(Duration::from_secs(20)).await;
        }
        bridge
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                start.elapsed() < timeout,
                "lxbridge not ready after {timeout:?}: are RabbitMQ ({AMQP_URL}) and Redis ({REDIS_URL}) running?"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// POSTs a body to a node's ingress with Bearer auth.
    pub async fn post(
        &self,
        node: &str,
        token: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (u16, Value) {
        self.post_with(
            node,
            Some(&format!("Bearer {token}")),
            content_type,
            None,
            body,
        )
        .await
    }

    pub async fn post_with(
        &self,
        node: &str,
        authorization: Option<&str>,
        content_type: &str,
        content_encoding: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(self.url(&format!("/api/v1/nodes/{node}/changes")))
            .header("content-type", content_type)
            .body(body);
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        if let Some(e) = content_encoding {
            req = req.header("content-encoding", e);
        }
        let resp = req.send().await.expect("ingress answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("non-JSON answer {status}: {text}"));
        (status, value)
    }

    /// POSTs JSON changes (an array) with Bearer auth.
    pub async fn post_json(&self, node: &str, token: &str, changes: &Value) -> (u16, Value) {
        self.post(
            node,
            token,
            "application/json",
            serde_json::to_vec(changes).unwrap(),
        )
        .await
    }
}

/// Calls the admin API with the config's admin token; the answer as JSON (Null if none).
pub async fn admin(
    bridge: &Bridge,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let token = bridge.config.admin.token.clone().unwrap_or_default();
    let mut req = bridge
        .http
        .request(method, bridge.url(path))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

impl Bridge {
    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        let token = self.config.admin.token.clone().unwrap_or_default();
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Stops lxbridge gracefully (as SIGTERM would).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    /// Stops lxbridge and removes its queues, exchanges and Redis keys (or its data folder).
    pub async fn finish(mut self) {
        self.stop().await;
        cleanup(&self.config).await;
    }

    /// The running lxbridge's shared state (its broker and store), for what the HTTP API
    /// can't set up.
    pub fn state(&self) -> &Arc<lxbridge::AppState> {
        &self.running.as_ref().expect("lxbridge is running").state
    }

    /// The number of changes in a target's DLQ: RabbitMQ's own count of the queue, or (the
    /// embedded backend's database being locked by the running lxbridge) the admin API's.
    pub async fn dlq_len(&self, target: &str) -> u64 {
        match self.config.backend {
            lxbridge::config::Backend::Rabbit => {
                u64::from(queue_len(&format!("{}.dlq.{target}", self.prefix)).await)
            }
            lxbridge::config::Backend::Embedded => {
                let (status, body) = self
                    .admin_get(&format!("/api/v1/dlq/{target}?limit=1"))
                    .await;
                assert_eq!(status, 200, "{body}");
                body["count"].as_u64().expect("DLQ count")
            }
        }
    }
}

/// Deletes everything a config created: its prefix in RabbitMQ and Redis, or the embedded
/// backend's data folder.
pub async fn cleanup(config: &lxbridge::config::Config) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    if config.backend == lxbridge::config::Backend::Embedded {
        let dir = config.data_dir();
        assert!(
            dir.starts_with(std::env::temp_dir().join("lxbridge-tests")),
            "a test's data_dir lives under the temp folder: {}",
            dir.display()
        );
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    let prefix = &config.broker.prefix;
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ reachable for cleanup");
    let ch = conn.create_channel().await.unwrap();
    let (exchanges, queues) = lxbridge::broker::declared_names(config);
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in exchanges {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "cleanup".into()).await;
    let mut redis = redis_conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    for chunk in keys.chunks(500) {
        let _: () = redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}

pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis reachable at 127.0.0.1:6379")
}

/// Message count of a queue (passive declare).
pub async fn queue_len(queue: &str) -> u32 {
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ reachable");
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = conn.close(200, "".into()).await;
    q.message_count()
}

// ---------------------------------------------------------------------------------------
// A TCP proxy that can cut connections

pub struct Proxy {
    pub addr: SocketAddr,
    enabled: Arc<AtomicBool>,
    cut: broadcast::Sender<()>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let enabled = Arc::new(AtomicBool::new(true));
        let (cut, _) = broadcast::channel(4);
        let upstream = upstream.to_string();
        let (en, cut_tx) = (enabled.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    break;
                };
                if !en.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut_rx = cut_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.recv() => {}
                    }
                });
            }
        });
        Proxy { addr, enabled, cut }
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.enabled.store(false, Ordering::SeqCst);
        let _ = self.cut.send(());
    }

    pub fn restore(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}
