//! `--commerceml`: a synthetic CommerceML catalog of `--cml-mb` MB uploaded as 1C's site
//! exchange uploads it (checkauth, init, file in parts of `file_limit`, import until
//! `success`), end to end until every element arrived at a push sink: elements/s, the
//! phases' seconds, lxbridge's peak RSS and CPU per element, beside the raw-RabbitMQ
//! baseline for as many messages of the elements' mean size.

use crate::baseline::run_baseline;
use crate::bridge::{backend_toml, bridge_bin, cleanup_after, process_usage, Bridge};
use crate::{backends, round3, Args};
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::{atomic::AtomicUsize, atomic::Ordering, Arc};
use std::time::{Duration, Instant};

/// The part size 1C is told at init (the protocol's usual 1 MiB).
const FILE_LIMIT: usize = 1 << 20;
const GROUPS: usize = 50;
const PROPERTIES: usize = 10;

/// What the generated catalog holds.
struct Catalog {
    path: PathBuf,
    elements: usize,
    bytes: u64,
}

/// Runs the scenario on each backend `--backend` names, one JSON line each.
pub(crate) async fn commerceml_bench(args: &Args) {
    let prefix = format!("lxbench-{}-cml", std::process::id());
    let path = std::env::temp_dir().join(format!("{prefix}-import.xml"));
    let catalog = write_catalog(&path, args.cml_mb * 1_000_000);
    let baseline = if args.no_baseline {
        Value::Null
    } else {
        run_baseline(&Args {
            name: "cml-baseline".into(),
            n: catalog.elements,
            size: (catalog.bytes as usize / catalog.elements).max(1),
            ..args.clone()
        })
        .await
    };
    for backend in backends(args) {
        let args = Args {
            backend: backend.to_string(),
            ..args.clone()
        };
        let bridge = run_one(&args, &format!("{prefix}-{backend}"), &catalog).await;
        let ratio = crate::ratio(&bridge["elements_per_s"], &baseline);
        let line = json!({
            "scenario": "commerceml",
            "backend": backend,
            "file_mb": round3(catalog.bytes as f64 / 1e6),
            "elements": catalog.elements,
            "file_limit": FILE_LIMIT,
            "bridge": bridge,
            "baseline": baseline,
            "ratio_delivered": ratio,
        });
        println!("{line}");
    }
    let _ = std::fs::remove_file(&catalog.path);
}

/// One backend: lxbridge with a CommerceML node routed to the sink, the upload, the figures.
async fn run_one(args: &Args, prefix: &str, catalog: &Catalog) -> Value {
    let sink = Arc::new(Sink::default());
    let (sink_url, server) = serve_sink(sink.clone()).await;
    let dir = std::env::temp_dir().join(format!("{prefix}-files"));
    let config = |port| bench_config(prefix, port, &sink_url, &dir, args);
    let bridge = Bridge::start_with(&bridge_bin(args), prefix, config).await;
    let pid = bridge.child.id();
    let start = Instant::now();
    let exchange = Exchange::open(&bridge.base).await;
    exchange.upload(&catalog.path).await;
    let uploaded = start.elapsed().as_secs_f64();
    let rounds = exchange.import().await;
    let imported = start.elapsed().as_secs_f64();
    let arrived = || sink.refs.lock().unwrap().len();
    crate::wait_until(
        arrived,
        catalog.elements,
        Duration::from_secs(600),
        "elements arrived",
    )
    .await;
    let total = start.elapsed().as_secs_f64();
    let (rss_mb, cpu_s) = process_usage(pid);
    bridge.stop();
    server.abort();
    cleanup_after(
        args,
        prefix,
        &bench_config(prefix, 0, "http://127.0.0.1:1", &dir, args),
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let delivered = sink.refs.lock().unwrap().len();
    json!({
        "elements_per_s": round3(delivered as f64 / total),
        "delivered": delivered,
        "changes_received": sink.changes.load(Ordering::SeqCst),
        "upload_s": round3(uploaded),
        "import_s": round3(imported - uploaded),
        "import_rounds": rounds,
        "seconds": round3(total),
        "peak_rss_mb": round3(rss_mb),
        "cpu_s": round3(cpu_s),
        "cpu_us_per_element": round3(cpu_s * 1e6 / catalog.elements as f64),
    })
}

fn bench_config(prefix: &str, port: u16, sink: &str, dir: &Path, args: &Args) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{backend}[[node]]
name = "ut"
token = "bench"
[node.commerceml]
file_limit = {FILE_LIMIT}
zip = false
dir = {dir:?}
[[node]]
name = "shop"
token = "x"
deliver = {{ mode = "push", url = "{sink}", batch_max = 100, concurrency = 8, gzip = false }}
[[route]]
from = "ut"
to = ["shop"]
types = ["CommerceML.*"]
"#,
        backend = backend_toml(prefix, args),
        dir = dir.display().to_string(),
    )
}

