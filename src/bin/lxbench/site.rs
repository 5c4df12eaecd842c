//! `--commerceml-site`: lxbridge feeding a CommerceML site as 1C does. `-n` products
//! (`CommerceML.Товар` changes, ~`-s` bytes of data each) are POSTed to a source node routed
//! to a `mode = "commerceml"` target: lxbench's own site, which answers as 1C-Bitrix does
//! (zip=yes, file_limit 200 KB), unpacks each package and reads it with lxbridge's
//! CommerceML reader. Products/s = products the site read / (first POST → last product
//! read), beside the raw-RabbitMQ baseline for as many messages of that size.

use crate::baseline::run_baseline;
use crate::bridge::{backend_toml, bridge_bin, cleanup_after, process_usage, Bridge};
use crate::{backends, round3, Args};
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::routing::any;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The part size the site announces (1C-Bitrix's default).
const FILE_LIMIT: usize = 204_800;

/// Runs the scenario on each backend `--backend` names, one JSON line each.
pub(crate) async fn site_bench(args: &Args) {
    let baseline = if args.no_baseline {
        Value::Null
    } else {
        run_baseline(&Args {
            name: "site-baseline".into(),
            ..args.clone()
        })
        .await
    };
    for backend in backends(args) {
        let args = Args {
            backend: backend.to_string(),
            ..args.clone()
        };
        let prefix = format!("lxbench-{}-site-{backend}", std::process::id());
        let bridge = run_one(&args, &prefix).await;
        let ratio = crate::ratio(&bridge["products_per_s"], &baseline);
        let line = json!({
            "scenario": "commerceml-site",
            "backend": backend,
            "n": args.n, "size": args.size, "batch": args.batch,
            "file_limit": FILE_LIMIT, "zip": true,
            "bridge": bridge,
            "baseline": baseline,
            "ratio_delivered": ratio,
        });
        println!("{line}");
    }
}

async fn run_one(args: &Args, prefix: &str) -> Value {
    let site = Arc::new(Site::default());
    let (url, server) = serve(site.clone()).await;
    let config = |port| bench_config(prefix, port, &url, args);
    let bridge = Bridge::start_with(&bridge_bin(args), prefix, config).await;
    let pid = bridge.child.id();
    let start = Instant::now();
    post_products(args, &bridge.base).await;
    let posted = start.elapsed().as_secs_f64();
    let read = || site.products.lock().unwrap().len();
    crate::wait_until(
        read,
        args.n,
        Duration::from_secs(600),
        "products read by the site",
    )
    .await;
    let total = start.elapsed().as_secs_f64();
    let (rss_mb, cpu_s) = process_usage(pid);
    bridge.stop();
    server.abort();
    cleanup_after(
        args,
        prefix,
        &bench_config(prefix, 0, "http://127.0.0.1:1", args),
    )
    .await;
    let read = site.products.lock().unwrap().len();
    let packages = *site.packages.lock().unwrap();
    json!({
        "products_per_s": round3(read as f64 / total),
        "products": read,
        "packages": packages,
        "posted_s": round3(posted),
        "seconds": round3(total),
        "peak_rss_mb": round3(rss_mb),
        "cpu_s": round3(cpu_s),
        "cpu_us_per_product": round3(cpu_s * 1e6 / args.n.max(1) as f64),
    })
}

fn bench_config(prefix: &str, port: u16, site: &str, args: &Args) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{backend}[[node]]
name = "central"
token = "bench"
[[node]]
name = "shop"
token = "x"
deliver = {{ mode = "commerceml", url = "{site}", auth = {{ basic = {{ user = "1c", password = "pw" }} }}, batch_max = 500, timeout = "60s" }}
[[route]]
from = "central"
to = ["shop"]
"#,
        backend = backend_toml(prefix, args),
    )
}

