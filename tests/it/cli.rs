//! The `lxbridge` command as an operator runs it: `validate` (every problem one a line, exit
//! 64), `generate-config` (an example that validates), and `status REF` against a running
//! bridge's admin API.

use crate::common::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_lxbridge");
const EXIT_CONFIG: i32 = 64;

/// A temp file with a name no other test (or run) uses; removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> TempFile {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "lxbridge-cli-{name}-{}-{}-{nanos}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn lxbridge(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        // A config from the environment must not change what the tests mean.
        .env_remove("LXBRIDGE_CONFIG")
        .output()
        .expect("the lxbridge binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn validate_prints_every_problem_one_a_line_and_exits_64() {
    // Exactly three mistakes: a route to an unknown node, a node name used twice, and a
    // push node without a url. Everything else is valid.
    let config = TempFile::new(
        "three-mistakes",
        r#"
[server]
listen = "127.0.0.1:8080"
[admin]
token = "admin-secret"

[[node]]
name = "central"
token = "central-secret"

[[node]]
name = "central"
token = "other-secret"

[[node]]
name = "shop"
token = "shop-secret"
[node.deliver]
mode = "push"

[[route]]
from = "central"
to = ["warehouse"]
types = ["Catalog.*"]
"#,
    );
    let out = lxbridge(&["validate", "--config", config.path()]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 3, "want 3 problem lines:\n{}", describe(&out));
    let one_line_naming = |words: &[&str]| {
        let hits: Vec<&&str> = lines
            .iter()
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "want exactly one line naming {words:?}:\n{}",
            describe(&out)
        );
    };
    one_line_naming(&["\"warehouse\"", "not a configured node"]);
    one_line_naming(&["\"central\"", "used twice"]);
    one_line_naming(&["\"shop\"", "url"]);
}

#[test]
fn validate_accepts_the_example_configs() {
    for example in [
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/lxbridge.example.toml"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/lxbridge.embedded.toml"),
    ] {
        let out = lxbridge(&["validate", "--config", example]);
        assert_eq!(out.status.code(), Some(0), "{example}: {}", describe(&out));
    }
    // The integrations' examples take their secrets from the environment: each `${NAME}`
    // they name is set for the check.
    for name in ["bitrix24", "amocrm", "signed-webhook"] {
        let example = format!("{}/config/{name}.toml", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&example).unwrap();
        let mut command = Command::new(BIN);
        command
            .args(["validate", "--config", &example])
            .env_remove("LXBRIDGE_CONFIG");
        for var in text.split("${").skip(1).filter_map(|s| s.split_once('}')) {
            command.env(var.0, "example-secret-value");
        }
        let out = command.output().expect("the lxbridge binary runs");
        assert_eq!(out.status.code(), Some(0), "{example}: {}", describe(&out));
    }
}

