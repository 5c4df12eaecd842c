//! Observability and deployment files: the Grafana dashboard and the Prometheus alerts only
//! use metrics a running lxbridge exports, the alerts pass promtool, and the files under
//! deploy/ parse and agree with the config (ports, paths, probes, grace periods, secrets).

use crate::common::*;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Every metric API.md ("Health and metrics") names.
const API_METRICS: [&str; 11] = [
    "lx_ingress_requests_total",
    "lx_changes_accepted_total",
    "lx_changes_rejected_total",
    "lx_deliveries_total",
    "lx_delivery_duration_seconds",
    "lx_end_to_end_seconds",
    "lx_dlq_messages",
    "lx_retry_messages",
    "lx_inflight",
    "lx_broker_up",
    "lx_store_up",
];

/// Where the container image, the Kubernetes ConfigMap mount and the systemd unit all
/// expect the config.
const CONFIG_PATH: &str = "/etc/lxbridge/lxbridge.toml";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

// ---------------------------------------------------------------------------------------
// PromQL and exposition-format scanning (no regex crate)

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// The lxbridge and process metric names a PromQL expression uses: whole identifiers that
/// start with `lx_` or `process_`, outside string literals (label values such as
/// `"$target"` are skipped).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'"' || b == b'\'' || b == b'`' {
            i += 1;
            while i < bytes.len() && bytes[i] != b {
                if bytes[i] == b'\\' && b != b'`' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if is_ident_start(b) {
            let start = i;
            while i < bytes.len() && is_ident(bytes[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("lx_") || word.starts_with("process_") {
                names.insert(word.to_string());
            }
        } else if b.is_ascii_digit() {
            // A number such as 5e3 or 0x1f is not an identifier.
            while i < bytes.len() && is_ident(bytes[i]) {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_name_scanner() {
    let found = metric_names(
        r#"histogram_quantile(0.99, sum by (target, le) (rate(lx_end_to_end_seconds_bucket{target=~"lx_not_a_metric"}[5m]))) > 5 and on (instance) process_open_fds and my_lx_thing"#,
    );
    assert_eq!(
        found,
        BTreeSet::from([
            "lx_end_to_end_seconds_bucket".to_string(),
            "process_open_fds".to_string()
        ])
    );
}

/// A scrape in Prometheus text format: the sample names, the declared types, and the
/// samples (name with labels → value).
struct Scrape {
    names: BTreeSet<String>,
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut names = BTreeSet::new();
        let mut types = BTreeMap::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
            if let Some((series, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    samples.insert(series.to_string(), v);
                }
            }
        }
        Scrape {
            names,
            types,
            samples,
        }
    }

    /// On the embedded backend there is no broker node or Redis server to name: these two are
    /// exported by the RabbitMQ backend only (and must be, there).
    fn endpoint_metrics_excused(&mut self, backend: Backend) {
        let endpoints = ["lx_broker_endpoint", "lx_store_endpoint"];
        if backend == Backend::Embedded {
            self.names.extend(endpoints.map(String::from));
        } else {
            for name in endpoints {
                assert!(
                    self.names.contains(name),
                    "the RabbitMQ backend exports {name}"
                );
            }
        }
    }

    /// A name is exported when a sample has it; a histogram's base name (API.md names
    /// `lx_delivery_duration_seconds`) counts when its `_bucket` series are there.
    fn exports(&self, name: &str) -> bool {
        self.names.contains(name) || self.names.contains(&format!("{name}_bucket"))
    }

    fn value(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }
}

// ---------------------------------------------------------------------------------------
// a. The dashboard and the alerts use only exported metrics

fn workload_config(target_url: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[broker]
url = "{{amqp}}"
prefix = "{{prefix}}"
[store]
redis_url = "{{redis}}"
[admin]
token = "admin-secret"
[retry]
delays = ["100ms"]
[[node]]
name = "central"
token = "central-secret"
[[node]]
name = "shop"
token = "shop-secret"
deliver = {{ mode = "push", url = "{target_url}", batch_max = 20, concurrency = 2, timeout = "2s" }}
[[route]]
from = "central"
to = ["shop"]
"#
    )
}

fn change(id: &str, reference: &str) -> Value {
    json!({"id": id, "type": "Catalog.X", "ref": reference, "data": {"id": id}})
}

/// Every `expr` string anywhere in a JSON document (panels, nested row panels, targets).
fn json_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => json_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| json_exprs(v, out)),
        _ => {}
    }
}

