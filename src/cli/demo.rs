//! `lxbridge demo`: lxbridge on the embedded backend, a built-in demo target and a few sample
//! 1C changes, all in this process, so a newcomer sees one change delivered and one
//! dead-lettered with one command and nothing else installed.
//!
//! The demo talks to its lxbridge only over HTTP, as a 1C base and an operator would: it
//! posts the samples to the ingress and reads their fate back through the admin API.

use super::admin::encode_segment;
use super::{init_logging, runtime};
use crate::app::{self, Running};
use crate::config::{Config, LogFormat};
use crate::model::parse_change;
use anyhow::{anyhow, bail, Context};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::warn;

// What `lxbridge demo` was asked for (its help is the `Command::Demo` doc).
#[derive(clap::Args)]
pub struct Options {
    /// Where lxbridge listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The folder for the demo's database and config, kept after exit [default: a fresh
    /// folder under the system temp dir, removed on exit].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print the report and stop, instead of running until Ctrl-C.
    #[arg(long)]
    pub exit: bool,
}

/// `lxbridge demo`: [`run`] with only problems logged (the report on stdout is what the
/// demo shows).
pub fn demo(options: Options) -> anyhow::Result<()> {
    init_logging(LogFormat::Text, "warn");
    runtime()?.block_on(run(options))
}

const ADMIN_TOKEN: &str = "demo-admin";
const SOURCE: &str = "central";
const SOURCE_TOKEN: &str = "central-secret";
const TARGET: &str = "site";
/// What lxbridge sends the demo target as `Authorization: Bearer`.
const TARGET_TOKEN: &str = "site-receive-secret";
const TARGET_PATH: &str = "/hs/lx/receive";
/// How long the samples get to be delivered or dead-lettered.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The object states that no longer change by themselves.
const FINAL_STATES: [&str; 4] = ["delivered", "dead", "filtered", "superseded"];

/// A change as a 1C base sends it (XDTO JSON): the project's 1C samples.
struct Sample {
    file: &'static str,
    body: &'static str,
}

macro_rules! sample {
    ($file:literal) => {
        Sample {
            file: $file,
            // FIXTURES (include_str! takes only a literal, relative to src/cli/).
            body: include_str!(concat!("../../tests/fixtures/1c/", $file)),
        }
    };
}

/// Where the samples come from, in the repository.
const FIXTURES: &str = "tests/fixtures/1c";

/// The order names a warehouse the demo target doesn't know, so it is refused for good.
const SAMPLES: [Sample; 4] = [
    sample!("catalog-nomenclature.json"),
    sample!("catalog-counterparty.json"),
    sample!("document-order.json"),
    sample!("register-prices.json"),
];

/// Runs the demo: prints the report, then (without `exit`) keeps lxbridge and the demo
/// target running until SIGINT/SIGTERM.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let dir = DataDir::new(options.data_dir)?;
    let listener = TcpListener::bind(&options.listen).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "; choose another address with --listen (127.0.0.1:0 takes any free port)"
        } else {
            ""
        };
        anyhow!("cannot listen on {}: {e}{hint}", options.listen)
    })?;
    let target = DemoTarget::start().await?;
    let result = run_lxbridge(&dir, listener, &target, options.exit).await;
    target.stop().await;
    result
    // `dir` drops here, after everything stopped: a temporary one is removed.
}

/// Writes the demo config, starts lxbridge with it, shows the demo and stops lxbridge.
async fn run_lxbridge(
    dir: &DataDir,
    listener: TcpListener,
    target: &DemoTarget,
    exit: bool,
) -> anyhow::Result<()> {
    let listen = listener
        .local_addr()
        .context("cannot read the address lxbridge listens on")?;
    let config_path = dir.path.join("demo.toml");
    std::fs::write(&config_path, config_text(listen, &target.url))
        .with_context(|| format!("cannot write the demo config {}", config_path.display()))?;
    let config = Config::load(&config_path)?;
    let running = app::start(config, listener)
        .await
        .context("cannot start lxbridge")?;
    let result = show(&running, target, dir, &config_path, exit).await;
    running.stop().await;
    result
}