#[test]
fn embedded_and_rabbitmq_sections_together_are_refused() {
    let dir = std::env::temp_dir().join(format!("lxbridge-both-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("both.toml");
    std::fs::write(
        &path,
        "[broker]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n[embedded]\ndata_dir = \"x\"\n\
         [[node]]\nname = \"a\"\ntoken = \"t\"\n",
    )
    .unwrap();
    let out = lxbridge(&["validate", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    assert!(
        describe(&out).contains("choose one backend"),
        "{}",
        describe(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generated_config_validates() {
    let out = lxbridge(&["generate-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let generated = stdout(&out);
    assert!(generated.contains("[[node]]"), "not a config:\n{generated}");
    let file = TempFile::new("generated", &generated);
    let out = lxbridge(&["validate", "--config", file.path()]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn unknown_key_is_an_error_naming_the_key() {
    let file = TempFile::new(
        "unknown-key",
        r#"
[server]
lisen = "127.0.0.1:8080"

[[node]]
name = "central"
token = "central-secret"
"#,
    );
    let out = lxbridge(&["validate", "--config", file.path()]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    let all = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(
        all.contains("lisen"),
        "the key is not named:\n{}",
        describe(&out)
    );
}

const BRIDGE_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[broker]
url = "{amqp}"
prefix = "{prefix}"
[store]
redis_url = "{redis}"
[admin]
token = "cli-admin-secret"
[retry]
delays = ["100ms", "200ms"]

[[node]]
name = "central"
token = "central-secret"

[[node]]
name = "shop"
token = "shop-secret"
[node.deliver]
mode = "push"
url = "{shop}"
gzip = false

[[route]]
from = "central"
to = ["shop"]
types = ["Catalog.*"]
"#;

async fn status_prints_what_the_admin_api_returns(backend: Backend) {
    let shop = Target::start().await;
    let bridge = Bridge::start(
        backend,
        "clistatus",
        &BRIDGE_CONFIG.replace("{shop}", &shop.url()),
    )
    .await;
    // A ref with characters that need encoding in a URL path.
    let reference = "Номенклатура=5f1c;ВидЦены=9a/2b";
    let (status, answer) = bridge
        .post_json(
            "central",
            "central-secret",
            &json!([{"id": "cli-1", "type": "Catalog.Products", "ref": reference, "data": {"Name": "Table"}}]),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    eventually(Duration::from_secs(15), "the change at the shop", || {
        shop.count() == 1
    })
    .await;
    // The target has it; the store records "delivered" right after the target answered.
    let path = format!("/api/v1/objects/{}", encode(reference));
    let start = std::time::Instant::now();
    let api = loop {
        let (code, object) = bridge.admin_get(&path).await;
        if code == 200 && object["targets"][0]["state"] == "delivered" {
            break object;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "admin API never showed delivered: {code} {object}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let config = TempFile::new(
        "status",
        &format!(
            "[server]\nlisten = \"{}\"\n[admin]\ntoken = \"cli-admin-secret\"\n",
            bridge.addr
        ),
    );
    let config_path = config.path().to_string();
    let reference_arg = reference.to_string();
    // Both argument orders clap allows.
    let outputs = tokio::task::spawn_blocking(move || {
        [
            lxbridge(&["status", &reference_arg, "--config", &config_path]),
            lxbridge(&["status", "--config", &config_path, &reference_arg]),
        ]
    })
    .await
    .unwrap();
    for out in &outputs {
        assert_eq!(out.status.code(), Some(0), "{}", describe(out));
        let printed: Value = serde_json::from_str(&stdout(out))
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", describe(out)));
        assert_eq!(printed["ref"], reference, "{printed}");
        let targets = printed["targets"].as_array().expect("targets array");
        let shop_entry = targets
            .iter()
            .find(|t| t["target"] == "shop")
            .unwrap_or_else(|| panic!("no shop target in {printed}"));
        assert_eq!(shop_entry["state"], "delivered", "{printed}");
        assert_eq!(shop_entry["type"], "Catalog.Products", "{printed}");
        // Same answer as the admin API (the object is settled: nothing changes any more).
        assert_eq!(printed["targets"], api["targets"], "{printed}\nvs\n{api}");
        assert_eq!(printed["history"], api["history"], "{printed}\nvs\n{api}");
    }
    drop(config);
    bridge.finish().await;
}

/// Percent-encodes a path segment.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn transform_prints_what_each_target_of_a_route_would_receive() {
    let config = TempFile::new(
        "transform",
        r#"
[[node]]
name = "central"
token = "t"
[[node]]
name = "site"
token = "t"
deliver = { mode = "push", url = "http://127.0.0.1:9/x", missing_refs = "wait" }
[[node]]
name = "erp"
token = "t"
deliver = { mode = "push", url = "http://127.0.0.1:9/y", format = "1c-xdto" }
[[route]]
name = "orders"
from = "central"
to = ["site", "erp"]
types = ["Document.*"]
[route.mapping.types."Document.ЗаказКлиента"]
keep = ["Number", "Posted", "Контрагент"]
fields = { "Number" = "number" }
refs = { "Контрагент" = "Catalog.Контрагенты" }
filter = [{ field = "Posted", eq = true }]
"#,
    );
    let order = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/1c/document-order.json"
    ))
    .unwrap();
    let run = |input: &str| {
        let mut child = Command::new(BIN)
            .args(["transform", "--route", "orders", "--config", config.path()])
            .env_remove("LXBRIDGE_CONFIG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(&order);
    assert!(out.status.success(), "{}", describe(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one line per target");
    let site = &lines[0];
    assert_eq!(site["target"], "site");
    assert_eq!(site["outcome"], "deliver");
    assert_eq!(
        site["change"]["data"],
        serde_json::json!({"number": "ЦБ-000315", "Posted": true, "Контрагент": "e2f3a4b5-8d4b-11ee-b9d1-0242ac120002"})
    );
    assert!(site["references"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["type"] == "Catalog.Контрагенты"));
    // The preview waits for what the delivery waits for: the order's `Основание` (a
    // document, and the route takes Document.*), not its counterparty (Catalog.Контрагенты
    // is never routed to site, so the delivery would not wait for it).
    assert_eq!(
        site["waits_for"],
        serde_json::json!([{"type": "Document.КоммерческоеПредложениеКлиенту", "ref": "e8f9a0b1-8d4b-11ee-b9d1-0242ac120002"}]),
        "{site}"
    );
    let erp = &lines[1];
    assert_eq!(
        erp["change"]["data"]["#type"],
        "jcfg:DocumentObject.ЗаказКлиента"
    );
    assert!(erp.get("waits_for").is_none());

    // An unposted order is filtered, and the reason names the condition.
    let unposted = order.replace("\"Posted\": true", "\"Posted\": false");
    let out = run(&unposted);
    let first: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(first["outcome"], "filtered");
    assert!(
        first["reason"].as_str().unwrap().contains("Posted"),
        "{first}"
    );

    // A type the route doesn't take.
    let catalog = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/1c/catalog-counterparty.json"
    ))
    .unwrap();
    let out = run(&catalog);
    let line: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(line["outcome"], "not routed", "{line}");

    // Bad input and an unknown route are errors.
    let out = run("{not json");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not JSON"));
    let out = Command::new(BIN)
        .args(["transform", "--route", "nope", "--config", config.path()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no route named"));
}

both_backends!(status_prints_what_the_admin_api_returns,);