/// Every panel, rows' nested panels included.
fn all_panels(panels: &Value, out: &mut Vec<Value>) {
    for p in panels.as_array().into_iter().flatten() {
        out.push(p.clone());
        all_panels(&p["panels"], out);
    }
}

/// Asserts every lx_/process_ metric in `exprs` is exported; returns the names used.
fn assert_exported(scrape: &Scrape, what: &str, exprs: &[String]) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for expr in exprs {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "{what}: expression uses no lxbridge metric: {expr}"
        );
        for name in names {
            assert!(
                scrape.names.contains(&name),
                "{what} uses {name}, which /metrics does not export (expression: {expr})"
            );
            used.insert(name);
        }
    }
    used
}

async fn dashboard_and_alerts_use_only_exported_metrics(backend: Backend) {
    // Workload: accepted changes delivered ok, one refused with retry:false (→ DLQ), one
    // rejected at ingress, one unauthorised request.
    let target = Target::start().await;
    target.set_verdict(|c| (c["ref"] == "refused").then(|| ("INN is invalid".to_string(), false)));
    let bridge = Bridge::start(backend, "observe", &workload_config(&target.url())).await;
    let (status, body) = bridge
        .post_json(
            "central",
            "central-secret",
            &json!([
                change("o-1", "ok-1"),
                change("o-2", "ok-2"),
                change("o-3", "ok-3"),
                change("r-1", "refused"),
                {"id": "bad-1", "ref": "no-type", "data": {}},
            ]),
        )
        .await;
    assert_eq!(status, 207, "four accepted, one without a type: {body}");
    let (status, _) = bridge
        .post_json("central", "wrong-token", &json!([change("x", "x")]))
        .await;
    assert_eq!(status, 401);

    // The DLQ/retry depth gauges are refreshed every 5 s.
    let dlq_line = "lx_dlq_messages{target=\"shop\"} 1";
    let start = Instant::now();
    let text = loop {
        let text = bridge.metrics().await;
        if text.contains(dlq_line) && target.count() >= 3 {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no {dlq_line:?} or not 3 deliveries after 20 s; /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut scrape = Scrape::parse(&text);
    scrape.endpoint_metrics_excused(backend);

    // API.md's metrics, with the types and samples the workload must have produced.
    for name in API_METRICS {
        assert!(scrape.exports(name), "/metrics lacks {name}:\n{text}");
    }
    for name in ["lx_delivery_duration_seconds", "lx_end_to_end_seconds"] {
        assert_eq!(
            scrape.types.get(name).map(String::as_str),
            Some("histogram"),
            "{name}"
        );
    }
    for name in [
        "lx_ingress_requests_total",
        "lx_changes_accepted_total",
        "lx_deliveries_total",
    ] {
        assert_eq!(
            scrape.types.get(name).map(String::as_str),
            Some("counter"),
            "{name}"
        );
    }
    let at_least = |series: &str, min: f64| {
        let v = scrape.value(series).unwrap_or(0.0);
        assert!(v >= min, "{series} = {v}, expected at least {min}\n{text}");
    };
    at_least(
        "lx_ingress_requests_total{code=\"207\",node=\"central\"}",
        1.0,
    );
    at_least(
        "lx_ingress_requests_total{code=\"401\",node=\"central\"}",
        1.0,
    );
    at_least("lx_changes_accepted_total{node=\"central\"}", 4.0);
    at_least("lx_changes_rejected_total{node=\"central\"}", 1.0);
    at_least("lx_deliveries_total{result=\"ok\",target=\"shop\"}", 3.0);
    at_least("lx_deliveries_total{result=\"dead\",target=\"shop\"}", 1.0);
    at_least("lx_end_to_end_seconds_count{target=\"shop\"}", 3.0);
    at_least("lx_delivery_duration_seconds_count{target=\"shop\"}", 1.0);
    at_least("lx_broker_up", 1.0);
    at_least("lx_store_up", 1.0);

    // The dashboard.
    let dashboard: Value = serde_json::from_str(&read("grafana/lxbridge.json"))
        .expect("grafana/lxbridge.json is JSON");
    assert!(
        dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "a current Grafana schema"
    );
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("dashboard variable {name} is missing"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let mut var_exprs = Vec::new();
    for name in ["node", "target"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        let query = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .or(v["definition"].as_str())
            .unwrap_or_default()
            .to_string();
        assert!(query.starts_with("label_values("), "{name}: {query}");
        assert!(query.contains(&format!(", {name})")), "{name}: {query}");
        var_exprs.push(query);
    }
    assert_exported(&scrape, "a dashboard variable", &var_exprs);

    let mut panels = Vec::new();
    all_panels(&dashboard["panels"], &mut panels);
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    for row in ["Ingress", "Delivery", "Failures", "Health"] {
        assert!(rows.contains(&row), "no row {row:?} in {rows:?}");
    }
    let ds = json!({"type": "prometheus", "uid": "${datasource}"});
    let mut ids = BTreeSet::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            // A table for the info metrics (which node, which server).
            ["timeseries", "stat", "table"].contains(&p["type"].as_str().unwrap_or_default()),
            "panel {title:?} has type {}",
            p["type"]
        );
        assert_eq!(p["datasource"], ds, "panel {title:?} datasource");
        let targets = p["targets"].as_array().expect("panel targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            assert_eq!(t["datasource"], ds, "panel {title:?} query datasource");
        }
        let pos = &p["gridPos"];
        assert!(
            pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24,
            "panel {title:?} is wider than the dashboard"
        );
    }
    for p in &panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
    }
    let mut exprs = Vec::new();
    json_exprs(&dashboard["panels"], &mut exprs);
    let used = assert_exported(&scrape, "grafana/lxbridge.json", &exprs);
    // The dashboard shows every API.md metric and the breaker.
    for name in API_METRICS.iter().copied().chain(["lx_breaker_open"]) {
        assert!(
            used.contains(name) || used.contains(&format!("{name}_bucket")),
            "the dashboard does not show {name}"
        );
    }

    // The alerting rules.
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/prometheus/alerts.yml")).expect("alerts.yml is YAML");
    let group = rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .find(|g| g["name"].as_str() == Some("lxbridge"))
        .expect("a rule group named lxbridge");
    let mut alert_exprs = Vec::new();
    for rule in group["rules"].as_sequence().expect("rules") {
        let name = rule["alert"].as_str().expect("every rule is an alert");
        let expr = rule["expr"].as_str().expect("alert expr").to_string();
        assert!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("critical" | "warning" | "info")
            ),
            "{name}: severity label"
        );
        for key in ["summary", "description"] {
            assert!(
                !rule["annotations"][key]
                    .as_str()
                    .unwrap_or("")
                    .trim()
                    .is_empty(),
                "{name}: annotation {key}"
            );
        }
        // `up` (Prometheus' own scrape health) is the only other metric allowed.
        if metric_names(&expr).is_empty() {
            assert!(
                expr.starts_with("up{"),
                "{name} uses no lxbridge metric: {expr}"
            );
            continue;
        }
        alert_exprs.push(expr);
    }
    let used = assert_exported(&scrape, "deploy/prometheus/alerts.yml", &alert_exprs);
    for name in [
        "lx_dlq_messages",
        "lx_breaker_open",
        "lx_broker_up",
        "lx_store_up",
        "lx_end_to_end_seconds_bucket",
        "lx_ingress_requests_total",
    ] {
        assert!(used.contains(name), "no alert watches {name}");
    }
    bridge.finish().await;
}

