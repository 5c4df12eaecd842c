//! CommerceML 2, lxbridge as the *site* of 1C's built-in site exchange (the 1c_exchange.php
//! protocol, API.md "CommerceML 2"): these tests play 1C's side over HTTP against the
//! running lxbridge — checkauth (Basic), the cookie, init, file parts, import repeated while
//! `progress`, and `type=sale` query/success — and check by ref what reached a push target,
//! what the admin objects API recorded, and what `mode=query` served.
//!
//! The expected elements of each fixture are what the crate's own reader
//! (`lxbridge::commerceml::Reader`) makes of it; `fixtures_hold_what_the_tests_count` pins
//! those counts so that a reader gone wrong can't make the other tests pass vacuously.

use crate::common::*;
use lxbridge::commerceml::{Element, ReadError, Reader};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) const WAIT: Duration = Duration::from_secs(30);
/// The part size the config announces (Bitrix's default).
pub(crate) const FILE_LIMIT: usize = 204800;

// ---------------------------------------------------------------------------------------
// Fixtures, read by the crate's reader

pub(crate) fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/commerceml/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Everything the reader yields for a file: its elements and its errors.
fn read(bytes: &[u8]) -> (Vec<Element>, Vec<ReadError>) {
    let mut elements = Vec::new();
    let mut errors = Vec::new();
    for item in Reader::new(bytes) {
        match item {
            Ok(e) => elements.push(e),
            Err(e) => errors.push(e),
        }
    }
    (elements, errors)
}

/// The elements of a file the reader reads without an error.
pub(crate) fn elements_of(bytes: &[u8], what: &str) -> Vec<Element> {
    let (elements, errors) = read(bytes);
    assert!(errors.is_empty(), "{what}: the reader found {errors:?}");
    elements
}

fn fixture_elements(name: &str) -> Vec<Element> {
    elements_of(&fixture(name), name)
}

fn kind_counts(elements: &[Element]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for e in elements {
        *m.entry(e.kind).or_default() += 1;
    }
    m
}

pub(crate) fn key(kind: &str, reference: &str) -> (String, String) {
    (kind.to_string(), reference.to_string())
}

/// The counts the assertions below rely on, from the fixtures' README, checked with the
/// crate's reader; and every (type, ref) once per file, so "one change per element" is
/// well-defined.
#[test]
fn fixtures_hold_what_the_tests_count() {
    use lxbridge::commerceml::{DOCUMENT, GROUP, OFFER, PRODUCT, PROPERTY};
    let import = fixture_elements("import0_1.xml");
    assert_eq!(
        kind_counts(&import),
        BTreeMap::from([(GROUP, 1), (PROPERTY, 12), (PRODUCT, 36)])
    );
    assert_eq!(import.iter().filter(|e| e.deleted).count(), 1);
    let offers = fixture_elements("offers0_1.xml");
    assert_eq!(kind_counts(&offers), BTreeMap::from([(OFFER, 44)]));
    let nested = fixture_elements("import0_1_with_nested_groups.xml");
    assert_eq!(
        kind_counts(&nested),
        BTreeMap::from([(GROUP, 13), (PROPERTY, 20), (PRODUCT, 283)])
    );
    assert!(fixture("import0_1_with_nested_groups.xml").len() > 5 * 200 * 1024);
    let orders = fixture_elements("bitrix-query-response-full.xml");
    let refs: Vec<&str> = orders.iter().map(|e| e.reference.as_str()).collect();
    assert_eq!(refs, vec!["132", "133"]);
    assert!(orders.iter().all(|e| e.kind == DOCUMENT));
    assert!(fixture_elements("bitrix-query-response-empty.xml").is_empty());
    for (name, elements) in [
        ("import0_1.xml", &import),
        ("offers0_1.xml", &offers),
        ("nested", &nested),
    ] {
        let keys: HashSet<_> = elements.iter().map(|e| key(e.kind, &e.reference)).collect();
        assert_eq!(keys.len(), elements.len(), "{name}: a (type, ref) twice");
    }
}

// ---------------------------------------------------------------------------------------
// 1C's side of the protocol

/// One answer of the endpoint.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn first_line(&self) -> String {
        self.text()
            .lines()
            .next()
            .unwrap_or("")
            .trim_end_matches('\r')
            .to_string()
    }

    /// The first line, which must be one of the three words 1C knows.
    fn word(&self, what: &str) -> String {
        let word = self.first_line();
        assert!(
            ["success", "progress", "failure"].contains(&word.as_str()),
            "{what}: the first line is not success|progress|failure (HTTP {}): {:?}",
            self.status,
            self.text()
        );
        word
    }

    /// Asserts a `failure` answer (the HTTP status given) and gives its text.
    fn failure(&self, http: u16, what: &str) -> String {
        assert_eq!(
            (self.status, self.word(what).as_str()),
            (http, "failure"),
            "{what}: {:?}",
            self.text()
        );
        let text = self.text();
        assert!(
            text.lines().count() >= 2 && !text.lines().nth(1).unwrap().trim().is_empty(),
            "{what}: a failure says what is wrong on the next line: {text:?}"
        );
        text
    }
}

#[derive(Clone, Copy)]
enum Auth<'a> {
    /// The cookie of the last checkauth.
    Session,
    Basic(&'a str, &'a str),
    /// A cookie header with this value.
    Cookie(&'a str),
    Nothing,
}

/// 1C's "Обмен с сайтом" pointed at one lxbridge instance.
#[derive(Clone)]
pub(crate) struct Site {
    http: reqwest::Client,
    base: String,
    node: String,
    token: String,
    cookie: Option<String>,
}

impl Site {
    pub(crate) fn new(base: &str, node: &str, token: &str) -> Site {
        Site {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()
                .unwrap(),
            base: base.to_string(),
            node: node.to_string(),
            token: token.to_string(),
            cookie: None,
        }
    }

