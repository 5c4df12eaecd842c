//! CommerceML 2, lxbridge as *1C* (API.md "CommerceML 2", "lxbridge as 1C"): a target with
//! `mode = "commerceml"` delivers to a site's `1c_exchange.php` as 1C's site exchange does,
//! and with `orders` fetches the site's orders. These tests feed lxbridge through part 1's
//! endpoint (a `ut` node, [`crate::commerceml::Site`] playing 1C) and check what a simulated
//! site ([`SiteSim`]) recorded, what the DLQ and the objects API say, and what a push target
//! got of the site's orders.
//!
//! The simulator behaves as shared/commerceml.md says 1C-Bitrix does: Basic checked at
//! `checkauth` only, which answers five lines (`success`, `PHPSESSID`, the session id,
//! `sessid=<32 hex>`, `timestamp=<unix>`); every later request needs the cookie of a live
//! session (else `failure\nОшибка авторизации`, or 401) and the `sessid` query parameter
//! (else `failure\nОшибка проверки источника запроса`); `init` wipes the session's uploads
//! and answers `zip=yes\nfile_limit=204800`; `file` appends (a part over `file_limit` is a
//! failure); `import` answers `progress` twice per file, then unzips the last archive,
//! reads the file with lxbridge's own reader and records its elements; every answer is
//! windows-1251 `text/html`. [`Knobs`] make it fail a product, go down, expire sessions,
//! drop the cookie or answer `rollback`; `type=sale&mode=query` serves configured bytes
//! (Bitrix's own answer by default) and `mode=success` calls are recorded.

use crate::commerceml::{
    cml_dir, elements_of, events, exchange, fixture, key, toml_path, RemoveOnDrop, Site,
    FILE_LIMIT, WAIT,
};
use crate::common::*;
use crate::store_loss::metric;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use lxbridge::commerceml::{Element, Reader, DOCUMENT, PRODUCT};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

const PATH: &str = "/bitrix/admin/1c_exchange.php";
const SITE_USER: &str = "1c";
const SITE_PASSWORD: &str = "pw";
const COOKIE: &str = "PHPSESSID";
const HTML_1251: &str = "text/html; charset=windows-1251";

// ---------------------------------------------------------------------------------------
// The simulated site

/// How the site behaves; changed while it runs with [`SiteSim::set`].
#[derive(Clone, Debug)]
pub(crate) struct Knobs {
    pub(crate) zip: bool,
    pub(crate) file_limit: usize,
    /// An unknown or expired cookie is answered 401 (else `failure\nОшибка авторизации`).
    pub(crate) unauthorized_401: bool,
    /// `progress` answers to each file's import before it is read.
    pub(crate) progress_rounds: usize,
    /// The import of a file holding this product `Ид` fails.
    pub(crate) fail_product: Option<String>,
    /// Every import is answered this (first line and all) instead.
    pub(crate) import_answer: Option<String>,
    /// The sessions live now or made next end after this many more requests.
    pub(crate) expire_after: Option<usize>,
    /// checkauth answers a bare `success`; any request with valid Basic is served.
    pub(crate) drops_cookie: bool,
    /// Every request is answered 503.
    pub(crate) down_503: bool,
    /// `type=sale&mode=query`: the body, its Content-Type, and a tag for the log.
    pub(crate) query: (Vec<u8>, String, String),
}

impl Default for Knobs {
    fn default() -> Knobs {
        Knobs {
            zip: true,
            file_limit: FILE_LIMIT,
            unauthorized_401: false,
            progress_rounds: 2,
            fail_product: None,
            import_answer: None,
            expire_after: None,
            drops_cookie: false,
            down_503: false,
            query: bitrix_query("bitrix-query-response-full.xml", "full"),
        }
    }
}

/// A Bitrix query answer from the fixtures, as Bitrix sends it (windows-1251).
fn bitrix_query(name: &str, tag: &str) -> (Vec<u8>, String, String) {
    (
        fixture(name),
        "application/xml; charset=windows-1251".into(),
        tag.into(),
    )
}

/// One request the site answered.
#[derive(Clone, Debug)]
pub(crate) struct Logged {
    pub(crate) at: String,
    pub(crate) method: String,
    pub(crate) kind: String,
    pub(crate) mode: String,
    pub(crate) filename: Option<String>,
    pub(crate) bytes: usize,
    pub(crate) cookie: Option<String>,
    pub(crate) sessid: Option<String>,
    pub(crate) basic: Option<(String, String)>,
    pub(crate) status: u16,
    /// The answer's text (for `query`: `query <tag>`).
    pub(crate) answer: String,
}

impl Logged {
    fn first_line(&self) -> &str {
        self.answer.lines().next().unwrap_or("")
    }

    fn is(&self, kind: &str, mode: &str) -> bool {
        self.kind == kind && self.mode == mode
    }
}

/// An element the site imported.
#[derive(Clone, Debug)]
pub(crate) struct Got {
    pub(crate) kind: &'static str,
    pub(crate) reference: String,
    pub(crate) deleted: bool,
    pub(crate) data: Value,
    pub(crate) file: String,
}

#[derive(Default)]
struct Session {
    sessid: Option<String>,
    files: HashMap<String, Vec<u8>>,
    archive: Option<String>,
    rounds: HashMap<String, usize>,
}

#[derive(Default)]
struct World {
    knobs: Knobs,
    sessions: HashMap<String, Session>,
    log: Vec<Logged>,
    elements: Vec<Got>,
    /// Each archive unpacked: its name and the names inside.
    archives: Vec<(String, Vec<String>)>,
}

/// An answer: status, Content-Type, body, and the text for the log.
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
    text: String,
}

impl Answer {
    fn text(status: u16, text: &str) -> Answer {
        Answer {
            status,
            content_type: HTML_1251.into(),
            body: encoding_rs::WINDOWS_1251.encode(text).0.into_owned(),
            text: text.into(),
        }
    }

    fn failure(text: &str) -> Answer {
        Answer::text(200, &format!("failure\n{text}"))
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap();
        (
            status,
            [(header::CONTENT_TYPE, self.content_type)],
            self.body,
        )
            .into_response()
    }
}

/// What a request says about itself.
struct Request {
    method: String,
    kind: String,
    mode: String,
    filename: Option<String>,
    sessid: Option<String>,
    cookie: Option<String>,
    basic: Option<(String, String)>,
}