// ---------------------------------------------------------------------------------------
// b. promtool accepts the rules (and the Prometheus config that loads them)

#[test]
fn alerts_pass_promtool() {
    let checks: [&[&str]; 2] = [
        &["check", "rules", "deploy/prometheus/alerts.yml"],
        &["check", "config", "deploy/prometheus/prometheus.yml"],
    ];
    for args in checks {
        let out = match std::process::Command::new("promtool")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert_ne!(
                    std::env::var("CI").as_deref(),
                    Ok("true"),
                    "promtool is not installed; .ci/run installs Debian's prometheus package"
                );
                eprintln!(
                    "notice: promtool not found, skipping `promtool {}`",
                    args.join(" ")
                );
                return;
            }
            Err(e) => panic!("cannot run promtool: {e}"),
        };
        assert!(
            out.status.success(),
            "promtool {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------------------
// c. The deployment files parse and agree with each other and with the config

/// Every YAML document of every *.yml / *.yaml under deploy/, by path relative to the repo.
fn deploy_yaml() -> BTreeMap<String, Vec<serde_yaml::Value>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yml" | "yaml")
            ) {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo("deploy"), &mut files);
    let root = repo("");
    files
        .into_iter()
        .map(|path| {
            let rel = path.strip_prefix(&root).unwrap().display().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
                .map(|doc| {
                    serde_yaml::Value::deserialize(doc)
                        .unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
                })
                .filter(|v| !v.is_null())
                .collect();
            assert!(!docs.is_empty(), "{rel} is empty");
            (rel, docs)
        })
        .collect()
}