    pub(crate) fn of(bridge: &Bridge, node: &str, token: &str) -> Site {
        Site::new(&format!("http://{}", bridge.addr), node, token)
    }

    /// The same 1C session talking to another instance.
    fn at(&self, base: &str) -> Site {
        Site {
            base: base.to_string(),
            ..self.clone()
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        kind: &str,
        mode: &str,
        filename: Option<&str>,
        body: Option<Vec<u8>>,
        auth: Auth<'_>,
    ) -> Reply {
        let mut query = vec![("type", kind), ("mode", mode)];
        if let Some(f) = filename {
            query.push(("filename", f));
        }
        let mut req = self
            .http
            .request(
                method,
                format!("{}/api/v1/nodes/{}/commerceml", self.base, self.node),
            )
            .query(&query);
        match auth {
            Auth::Session => {
                let cookie = self.cookie.as_ref().expect("checkauth came first");
                req = req.header("cookie", format!("LXBRIDGE_CML={cookie}"));
            }
            Auth::Basic(user, password) => req = req.basic_auth(user, Some(password)),
            Auth::Cookie(value) => req = req.header("cookie", format!("LXBRIDGE_CML={value}")),
            Auth::Nothing => {}
        }
        if let Some(body) = body {
            req = req
                .header("content-type", "application/octet-stream")
                .body(body);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("mode={mode} answers: {e}"));
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("").to_string())
            .unwrap_or_default();
        let body = resp.bytes().await.unwrap().to_vec();
        Reply {
            status,
            content_type,
            body,
        }
    }

    async fn get(&self, kind: &str, mode: &str, filename: Option<&str>) -> Reply {
        self.call(
            reqwest::Method::GET,
            kind,
            mode,
            filename,
            None,
            Auth::Session,
        )
        .await
    }

    /// `mode=checkauth` with Basic: the five lines, the cookie kept for later requests.
    pub(crate) async fn checkauth(&mut self, kind: &str) {
        let (node, token) = (self.node.clone(), self.token.clone());
        let reply = self
            .call(
                reqwest::Method::GET,
                kind,
                "checkauth",
                None,
                None,
                Auth::Basic(&node, &token),
            )
            .await;
        let text = reply.text();
        assert_eq!(reply.status, 200, "checkauth: {text:?}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "checkauth answers 5 lines: {text:?}");
        assert_eq!(lines[0], "success", "{text:?}");
        assert_eq!(lines[1], "LXBRIDGE_CML", "{text:?}");
        assert!(!lines[2].is_empty(), "a cookie value: {text:?}");
        let sessid = lines[3].strip_prefix("sessid=").expect("sessid=…");
        assert!(
            !sessid.is_empty() && sessid.bytes().all(|b| b.is_ascii_hexdigit()),
            "sessid is hex: {text:?}"
        );
        let timestamp: u64 = lines[4]
            .strip_prefix("timestamp=")
            .and_then(|t| t.parse().ok())
            .expect("timestamp=<unix seconds>");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            timestamp.abs_diff(now) < 120,
            "timestamp {timestamp} vs {now}"
        );
        self.cookie = Some(lines[2].to_string());
    }

    /// `mode=init`: (zip, file_limit).
    pub(crate) async fn init(&self, kind: &str) -> (bool, usize) {
        let reply = self.get(kind, "init", None).await;
        let text = reply.text();
        assert_eq!(reply.status, 200, "init: {text:?}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "init answers zip and file_limit: {text:?}");
        let zip = match lines[0] {
            "zip=yes" => true,
            "zip=no" => false,
            other => panic!("init: {other:?} is not zip=yes|no"),
        };
        let limit = lines[1]
            .strip_prefix("file_limit=")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("init: {:?} is not file_limit=<n>", lines[1]));
        (zip, limit)
    }

    /// One POST of `mode=file`.
    async fn post_file(&self, kind: &str, name: &str, part: &[u8]) -> Reply {
        self.call(
            reqwest::Method::POST,
            kind,
            "file",
            Some(name),
            Some(part.to_vec()),
            Auth::Session,
        )
        .await
    }

    /// Uploads a file in parts of `part` bytes, each answered a bare `success`.
    pub(crate) async fn upload(&self, kind: &str, name: &str, bytes: &[u8], part: usize) -> usize {
        let mut parts = 0;
        for (i, chunk) in bytes.chunks(part).enumerate() {
            let reply = self.post_file(kind, name, chunk).await;
            assert_eq!(
                (reply.status, reply.text().trim_end()),
                (200, "success"),
                "{name} part {i} of {part} bytes"
            );
            parts += 1;
        }
        parts
    }

    /// `mode=import` asked again while it answers `progress`: the final answer, and how
    /// many `progress` answers came before it.
    async fn import(&self, kind: &str, name: &str) -> (Reply, usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut progress = 0;
        for _ in 0..1000 {
            let reply = self.get(kind, "import", Some(name)).await;
            assert_eq!(reply.status, 200, "import {name}: {:?}", reply.text());
            if reply.word(&format!("import {name}")) != "progress" {
                return (reply, progress);
            }
            progress += 1;
            assert!(
                Instant::now() < deadline,
                "import {name}: still progress after 120 s ({progress} answers)"
            );
        }
        panic!("import {name}: progress 1000 times");
    }

    /// Imports until done and asserts `success`; its text.
    pub(crate) async fn import_ok(&self, kind: &str, name: &str) -> String {
        let (reply, _) = self.import(kind, name).await;
        assert_eq!(
            reply.first_line(),
            "success",
            "import {name}: {:?}",
            reply.text()
        );
        reply.text()
    }
}

/// The number written after `label` in `text`.
fn number_after(text: &str, label: &str) -> Option<u64> {
    let at = text.find(label)? + label.len();
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Whether `n` is one of the numbers in `text`.
pub(crate) fn mentions_number(text: &str, n: usize) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|w| w == n.to_string())
}