/// POSTs the products in requests of `--batch` over `--connections`.
async fn post_products(args: &Args, base: &str) {
    let client = reqwest::Client::new();
    let url = format!("{base}/api/v1/nodes/central/changes");
    let requests: Vec<(usize, usize)> = (0..args.n)
        .step_by(args.batch.max(1))
        .map(|s| (s, (s + args.batch).min(args.n)))
        .collect();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let requests = Arc::new(requests);
    let workers: Vec<_> = (0..args.connections)
        .map(|_| {
            let (client, url, next, requests) =
                (client.clone(), url.clone(), next.clone(), requests.clone());
            let size = args.size;
            tokio::spawn(async move {
                while let Some(&(from, to)) =
                    requests.get(next.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
                {
                    post_until_accepted(&client, &url, body(from, to, size)).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
}

async fn post_until_accepted(client: &reqwest::Client, url: &str, body: String) {
    loop {
        let sent = client
            .post(url)
            .bearer_auth("bench")
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().as_u16() == 202 => return,
            Ok(r) => eprintln!("lxbench: ingress answered {}; retrying", r.status()),
            Err(e) => eprintln!("lxbench: {e}; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Products `from..to` as `CommerceML.Товар` changes shaped as 1C writes a product.
fn body(from: usize, to: usize, size: usize) -> String {
    let filler = "д".repeat(size.saturating_sub(400) / 2);
    let changes: Vec<Value> = (from..to)
        .map(|i| {
            json!({
                "id": format!("p{i}"),
                "type": "CommerceML.Товар",
                "ref": format!("{i:08x}-7c3b-11e6-80d6-0050568b1bf1"),
                "data": {
                    "Ид": format!("{i:08x}-7c3b-11e6-80d6-0050568b1bf1"),
                    "Артикул": format!("A-{i}"),
                    "Наименование": format!("Товар номер {i}"),
                    "БазоваяЕдиница": {"@Код": "796", "@НаименованиеПолное": "Штука", "#text": "шт"},
                    "Группы": {"Ид": format!("group-{:02}", i % 50)},
                    "Описание": filler,
                    "ЗначенияРеквизитов": {"ЗначениеРеквизита": [
                        {"Наименование": "ВидНоменклатуры", "Значение": "Товар"},
                        {"Наименование": "Вес", "Значение": format!("{}", i % 13)}
                    ]}
                }
            })
        })
        .collect();
    Value::Array(changes).to_string()
}

/// The site: the files of the current exchange, and what it read.
#[derive(Default)]
struct Site {
    files: Mutex<HashMap<String, Vec<u8>>>,
    products: Mutex<HashSet<String>>,
    packages: Mutex<u64>,
}

#[derive(serde::Deserialize)]
struct Params {
    mode: String,
    filename: Option<String>,
}

async fn exchange(State(site): State<Arc<Site>>, Query(p): Query<Params>, body: Bytes) -> String {
    match p.mode.as_str() {
        "checkauth" => format!(
            "success\nPHPSESSID\nbench\nsessid=00000000000000000000000000000000\ntimestamp={}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        ),
        "init" => {
            site.files.lock().unwrap().clear();
            format!("zip=yes\nfile_limit={FILE_LIMIT}")
        }
        "file" => {
            let name = p.filename.unwrap_or_default();
            let mut files = site.files.lock().unwrap();
            files.entry(name).or_default().extend_from_slice(&body);
            "success".into()
        }
        "import" => site.import(&p.filename.unwrap_or_default()),
        _ => "failure\nunknown command".into(),
    }
}

impl Site {
    /// Unpacks the uploaded archives, then reads the named file.
    fn import(&self, name: &str) -> String {
        let mut files = self.files.lock().unwrap();
        let archives: Vec<String> = files
            .keys()
            .filter(|k| k.ends_with(".zip"))
            .cloned()
            .collect();
        for archive in archives {
            let bytes = files.remove(&archive).unwrap();
            let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).expect("a zip");
            for i in 0..zip.len() {
                let mut entry = zip.by_index(i).expect("an entry");
                let mut out = Vec::new();
                entry.read_to_end(&mut out).expect("unzip");
                let name = entry.name().map(|n| n.to_string()).unwrap_or_default();
                files.insert(name, out);
            }
        }
        let Some(file) = files.get(name) else {
            return format!("failure\nфайл {name} не загружен");
        };
        let mut products = self.products.lock().unwrap();
        for element in lxbridge::commerceml::Reader::new(&file[..]) {
            match element {
                Ok(e) if e.kind == lxbridge::commerceml::PRODUCT => {
                    products.insert(e.reference);
                }
                Ok(_) => {}
                Err(e) => return format!("failure\n{e}"),
            }
        }
        *self.packages.lock().unwrap() += 1;
        "success".into()
    }
}

async fn serve(site: Arc<Site>) -> (String, tokio::task::JoinHandle<()>) {
    const PATH: &str = "/bitrix/admin/1c_exchange.php";
    let app = axum::Router::new()
        .route(PATH, any(exchange))
        .with_state(site);
    let (base, server) = crate::serve(app).await;
    (format!("{base}{PATH}"), server)
}