/// Posts the samples, waits for their fate, prints the report and, unless `exit`, waits
/// for a signal.
async fn show(
    running: &Running,
    target: &DemoTarget,
    dir: &DataDir,
    config_path: &Path,
    exit: bool,
) -> anyhow::Result<()> {
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")?;
    let mut posted = Vec::with_capacity(SAMPLES.len());
    for sample in &SAMPLES {
        posted.push(post_sample(&client, &base, sample).await?);
    }
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let seen = loop {
        let seen = look(&client, &base, &posted).await?;
        if seen.settled() || Instant::now() >= deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let received = target.received.lock().await.clone();
    let report = Report {
        base: &base,
        target_url: &target.url,
        dir,
        config_path,
        posted: &posted,
        seen: &seen,
        received: &received,
    };
    print!("{report}");
    if !seen.settled() {
        bail!(
            "the sample changes were not all delivered or dead-lettered within {} s (see above)",
            SETTLE_TIMEOUT.as_secs()
        );
    }
    if exit {
        println!(
            "(--exit: stopped after the report; these commands work while `lxbridge demo` runs.)"
        );
        return Ok(());
    }
    println!("Ctrl-C to stop.");
    let stopped = running.shutdown_token();
    tokio::select! {
        _ = signal() => {}
        _ = stopped.cancelled() => {}
    }
    println!("Stopping.");
    Ok(())
}

/// The config the demo runs with: embedded backend, a publishing node and a push node that
/// is the demo target. Written as TOML, as a user would write it, and kept in the data
/// folder so `lxbridge status`/`lxbridge dlq` can use it while the demo runs.
fn config_text(listen: SocketAddr, target_url: &str) -> String {
    format!(
        r#"# The config `lxbridge demo` runs with (written by it; rewritten on each run).

[server]
listen = "{listen}"
shutdown_grace = "5s"

[embedded]
data_dir = "."   # this file's folder

[admin]
token = "{ADMIN_TOKEN}"

[retry]
delays = ["1s", "2s"]   # short, for the demo

# The 1C base: it only publishes.
[[node]]
name = "{SOURCE}"
token = "{SOURCE_TOKEN}"

# The site: the demo target stands in for it.
[[node]]
name = "{TARGET}"
token = "site-secret"
[node.deliver]
mode = "push"
url = "{target_url}"
auth = {{ bearer = "{TARGET_TOKEN}" }}
gzip = false
timeout = "5s"

[[route]]
name = "{SOURCE}-to-{TARGET}"
from = "{SOURCE}"
to = ["{TARGET}"]
"#
    )
}

/// The demo's data folder; a temporary one is removed when dropped (after lxbridge stopped).
struct DataDir {
    path: PathBuf,
    temporary: bool,
}

impl DataDir {
    fn new(given: Option<PathBuf>) -> anyhow::Result<DataDir> {
        let (path, temporary) = match given {
            Some(path) => (path, false),
            None => {
                let path =
                    std::env::temp_dir().join(format!("lxbridge-demo-{}", std::process::id()));
                // Left by an earlier demo that had the same process id and was killed.
                if path.exists() {
                    std::fs::remove_dir_all(&path).with_context(|| {
                        format!("cannot clear the old demo folder {}", path.display())
                    })?;
                }
                (path, true)
            }
        };
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create the data folder {}", path.display()))?;
        let path = std::path::absolute(&path).unwrap_or(path);
        Ok(DataDir { path, temporary })
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self.temporary {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                eprintln!(
                    "lxbridge demo: cannot remove the demo folder {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// A sample lxbridge accepted.
struct Posted {
    file: &'static str,
    kind: String,
    reference: String,
}

async fn post_sample(
    client: &reqwest::Client,
    base: &str,
    sample: &Sample,
) -> anyhow::Result<Posted> {
    let value = serde_json::from_str(sample.body)
        .with_context(|| format!("sample {} is not JSON", sample.file))?;
    let change =
        parse_change(value).map_err(|e| anyhow!("sample {} is not a change: {e}", sample.file))?;
    let response = client
        .post(format!("{base}/api/v1/nodes/{SOURCE}/changes"))
        .bearer_auth(SOURCE_TOKEN)
        .header(header::CONTENT_TYPE, "application/json")
        .body(sample.body)
        .send()
        .await
        .with_context(|| format!("cannot post sample {} to lxbridge", sample.file))?;
    let (status, answer) = read_json(response).await?;
    if status != reqwest::StatusCode::ACCEPTED {
        bail!(
            "lxbridge answered {status} to sample {}: {answer}",
            sample.file
        );
    }
    Ok(Posted {
        file: sample.file,
        kind: change.kind,
        reference: change.reference,
    })
}

async fn read_json(response: reqwest::Response) -> anyhow::Result<(reqwest::StatusCode, Value)> {
    let status = response.status();
    let url = response.url().clone();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("cannot read the answer from {url}"))?;
    let value = serde_json::from_slice(&body).with_context(|| {
        format!(
            "{url} answered {status} with a body that is not JSON: {}",
            String::from_utf8_lossy(&body)
        )
    })?;
    Ok((status, value))
}

/// `GET /api/v1/objects/{ref}`, the part the demo reads.
#[derive(Deserialize)]
struct ObjectView {
    targets: Vec<TargetState>,
}

#[derive(Deserialize)]
struct TargetState {
    #[serde(rename = "type")]
    kind: String,
    target: String,
    state: String,
}

/// `GET /api/v1/dlq/{target}`, the part the demo reads.
#[derive(Deserialize)]
struct DlqPage {
    items: Vec<DeadItem>,
}

#[derive(Deserialize)]
struct DeadItem {
    #[serde(rename = "ref")]
    reference: String,
    error: String,
}

/// What the admin API shows about the posted samples at the target.
struct Seen {
    /// Per posted sample, its state at the target (`None`: none recorded yet).
    states: Vec<Option<String>>,
    /// Per posted sample, its error in the target's DLQ (`None`: not there).
    dead: Vec<Option<String>>,
}

impl Seen {
    /// Every sample is in a final state, and every dead one is listed in the DLQ.
    fn settled(&self) -> bool {
        self.states.iter().zip(&self.dead).all(|(state, dead)| {
            matches!(state.as_deref(), Some(s) if FINAL_STATES.contains(&s))
                && (state.as_deref() != Some("dead") || dead.is_some())
        })
    }
}

async fn look(client: &reqwest::Client, base: &str, posted: &[Posted]) -> anyhow::Result<Seen> {
    let mut states = Vec::with_capacity(posted.len());
    for p in posted {
        let url = format!("{base}/api/v1/objects/{}", encode_segment(&p.reference));
        let (status, answer) = admin_get(client, &url).await?;
        let state = match status {
            reqwest::StatusCode::NOT_FOUND => None,
            reqwest::StatusCode::OK => {
                let view: ObjectView = serde_json::from_value(answer)
                    .with_context(|| format!("{url} answered an unexpected object view"))?;
                view.targets
                    .into_iter()
                    .find(|t| t.target == TARGET && t.kind == p.kind)
                    .map(|t| t.state)
            }
            _ => bail!("{url} answered {status}: {answer}"),
        };
        states.push(state);
    }
    let url = format!("{base}/api/v1/dlq/{TARGET}?limit=100");
    let (status, answer) = admin_get(client, &url).await?;
    if status != reqwest::StatusCode::OK {
        bail!("{url} answered {status}: {answer}");
    }
    let page: DlqPage = serde_json::from_value(answer)
        .with_context(|| format!("{url} answered an unexpected DLQ page"))?;
    let dead = posted
        .iter()
        .map(|p| {
            page.items
                .iter()
                .find(|item| item.reference == p.reference)
                .map(|item| item.error.clone())
        })
        .collect();
    Ok(Seen { states, dead })
}

async fn admin_get(
    client: &reqwest::Client,
    url: &str,
) -> anyhow::Result<(reqwest::StatusCode, Value)> {
    let response = client
        .get(url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .with_context(|| format!("cannot call the admin API at {url}"))?;
    read_json(response).await
}

/// Everything the report shows.
struct Report<'a> {
    base: &'a str,
    target_url: &'a str,
    dir: &'a DataDir,
    config_path: &'a Path,
    posted: &'a [Posted],
    seen: &'a Seen,
    received: &'a [Received],
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.posted.iter().map(|p| p.kind.chars().count());
        let width = width.max().unwrap_or(0);
        self.header(out)?;
        self.posted(out, width)?;
        self.received(out, width)?;
        self.look_around(out)?;
        writeln!(out)
    }
}

impl Report<'_> {
    /// Where lxbridge and the demo target are.
    fn header(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = if self.dir.temporary {
            "removed on exit"
        } else {
            "kept"
        };
        writeln!(out, "lxbridge demo")?;
        writeln!(
            out,
            "  lxbridge     {}  (embedded backend: SQLite in {}, {kept}; \
             no RabbitMQ, no Redis)",
            self.base,
            self.dir.path.display()
        )?;
        writeln!(
            out,
            "  demo target  {}  (stands in for node \"{TARGET}\")",
            self.target_url
        )?;
        writeln!(out)
    }

    /// The samples and what became of them (`width`: of the longest type).
    fn posted(&self, out: &mut fmt::Formatter<'_>, width: usize) -> fmt::Result {
        writeln!(
            out,
            "Node \"{SOURCE}\" posted {} changes as 1C sends them (XDTO JSON); \
             route {SOURCE} -> {TARGET}:",
            self.posted.len()
        )?;
        let seen = self.seen.states.iter().zip(&self.seen.dead);
        for (p, (state, dead)) in self.posted.iter().zip(seen) {
            let state = state.as_deref().unwrap_or("not seen yet");
            writeln!(out, "  {state:<10} {:<width$}  {}", p.kind, p.reference)?;
            if let Some(error) = dead {
                writeln!(out, "  {:<10} error: {error}", "")?;
                writeln!(
                    out,
                    "  {:<10} (in the DLQ of \"{TARGET}\"; sample {FIXTURES}/{})",
                    "", p.file
                )?;
            }
        }
        writeln!(out)
    }

    /// What the demo target was sent and answered.
    fn received(&self, out: &mut fmt::Formatter<'_>, width: usize) -> fmt::Result {
        let n = self.received.len();
        let s = if n == 1 { "" } else { "s" };
        writeln!(out, "The demo target received {n} change{s}:")?;
        for change in self.received {
            let answer = match &change.error {
                None => "ok".to_string(),
                Some(error) => format!("error, retry: false: {error}"),
            };
            writeln!(
                out,
                "  attempt {}  {} {:<width$}  {}  -> {answer}",
                change.attempt, change.op, change.kind, change.reference
            )?;
        }
        writeln!(out)
    }

    /// Ready-to-paste commands.
    fn look_around(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = self.base;
        // The dead change has the most telling history.
        let dead = self.posted.iter().zip(&self.seen.dead);
        let shown = dead
            .clone()
            .find(|(_, dead)| dead.is_some())
            .or_else(|| dead.clone().next())
            .map(|(p, _)| p);
        let admin = format!("curl -sS -H 'Authorization: Bearer {ADMIN_TOKEN}'");
        writeln!(out, "Look around (admin token \"{ADMIN_TOKEN}\"):")?;
        if let Some(p) = shown {
            let reference = encode_segment(&p.reference);
            writeln!(out, "  {}: state per target and history", p.kind)?;
            writeln!(out, "    {admin} {base}/api/v1/objects/{reference}")?;
        }
        writeln!(out, "  dead-letter queue of \"{TARGET}\"")?;
        writeln!(out, "    {admin} {base}/api/v1/dlq/{TARGET}")?;
        writeln!(
            out,
            "  replay it (the demo target refuses the order again, so it returns to the DLQ)"
        )?;
        writeln!(
            out,
            "    {admin} -X POST -H 'Content-Type: application/json' -d '{{}}' \
             {base}/api/v1/dlq/{TARGET}/replay"
        )?;
        writeln!(out, "  metrics")?;
        writeln!(out, "    curl -sS {base}/metrics")?;
        writeln!(out, "  readiness")?;
        writeln!(out, "    curl -sS {base}/readyz")?;
        writeln!(out, "  publish a change of your own as \"{SOURCE}\"")?;
        writeln!(
            out,
            "    curl -sS -H 'Authorization: Bearer {SOURCE_TOKEN}' \
             -H 'Content-Type: application/json' \
             -d '{{\"type\": \"Catalog.Products\", \"ref\": \"p-1\", \
             \"data\": {{\"Description\": \"Chair\"}}}}' \
             {base}/api/v1/nodes/{SOURCE}/changes"
        )?;
        writeln!(
            out,
            "  the config in use (for `lxbridge status REF --config FILE`, \
             `lxbridge dlq list --target {TARGET} --config FILE`)"
        )?;
        writeln!(out, "    {}", self.config_path.display())?;
        Ok(())
    }
}

/// What the demo target was sent, and what it answered.
#[derive(Clone)]
struct Received {
    attempt: u64,
    op: String,
    kind: String,
    reference: String,
    /// `None`: answered ok.
    error: Option<String>,
}

/// A push target (docs/api.md "Delivering to a push node") in this process: it takes every change
/// except an order naming a warehouse it doesn't know, which it refuses with `"retry": false`.
struct DemoTarget {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Deserialize)]
struct Batch {
    changes: Vec<Incoming>,
}

#[derive(Deserialize)]
struct Incoming {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "ref")]
    reference: String,
    op: String,
    data: Option<Value>,
    attempt: u64,
}

