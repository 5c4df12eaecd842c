//! The `lxbridge` command as an operator runs it: `validate` (every problem one a line, exit
//! 64), `generate-config` (an example that validates), and `status REF` against a running
//! bridge's admin API.

mod common;

use common::*;
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
fn validate_accepts_the_example_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/lxbridge.example.toml");
    let out = lxbridge(&["validate", "--config", example]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_what_the_admin_api_returns() {
    let shop = Target::start().await;
    let bridge = Bridge::start("clistatus", &BRIDGE_CONFIG.replace("{shop}", &shop.url())).await;
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