impl Request {
    fn of(method: &Method, query: &HashMap<String, String>, headers: &HeaderMap) -> Request {
        let get = |k: &str| query.get(k).cloned();
        Request {
            method: method.to_string(),
            kind: get("type").unwrap_or_default(),
            mode: get("mode").unwrap_or_default(),
            filename: get("filename"),
            sessid: get("sessid"),
            cookie: cookie(headers),
            basic: basic(headers),
        }
    }

    fn basic_ok(&self) -> bool {
        self.basic.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
            == Some((SITE_USER, SITE_PASSWORD))
    }

    fn logged(self, bytes: usize, answer: &Answer) -> Logged {
        Logged {
            at: lxbridge::clock::rfc3339_now(),
            method: self.method,
            kind: self.kind,
            mode: self.mode,
            filename: self.filename,
            bytes,
            cookie: self.cookie,
            sessid: self.sessid,
            basic: self.basic,
            status: answer.status,
            answer: answer.text.clone(),
        }
    }
}

/// The PHPSESSID cookie's value.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then(|| value.to_string())
        })
}

/// Basic credentials, decoded.
fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

fn random_hex(len: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    while out.len() < len {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        h.write_u128(now.unwrap_or_default().as_nanos());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(len);
    out
}

impl World {
    fn answer(&mut self, r: &Request, body: &[u8]) -> Answer {
        if self.knobs.down_503 {
            return Answer::text(503, "Service Unavailable");
        }
        let answer = if r.mode == "checkauth" {
            self.checkauth(r)
        } else {
            match self.authorize(r) {
                Ok(session) => self.serve(&session, r, body),
                Err(answer) => answer,
            }
        };
        self.count_down();
        answer
    }

    fn count_down(&mut self) {
        if let Some(n) = self.knobs.expire_after.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.knobs.expire_after = None;
                self.sessions.clear();
            }
        }
    }

    fn checkauth(&mut self, r: &Request) -> Answer {
        if !r.basic_ok() {
            return Answer::text(401, "failure\nНеверный логин или пароль");
        }
        if self.knobs.drops_cookie {
            self.sessions
                .entry(format!("basic:{SITE_USER}"))
                .or_default();
            return Answer::text(200, "success");
        }
        let (id, sessid) = (random_hex(26), random_hex(32));
        let session = Session {
            sessid: Some(sessid.clone()),
            ..Session::default()
        };
        self.sessions.insert(id.clone(), session);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        Answer::text(
            200,
            &format!("success\n{COOKIE}\n{id}\nsessid={sessid}\ntimestamp={now}"),
        )
    }

    /// The session a request belongs to, or the answer refusing it.
    fn authorize(&mut self, r: &Request) -> Result<String, Answer> {
        if self.knobs.drops_cookie {
            if !r.basic_ok() {
                return Err(Answer::text(401, "failure\nНеверный логин или пароль"));
            }
            let id = format!("basic:{SITE_USER}");
            self.sessions.entry(id.clone()).or_default();
            return Ok(id);
        }
        let Some((id, session)) = r
            .cookie
            .as_ref()
            .and_then(|c| self.sessions.get_key_value(c))
        else {
            let status = if self.knobs.unauthorized_401 {
                401
            } else {
                200
            };
            return Err(Answer::text(status, "failure\nОшибка авторизации"));
        };
        if session.sessid.is_some() && r.sessid != session.sessid {
            return Err(Answer::failure("Ошибка проверки источника запроса"));
        }
        Ok(id.clone())
    }

    fn serve(&mut self, id: &str, r: &Request, body: &[u8]) -> Answer {
        let session = self.sessions.get_mut(id).expect("authorized");
        match (r.kind.as_str(), r.mode.as_str()) {
            ("sale", "init") => Answer::text(
                200,
                &format!("zip=no\nfile_limit={}", self.knobs.file_limit),
            ),
            (_, "init") => {
                *session = Session {
                    sessid: session.sessid.take(),
                    ..Session::default()
                };
                let zip = if self.knobs.zip { "yes" } else { "no" };
                let limit = self.knobs.file_limit;
                Answer::text(200, &format!("zip={zip}\nfile_limit={limit}"))
            }
            (_, "file") => file(session, self.knobs.file_limit, r, body),
            ("catalog", "import") => {
                let (knobs, elements, archives) =
                    (&self.knobs, &mut self.elements, &mut self.archives);
                import(session, knobs, r, elements, archives)
            }
            ("sale", "query") => {
                let (body, content_type, tag) = self.knobs.query.clone();
                Answer {
                    status: 200,
                    content_type,
                    body,
                    text: format!("query {tag}"),
                }
            }
            ("sale", "success") => Answer::text(200, "success"),
            _ => Answer::failure("unknown command"),
        }
    }
}

/// `mode=file`: appends a part.
fn file(session: &mut Session, limit: usize, r: &Request, body: &[u8]) -> Answer {
    let Some(name) = r.filename.clone() else {
        return Answer::failure("Не указано имя файла");
    };
    if name.contains("..") || name.starts_with('/') {
        return Answer::failure(&format!("Недопустимое имя файла {name}"));
    }
    if body.len() > limit {
        let n = body.len();
        return Answer::failure(&format!(
            "Часть файла {name} ({n} байт) больше file_limit ({limit})"
        ));
    }
    session
        .files
        .entry(name.clone())
        .or_default()
        .extend_from_slice(body);
    if name.ends_with(".zip") {
        session.archive = Some(name);
    }
    Answer::text(200, "success")
}