impl DemoTarget {
    async fn start() -> anyhow::Result<DemoTarget> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot start the demo target on 127.0.0.1")?;
        let addr = listener
            .local_addr()
            .context("cannot read the demo target's address")?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route(TARGET_PATH, post(receive))
            .with_state(received.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await });
            if let Err(e) = server.await {
                warn!(error = %e, "the demo target failed");
            }
        });
        Ok(DemoTarget {
            url: format!("http://{addr}{TARGET_PATH}"),
            received,
            stop,
            task,
        })
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn receive(
    State(received): State<Arc<Mutex<Vec<Received>>>>,
    headers: HeaderMap,
    Json(batch): Json<Batch>,
) -> Response {
    let expected = format!("Bearer {TARGET_TOKEN}");
    if headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) != Some(expected.as_bytes()) {
        let body = json!({"error": "missing or wrong bearer token"});
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    let mut log = received.lock().await;
    let mut results = Vec::with_capacity(batch.changes.len());
    for change in batch.changes {
        let error = refusal(&change);
        results.push(match &error {
            None => json!({"id": change.id, "status": "ok"}),
            Some(error) => {
                json!({"id": change.id, "status": "error", "error": error, "retry": false})
            }
        });
        log.push(Received {
            attempt: change.attempt,
            op: change.op,
            kind: change.kind,
            reference: change.reference,
            error,
        });
    }
    Json(json!({ "results": results })).into_response()
}