// ---------------------------------------------------------------------------------------
// lxbridge with a CommerceML node and a push target

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
name = "shop"
token = "shop-secret"
[node.deliver]
mode = "push"
url = "@SHOP@"
batch_max = 100

[[node]]
name = "ut"
token = "ut-secret"
[node.commerceml]
file_limit = 204800
zip = @ZIP@
keep_files = "0s"
import_wait = "2s"
dir = @DIR@
@UT@

[[route]]
from = "ut"
to = ["shop"]
types = ["CommerceML.*"]
@EXTRA@
"#;

struct Setup {
    bridge: Bridge,
    shop: Target,
    dir: PathBuf,
    _dir_removed: RemoveOnDrop,
}

/// The `.xml` files anywhere under `dir`.
fn xml_files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "xml") {
                found.push(path);
            }
        }
    }
    found
}

/// Removes a test's session folder (and its embedded data folder) even when it fails.
pub(crate) struct RemoveOnDrop(pub(crate) Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The session folder of a test (the `dir` extension), under the tests' temp folder.
pub(crate) fn cml_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir()
        .join("lxbridge-tests")
        .join(format!("{prefix}-cml"))
}

pub(crate) fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

impl Setup {
    /// `ut_lines`: more of the `ut` node (after its `[node.commerceml]`); `extra`: more
    /// nodes and routes (`@DIR@` in them is the same folder).
    async fn start(backend: Backend, name: &str, zip: bool, ut_lines: &str, extra: &str) -> Setup {
        let prefix = unique_prefix(name);
        let dir = cml_dir(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        let shop = Target::start().await;
        let template = CONFIG
            .replace("@UT@", ut_lines)
            .replace("@EXTRA@", extra)
            .replace("@SHOP@", &shop.url())
            .replace("@ZIP@", if zip { "true" } else { "false" })
            .replace("@DIR@", &toml_path(&dir));
        let bridge = Bridge::start_with(backend, &prefix, &template, AMQP_URL, true).await;
        Setup {
            bridge,
            shop,
            _dir_removed: RemoveOnDrop(vec![dir.clone(), data_dir(&prefix)]),
            dir,
        }
    }

    fn site(&self) -> Site {
        Site::of(&self.bridge, "ut", "ut-secret")
    }

    async fn object(&self, reference: &str) -> Value {
        let path = format!("/api/v1/objects/{}", reference.replace('#', "%23"));
        let (status, object) = self.bridge.admin_get(&path).await;
        assert_eq!(status, 200, "objects API for {reference:?}: {object}");
        object
    }

    async fn finish(self) {
        self.bridge.finish().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a target received, by (type, ref).
fn by_key(target: &Target) -> HashMap<(String, String), Vec<Value>> {
    let mut m: HashMap<(String, String), Vec<Value>> = HashMap::new();
    for r in target.received() {
        let c = r.change;
        m.entry(key(
            c["type"].as_str().unwrap_or(""),
            c["ref"].as_str().unwrap_or(""),
        ))
        .or_default()
        .push(c);
    }
    m
}

/// Waits for `expected.len()` changes, lets more show up, then: each element exactly once,
/// with its type and Ид as ref, its op, and the reader's data, from `source`; nothing else.
async fn assert_arrived_once(target: &Target, expected: &[Element], source: &str, what: &str) {
    let n = expected.len();
    let deadline = Instant::now() + WAIT;
    while target.count() < n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n} changes arrived in {WAIT:?}; missing e.g. {:?}",
            target.count(),
            expected
                .iter()
                .find(|e| !by_key(target).contains_key(&key(e.kind, &e.reference)))
                .map(|e| (e.kind, &e.reference))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got = by_key(target);
    for e in expected {
        let list = got
            .get(&key(e.kind, &e.reference))
            .unwrap_or_else(|| panic!("{what}: {} {:?} never arrived", e.kind, e.reference));
        assert_eq!(
            list.len(),
            1,
            "{what}: {} {:?} arrived {} times",
            e.kind,
            e.reference,
            list.len()
        );
        let c = &list[0];
        let op = if e.deleted { "delete" } else { "upsert" };
        assert_eq!(c["op"], op, "{what}: {} {:?}: {c}", e.kind, e.reference);
        assert_eq!(
            c["data"], e.data,
            "{what}: {} {:?}: the data is not the element's",
            e.kind, e.reference
        );
        assert_eq!(c["source"], source, "{what}: {c}");
        let id = c["id"].as_str().unwrap_or("");
        assert!(id.starts_with("cml-"), "{what}: change id {id:?}");
    }
    assert_eq!(
        target.count(),
        n,
        "{what}: more changes than elements arrived"
    );
    assert_eq!(target.distinct_ids().len(), n, "{what}: change ids repeat");
}

pub(crate) fn events(object: &Value) -> Vec<(String, String)> {
    object["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|e| {
                    (
                        e["target"].as_str().unwrap_or("").to_string(),
                        e["event"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The checkauth, init, upload, import of one catalog exchange; the import answers.
pub(crate) async fn exchange(site: &mut Site, files: &[(&str, &[u8])], part: usize) -> Vec<String> {
    site.checkauth("catalog").await;
    let (zip, limit) = site.init("catalog").await;
    assert!(!zip, "this node has zip = false");
    assert_eq!(limit, FILE_LIMIT);
    let mut answers = Vec::new();
    for (name, bytes) in files {
        site.upload("catalog", name, bytes, part).await;
        answers.push(site.import_ok("catalog", name).await);
    }
    answers
}

// ---------------------------------------------------------------------------------------
// 1. The full catalog exchange

async fn full_exchange_delivers_every_element_once_with_its_data(backend: Backend) {
    let setup = Setup::start(backend, "cml-full", false, "", "").await;
    let import = fixture("import0_1.xml");
    let offers = fixture("offers0_1.xml");
    let mut expected = elements_of(&import, "import0_1.xml");
    let import_n = expected.len();
    let offers_elements = elements_of(&offers, "offers0_1.xml");
    let offers_n = offers_elements.len();
    expected.extend(offers_elements);

    let mut site = setup.site();
    let answers = exchange(
        &mut site,
        &[("import0_1.xml", &import), ("offers0_1.xml", &offers)],
        FILE_LIMIT,
    )
    .await;
    for (answer, n) in answers.iter().zip([import_n, offers_n]) {
        assert!(
            mentions_number(answer, n),
            "the success text counts the {n} elements: {answer:?}"
        );
        assert_eq!(
            number_after(answer, "без изменений: "),
            Some(0),
            "nothing was unchanged: {answer:?}"
        );
    }
    assert_arrived_once(&setup.shop, &expected, "ut", "import0_1 + offers0_1").await;
    let left = xml_files_under(&setup.dir);
    assert!(
        left.is_empty(),
        "keep_files = 0s: imported files removed, left {left:?}"
    );

    // The objects API: a product's history (accepted from ut, delivered to the shop).
    let product = expected
        .iter()
        .find(|e| e.kind == "CommerceML.Товар" && !e.deleted)
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let object = setup.object(&product.reference).await;
        let ev = events(&object);
        let delivered = object["targets"].as_array().is_some_and(|ts| {
            ts.iter().any(|t| {
                t["type"] == "CommerceML.Товар"
                    && t["target"] == "shop"
                    && t["state"] == "delivered"
            })
        });
        if delivered && ev.contains(&("shop".into(), "delivered".into())) {
            assert!(
                ev.contains(&("ut".into(), "accepted".into())),
                "accepted from ut: {object}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no delivered history for {}: {object}",
            product.reference
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The deleted product came as a delete.
    let deleted = expected.iter().find(|e| e.deleted).unwrap();
    let object = setup.object(&deleted.reference).await;
    assert!(
        events(&object).contains(&("ut".into(), "accepted".into())),
        "{object}"
    );
    setup.finish().await;
}

/// The 1.2 MB catalog with nested groups, uploaded in parts of 200 KB (appended on the
/// site): every group (nested ones with ИдРодителя), property and product arrives once.
async fn nested_groups_catalog_in_200kb_parts_arrives_whole(backend: Backend) {
    let setup = Setup::start(backend, "cml-nested", false, "", "").await;
    let nested = fixture("import0_1_with_nested_groups.xml");
    let expected = elements_of(&nested, "nested");
    assert!(
        expected
            .iter()
            .any(|e| e.kind == "CommerceML.Группа" && e.data.get("ИдРодителя").is_some()),
        "the reader gives nested groups their parent"
    );
    let mut site = setup.site();
    site.checkauth("catalog").await;
    assert_eq!(site.init("catalog").await, (false, FILE_LIMIT));
    let parts = site
        .upload("catalog", "import0_1.xml", &nested, 200 * 1024)
        .await;
    assert!(parts >= 6, "{parts} parts");
    let answer = site.import_ok("catalog", "import0_1.xml").await;
    assert!(mentions_number(&answer, expected.len()), "{answer:?}");
    assert_arrived_once(&setup.shop, &expected, "ut", "nested groups in parts").await;
    setup.finish().await;
}

// ---------------------------------------------------------------------------------------
// 2. The same catalog again: unchanged; one edit: one product

/// import0_1.xml with one product's Наименование changed: the bytes, that product's ref
/// and its new data (checked with the reader: nothing else differs).
fn with_one_product_renamed(import: &[u8]) -> (Vec<u8>, String, Value) {
    let original = elements_of(import, "import0_1.xml");
    let product = original
        .iter()
        .find(|e| e.kind == "CommerceML.Товар" && !e.deleted)
        .unwrap();
    let text = String::from_utf8(import.to_vec()).unwrap();
    let at = text
        .find(&format!("<Ид>{}</Ид>", product.reference))
        .expect("the product's Ид in the file");
    let open = at + text[at..].find("<Наименование>").unwrap() + "<Наименование>".len();
    let close = open + text[open..].find("</Наименование>").unwrap();
    let renamed = format!("{}Коврик переименованный{}", &text[..open], &text[close..]).into_bytes();
    let changed = elements_of(&renamed, "renamed");
    assert_eq!(changed.len(), original.len());
    let differ: Vec<&Element> = changed
        .iter()
        .zip(&original)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a)
        .collect();
    assert_eq!(differ.len(), 1, "one element changed");
    assert_eq!(differ[0].reference, product.reference);
    assert_eq!(differ[0].data["Наименование"], "Коврик переименованный");
    (renamed, product.reference.clone(), differ[0].data.clone())
}

async fn same_catalog_again_is_unchanged_and_one_edit_delivers_one_product(backend: Backend) {
    let setup = Setup::start(backend, "cml-unchanged", false, "", "").await;
    let import = fixture("import0_1.xml");
    let offers = fixture("offers0_1.xml");
    let mut expected = elements_of(&import, "import0_1.xml");
    let import_n = expected.len();
    let offers_n = elements_of(&offers, "offers0_1.xml").len();
    expected.extend(elements_of(&offers, "offers0_1.xml"));
    let files: [(&str, &[u8]); 2] = [("import0_1.xml", &import), ("offers0_1.xml", &offers)];
    let mut site = setup.site();
    exchange(&mut site, &files, FILE_LIMIT).await;
    assert_arrived_once(&setup.shop, &expected, "ut", "first upload").await;
    let delivered = setup.shop.count();

    // The same files in full, in a new session: every element unchanged, nothing sent.
    let mut again = setup.site();
    let answers = exchange(&mut again, &files, FILE_LIMIT).await;
    assert_ne!(again.cookie, site.cookie, "a new session");
    for (answer, n) in answers.iter().zip([import_n, offers_n]) {
        assert_eq!(
            number_after(answer, "без изменений: "),
            Some(n as u64),
            "every element unchanged: {answer:?}"
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        setup.shop.count(),
        delivered,
        "an unchanged element is not delivered again"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", setup.bridge.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (outcome, n) in [("accepted", expected.len()), ("unchanged", expected.len())] {
        let series = format!("lx_commerceml_elements_total{{node=\"ut\",outcome=\"{outcome}\"}}");
        assert_eq!(
            crate::store_loss::metric(&metrics, &series),
            n as f64,
            "{series}"
        );
    }
    for sample in [
        expected
            .iter()
            .find(|e| e.kind == "CommerceML.Товар")
            .unwrap(),
        expected
            .iter()
            .find(|e| e.kind == "CommerceML.Предложение")
            .unwrap(),
    ] {
        let object = setup.object(&sample.reference).await;
        assert!(
            events(&object).contains(&("ut".into(), "unchanged".into())),
            "{} {:?}: an `unchanged` event with target ut: {object}",
            sample.kind,
            sample.reference
        );
    }

    // One product renamed: exactly that product arrives, with the new data.
    let (renamed, reference, data) = with_one_product_renamed(&import);
    let mut third = setup.site();
    let answers = exchange(&mut third, &[("import0_1.xml", &renamed)], FILE_LIMIT).await;
    assert_eq!(
        number_after(&answers[0], "без изменений: "),
        Some(import_n as u64 - 1),
        "{:?}",
        answers[0]
    );
    eventually(WAIT, "the renamed product", || {
        setup.shop.count() > delivered
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        setup.shop.count(),
        delivered + 1,
        "only the renamed product"
    );
    let last = setup.shop.received().last().unwrap().change.clone();
    assert_eq!(last["type"], "CommerceML.Товар");
    assert_eq!(last["ref"], reference.as_str());
    assert_eq!(last["data"], data);
    assert_eq!(last["op"], "upsert");
    setup.finish().await;
}

// ---------------------------------------------------------------------------------------
// 3. zip=yes

fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in files {
        w.start_file(*name, options).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn files_named(dir: &Path, name: &str, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_named(&path, name, found);
        } else if path.file_name().is_some_and(|n| n == name) {
            found.push(path);
        }
    }
}

async fn zip_archive_in_parts_delivers_as_the_plain_files(backend: Backend) {
    let setup = Setup::start(backend, "cml-zip", true, "", "").await;
    let import = fixture("import0_1.xml");
    let offers = fixture("offers0_1.xml");
    // Incompressible, so that the archive takes several parts.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let picture: Vec<u8> = (0..40_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let archive = zip_of(&[
        ("import.xml", &import),
        ("offers.xml", &offers),
        ("import_files/ab/pic.jpg", &picture),
    ]);
    let mut expected = elements_of(&import, "import0_1.xml");
    expected.extend(elements_of(&offers, "offers0_1.xml"));

    let mut site = setup.site();
    site.checkauth("catalog").await;
    assert_eq!(site.init("catalog").await, (true, FILE_LIMIT));
    let part = 16 * 1024;
    let parts = site
        .upload("catalog", "v8_3B8F_3e.zip", &archive, part)
        .await;
    assert!(parts >= 2, "the archive went in {parts} parts");
    site.import_ok("catalog", "import.xml").await;
    site.import_ok("catalog", "offers.xml").await;
    assert_arrived_once(&setup.shop, &expected, "ut", "zip").await;
    // The picture came out of the archive whole, in the session's folder.
    let mut found = Vec::new();
    files_named(&setup.dir, "pic.jpg", &mut found);
    assert_eq!(
        found.len(),
        1,
        "import_files/ab/pic.jpg unpacked: {found:?}"
    );
    assert!(
        found[0].ends_with("import_files/ab/pic.jpg"),
        "{}",
        found[0].display()
    );
    assert_eq!(std::fs::read(&found[0]).unwrap(), picture);
    setup.finish().await;
}

// ---------------------------------------------------------------------------------------
// 4. Orders: mode=query and mode=success; 1C's orders imported

const ORDER_NODES: &str = r#"
[[node]]
name = "crm"
token = "crm-secret"

[[node]]
name = "ut2"
token = "ut2-secret"
[node.commerceml]
query_encoding = "windows-1251"
dir = @DIR@
[node.deliver]
mode = "pull"
lease = "30s"

[[route]]
from = "crm"
to = ["ut", "ut2"]
types = ["CommerceML.Документ"]
"#;

fn order(n: usize) -> (String, Value) {
    let reference = format!("order-{n}-5f1c");
    let data = json!({
        "Номер": format!("{n}"),
        "Дата": "2026-02-14",
        "ХозОперация": "Заказ товара",
        "Роль": "Продавец",
        "Валюта": "руб",
        "Сумма": format!("{}.00", 1000 + n),
        "Контрагенты": {"Контрагент": {"Ид": format!("client-{n}"), "Наименование": "Иванов Иван Иванович", "Роль": "Покупатель"}},
        "Товары": {"Товар": [
            {"Ид": "82cfb8dc-0001", "Наименование": "Коврик «Ёлка» & Co", "Количество": "2", "Сумма": "600.00"},
            {"Ид": "82cfb8dc-0002", "Наименование": "Коврик для ванной", "Количество": "1", "Сумма": "400.00"}
        ]},
        "Комментарий": "позвонить <до> 18:00"
    });
    (reference, data)
}

/// A query's answer read back: (ref, data) of each Документ.
fn query_documents(reply: &Reply, charset: &str, what: &str) -> Vec<(String, Value)> {
    assert_eq!(reply.status, 200, "{what}: {:?}", reply.text());
    let content_type = reply.content_type.to_ascii_lowercase();
    assert!(
        content_type.starts_with("application/xml")
            && content_type.contains(&format!("charset={charset}")),
        "{what}: Content-Type {:?}",
        reply.content_type
    );
    let head = String::from_utf8_lossy(&reply.body[..reply.body.len().min(100)]).to_lowercase();
    assert!(
        head.starts_with(&format!("<?xml version=\"1.0\" encoding=\"{charset}\"?>")),
        "{what}: the XML declaration names the encoding: {head:?}"
    );
    let (elements, errors) = read(&reply.body);
    assert!(errors.is_empty(), "{what}: the answer reads: {errors:?}");
    let encoding = encoding_rs::Encoding::for_label(charset.as_bytes()).unwrap();
    let (text, _, malformed) = encoding.decode(&reply.body);
    assert!(!malformed, "{what}: the body is {charset}");
    assert!(
        text.contains("<КоммерческаяИнформация")
            && text.trim_end().ends_with("</КоммерческаяИнформация>"),
        "{what}: the root element: {text}"
    );
    if charset != "utf-8" && !elements.is_empty() {
        assert!(
            std::str::from_utf8(&reply.body).is_err(),
            "{what}: Cyrillic in {charset}, not UTF-8"
        );
    }
    elements
        .into_iter()
        .map(|e| {
            assert_eq!(e.kind, "CommerceML.Документ", "{what}");
            (e.reference, e.data)
        })
        .collect()
}

/// Queries until orders come, checks a second query serves the same, confirms: each batch
/// served, until `n` orders came; then the empty root, twice.
async fn take_orders(site: &Site, charset: &str, n: usize) -> Vec<(String, Value)> {
    let mut got: Vec<(String, Value)> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "{}: {} of {n} orders served",
            site.node,
            got.len()
        );
        let first = query_documents(&site.get("sale", "query", None).await, charset, "query");
        if first.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let second = query_documents(
            &site.get("sale", "query", None).await,
            charset,
            "query again",
        );
        assert_eq!(
            second, first,
            "{}: the same orders until success",
            site.node
        );
        let reply = site.get("sale", "success", None).await;
        assert_eq!(
            (reply.status, reply.word("success").as_str()),
            (200, "success"),
            "mode=success: {:?}",
            reply.text()
        );
        got.extend(first);
    }
    for _ in 0..2 {
        let reply = site.get("sale", "query", None).await;
        let after = query_documents(&reply, charset, "query after success");
        assert!(
            after.is_empty(),
            "{}: confirmed orders are never served again: {after:?}",
            site.node
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    got
}

async fn orders_are_served_to_query_until_success_and_1c_orders_are_imported(backend: Backend) {
    let setup = Setup::start(
        backend,
        "cml-orders",
        false,
        "[node.deliver]\nmode = \"pull\"\nlease = \"30s\"",
        ORDER_NODES,
    )
    .await;
    let orders: Vec<(String, Value)> = (1..=3).map(order).collect();
    let changes: Vec<Value> = orders
        .iter()
        .enumerate()
        .map(|(i, (r, data))| {
            json!({"id": format!("ord-{i}"), "type": "CommerceML.Документ", "ref": r, "data": data})
        })
        .collect();

    // Before anything is routed to them, the query is the root element alone.
    let mut ut = setup.site();
    ut.checkauth("sale").await;
    ut.init("sale").await;
    let empty = ut.get("sale", "query", None).await;
    assert!(query_documents(&empty, "utf-8", "empty query").is_empty());
    assert!(
        empty.text().contains("КоммерческаяИнформация"),
        "{:?}",
        empty.text()
    );

    let (status, answer) = setup
        .bridge
        .post_json("crm", "crm-secret", &Value::Array(changes))
        .await;
    assert_eq!(status, 202, "{answer}");

    let mut ut2 = Site::of(&setup.bridge, "ut2", "ut2-secret");
    ut2.checkauth("sale").await;
    ut2.init("sale").await;
    for (site, charset) in [(&ut, "utf-8"), (&ut2, "windows-1251")] {
        let got = take_orders(site, charset, orders.len()).await;
        let got_refs: Vec<&String> = got.iter().map(|(r, _)| r).collect();
        let mut sorted = got_refs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            got.len(),
            "{charset}: an order twice: {got_refs:?}"
        );
        for (reference, data) in &orders {
            let (_, read_back) = got
                .iter()
                .find(|(r, _)| r == reference)
                .unwrap_or_else(|| panic!("{charset}: {reference} not served: {got_refs:?}"));
            let mut want = data.clone();
            want["Ид"] = json!(reference);
            assert_eq!(
                read_back, &want,
                "{charset}: {reference} reads back as posted"
            );
        }
    }
    // Confirmed: the objects API shows them delivered to both.
    for (reference, _) in &orders {
        let deadline = Instant::now() + WAIT;
        loop {
            let object = setup.object(reference).await;
            let states: HashMap<String, String> = object["targets"]
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
            if states.get("ut").map(String::as_str) == Some("delivered")
                && states.get("ut2").map(String::as_str) == Some("delivered")
            {
                break;
            }
            assert!(Instant::now() < deadline, "{reference}: {object}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // 1C's own orders (a Bitrix-made file, windows-1251) uploaded: one change per Документ
    // at the shop. 1C's older flow never asks `import`: the part that makes the file whole
    // is answered only once every order in it was accepted; the newer flow's `import` after
    // it gets the same answer and publishes nothing again.
    let bitrix = fixture("bitrix-query-response-full.xml");
    let expected = elements_of(&bitrix, "bitrix orders");
    let mut sale = setup.site();
    sale.checkauth("sale").await;
    let (zip, _) = sale.init("sale").await;
    assert!(
        !zip,
        "a sale exchange is told zip=no, so a whole file can be told"
    );
    let part = bitrix.len() / 2 + 1;
    let (first, last) = bitrix.split_at(part);
    sale.upload("sale", "orders-2d1b.xml", first, part).await;
    let whole = sale.post_file("sale", "orders-2d1b.xml", last).await;
    let text = whole.text();
    assert_eq!(
        (whole.status, whole.first_line().as_str()),
        (200, "success"),
        "{text:?}"
    );
    assert!(mentions_number(&text, expected.len()), "{text:?}");
    let answer = sale.import_ok("sale", "orders-2d1b.xml").await;
    assert_eq!(
        answer, text,
        "mode=import after the whole file answers alike"
    );
    assert_arrived_once(&setup.shop, &expected, "ut", "1C's orders").await;
    setup.finish().await;
}

// ---------------------------------------------------------------------------------------
// 5. Bad input

const SMALL_NODE: &str = r#"
[[node]]
name = "small"
token = "small-secret"
[node.commerceml]
file_limit = 50000
session_limit = 100000
dir = @DIR@

[[route]]
from = "small"
to = ["shop"]
types = ["CommerceML.*"]
"#;

const NO_ID: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<КоммерческаяИнформация xmlns="urn:1C.ru:commerceml_2" ВерсияСхемы="2.07" ДатаФормирования="2026-02-14T10:00:00">
	<Каталог СодержитТолькоИзменения="true">
		<Ид>cat-1</Ид>
		<Наименование>Каталог</Наименование>
		<Товары>
			<Товар>
				<Ид>p-with-id-1</Ид>
				<Наименование>Первый</Наименование>
			</Товар>
			<Товар>
				<Наименование>Без Ид</Наименование>
			</Товар>
			<Товар>
				<Ид>p-with-id-2</Ид>
				<Наименование>Третий</Наименование>
			</Товар>
		</Товары>
	</Каталог>
</КоммерческаяИнформация>
"#;

const NOT_XML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<КоммерческаяИнформация ВерсияСхемы=\"2.07\">\n<Каталог>\n<Товары></Каталог>\n</КоммерческаяИнформация>\n";

const NOT_CML: &str = "<?xml version=\"1.0\"?>\n<html>\n<body>Fatal error: Allowed memory size exhausted</body>\n</html>\n";

/// The file error the reader finds in `bytes` (the test's premise).
fn file_error(bytes: &[u8], what: &str) -> ReadError {
    let (_, errors) = read(bytes);
    let error = errors
        .into_iter()
        .last()
        .unwrap_or_else(|| panic!("{what}: the reader finds no error"));
    assert!(matches!(error, ReadError::File(_)), "{what}: {error:?}");
    error
}

async fn bad_input_is_answered_failure_and_skipped_elements_are_listed(backend: Backend) {
    let setup = Setup::start(backend, "cml-bad", false, "", SMALL_NODE).await;
    let mut site = setup.site();
    let get = reqwest::Method::GET;

    site.checkauth("catalog").await;
    site.init("catalog").await;
    // Basic again without the cookie: the node's latest session.
    let reply = site
        .call(
            get.clone(),
            "catalog",
            "init",
            None,
            None,
            Auth::Basic("ut", "ut-secret"),
        )
        .await;
    assert_eq!(reply.status, 200, "init with Basic: {:?}", reply.text());
    assert!(reply.text().starts_with("zip=no"), "{:?}", reply.text());
    let reply = site.get("catalog", "frobnicate", None).await;
    reply.failure(200, "an unknown mode");

    // Not XML, truncated, not CommerceML: failure naming the line, as the reader says.
    let import = fixture("import0_1.xml");
    let truncated = import[..100_000].to_vec();
    for (name, bytes) in [
        ("broken.xml", NOT_XML.as_bytes().to_vec()),
        ("truncated.xml", truncated),
        ("html.xml", NOT_CML.as_bytes().to_vec()),
    ] {
        let error = file_error(&bytes, name);
        site.upload("catalog", name, &bytes, FILE_LIMIT).await;
        let (reply, _) = site.import("catalog", name).await;
        let text = reply.failure(200, name);
        assert!(
            text.contains(&error.russian()),
            "{name}: the failure says what the reader found ({:?}): {text:?}",
            error.russian()
        );
        assert!(
            text.contains(&error.line().to_string()) && text.contains("строк"),
            "{name}: the failure names the line {}: {text:?}",
            error.line()
        );
    }

    // An element without Ид: skipped and listed; the others delivered; recorded as rejected.
    let (elements, errors) = read(NO_ID.as_bytes());
    assert_eq!(elements.len(), 2);
    assert_eq!(errors.len(), 1);
    assert!(matches!(errors[0], ReadError::Element(_)));
    site.upload("catalog", "no-id.xml", NO_ID.as_bytes(), FILE_LIMIT)
        .await;
    let text = site.import_ok("catalog", "no-id.xml").await;
    assert!(
        text.contains(&errors[0].russian()),
        "the success text lists the skipped element ({:?}): {text:?}",
        errors[0].russian()
    );
    assert_eq!(
        number_after(&text, "пропущено элементов: "),
        Some(1),
        "{text:?}"
    );
    assert_arrived_once(
        &setup.shop,
        &elements,
        "ut",
        "the file with an element without Ид",
    )
    .await;
    let object = setup.object("no-id.xml").await;
    assert!(
        events(&object).iter().any(|(_, event)| event == "rejected"),
        "history of the file name has `rejected`: {object}"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", setup.bridge.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = r#"lx_commerceml_elements_total{node="ut",outcome="rejected"}"#;
    assert!(
        crate::store_loss::metric(&metrics, series) >= 1.0,
        "{series}"
    );

    // init starts the exchange afresh: what was uploaded before it is gone.
    site.upload("catalog", "stale.xml", NO_ID.as_bytes(), FILE_LIMIT)
        .await;
    site.init("catalog").await;
    let (reply, _) = site.import("catalog", "stale.xml").await;
    reply.failure(200, "import of a file uploaded before init");

    // Unsafe names.
    for name in [
        "../evil.xml",
        "import_files/../../evil.xml",
        "/etc/lxbridge-evil.xml",
    ] {
        let reply = site.post_file("catalog", name, b"<x/>").await;
        reply.failure(200, &format!("mode=file filename={name}"));
        let reply = site.get("catalog", "import", Some(name)).await;
        reply.failure(200, &format!("mode=import filename={name}"));
    }
    let mut evil = Vec::new();
    files_named(setup.dir.parent().unwrap(), "evil.xml", &mut evil);
    assert!(evil.is_empty(), "written outside the session: {evil:?}");
    assert!(!Path::new("/etc/lxbridge-evil.xml").exists());

    // Over the session's size limit (100000 bytes on `small`).
    let mut small = Site::of(&setup.bridge, "small", "small-secret");
    small.checkauth("catalog").await;
    small.init("catalog").await;
    let mut failed = None;
    for (i, chunk) in import.chunks(40_000).enumerate() {
        let reply = small.post_file("catalog", "import0_1.xml", chunk).await;
        if reply.word("oversize upload") == "failure" {
            failed = Some((i, reply.text()));
            break;
        }
    }
    let (i, text) = failed.expect("an upload over session_limit fails");
    assert_eq!(i, 2, "the part that crosses 100000 bytes fails: {text:?}");
    assert!(text.contains("session_limit"), "{text:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        setup.shop.count(),
        2,
        "nothing but the two products with Ид"
    );
    // Wrong or missing password: 401 and failure.
    for (auth, what) in [
        (
            Auth::Basic("ut", "wrong"),
            "checkauth with a wrong password",
        ),
        (
            Auth::Basic("small", "small-secret"),
            "checkauth with another node's credentials",
        ),
        (Auth::Nothing, "checkauth without credentials"),
    ] {
        let reply = site
            .call(get.clone(), "catalog", "checkauth", None, None, auth)
            .await;
        reply.failure(401, what);
    }
    // No session: no cookie and no Basic, or a forged cookie.
    let reply = site
        .call(get.clone(), "catalog", "init", None, None, Auth::Nothing)
        .await;
    reply.failure(401, "init without cookie or Basic");
    let forged = format!("{}.{}", "ab".repeat(16), "cd".repeat(16));
    let reply = site
        .call(
            get.clone(),
            "catalog",
            "init",
            None,
            None,
            Auth::Cookie(&forged),
        )
        .await;
    reply.failure(401, "init with a forged cookie");

    setup.finish().await;
}

both_backends!(
    full_exchange_delivers_every_element_once_with_its_data,
    nested_groups_catalog_in_200kb_parts_arrives_whole,
    same_catalog_again_is_unchanged_and_one_edit_delivers_one_product,
    zip_archive_in_parts_delivers_as_the_plain_files,
    orders_are_served_to_query_until_success_and_1c_orders_are_imported,
    bad_input_is_answered_failure_and_skipped_elements_are_listed,
);

// ---------------------------------------------------------------------------------------
// 6. Two instances sharing the session folder (RabbitMQ backend)

fn two_instance_config(target: &str, dir: &Path) -> String {
    format!(
        r#"{head}[[node]]
name = "shop"
token = "shop-secret"
deliver = {{ mode = "push", url = "{target}", batch_max = 100 }}
[[node]]
name = "ut"
token = "ut-secret"
[node.commerceml]
file_limit = 204800
zip = false
import_wait = "1ms"
dir = {dir}
[[route]]
from = "ut"
to = ["shop"]
types = ["CommerceML.*"]
"#,
        head = crate::fleet::INSTANCES_HEAD,
        dir = toml_path(dir)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_exchange_session() {
    let shop = Target::start().await;
    let dir = cml_dir(&unique_prefix("cml-two"));
    let _ = std::fs::remove_dir_all(&dir);
    let _dir_removed = RemoveOnDrop(vec![dir.clone()]);
    let mut cluster =
        crate::fleet::Cluster::new("cml-two", &two_instance_config(&shop.url(), &dir));
    let (a, b) = (cluster.start().await, cluster.start().await);
    let mut on_a = Site::new(cluster.base(a), "ut", "ut-secret");
    on_a.checkauth("catalog").await;
    let on_b = on_a.at(cluster.base(b));
    assert_eq!(on_b.init("catalog").await, (false, FILE_LIMIT));

    let nested = fixture("import0_1_with_nested_groups.xml");
    let expected = elements_of(&nested, "nested");
    let name = "import___3c1a.xml";
    let parts: Vec<&[u8]> = nested.chunks(200 * 1024).collect();
    assert!(parts.len() >= 6);
    for (i, part) in parts.iter().enumerate() {
        let site = if i % 2 == 0 { &on_a } else { &on_b };
        let reply = site.post_file("catalog", name, part).await;
        assert_eq!(
            (reply.status, reply.text().trim_end()),
            (200, "success"),
            "part {i} on {}",
            if i % 2 == 0 { "A" } else { "B" }
        );
    }
    // The import starts on B (import_wait 1ms: it answers progress), A answers after.
    let first = on_b.get("catalog", "import", Some(name)).await;
    assert_eq!(
        (first.status, first.word("import on B").as_str()),
        (200, "progress"),
        "{:?}",
        first.text()
    );
    let (last, progress_on_a) = on_a.import("catalog", name).await;
    assert_eq!(
        last.first_line(),
        "success",
        "A answers for B's import: {:?}",
        last.text()
    );
    assert!(
        mentions_number(&last.text(), expected.len()),
        "{:?}",
        last.text()
    );
    assert!(
        progress_on_a > 0,
        "A answered progress for the job B runs before its success"
    );
    assert_arrived_once(&shop, &expected, "ut", "two instances").await;
    let counts = shop.id_counts();
    assert!(counts.values().all(|&n| n == 1), "a change delivered twice");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