/// 1C's side of one catalog exchange session.
struct Exchange {
    http: reqwest::Client,
    url: String,
    cookie: String,
}

impl Exchange {
    /// `checkauth` (Basic) then `init`.
    async fn open(base: &str) -> Exchange {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let url = format!("{base}/api/v1/nodes/ut/commerceml");
        let answer = http
            .get(&url)
            .query(&[("type", "catalog"), ("mode", "checkauth")])
            .basic_auth("ut", Some("bench"))
            .send()
            .await
            .expect("checkauth")
            .text()
            .await
            .unwrap();
        let lines: Vec<&str> = answer.lines().collect();
        assert_eq!(lines.first(), Some(&"success"), "checkauth: {answer:?}");
        let exchange = Exchange {
            http,
            url,
            cookie: format!("{}={}", lines[1], lines[2]),
        };
        let init = exchange.call("init", None, None).await;
        assert!(init.starts_with("zip="), "init: {init:?}");
        exchange
    }

    /// One request of the session; the answer's text.
    async fn call(&self, mode: &str, filename: Option<&str>, body: Option<Vec<u8>>) -> String {
        let mut query = vec![("type", "catalog"), ("mode", mode)];
        query.extend(filename.map(|f| ("filename", f)));
        let method = if body.is_some() {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let mut req = self
            .http
            .request(method, &self.url)
            .query(&query)
            .header("cookie", &self.cookie);
        if let Some(body) = body {
            req = req.body(body);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        resp.text().await.unwrap_or_default()
    }

    /// `mode=file` in parts of `FILE_LIMIT`, read from disk one part at a time.
    async fn upload(&self, path: &Path) {
        let mut file = std::fs::File::open(path).expect("the catalog");
        let mut part = vec![0u8; FILE_LIMIT];
        loop {
            let n = read_full(&mut file, &mut part);
            if n == 0 {
                break;
            }
            let answer = self
                .call("file", Some("import.xml"), Some(part[..n].to_vec()))
                .await;
            assert!(answer.starts_with("success"), "file: {answer:?}");
        }
    }

    /// `mode=import` until `success`; how many rounds it took.
    async fn import(&self) -> usize {
        for round in 1.. {
            let answer = self.call("import", Some("import.xml"), None).await;
            match answer.lines().next() {
                Some("success") => return round,
                Some("progress") => continue,
                _ => panic!("import: {answer:?}"),
            }
        }
        unreachable!()
    }
}

/// Reads until `buf` is full or the file ends; the bytes read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]).expect("read the catalog") {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// The refs the sink received, and how many changes (a redelivery counts again); `--webhook`
/// delivers to it too.
#[derive(Default)]
pub(crate) struct Sink {
    pub(crate) refs: Mutex<HashSet<String>>,
    pub(crate) changes: AtomicUsize,
}

async fn receive(State(sink): State<Arc<Sink>>, body: Bytes) -> String {
    #[derive(serde::Deserialize)]
    struct Batch {
        changes: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(rename = "ref")]
        reference: String,
    }
    if let Ok(batch) = serde_json::from_slice::<Batch>(&body) {
        sink.changes
            .fetch_add(batch.changes.len(), Ordering::SeqCst);
        let mut refs = sink.refs.lock().unwrap();
        refs.extend(batch.changes.into_iter().map(|c| c.reference));
    }
    json!({"results": []}).to_string()
}

/// Serves the sink's `POST /sink` on a free port; its URL and the server task.
pub(crate) async fn serve_sink(sink: Arc<Sink>) -> (String, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new()
        .route("/sink", post(receive))
        .with_state(sink);
    let (base, server) = crate::serve(app).await;
    (format!("{base}/sink"), server)
}

/// Writes a CommerceML 2.05 `import.xml` of about `target` bytes: groups, properties, and
/// products shaped as 1C writes them (requisites, property values, a description).
fn write_catalog(path: &Path, target: usize) -> Catalog {
    let file = std::fs::File::create(path).expect("create the catalog");
    let mut out = Counting {
        inner: BufWriter::new(file),
        bytes: 0,
    };
    write_head(&mut out);
    let mut products = 0;
    out.text("<Каталог СодержитТолькоИзменения=\"false\"><Ид>bench-catalog</Ид><ИдКлассификатора>bench</ИдКлассификатора><Наименование>Каталог</Наименование><Товары>");
    while (out.bytes as usize) < target {
        write_product(&mut out, products);
        products += 1;
    }
    out.text("</Товары></Каталог></КоммерческаяИнформация>\n");
    out.inner.flush().expect("write the catalog");
    Catalog {
        path: path.to_path_buf(),
        elements: GROUPS + PROPERTIES + products,
        bytes: out.bytes,
    }
}

fn write_head(out: &mut Counting) {
    out.text("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<КоммерческаяИнформация ВерсияСхемы=\"2.05\" ДатаФормирования=\"2026-12-02T10:00:00\">");
    out.text("<Классификатор><Ид>bench</Ид><Наименование>Классификатор</Наименование><Группы>");
    for g in 0..GROUPS {
        out.text(&format!(
            "<Группа><Ид>group-{g:04}</Ид><Наименование>Группа {g}</Наименование></Группа>"
        ));
    }
    out.text("</Группы><Свойства>");
    for p in 0..PROPERTIES {
        out.text(&format!("<Свойство><Ид>prop-{p:02}</Ид><Наименование>Свойство {p}</Наименование><ТипЗначений>Строка</ТипЗначений></Свойство>"));
    }
    out.text("</Свойства></Классификатор>");
}

fn write_product(out: &mut Counting, i: usize) {
    let mut values = String::new();
    for p in 0..PROPERTIES {
        values.push_str(&format!(
            "<ЗначенияСвойства><Ид>prop-{p:02}</Ид><Значение>значение {}</Значение></ЗначенияСвойства>",
            (i + p) % 97
        ));
    }
    out.text(&format!(
        "<Товар><Ид>{i:08x}-7c3b-11e6-80d6-0050568b1bf1</Ид><Артикул>A-{i}</Артикул>\
         <Наименование>Товар номер {i}</Наименование>\
         <БазоваяЕдиница Код=\"796\" НаименованиеПолное=\"Штука\">шт</БазоваяЕдиница>\
         <Группы><Ид>group-{:04}</Ид></Группы>\
         <Описание>Описание товара {i}: синтетическая карточка для замера скорости обмена.</Описание>\
         <ЗначенияСвойств>{values}</ЗначенияСвойств>\
         <СтавкиНалогов><СтавкаНалога><Наименование>НДС</Наименование><Ставка>20</Ставка></СтавкаНалога></СтавкиНалогов>\
         <ЗначенияРеквизитов><ЗначениеРеквизита><Наименование>ВидНоменклатуры</Наименование><Значение>Товар</Значение></ЗначениеРеквизита>\
         <ЗначениеРеквизита><Наименование>Вес</Наименование><Значение>{}</Значение></ЗначениеРеквизита></ЗначенияРеквизитов></Товар>",
        i % GROUPS,
        i % 13
    ));
}

/// A writer that counts what it wrote.
struct Counting {
    inner: BufWriter<std::fs::File>,
    bytes: u64,
}

impl Counting {
    fn text(&mut self, s: &str) {
        self.inner
            .write_all(s.as_bytes())
            .expect("write the catalog");
        self.bytes += s.len() as u64;
    }
}