fn duration(text: &str) -> Duration {
    text.parse::<lxbridge::config::Duration>()
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

/// `${NAME}` references in a text.
fn env_refs(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after.find('}').expect("unterminated ${");
        names.insert(after[..end].to_string());
        rest = &after[end + 1..];
    }
    names
}

fn str_of<'a>(v: &'a serde_yaml::Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v:?}"))
}

#[test]
fn deploy_files_parse_and_agree_with_config() {
    let yaml = deploy_yaml();
    for expected in [
        "deploy/docker-compose.yml",
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/prometheus.yml",
        "deploy/grafana/provisioning/datasources/prometheus.yml",
        "deploy/grafana/provisioning/dashboards/lxbridge.yml",
        "deploy/k8s/deployment.yaml",
        "deploy/k8s/configmap.yaml",
        "deploy/k8s/secret.yaml",
        "deploy/k8s/service.yaml",
        "deploy/k8s/pdb.yaml",
        "deploy/k8s/hpa.yaml",
    ] {
        assert!(
            yaml.contains_key(expected),
            "{expected} is missing: {:?}",
            yaml.keys()
        );
    }
    let doc = |path: &str| &yaml[path][0];
    let deploy_dir = repo("deploy");

    // The compose config validates and is reachable from the other containers.
    let compose_config =
        lxbridge::config::Config::load(&repo("deploy/lxbridge.compose.toml")).expect("parses");
    assert_eq!(compose_config.validate(), Vec::<String>::new());
    let listen: SocketAddr = compose_config.server.listen.parse().unwrap();
    assert!(
        listen.ip().is_unspecified() && listen.port() == 8080,
        "{listen}"
    );
    let urls = &compose_config.broker.url.0;
    assert!(
        urls.len() == 1 && urls[0].contains("@rabbitmq:5672/"),
        "{urls:?}"
    );
    assert!(compose_config
        .store
        .redis_url
        .starts_with("redis://redis:6379/"));

    // docker-compose.yml
    let compose = doc("deploy/docker-compose.yml");
    let services = compose["services"].as_mapping().expect("services");
    for name in ["rabbitmq", "redis", "lxbridge", "prometheus", "grafana"] {
        assert!(
            services.contains_key(name),
            "compose service {name} is missing"
        );
    }
    assert!(str_of(&compose["services"]["rabbitmq"]["image"], "image")
        .starts_with("rabbitmq:3.13-management"));
    assert!(str_of(&compose["services"]["redis"]["image"], "image").starts_with("redis:7"));
    let lx = &compose["services"]["lxbridge"];
    let context = deploy_dir.join(str_of(&lx["build"]["context"], "build.context"));
    assert_eq!(
        context.canonicalize().unwrap(),
        repo("").canonicalize().unwrap(),
        "build context is the repo root"
    );
    assert!(context
        .join(str_of(&lx["build"]["dockerfile"], "build.dockerfile"))
        .is_file());
    let mut mounts: BTreeMap<String, String> = BTreeMap::new(); // container path → source
    for (service, spec) in services {
        let service = service.as_str().unwrap();
        for volume in spec["volumes"].as_sequence().into_iter().flatten() {
            let (source, target) = match volume {
                serde_yaml::Value::String(s) => {
                    let mut parts = s.split(':');
                    (
                        parts.next().unwrap().to_string(),
                        parts.next().unwrap_or("").to_string(),
                    )
                }
                long => (
                    str_of(&long["source"], "volume source").to_string(),
                    str_of(&long["target"], "volume target").to_string(),
                ),
            };
            if source.starts_with("./") || source.starts_with("../") {
                assert!(
                    deploy_dir.join(&source).exists(),
                    "compose service {service} mounts {source}, which does not exist in deploy/"
                );
                mounts.insert(target, source);
            }
        }
    }
    assert_eq!(
        mounts.get(CONFIG_PATH).map(String::as_str),
        Some("./lxbridge.compose.toml")
    );
    let ports: Vec<&str> = lx["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    assert!(
        ports.iter().any(|p| p.ends_with(":8080")),
        "lxbridge publishes 8080: {ports:?}"
    );
    assert!(
        duration(str_of(&lx["stop_grace_period"], "stop_grace_period"))
            > compose_config.server.shutdown_grace.0,
        "docker stop must wait longer than server.shutdown_grace"
    );

    // prometheus.yml: scrapes lxbridge:8080 and loads alerts.yml.
    let prom = doc("deploy/prometheus/prometheus.yml");
    let job = prom["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|j| j["job_name"].as_str() == Some("lxbridge"))
        .expect("a scrape job named lxbridge");
    let targets: Vec<&str> = job["static_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|c| {
            c["targets"]
                .as_sequence()
                .unwrap()
                .iter()
                .filter_map(|t| t.as_str())
        })
        .collect();
    assert!(!targets.is_empty());
    for t in &targets {
        let (host, port) = t.rsplit_once(':').unwrap();
        assert_eq!(port, "8080", "scrape target {t}");
        assert!(
            services.contains_key(host),
            "scrape target {t} is not a compose service"
        );
    }
    let rule_files: Vec<&str> = prom["rule_files"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    assert!(rule_files.contains(&"alerts.yml"), "{rule_files:?}");
    assert!(repo("deploy/prometheus/alerts.yml").is_file());
    assert_eq!(
        mounts
            .get("/etc/prometheus/prometheus.yml")
            .map(String::as_str),
        Some("./prometheus/prometheus.yml")
    );
    assert_eq!(
        mounts.get("/etc/prometheus/alerts.yml").map(String::as_str),
        Some("./prometheus/alerts.yml")
    );

    // Grafana provisioning: the datasource is the compose Prometheus, and the dashboard
    // provider reads the folder the compose file mounts grafana/lxbridge.json into.
    let ds = &doc("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"][0];
    assert_eq!(ds["type"].as_str(), Some("prometheus"));
    assert_eq!(ds["url"].as_str(), Some("http://prometheus:9090"));
    let provider = &doc("deploy/grafana/provisioning/dashboards/lxbridge.yml")["providers"][0];
    let folder = str_of(&provider["options"]["path"], "provider path").trim_end_matches('/');
    let (dashboard_target, _) = mounts
        .iter()
        .find(|(_, source)| source.as_str() == "../grafana/lxbridge.json")
        .expect("compose mounts grafana/lxbridge.json");
    assert_eq!(
        Path::new(dashboard_target).parent().unwrap(),
        Path::new(folder)
    );

    // Dockerfile (build context = repo root).
    let dockerfile = read("deploy/Dockerfile");
    for needle in [
        "FROM rust:1-bookworm",
        "cargo build --release",
        "--locked",
        "FROM debian:bookworm-slim",
        "ca-certificates",
        "EXPOSE 8080",
        "ENTRYPOINT [\"lxbridge\"]",
        &format!("CMD [\"run\", \"--config\", \"{CONFIG_PATH}\"]"),
        &format!("COPY config/lxbridge.example.toml {CONFIG_PATH}"),
    ] {
        assert!(
            dockerfile.contains(needle),
            "deploy/Dockerfile lacks {needle:?}"
        );
    }
    let user = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("USER "))
        .next_back()
        .expect("the runtime stage sets USER");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "USER {user}"
    );
    for line in dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line
            .split_whitespace()
            .skip(1)
            .filter(|w| !w.starts_with("--"))
            .collect();
        for source in &words[..words.len() - 1] {
            assert!(
                repo(source).exists(),
                "Dockerfile copies {source}, not in the repo root"
            );
        }
    }

    // Kubernetes: every document has a kind; index them.
    let mut k8s: BTreeMap<String, &serde_yaml::Value> = BTreeMap::new();
    for (path, docs) in yaml.iter().filter(|(p, _)| p.starts_with("deploy/k8s/")) {
        for d in docs {
            let kind = str_of(&d["kind"], &format!("{path}: kind"));
            assert!(d["apiVersion"].is_string(), "{path}: apiVersion");
            assert!(d["metadata"]["name"].is_string(), "{path}: metadata.name");
            k8s.insert(kind.to_string(), d);
        }
    }
    for kind in [
        "Deployment",
        "ConfigMap",
        "Secret",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ] {
        assert!(k8s.contains_key(kind), "no {kind} under deploy/k8s");
    }
    let deployment = k8s["Deployment"];
    let configmap = k8s["ConfigMap"];
    let secret = k8s["Secret"];

    // The ConfigMap's config: every ${NAME} comes from the Secret; with the Secret's
    // (placeholder) values it parses, validates and listens on 0.0.0.0:8080.
    let config_text = str_of(
        &configmap["data"]["lxbridge.toml"],
        "ConfigMap data lxbridge.toml",
    );
    let refs = env_refs(config_text);
    assert!(
        !refs.is_empty(),
        "the ConfigMap config reads its secrets from the environment"
    );
    for name in &refs {
        let value = secret["stringData"][name.as_str()]
            .as_str()
            .unwrap_or_else(|| {
                panic!("${{{name}}} is used by the ConfigMap but not in the Secret")
            });
        std::env::set_var(name, value);
    }
    let k8s_config =
        lxbridge::config::Config::parse(config_text, "deploy/k8s/configmap.yaml").expect("parses");
    assert_eq!(k8s_config.validate(), Vec::<String>::new());
    let listen: SocketAddr = k8s_config.server.listen.parse().unwrap();
    assert!(
        listen.ip().is_unspecified() && listen.port() == 8080,
        "{listen}"
    );

    // The Deployment.
    let pod = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        &deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        &labels["app.kubernetes.io/name"]
    );
    let container = &pod["containers"][0];
    let probe = |name: &str| {
        let get = &container[name]["httpGet"];
        (
            get["path"].as_str().unwrap_or_default().to_string(),
            get["port"].as_u64().unwrap_or_default(),
        )
    };
    assert_eq!(probe("readinessProbe"), ("/readyz".to_string(), 8080));
    assert_eq!(probe("livenessProbe"), ("/healthz".to_string(), 8080));
    assert!(
        container["resources"]["requests"]["cpu"].is_string(),
        "CPU request (the HPA needs it)"
    );
    assert!(container["resources"]["limits"]["memory"].is_string());
    let pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        .as_sequence()
        .and_then(|c| c.last())
        .and_then(|s| s.as_str())
        .map(|s| Duration::from_secs(s.parse().unwrap()))
        .unwrap_or_default();
    let grace = Duration::from_secs(
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    );
    assert!(
        grace > k8s_config.server.shutdown_grace.0 + pre_stop,
        "terminationGracePeriodSeconds {grace:?} must exceed preStop {pre_stop:?} + shutdown_grace {}",
        k8s_config.server.shutdown_grace
    );
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(args, ["run", "--config", CONFIG_PATH]);
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Path::new(CONFIG_PATH).parent().unwrap().to_str())
        .expect("the config volume is mounted at /etc/lxbridge");
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"], configmap["metadata"]["name"]);
    let secret_from_env = container["envFrom"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|e| e["secretRef"]["name"] == secret["metadata"]["name"]);
    assert!(
        secret_from_env,
        "the pod's environment comes from the Secret"
    );
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);

    // Service, PDB, HPA.
    let service = k8s["Service"];
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/name"],
        labels["app.kubernetes.io/name"]
    );
    assert!(service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p["port"].as_u64() == Some(8080)));
    let pdb = k8s["PodDisruptionBudget"];
    assert_eq!(pdb["apiVersion"].as_str(), Some("policy/v1"));
    assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(1));
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        labels["app.kubernetes.io/name"]
    );
    let hpa = k8s["HorizontalPodAutoscaler"];
    assert_eq!(hpa["apiVersion"].as_str(), Some("autoscaling/v2"));
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let cpu = hpa["spec"]["metrics"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["resource"]["name"].as_str() == Some("cpu"))
        .expect("a CPU metric");
    assert_eq!(
        cpu["resource"]["target"]["averageUtilization"].as_u64(),
        Some(70)
    );
    // Every replica the HPA may start gets a share of each push target.
    let max_replicas = hpa["spec"]["maxReplicas"].as_u64().unwrap();
    assert!(
        u64::from(k8s_config.broker.partitions) >= max_replicas,
        "broker.partitions {} < HPA maxReplicas {max_replicas}: some replicas would get no push work",
        k8s_config.broker.partitions
    );
    let min_replicas = hpa["spec"]["minReplicas"].as_u64().unwrap_or(1);
    assert!(
        replicas >= 2 && min_replicas >= 2,
        "with minAvailable 1, fewer than 2 replicas would block node drains"
    );

    // The systemd unit runs the same config path and outlasts the shutdown grace.
    let unit = read("deploy/systemd/lxbridge.service");
    let setting = |key: &str| {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .next_back()
            .unwrap_or_else(|| panic!("the unit lacks {key}="))
            .to_string()
    };
    assert_eq!(
        setting("ExecStart"),
        format!("/usr/local/bin/lxbridge run --config {CONFIG_PATH}")
    );
    assert_eq!(setting("Type"), "simple");
    assert_eq!(setting("Restart"), "on-failure");
    assert_eq!(setting("KillSignal"), "SIGTERM");
    assert_eq!(setting("NoNewPrivileges"), "yes");
    assert_eq!(setting("ProtectSystem"), "strict");
    let stop = Duration::from_secs(
        setting("TimeoutStopSec")
            .parse()
            .expect("TimeoutStopSec in seconds"),
    );
    assert!(
        stop > k8s_config.server.shutdown_grace.0,
        "TimeoutStopSec {stop:?}"
    );
}

both_backends!(dashboard_and_alerts_use_only_exported_metrics,);