/// Why the demo target can't store a change, if it can't: the site has no warehouses, so a
/// document that names one (the order's `Склад`) is refused for good.
fn refusal(change: &Incoming) -> Option<String> {
    let warehouse = change.data.as_ref()?.get("Склад")?.as_str()?;
    Some(format!(
        "warehouse '{warehouse}' (Склад) does not exist in the site"
    ))
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_validates() {
        let listen: SocketAddr = "127.0.0.1:8080".parse().expect("an address");
        let text = config_text(listen, "http://127.0.0.1:9/hs/lx/receive");
        let config = Config::parse(&text, "demo").expect("the demo config parses");
        assert_eq!(config.validate(), Vec::<String>::new());
        assert_eq!(config.backend, crate::config::Backend::Embedded);
    }

    #[test]
    fn every_sample_is_a_change_and_only_the_order_is_refused() {
        let refused: Vec<&str> = SAMPLES
            .iter()
            .filter(|s| {
                let change =
                    parse_change(serde_json::from_str(s.body).expect("JSON")).expect("a change");
                refusal(&Incoming {
                    id: "x".into(),
                    kind: change.kind,
                    reference: change.reference,
                    op: "upsert".into(),
                    data: change.data,
                    attempt: 1,
                })
                .is_some()
            })
            .map(|s| s.file)
            .collect();
        assert_eq!(refused, ["document-order.json"]);
    }
}