/// `mode=import`: progress, then the file read and its elements recorded.
fn import(
    session: &mut Session,
    knobs: &Knobs,
    r: &Request,
    elements: &mut Vec<Got>,
    archives: &mut Vec<(String, Vec<String>)>,
) -> Answer {
    let Some(name) = r.filename.clone() else {
        return Answer::failure("Не указано имя файла");
    };
    let round = session.rounds.entry(name.clone()).or_default();
    *round += 1;
    let round = *round;
    if let Some(line) = &knobs.import_answer {
        return Answer::text(200, line);
    }
    if round <= knobs.progress_rounds {
        return Answer::text(200, &format!("progress\nШаг {round}"));
    }
    if let Err(e) = unzip(session, archives) {
        return Answer::failure(&e);
    }
    let Some(bytes) = session.files.get(&name) else {
        return Answer::failure(&format!("Файл {name} не найден"));
    };
    let read = match read_all(bytes) {
        Ok(read) => read,
        Err(e) => return Answer::failure(&format!("{name}: {e}")),
    };
    if let Some(x) = &knobs.fail_product {
        if read.iter().any(|e| e.kind == PRODUCT && &e.reference == x) {
            return Answer::failure(&format!("Товар {x}: ошибка записи"));
        }
    }
    let n = read.len();
    elements.extend(read.into_iter().map(|e| Got {
        kind: e.kind,
        reference: e.reference,
        deleted: e.deleted,
        data: e.data,
        file: name.clone(),
    }));
    Answer::text(200, &format!("success\nИмпортировано элементов: {n}"))
}

/// Unpacks the last uploaded archive into the session's files (once).
fn unzip(session: &mut Session, archives: &mut Vec<(String, Vec<String>)>) -> Result<(), String> {
    let Some(name) = session.archive.take() else {
        return Ok(());
    };
    let bytes = session.files.get(&name).cloned().unwrap_or_default();
    let bad = |e: &dyn std::fmt::Display| format!("Архив {name}: {e}");
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| bad(&e))?;
    let mut names = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| bad(&e))?;
        if entry.is_dir() {
            continue;
        }
        let inside = entry.name().map_err(|e| bad(&e))?.to_string();
        let mut out = Vec::new();
        entry.read_to_end(&mut out).map_err(|e| bad(&e))?;
        names.push(inside.clone());
        session.files.insert(inside, out);
    }
    archives.push((name, names));
    Ok(())
}

/// Every element of a file, or the reader's first error.
fn read_all(bytes: &[u8]) -> Result<Vec<Element>, String> {
    Reader::new(bytes)
        .map(|item| item.map_err(|e| e.russian()))
        .collect()
}

async fn handle(
    State(world): State<Arc<Mutex<World>>>,
    method: Method,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Request::of(&method, &query, &headers);
    let mut world = world.lock().unwrap();
    let answer = world.answer(&request, &body);
    let logged = request.logged(body.len(), &answer);
    world.log.push(logged);
    answer.into_response()
}

struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// The simulated 1C-Bitrix site.
pub(crate) struct SiteSim {
    pub(crate) addr: SocketAddr,
    world: Arc<Mutex<World>>,
    server: Mutex<Option<Server>>,
}

impl SiteSim {
    pub(crate) async fn start(knobs: Knobs) -> SiteSim {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let world = Arc::new(Mutex::new(World {
            knobs,
            ..World::default()
        }));
        SiteSim {
            addr: listener.local_addr().unwrap(),
            server: Mutex::new(Some(serve(listener, world.clone()))),
            world,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}{PATH}", self.addr)
    }

    pub(crate) fn set(&self, change: impl FnOnce(&mut Knobs)) {
        change(&mut self.world.lock().unwrap().knobs);
    }

    pub(crate) fn log(&self) -> Vec<Logged> {
        self.world.lock().unwrap().log.clone()
    }

    pub(crate) fn elements(&self) -> Vec<Got> {
        self.world.lock().unwrap().elements.clone()
    }

    pub(crate) fn archives(&self) -> Vec<(String, Vec<String>)> {
        self.world.lock().unwrap().archives.clone()
    }

    /// The last `n` requests, one a line, for a failing assertion.
    pub(crate) fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let from = log.len().saturating_sub(n);
        let lines: Vec<String> = log[from..]
            .iter()
            .enumerate()
            .map(|(i, l)| {
                format!(
                    "#{} {} {} type={} mode={} filename={:?} bytes={} cookie={} sessid={} basic={} -> {} {:?}",
                    from + i,
                    l.at,
                    l.method,
                    l.kind,
                    l.mode,
                    l.filename,
                    l.bytes,
                    l.cookie.is_some(),
                    l.sessid.is_some(),
                    l.basic.is_some(),
                    l.status,
                    l.answer.chars().take(120).collect::<String>()
                )
            })
            .collect();
        format!("site log ({} requests):\n{}", log.len(), lines.join("\n"))
    }

    /// Stops listening: connections are refused until [`SiteSim::accept_connections`].
    pub(crate) async fn refuse_connections(&self) {
        let Some(server) = self.server.lock().unwrap().take() else {
            return;
        };
        let _ = server.stop.send(());
        let abort = server.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }

    pub(crate) async fn accept_connections(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => assert!(Instant::now() < deadline, "rebind {}: {e}", self.addr),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        *self.server.lock().unwrap() = Some(serve(listener, self.world.clone()));
    }
}

fn serve(listener: TcpListener, world: Arc<Mutex<World>>) -> Server {
    let app = Router::new().route(PATH, any(handle)).with_state(world);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    Server { stop, task }
}

// ---------------------------------------------------------------------------------------
// lxbridge with a `ut` node (1C, part 1) routed to a site target `shop`

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
delays = @RETRY@

[[node]]
name = "ut"
token = "ut-secret"
[node.commerceml]
file_limit = 204800
zip = false
keep_files = "0s"
import_wait = "2s"
dir = @DIR@

[[node]]
name = "shop"
token = "shop-secret"
[node.deliver]
mode = "commerceml"
url = "@SITE@"
auth = { basic = { user = "1c", password = "pw" } }
batch_max = 500
timeout = "10s"
import_rounds = 50
import_time = "60s"
@SHOP@

[[route]]
from = "ut"
to = ["shop"]
types = ["CommerceML.*"]
@EXTRA@
"#;

/// Retry steps that outlast the breaker's threshold (5 unreachable in a row), so an outage
/// holds changes rather than walking them to the DLQ.
const RETRY_LONG: &str = r#"["200ms", "400ms", "800ms", "1s", "1s"]"#;
/// One retry: a change the site refuses is dead on its second attempt.
const RETRY_ONE: &str = r#"["1s"]"#;

struct Setup {
    bridge: Bridge,
    site: SiteSim,
    _removed: RemoveOnDrop,
}

/// What a test's lxbridge is made of: `shop` lines (after its `[node.deliver]`) and more
/// nodes and routes.
struct Plan<'a> {
    name: &'a str,
    knobs: Knobs,
    retry: &'a str,
    shop: &'a str,
    extra: &'a str,
    amqp: &'a str,
}

impl Plan<'_> {
    fn new<'a>(name: &'a str, knobs: Knobs, retry: &'a str) -> Plan<'a> {
        Plan {
            name,
            knobs,
            retry,
            shop: "",
            extra: "",
            amqp: AMQP_URL,
        }
    }
}

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("lxbridge=info")
        .with_test_writer()
        .try_init();
}

impl Setup {
    async fn start(backend: Backend, plan: Plan<'_>) -> Setup {
        logs();
        let prefix = unique_prefix(plan.name);
        let dir = cml_dir(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        let site = SiteSim::start(plan.knobs).await;
        let template = CONFIG
            .replace("@RETRY@", plan.retry)
            .replace("@SHOP@", plan.shop)
            .replace("@EXTRA@", plan.extra)
            .replace("@SITE@", &site.url())
            .replace("@DIR@", &toml_path(&dir));
        let bridge = Bridge::start_with(backend, &prefix, &template, plan.amqp, true).await;
        Setup {
            bridge,
            site,
            _removed: RemoveOnDrop(vec![dir, data_dir(&prefix)]),
        }
    }

    /// 1C's side (part 1): uploads files through the `ut` node, each imported to success.
    async fn upload_from_1c(&self, files: &[(&str, &[u8])]) {
        let mut one_c = Site::of(&self.bridge, "ut", "ut-secret");
        exchange(&mut one_c, files, FILE_LIMIT).await;
    }

    async fn dlq(&self) -> Vec<Value> {
        let (status, body) = self.bridge.admin_get("/api/v1/dlq/shop?limit=1000").await;
        assert_eq!(status, 200, "DLQ of shop: {body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until the DLQ holds every one of `refs`; its items.
    async fn dlq_with(&self, refs: &[&str], what: &str) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let items = self.dlq().await;
            let dead: BTreeSet<&str> = items.iter().filter_map(|i| i["ref"].as_str()).collect();
            if refs.iter().all(|r| dead.contains(r)) {
                return items;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {refs:?} not all in shop's DLQ after 60 s: {items:?}\n{}",
                self.site.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn metrics(&self) -> String {
        self.bridge.metrics().await
    }

    async fn finish(self) {
        self.site.refuse_connections().await;
        self.bridge.finish().await;
    }
}

/// A `Каталог` of `n` products `<tag>-<i>` (only changes).
fn catalog(tag: &str, n: usize) -> Vec<u8> {
    let products: String = (1..=n)
        .map(|i| {
            format!("<Товар><Ид>{tag}-{i}</Ид><Наименование>Товар {tag} {i}</Наименование></Товар>")
        })
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<КоммерческаяИнформация \
         xmlns=\"urn:1C.ru:commerceml_2\" ВерсияСхемы=\"2.07\" \
         ДатаФормирования=\"2026-02-14T10:00:00\"><Каталог \
         СодержитТолькоИзменения=\"true\"><Ид>cat-1</Ид><Наименование>Каталог</Наименование>\
         <Товары>{products}</Товары></Каталог></КоммерческаяИнформация>\n"
    )
    .into_bytes()
}

fn catalog_and_offers() -> (Vec<u8>, Vec<u8>, Vec<Element>) {
    let import = fixture("import0_1.xml");
    let offers = fixture("offers0_1.xml");
    let mut expected = elements_of(&import, "import0_1.xml");
    expected.extend(elements_of(&offers, "offers0_1.xml"));
    (import, offers, expected)
}

/// Waits until the site imported `expected.len()` elements, lets more come, then: each
/// expected element exactly once, with its kind, Ид, deleted mark and data; nothing else.
async fn assert_site_has(site: &SiteSim, expected: &[Element], wait: Duration, what: &str) {
    let deadline = Instant::now() + wait;
    while site.elements().len() < expected.len() {
        assert!(
            Instant::now() < deadline,
            "{what}: the site imported {} of {} elements in {wait:?}; missing e.g. {:?}\n{}",
            site.elements().len(),
            expected.len(),
            missing(site, expected).first(),
            site.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = site.elements();
    let mut by: HashMap<(String, String), Vec<&Got>> = HashMap::new();
    for g in &got {
        by.entry(key(g.kind, &g.reference)).or_default().push(g);
    }
    let mut wrong = Vec::new();
    for e in expected {
        match by.get(&key(e.kind, &e.reference)).map(Vec::as_slice) {
            Some([g]) if g.data == e.data && g.deleted == e.deleted => {}
            Some([g]) => wrong.push(format!(
                "{} {:?} (in {}): deleted {} (want {}), data {} (want {})",
                e.kind, e.reference, g.file, g.deleted, e.deleted, g.data, e.data
            )),
            Some(list) => wrong.push(format!(
                "{} {:?} imported {} times",
                e.kind,
                e.reference,
                list.len()
            )),
            None => wrong.push(format!("{} {:?} never imported", e.kind, e.reference)),
        }
    }
    assert!(
        wrong.is_empty(),
        "{what}: {} of {} elements wrong at the site:\n{}",
        wrong.len(),
        expected.len(),
        wrong.join("\n")
    );
    assert_eq!(
        got.len(),
        expected.len(),
        "{what}: the site imported more than was sent"
    );
}

fn missing<'e>(site: &SiteSim, expected: &'e [Element]) -> Vec<(&'e str, &'e str)> {
    let got: BTreeSet<(String, String)> = site
        .elements()
        .iter()
        .map(|g| key(g.kind, &g.reference))
        .collect();
    expected
        .iter()
        .filter(|e| !got.contains(&key(e.kind, &e.reference)))
        .map(|e| (e.kind, e.reference.as_str()))
        .collect()
}

/// Every request carried the site's Basic credentials, and none was refused.
fn assert_clean_exchange(site: &SiteSim, what: &str) {
    let log = site.log();
    let refused: Vec<&Logged> = log
        .iter()
        .filter(|l| l.status != 200 || l.first_line() == "failure")
        .collect();
    assert!(
        refused.is_empty(),
        "{what}: the site refused {refused:#?}\n{}",
        site.log_tail(40)
    );
    let without = log.iter().filter(|l| !basic_is_the_sites(l)).count();
    assert_eq!(
        without,
        0,
        "{what}: requests without the site's Basic\n{}",
        site.log_tail(40)
    );
}

fn basic_is_the_sites(l: &Logged) -> bool {
    l.basic.as_ref().map(|(u, p)| (u.as_str(), p.as_str())) == Some((SITE_USER, SITE_PASSWORD))
}

/// Every request after a checkauth carried that checkauth's cookie and sessid.
fn assert_session_carried(site: &SiteSim, what: &str) {
    let mut current: Option<(String, String)> = None;
    for (i, l) in site.log().iter().enumerate() {
        if l.mode == "checkauth" {
            let lines: Vec<&str> = l.answer.lines().collect();
            let sessid = lines[3].strip_prefix("sessid=").unwrap_or("");
            current = Some((lines[2].to_string(), sessid.to_string()));
            continue;
        }
        let (cookie, sessid) = current.as_ref().expect("checkauth first");
        assert!(
            l.cookie.as_ref() == Some(cookie) && l.sessid.as_ref() == Some(sessid),
            "{what}: request #{i} without the session's cookie and sessid\n{}",
            site.log_tail(40)
        );
    }
}

/// Each import answered `success` was asked again after `progress` answers (2 per file).
fn assert_progress_was_followed(site: &SiteSim, what: &str) {
    let log = site.log();
    let imports = log.iter().filter(|l| l.is("catalog", "import"));
    let (mut progress, mut success) = (0, 0);
    for l in imports {
        match l.first_line() {
            "progress" => progress += 1,
            "success" => success += 1,
            other => panic!("{what}: import answered {other:?}"),
        }
    }
    assert!(success > 0, "{what}: no import succeeded");
    assert_eq!(
        progress,
        2 * success,
        "{what}: each file's import asked again while progress\n{}",
        site.log_tail(40)
    );
}

// ---------------------------------------------------------------------------------------
// a. The real catalog and offers reach the site

async fn catalog_and_offers_reach_the_site_as_the_reader_reads_them(backend: Backend) {
    let plan = Plan::new("cmls-full", Knobs::default(), RETRY_ONE);
    let setup = Setup::start(backend, plan).await;
    let (import, offers, expected) = catalog_and_offers();
    setup
        .upload_from_1c(&[("import0_1.xml", &import), ("offers0_1.xml", &offers)])
        .await;
    assert_site_has(&setup.site, &expected, WAIT, "import0_1 + offers0_1").await;
    assert_clean_exchange(&setup.site, "catalog and offers");
    assert_session_carried(&setup.site, "catalog and offers");
    assert_progress_was_followed(&setup.site, "catalog and offers");

    // zip=yes: each package ONE archive uploaded in parts of at most 204800 bytes, the
    // imports by the names inside it, import.xml before offers.xml.
    let log = setup.site.log();
    let uploads: Vec<&Logged> = log.iter().filter(|l| l.is("catalog", "file")).collect();
    assert!(!uploads.is_empty(), "nothing uploaded");
    for u in &uploads {
        let name = u.filename.as_deref().unwrap_or("");
        assert!(name.ends_with(".zip"), "zip=yes, yet {name:?} was uploaded");
        assert!(u.bytes <= FILE_LIMIT, "a part of {} bytes", u.bytes);
    }
    let archives = setup.site.archives();
    let inits = log.iter().filter(|l| l.is("catalog", "init")).count();
    assert_eq!(
        archives.len(),
        inits,
        "one archive per package: {archives:?}"
    );
    for (name, inside) in &archives {
        let mut sorted = inside.clone();
        sorted.sort();
        sorted.dedup();
        assert!(
            !inside.is_empty()
                && sorted.len() == inside.len()
                && inside
                    .iter()
                    .all(|n| n == "import.xml" || n == "offers.xml"),
            "{name} holds {inside:?}"
        );
    }
    let imported: Vec<&str> = log
        .iter()
        .filter(|l| l.is("catalog", "import") && l.first_line() == "success")
        .filter_map(|l| l.filename.as_deref())
        .collect();
    let in_archives: usize = archives.iter().map(|(_, inside)| inside.len()).sum();
    assert_eq!(
        imported.len(),
        in_archives,
        "each file in an archive imported once: {imported:?}"
    );
    for g in setup.site.elements() {
        let file = if g.kind == "CommerceML.Предложение" {
            "offers.xml"
        } else {
            "import.xml"
        };
        assert_eq!(g.file, file, "{} {:?}", g.kind, g.reference);
    }
    assert_eq!(setup.dlq().await.len(), 0, "nothing dead");
    setup.finish().await;
}

// ---------------------------------------------------------------------------------------
// e. zip=no and a small file_limit: plain files, appended part by part

async fn plain_files_go_in_parts_of_the_sites_file_limit(backend: Backend) {
    let knobs = Knobs {
        zip: false,
        file_limit: 16 * 1024,
        ..Knobs::default()
    };
    let setup = Setup::start(backend, Plan::new("cmls-parts", knobs, RETRY_ONE)).await;
    let nested = fixture("import0_1_with_nested_groups.xml");
    let expected = elements_of(&nested, "nested");
    setup.upload_from_1c(&[("import0_1.xml", &nested)]).await;
    assert_site_has(&setup.site, &expected, WAIT, "nested groups, zip=no").await;
    assert_clean_exchange(&setup.site, "zip=no");
    assert_session_carried(&setup.site, "zip=no");
    assert_progress_was_followed(&setup.site, "zip=no");
    let log = setup.site.log();
    let mut parts: HashMap<&str, usize> = HashMap::new();
    for u in log.iter().filter(|l| l.is("catalog", "file")) {
        let name = u.filename.as_deref().unwrap_or("");
        assert_eq!(name, "import.xml", "zip=no: the XML file under its name");
        assert!(u.bytes <= 16 * 1024, "a part of {} bytes", u.bytes);
        *parts.entry(name).or_default() += 1;
    }
    assert!(
        parts.get("import.xml").is_some_and(|&n| n >= 10),
        "a 1 MB import.xml goes in parts of 16 KB: {parts:?}"
    );
    assert!(setup.site.archives().is_empty(), "no archive with zip=no");
    setup.finish().await;
}

// ---------------------------------------------------------------------------------------
// b. A product the site fails is dead alone; an outage of the site loses nothing

async fn a_product_the_site_fails_is_dead_and_an_outage_loses_nothing(backend: Backend) {
    let (import, offers, expected) = catalog_and_offers();
    let failing = expected
        .iter()
        .find(|e| e.kind == PRODUCT && !e.deleted)
        .unwrap()
        .reference
        .clone();
    let knobs = Knobs {
        fail_product: Some(failing.clone()),
        ..Knobs::default()
    };
    let setup = Setup::start(backend, Plan::new("cmls-fail", knobs, RETRY_LONG)).await;
    setup
        .upload_from_1c(&[("import0_1.xml", &import), ("offers0_1.xml", &offers)])
        .await;
    let items = setup.dlq_with(&[&failing], "the failing product").await;
    let others: Vec<Element> = expected
        .iter()
        .filter(|e| !(e.kind == PRODUCT && e.reference == failing))
        .cloned()
        .collect();
    assert_site_has(
        &setup.site,
        &others,
        Duration::from_secs(120),
        "all but the failing product",
    )
    .await;
    assert_only_dead(&setup.dlq().await, &failing);
    let text = format!("Товар {failing}: ошибка записи");
    let error = items[0]["error"].as_str().unwrap_or("");
    assert!(
        error.contains(&text),
        "the site's text {text:?} in {error:?}"
    );

    // Purge it; the site down 30 s (15 s refusing connections, 15 s answering 503) while
    // three catalogs are sent: the breaker holds them, all arrive after, nothing dies.
    let (status, purged) = admin(
        &setup.bridge,
        reqwest::Method::DELETE,
        "/api/v1/dlq/shop",
        Some(json!({})),
    )
    .await;
    assert_eq!((status, &purged["purged"]), (200, &json!(1)), "{purged}");
    setup.site.set(|k| k.fail_product = None);
    let fresh = outage(&setup).await;
    let mut all = others;
    all.extend(fresh);
    assert_site_has(
        &setup.site,
        &all,
        Duration::from_secs(90),
        "after the outage",
    )
    .await;
    assert_eq!(
        setup.dlq().await,
        Vec::<Value>::new(),
        "nothing died in the outage"
    );
    setup.finish().await;
}

fn assert_only_dead(items: &[Value], reference: &str) {
    let refs: Vec<&str> = items.iter().filter_map(|i| i["ref"].as_str()).collect();
    assert_eq!(refs, vec![reference], "only the failing product is dead");
    assert_eq!(items[0]["type"], PRODUCT, "{:?}", items[0]);
}

/// Takes the site down for 30 s while three catalogs are sent; the breaker must open.
/// The elements sent.
async fn outage(setup: &Setup) -> Vec<Element> {
    let before = setup.site.elements().len();
    setup.site.refuse_connections().await;
    let start = Instant::now();
    let mut sent = Vec::new();
    let mut breaker_opened = false;
    let mut back_503 = false;
    while start.elapsed() < Duration::from_secs(30) {
        let n = sent.len() / 5;
        if n < 3 && start.elapsed() >= Duration::from_secs(4 * n as u64) {
            let bytes = catalog(&format!("down{n}"), 5);
            sent.extend(elements_of(&bytes, "down catalog"));
            setup.upload_from_1c(&[("import.xml", &bytes)]).await;
        }
        if !back_503 && start.elapsed() >= Duration::from_secs(15) {
            setup.site.set(|k| k.down_503 = true);
            setup.site.accept_connections().await;
            back_503 = true;
        }
        breaker_opened |= setup
            .metrics()
            .await
            .contains("lx_breaker_open{target=\"shop\"} 1");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    setup.site.set(|k| k.down_503 = false);
    assert_eq!(setup.site.elements().len(), before, "imported while down");
    assert!(
        breaker_opened,
        "shop's breaker opened while the site was down"
    );
    assert_eq!(setup.dlq().await.len(), 0, "dead while the site was down");
    sent
}

// ---------------------------------------------------------------------------------------
// c. Orders

const ERP: &str = r#"
[[node]]
name = "erp"
token = "erp-secret"
[node.deliver]
mode = "push"
url = "@ERP@"
batch_max = 100

[[route]]
from = "shop"
to = ["erp"]
types = ["CommerceML.Документ"]
"#;

/// Waits for the orders at the push target: each once, from `shop`, with the reader's data.
async fn assert_orders_arrived(erp: &Target, expected: &[Element], site: &SiteSim) {
    let deadline = Instant::now() + WAIT;
    while erp.count() < expected.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} orders at erp\n{}",
            erp.count(),
            expected.len(),
            site.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got = erp.received();
    assert_eq!(
        got.len(),
        expected.len(),
        "one change per Документ: {got:?}"
    );
    for e in expected {
        let c = got
            .iter()
            .map(|r| &r.change)
            .find(|c| c["ref"] == e.reference.as_str())
            .unwrap_or_else(|| panic!("order {} not at erp: {got:?}", e.reference));
        assert_eq!(c["type"], DOCUMENT, "{c}");
        assert_eq!(c["source"], "shop", "{c}");
        assert_eq!(c["op"], "upsert", "{c}");
        assert_eq!(
            c["data"], e.data,
            "order {}: the data is the Документ",
            e.reference
        );
    }
}

/// The sale requests, in order.
fn sale_log(site: &SiteSim) -> Vec<Logged> {
    site.log()
        .into_iter()
        .filter(|l| l.kind == "sale")
        .collect()
}

/// The `mode=success` calls made after a query that served `tag`: their times.
fn successes_after(log: &[Logged], tag: &str) -> Vec<String> {
    let mut last_query = None;
    let mut out = Vec::new();
    for l in log {
        match l.mode.as_str() {
            "query" => last_query = Some(l.answer.clone()),
            "success" if last_query.as_deref() == Some(&format!("query {tag}")) => {
                out.push(l.at.clone())
            }
            _ => {}
        }
    }
    out
}

fn queries_of(log: &[Logged], tag: &str) -> usize {
    let answer = format!("query {tag}");
    log.iter()
        .filter(|l| l.mode == "query" && l.answer == answer)
        .count()
}

/// checkauth first; each query after an init of its round; success only after a query.
fn assert_round_shape(log: &[Logged]) {
    assert!(
        log.first().is_some_and(|l| l.mode == "checkauth"),
        "{log:#?}"
    );
    let mut init_since_query = false;
    let mut queried = false;
    for l in log {
        match l.mode.as_str() {
            "init" => init_since_query = true,
            "query" => {
                assert!(
                    init_since_query,
                    "a query without its round's init: {log:#?}"
                );
                init_since_query = false;
                queried = true;
            }
            "success" => assert!(queried, "success before any query: {log:#?}"),
            _ => {}
        }
    }
    let refused: Vec<&Logged> = log
        .iter()
        .filter(|l| l.status != 200 || l.first_line() == "failure")
        .collect();
    assert!(refused.is_empty(), "sale requests refused: {refused:#?}");
}

/// The `at` of an object's `accepted` event from `shop`.
async fn accepted_at(bridge: &Bridge, reference: &str) -> String {
    let (status, object) = bridge
        .admin_get(&format!("/api/v1/objects/{reference}"))
        .await;
    assert_eq!(status, 200, "objects API for order {reference}: {object}");
    object["history"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["event"] == "accepted" && e["target"] == "shop")
        .and_then(|e| e["at"].as_str())
        .unwrap_or_else(|| panic!("order {reference}: no accepted event from shop: {object}"))
        .to_string()
}

async fn orders_are_published_once_and_success_follows_acceptance(backend: Backend) {
    let erp = Target::start().await;
    let extra = ERP.replace("@ERP@", &erp.url());
    let mut plan = Plan::new("cmls-orders", Knobs::default(), RETRY_ONE);
    plan.shop = "orders = \"1s\"";
    plan.extra = &extra;
    let setup = Setup::start(backend, plan).await;
    let expected = elements_of(&fixture("bitrix-query-response-full.xml"), "orders");
    assert_orders_arrived(&erp, &expected, &setup.site).await;

    // success only after the orders were accepted.
    let deadline = Instant::now() + WAIT;
    while successes_after(&sale_log(&setup.site), "full").is_empty() {
        assert!(Instant::now() < deadline, "{}", setup.site.log_tail(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_success = successes_after(&sale_log(&setup.site), "full")[0].clone();
    for e in &expected {
        let accepted = accepted_at(&setup.bridge, &e.reference).await;
        assert!(
            accepted <= first_success,
            "order {}: accepted at {accepted}, success sent at {first_success}",
            e.reference
        );
    }

    // Three more rounds with the same answer: unchanged, nothing delivered again.
    let queried = queries_of(&sale_log(&setup.site), "full");
    let deadline = Instant::now() + WAIT;
    while queries_of(&sale_log(&setup.site), "full") < queried + 3 {
        assert!(Instant::now() < deadline, "{}", setup.site.log_tail(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        erp.count(),
        expected.len(),
        "an unchanged order delivered again"
    );
    let log = sale_log(&setup.site);
    assert_round_shape(&log);
    assert!(
        successes_after(&log, "full").len() >= 3,
        "each round confirmed"
    );
    for e in &expected {
        let (_, object) = setup
            .bridge
            .admin_get(&format!("/api/v1/objects/{}", e.reference))
            .await;
        assert!(
            events(&object).contains(&("shop".into(), "unchanged".into())),
            "order {}: an unchanged event from shop: {object}",
            e.reference
        );
    }
    let metrics = setup.metrics().await;
    for (series, least) in [
        (
            r#"lx_commerceml_orders_total{node="shop",outcome="accepted"}"#,
            2.0,
        ),
        (
            r#"lx_commerceml_orders_total{node="shop",outcome="unchanged"}"#,
            6.0,
        ),
        (
            r#"lx_commerceml_order_rounds_total{node="shop",result="ok"}"#,
            4.0,
        ),
    ] {
        assert!(metric(&metrics, series) >= least, "{series} >= {least}");
    }
    assert_eq!(
        metric(
            &metrics,
            r#"lx_commerceml_orders_total{node="shop",outcome="accepted"}"#
        ),
        2.0
    );
    setup.finish().await;
}

/// RabbitMQ cut (a proxy between lxbridge and RabbitMQ) while the site has orders: no
/// success, the query is asked again; restored: the orders delivered, success sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_order_success_while_the_broker_is_away() {
    let erp = Target::start().await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let extra = ERP.replace("@ERP@", &erp.url());
    let amqp = proxy.amqp_url();
    let knobs = Knobs {
        query: bitrix_query("bitrix-query-response-empty.xml", "empty"),
        ..Knobs::default()
    };
    let mut plan = Plan::new("cmls-cut", knobs, RETRY_ONE);
    plan.shop = "orders = \"1s\"";
    plan.extra = &extra;
    plan.amqp = &amqp;
    let setup = Setup::start(Backend::Rabbit, plan).await;
    let site = &setup.site;
    let deadline = Instant::now() + WAIT;
    while queries_of(&sale_log(site), "empty") < 2 {
        assert!(Instant::now() < deadline, "{}", site.log_tail(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    proxy.cut();
    site.set(|k| k.query = bitrix_query("bitrix-query-response-full.xml", "full"));
    let deadline = Instant::now() + WAIT;
    while queries_of(&sale_log(site), "full") < 3 {
        assert!(
            Instant::now() < deadline,
            "the query is asked again while the broker is away\n{}",
            site.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = sale_log(site);
    assert_eq!(
        successes_after(&log, "full"),
        Vec::<String>::new(),
        "success sent while the broker was away\n{}",
        site.log_tail(30)
    );
    assert_eq!(erp.count(), 0, "orders delivered with the broker away");
    let failed = r#"lx_commerceml_order_rounds_total{node="shop",result="failed"}"#;
    assert!(metric(&setup.metrics().await, failed) >= 1.0, "{failed}");

    proxy.restore();
    let expected = elements_of(&fixture("bitrix-query-response-full.xml"), "orders");
    assert_orders_arrived(&erp, &expected, site).await;
    let deadline = Instant::now() + WAIT;
    while successes_after(&sale_log(site), "full").is_empty() {
        assert!(
            Instant::now() < deadline,
            "no success after the broker came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    setup.finish().await;
}

// ---------------------------------------------------------------------------------------
// d. Sessions: expired, no cookie; a non-standard answer; too many progress rounds

/// Whether some request answered as `refused` is followed by a checkauth.
fn renewed_after(log: &[Logged], refused: impl Fn(&Logged) -> bool) -> bool {
    log.iter()
        .position(refused)
        .is_some_and(|at| log[at + 1..].iter().any(|l| l.mode == "checkauth"))
}

async fn an_expired_session_is_renewed_and_the_package_redone(backend: Backend) {
    let knobs = Knobs {
        expire_after: Some(2),
        ..Knobs::default()
    };
    let setup = Setup::start(backend, Plan::new("cmls-expire", knobs, RETRY_ONE)).await;
    let (import, offers, _) = catalog_and_offers();
    let products = elements_of(&import, "import0_1.xml");
    setup.upload_from_1c(&[("import0_1.xml", &import)]).await;
    assert_site_has(&setup.site, &products, WAIT, "after a failure answer").await;
    let log = setup.site.log();
    assert!(
        renewed_after(&log, |l| l.answer == "failure\nОшибка авторизации"),
        "checkauth again after the session ended\n{}",
        setup.site.log_tail(40)
    );

    // Now the site answers 401 for an ended session.
    setup.site.set(|k| {
        k.unauthorized_401 = true;
        k.expire_after = Some(2);
    });
    let mut all = products;
    all.extend(elements_of(&offers, "offers0_1.xml"));
    setup.upload_from_1c(&[("offers0_1.xml", &offers)]).await;
    assert_site_has(&setup.site, &all, WAIT, "after a 401").await;
    assert!(
        renewed_after(&setup.site.log(), |l| l.status == 401),
        "checkauth again after a 401\n{}",
        setup.site.log_tail(40)
    );
    assert_eq!(setup.dlq().await, Vec::<Value>::new(), "nothing dead");
    setup.finish().await;
}

async fn a_site_without_cookie_is_served_with_basic(backend: Backend) {
    let knobs = Knobs {
        drops_cookie: true,
        ..Knobs::default()
    };
    let setup = Setup::start(backend, Plan::new("cmls-nocookie", knobs, RETRY_ONE)).await;
    let import = fixture("import0_1.xml");
    let products = elements_of(&import, "import0_1.xml");
    setup.upload_from_1c(&[("import0_1.xml", &import)]).await;
    assert_site_has(&setup.site, &products, WAIT, "no cookie").await;
    assert_clean_exchange(&setup.site, "no cookie");
    let log = setup.site.log();
    assert!(
        log.iter()
            .any(|l| l.mode == "checkauth" && l.answer == "success"),
        "checkauth answered a bare success\n{}",
        setup.site.log_tail(20)
    );
    assert_eq!(setup.dlq().await, Vec::<Value>::new(), "nothing dead");
    setup.finish().await;
}

async fn a_rollback_answer_dead_letters_naming_the_line(backend: Backend) {
    let knobs = Knobs {
        import_answer: Some("rollback".into()),
        ..Knobs::default()
    };
    let setup = Setup::start(backend, Plan::new("cmls-rollback", knobs, RETRY_ONE)).await;
    let bytes = catalog("rb", 3);
    setup.upload_from_1c(&[("import.xml", &bytes)]).await;
    let items = setup.dlq_with(&["rb-1", "rb-2", "rb-3"], "rollback").await;
    assert_eq!(items.len(), 3, "{items:?}");
    for item in &items {
        let error = item["error"].as_str().unwrap_or("");
        assert!(
            error.contains("rollback"),
            "the error names the line: {item}"
        );
    }
    assert!(setup.site.elements().is_empty(), "nothing imported");

    // An HTML page (a PHP fatal error) is a failure naming its first line.
    let page = "<!DOCTYPE html>\n<html><body>Fatal error: Allowed memory size</body></html>";
    setup.site.set(|k| k.import_answer = Some(page.into()));
    setup
        .upload_from_1c(&[("import.xml", &catalog("html", 1))])
        .await;
    let items = setup.dlq_with(&["html-1"], "an HTML answer").await;
    let item = items.iter().find(|i| i["ref"] == "html-1").unwrap();
    let error = item["error"].as_str().unwrap_or("");
    assert!(
        error.contains("<!DOCTYPE html>"),
        "the error names the line: {item}"
    );
    assert!(setup.site.elements().is_empty(), "nothing imported");

    // A site that answers progress for ever: failed after import_rounds (50).
    setup.site.set(|k| {
        k.import_answer = None;
        k.progress_rounds = usize::MAX;
    });
    let bytes = catalog("slow", 2);
    setup.upload_from_1c(&[("import.xml", &bytes)]).await;
    let items = setup
        .dlq_with(&["slow-1", "slow-2"], "endless progress")
        .await;
    let slow = items
        .iter()
        .filter(|i| i["ref"].as_str().is_some_and(|r| r.starts_with("slow-")));
    for item in slow {
        let error = item["error"].as_str().unwrap_or("");
        assert!(
            crate::commerceml::mentions_number(error, 50),
            "the error names the bound 50: {item}"
        );
    }
    let run = max_import_run(&setup.site.log());
    assert!(
        (50..=51).contains(&run),
        "import asked while progress, at most 50 progress answers: {run} in a row\n{}",
        setup.site.log_tail(10)
    );
    assert!(setup.site.elements().is_empty(), "nothing imported");
    setup.finish().await;
}

/// The most imports of one file in one package (between inits).
fn max_import_run(log: &[Logged]) -> usize {
    let mut runs: HashMap<String, usize> = HashMap::new();
    let mut most = 0;
    for l in log.iter().filter(|l| l.kind == "catalog") {
        match l.mode.as_str() {
            "init" => runs.clear(),
            "import" => {
                let n = runs
                    .entry(l.filename.clone().unwrap_or_default())
                    .or_default();
                *n += 1;
                most = most.max(*n);
            }
            _ => {}
        }
    }
    most
}

both_backends!(
    catalog_and_offers_reach_the_site_as_the_reader_reads_them,
    plain_files_go_in_parts_of_the_sites_file_limit,
    a_product_the_site_fails_is_dead_and_an_outage_loses_nothing,
    orders_are_published_once_and_success_follows_acceptance,
    an_expired_session_is_renewed_and_the_package_redone,
    a_site_without_cookie_is_served_with_basic,
    a_rollback_answer_dead_letters_naming_the_line,
);
