//! Configuration: the TOML file of API.md, typed, with defaults, `${ENV}` expansion and a
//! `validate()` that reports every problem at once (like `vector validate`).
//!
//! Reading the file is the only I/O here; everything else is pure so it can be unit-tested.

use crate::transform::{Compiled, Mapping};
use serde::{Deserialize, Deserializer};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration as StdDuration;

/// Errors loading a configuration file (not validation problems: see [`Config::validate`]).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Toml { path: String, message: String },
    #[error("config file {path}: environment variable {name} (used as ${{{name}}}) is not set")]
    MissingEnv { path: String, name: String },
    #[error("config file {path}: {message}")]
    Schema { path: String, message: String },
}

/// A duration written as a number with a unit: `250ms`, `10s`, `5m`, `24h`, `7d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Duration(StdDuration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Duration(StdDuration::from_millis(ms))
    }
}

impl std::str::FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration {s:?} has no unit (use ms, s, m, h or d)"))?;
        let (number, unit) = s.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("duration {s:?} does not start with a whole number"))?;
        let ms = match unit {
            "ms" => n,
            "s" => n * 1_000,
            "m" => n * 60_000,
            "h" => n * 3_600_000,
            "d" => n * 86_400_000,
            _ => {
                return Err(format!(
                    "duration {s:?} has unknown unit {unit:?} (use ms, s, m, h or d)"
                ))
            }
        };
        Ok(Duration::from_millis(ms))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeConfig>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// Extension: the built-in backend (no RabbitMQ, no Redis), used when the config has
    /// neither `[broker]` nor `store.redis_url`.
    #[serde(default)]
    pub embedded: Option<EmbeddedConfig>,
    /// Which backend carries the changes; decided from the sections present.
    #[serde(skip)]
    pub backend: Backend,
    /// `[broker]` or `store.redis_url` was written in the config (for validate).
    #[serde(skip)]
    pub external_given: bool,
    /// The folder relative paths in the config (mapping and script files) start from.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    pub dedupe_window: Duration,
    /// Extension: how long SIGTERM waits for in-flight requests and deliveries.
    pub shutdown_grace: Duration,
    /// Extension: `"text"` (default) or `"json"` log lines on stderr.
    pub log_format: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 32 * 1024 * 1024,
            dedupe_window: Duration::from_secs(24 * 3600),
            shutdown_grace: Duration::from_secs(30),
            log_format: "text".into(),
        }
    }
}

/// Which implementation of the broker and store traits runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// RabbitMQ holds the messages, Redis the facts: for high load and many instances.
    Rabbit,
    /// One SQLite database in `embedded.data_dir` holds both: one machine, one instance.
    #[default]
    Embedded,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// The folder of the embedded database (created if missing); a relative path starts
    /// from the config file's folder, as mapping files do.
    pub data_dir: PathBuf,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            data_dir: PathBuf::from("lxbridge-data"),
        }
    }
}

/// The most partitions a target's delivery queue may have (`broker.partitions`).
pub const MAX_PARTITIONS: u16 = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// One URL, or the nodes of a RabbitMQ cluster: each connection goes to the first that
    /// answers, and to the next one when it is lost.
    pub url: Urls,
    pub prefix: String,
    /// Extension: how many partitions each push target's delivery queue has (default 1). An
    /// object lives in one partition (by a hash of its ref); each partition is delivered by
    /// one instance at a time (single active consumer), and the partitions are shared out
    /// among the running instances. One instance needs one; several want at least as many.
    pub partitions: u16,
    /// For `amqps://`: a private CA and an optional client certificate.
    pub tls: Option<TlsFiles>,
    /// Extension: how many cluster nodes each quorum queue is replicated on when it is
    /// created (`x-quorum-initial-group-size`); unset, RabbitMQ decides (every node of the
    /// cluster, in RabbitMQ 3.10).
    pub quorum_replicas: Option<u8>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: Urls(vec!["amqp://guest:guest@127.0.0.1:5672/%2f".into()]),
            prefix: "lx".into(),
            partitions: 1,
            tls: None,
            quorum_replicas: None,
        }
    }
}

/// `broker.url`: one URL or a list of them, in the order they are tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Urls(pub Vec<String>);

impl<'de> Deserialize<'de> for Urls {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OneOrMany;
        impl<'de> serde::de::Visitor<'de> for OneOrMany {
            type Value = Urls;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a URL or a list of URLs")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Urls, E> {
                Ok(Urls(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Urls, A::Error> {
                let mut urls = Vec::new();
                while let Some(url) = seq.next_element::<String>()? {
                    urls.push(url);
                }
                Ok(Urls(urls))
            }
        }
        d.deserialize_any(OneOrMany)
    }
}

/// `tls = { ca_file, cert_file, key_file }` of `[broker]` or `[store]`: PEM files (relative
/// paths start from the config file's folder).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA that signed the server's certificate, when it is not a public one.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (chain), for servers that verify their clients.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PKCS#8, PKCS#1 or SEC1 PEM).
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The Redis to use; with `sentinels`, only its scheme (`rediss://` for TLS), user,
    /// password and database number are used, the master's address comes from them.
    pub redis_url: String,
    /// Redis Sentinel: the sentinels to ask for the master of `master_name`.
    pub sentinels: Vec<String>,
    pub master_name: Option<String>,
    /// For `rediss://`: a private CA and an optional client certificate.
    pub tls: Option<TlsFiles>,
    /// Extension: how long object status, history and delivery marks are kept.
    pub retention: Duration,
    /// Extension: how many history events are kept per object (oldest dropped first).
    pub history_max: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            redis_url: "redis://127.0.0.1:6379/0".into(),
            sentinels: Vec::new(),
            master_name: None,
            tls: None,
            retention: Duration::from_secs(30 * 86_400),
            history_max: 100,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token for the admin API; with none set the admin API answers 401.
    pub token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub delays: Vec<Duration>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            delays: ["1s", "10s", "1m", "10m", "1h"]
                .iter()
                .map(|d| d.parse().expect("built-in delays parse"))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub token: String,
    pub deliver: Option<DeliverConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliverMode {
    Push,
    Pull,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Auth {
    #[serde(rename = "bearer")]
    Bearer(String),
    #[serde(rename = "basic")]
    Basic { user: String, password: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverConfig {
    pub mode: DeliverMode,
    pub url: Option<String>,
    pub auth: Option<Auth>,
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    #[serde(default = "default_true")]
    pub gzip: bool,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default = "default_lease")]
    pub lease: Duration,
    /// The shape of each delivered change's `data`.
    #[serde(default)]
    pub format: Format,
    /// `"wait"`: a change whose referenced objects never reached this target waits for them.
    #[serde(default)]
    pub missing_refs: MissingRefs,
    /// Rewrite references through this target's remap table, and learn it from the
    /// `target_ref` the target answers.
    #[serde(default)]
    pub remap: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Format {
    /// `data` as lxbridge holds it.
    #[default]
    #[serde(rename = "lxbridge")]
    Lxbridge,
    /// `data` in the 1C platform JSON (XDTO) form, readable with ПрочитатьJSON + ПрочитатьXDTO.
    #[serde(rename = "1c-xdto")]
    Xdto,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingRefs {
    #[default]
    Ignore,
    Wait,
}

fn default_batch_max() -> usize {
    100
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_true() -> bool {
    true
}
fn default_concurrency() -> usize {
    4
}
fn default_lease() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: Option<String>,
    pub from: String,
    pub to: Vec<String>,
    #[serde(default = "default_types")]
    pub types: Vec<String>,
    /// How changes are reshaped for the targets of this route (inline).
    pub mapping: Option<Mapping>,
    /// The same, from a TOML file (relative to the config file's folder).
    pub mapping_file: Option<String>,
}

impl RouteConfig {
    /// The route's name for messages: its `name`, else `from -> to`.
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => format!("route {name:?}"),
            None => format!("route {} -> {}", self.from, self.to.join(",")),
        }
    }
}

fn default_types() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    pub nodes: Vec<String>,
    #[serde(default = "default_types")]
    pub types: Vec<String>,
    #[serde(default = "default_conflict")]
    pub conflict: String,
    /// Extension: lxbridge hops a change may make through members that rewrite what they
    /// receive and send it back, before it is dropped as a loop.
    #[serde(default = "default_max_hops")]
    pub max_hops: u32,
}

fn default_max_hops() -> u32 {
    10
}

fn default_conflict() -> String {
    "last_writer_wins".into()
}

/// `[a-z0-9_-]{1,64}`: node names appear in exchange names, queue names and URLs.
/// Checks that every URL of `at` is `<plain>://` or its TLS form (`<plain>s://`), and not a
/// mix of both; true when they use TLS.
fn schemes(at: &str, urls: &[String], plain: &str, problems: &mut Vec<String>) -> bool {
    let tls = format!("{plain}s");
    let mut kinds = HashSet::new();
    for url in urls {
        match reqwest::Url::parse(url) {
            Ok(u) if u.scheme() == plain || u.scheme() == tls => {
                kinds.insert(u.scheme() == tls);
                if u.host_str().is_none_or(str::is_empty) {
                    problems.push(format!("{at} {url:?} names no host"));
                }
            }
            Ok(u) => problems.push(format!(
                "{at} {url:?} must start with {plain}:// or {tls}:// (not {}://)",
                u.scheme()
            )),
            Err(e) => problems.push(format!("{at} {url:?} is not a URL: {e}")),
        }
    }
    if kinds.len() > 1 {
        problems.push(format!(
            "{at} mixes {plain}:// and {tls}:// URLs: every node is reached the same way (no plain-text fallback)"
        ));
    }
    kinds.contains(&true)
}

pub fn valid_node_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A route's type pattern: dot-separated words, each either literal, `*` (one word) or `#`
/// (zero or more words). A pattern that is exactly `*` means every type. These are RabbitMQ
/// topic patterns, so routing happens in the broker exactly as [`crate::route`] computes it.
pub fn type_pattern_problem(pattern: &str) -> Option<String> {
    if pattern.is_empty() {
        return Some("is empty".into());
    }
    for word in pattern.split('.') {
        if word.is_empty() {
            return Some("has an empty word (two dots in a row, or a leading/trailing dot)".into());
        }
        if word.len() > 1 && (word.contains('*') || word.contains('#')) {
            return Some(format!(
                "uses a wildcard inside the word {word:?}; `*` and `#` must stand for a whole \
                 dot-separated word, like \"Catalog.*\""
            ));
        }
        if word.chars().any(char::is_whitespace) {
            return Some("contains whitespace".into());
        }
    }
    None
}

fn expand_env(value: &mut toml::Value, path: &str) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let end = after.find('}').ok_or_else(|| ConfigError::Schema {
                    path: path.into(),
                    message: format!("unterminated ${{ in value {s:?}"),
                })?;
                let name = &after[..end];
                let val = std::env::var(name).map_err(|_| ConfigError::MissingEnv {
                    path: path.into(),
                    name: name.into(),
                })?;
                out.push_str(&val);
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        toml::Value::Array(items) => {
            for item in items {
                expand_env(item, path)?;
            }
        }
        toml::Value::Table(table) => {
            for (_, item) in table.iter_mut() {
                expand_env(item, path)?;
            }
        }
        _ => {}
    }
    Ok(())
}

impl Config {
    /// Reads and parses a config file, expanding `${NAME}` from the environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut config = Config::parse(&text, &shown)?;
        config.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(config)
    }

    /// A route's mapping (inline or from its file); `None` when it has none.
    pub fn route_mapping(&self, route: &RouteConfig) -> Result<Option<Mapping>, String> {
        match (&route.mapping, &route.mapping_file) {
            (Some(_), Some(_)) => Err(format!(
                "{}: set mapping or mapping_file, not both",
                route.label()
            )),
            (Some(m), None) => Ok(Some(m.clone())),
            (None, Some(file)) => {
                let path = self.base_dir.join(file);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    format!(
                        "{}: cannot read mapping_file {}: {e}",
                        route.label(),
                        path.display()
                    )
                })?;
                toml::from_str(&text).map(Some).map_err(|e| {
                    format!(
                        "{}: mapping_file {} is not a valid mapping: {e}",
                        route.label(),
                        path.display()
                    )
                })
            }
            (None, None) => Ok(None),
        }
    }

    /// The route's mapping compiled for delivery (identity when it has none).
    pub fn compiled_mapping(&self, route: &RouteConfig) -> Result<Compiled, Vec<String>> {
        match self.route_mapping(route).map_err(|e| vec![e])? {
            None => Ok(Compiled::identity()),
            Some(m) => Compiled::new(&m, &self.base_dir).map_err(|problems| {
                problems
                    .into_iter()
                    .map(|p| format!("{}: mapping: {p}", route.label()))
                    .collect()
            }),
        }
    }

    /// Parses config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Toml {
            path: origin.into(),
            message: e.to_string(),
        })?;
        expand_env(&mut value, origin)?;
        let external_given = value.get("broker").is_some()
            || value
                .get("store")
                .is_some_and(|s| s.get("redis_url").is_some() || s.get("sentinels").is_some());
        let mut config = Config::deserialize(value).map_err(|e| ConfigError::Schema {
            path: origin.into(),
            message: e.to_string(),
        })?;
        config.base_dir = PathBuf::from(".");
        config.external_given = external_given;
        config.backend = if external_given && config.embedded.is_none() {
            Backend::Rabbit
        } else {
            Backend::Embedded
        };
        Ok(config)
    }

    /// The embedded backend's folder, resolved against the config file's folder.
    pub fn data_dir(&self) -> PathBuf {
        let dir = self.embedded.clone().unwrap_or_default().data_dir;
        if dir.is_absolute() {
            dir
        } else {
            self.base_dir.join(dir)
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// What is wrong with how RabbitMQ and Redis are reached: URLs, TLS files, Sentinel.
    fn connection_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let broker = &self.broker;
        if broker.url.0.is_empty() {
            problems.push("broker.url lists no URL".into());
        }
        let tls_urls = schemes("broker.url", &broker.url.0, "amqp", &mut problems);
        self.tls_files("broker.tls", broker.tls.as_ref(), tls_urls, &mut problems);
        if broker.quorum_replicas == Some(0) {
            problems.push("broker.quorum_replicas must be at least 1".into());
        }
        let store = &self.store;
        let urls = std::slice::from_ref(&store.redis_url);
        let tls_urls = schemes("store.redis_url", urls, "redis", &mut problems);
        schemes("store.sentinels", &store.sentinels, "redis", &mut problems);
        self.tls_files("store.tls", store.tls.as_ref(), tls_urls, &mut problems);
        match (store.sentinels.is_empty(), &store.master_name) {
            (true, Some(_)) => {
                problems.push("store.master_name is set but store.sentinels is empty".into())
            }
            (false, None) => problems.push(
                "store.sentinels needs store.master_name (the name the sentinels monitor)".into(),
            ),
            _ => {}
        }
        problems
    }

    /// Checks a `tls = { … }` table: its files, and that some URL uses TLS.
    fn tls_files(
        &self,
        at: &str,
        files: Option<&TlsFiles>,
        tls_urls: bool,
        problems: &mut Vec<String>,
    ) {
        let Some(files) = files else { return };
        if !tls_urls {
            problems.push(format!(
                "{at} is set but no URL of its section uses TLS (amqps:// or rediss://): lxbridge would connect in plain text"
            ));
        }
        if let Err(found) = crate::tls::Material::load(files, &self.base_dir, at) {
            problems.extend(found);
        }
    }

    /// Every problem in the configuration, one sentence each; empty when it is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.server.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "server.listen {:?} is not an address like \"127.0.0.1:8080\"",
                self.server.listen
            ));
        }
        if self.server.max_body_bytes == 0 {
            problems.push("server.max_body_bytes must be greater than 0".into());
        }
        if !matches!(self.server.log_format.as_str(), "text" | "json") {
            problems.push(format!(
                "server.log_format {:?} is not \"text\" or \"json\"",
                self.server.log_format
            ));
        }
        if self.external_given && self.embedded.is_some() {
            problems.push(
                "[embedded] and [broker]/store.redis_url are both set: choose one backend (embedded, or RabbitMQ + Redis)"
                    .into(),
            );
        }
        if let Some(embedded) = &self.embedded {
            if embedded.data_dir.as_os_str().is_empty() {
                problems.push("embedded.data_dir must not be empty".into());
            }
        }
        if self.backend == Backend::Rabbit {
            problems.extend(self.connection_problems());
        }
        let prefix = &self.broker.prefix;
        if prefix.is_empty()
            || prefix.len() > 64
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            problems.push(format!(
                "broker.prefix {prefix:?} must be 1-64 characters of a-z, A-Z, 0-9, _, - or ."
            ));
        }
        if !(1..=MAX_PARTITIONS).contains(&self.broker.partitions) {
            problems.push(format!(
                "broker.partitions {} must be 1-{MAX_PARTITIONS}",
                self.broker.partitions
            ));
        }
        if self.store.history_max == 0 {
            problems.push("store.history_max must be at least 1".into());
        }
        if self.retry.delays.is_empty() {
            problems.push("retry.delays must list at least one delay".into());
        }
        if self.retry.delays.len() > 50 {
            problems.push("retry.delays may list at most 50 delays".into());
        }
        if self.nodes.is_empty() {
            problems.push("no [[node]] is configured".into());
        }

        let mut seen = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if !valid_node_name(&node.name) {
                problems.push(format!(
                    "node[{i}].name {:?} must match [a-z0-9_-]{{1,64}}",
                    node.name
                ));
            }
            if !seen.insert(node.name.as_str()) {
                problems.push(format!("node name {:?} is used twice", node.name));
            }
            if node.token.is_empty() {
                problems.push(format!("node {:?} has an empty token", node.name));
            }
            if let Some(d) = &node.deliver {
                let at = format!("node {:?} deliver", node.name);
                match (d.mode, &d.url) {
                    (DeliverMode::Push, None) => {
                        problems.push(format!("{at}: mode \"push\" needs a url"))
                    }
                    (DeliverMode::Push, Some(url)) => {
                        if reqwest::Url::parse(url)
                            .map(|u| !matches!(u.scheme(), "http" | "https") || !u.has_host())
                            .unwrap_or(true)
                        {
                            problems.push(format!(
                                "{at}: url {url:?} is not an http:// or https:// URL"
                            ));
                        }
                    }
                    (DeliverMode::Pull, _) => {}
                }
                if d.batch_max == 0 || d.batch_max > 10_000 {
                    problems.push(format!("{at}: batch_max must be between 1 and 10000"));
                }
                if d.concurrency == 0 || d.concurrency > 256 {
                    problems.push(format!("{at}: concurrency must be between 1 and 256"));
                }
                if d.timeout.0.is_zero() {
                    problems.push(format!("{at}: timeout must be greater than 0"));
                }
            }
        }

        let nodes: HashMap<&str, &NodeConfig> =
            self.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        let mut route_names = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = match &route.name {
                Some(name) => format!("route {name:?}"),
                None => format!("route[{i}]"),
            };
            if let Some(name) = &route.name {
                if !route_names.insert(name.as_str()) {
                    problems.push(format!("route name {name:?} is used twice"));
                }
            }
            if !nodes.contains_key(route.from.as_str()) {
                problems.push(format!(
                    "{at}: from {:?} is not a configured node",
                    route.from
                ));
            }
            if route.to.is_empty() {
                problems.push(format!("{at}: to lists no target"));
            }
            for target in &route.to {
                match nodes.get(target.as_str()) {
                    None => problems.push(format!("{at}: to {target:?} is not a configured node")),
                    Some(n) if n.deliver.is_none() => problems.push(format!(
                        "{at}: target {target:?} has no [node.deliver] section, so nothing can be delivered to it"
                    )),
                    Some(_) if *target == route.from => {
                        problems.push(format!("{at}: routes node {target:?} to itself"))
                    }
                    Some(_) => {}
                }
            }
            for pattern in &route.types {
                if let Some(why) = type_pattern_problem(pattern) {
                    problems.push(format!("{at}: types pattern {pattern:?} {why}"));
                }
            }
            if let Err(mapping_problems) = self.compiled_mapping(route) {
                problems.extend(mapping_problems);
            }
        }
        let mut group_of: HashMap<&str, &str> = HashMap::new();
        let mut group_names = HashSet::new();
        for (i, group) in self.groups.iter().enumerate() {
            let at = format!("group {:?}", group.name);
            if !valid_node_name(&group.name) {
                problems.push(format!(
                    "group[{i}].name {:?} must be 1-64 characters of a-z, 0-9, _ or -",
                    group.name
                ));
            }
            if !group_names.insert(group.name.as_str()) {
                problems.push(format!("{at}: the name is used twice"));
            }
            if group.nodes.len() < 2 {
                problems.push(format!("{at}: nodes must list at least two nodes"));
            }
            let mut seen = HashSet::new();
            for member in &group.nodes {
                if !seen.insert(member.as_str()) {
                    problems.push(format!("{at}: node {member:?} is listed twice"));
                    continue;
                }
                match self.node(member) {
                    None => problems.push(format!("{at}: unknown node {member:?}")),
                    Some(n) if n.deliver.is_none() => problems.push(format!(
                        "{at}: node {member:?} has no [node.deliver]: a member receives the others' changes"
                    )),
                    Some(_) => {}
                }
                if let Some(other) = group_of.insert(member.as_str(), group.name.as_str()) {
                    problems.push(format!(
                        "{at}: node {member:?} is already a member of group {other:?} (a node is in one group at most)"
                    ));
                }
            }
            if group.types.is_empty() {
                problems.push(format!(
                    "{at}: types must not be empty (leave it out for all types)"
                ));
            }
            for pattern in &group.types {
                if let Some(why) = type_pattern_problem(pattern) {
                    problems.push(format!("{at}: types pattern {pattern:?} {why}"));
                }
            }
            if !matches!(group.conflict.as_str(), "last_writer_wins" | "priority") {
                problems.push(format!(
                    "{at}: conflict {:?} is not \"last_writer_wins\" or \"priority\"",
                    group.conflict
                ));
            }
            if group.max_hops == 0 {
                problems.push(format!("{at}: max_hops must be at least 1"));
            }
        }
        problems
    }

    /// Nodes that receive changes by push, in config order.
    pub fn push_targets(&self) -> impl Iterator<Item = (&NodeConfig, &DeliverConfig)> {
        self.nodes.iter().filter_map(|n| match &n.deliver {
            Some(d) if d.mode == DeliverMode::Push => Some((n, d)),
            _ => None,
        })
    }
}

/// The commented example printed by `lxbridge generate-config`; a test checks it validates.
pub const EXAMPLE: &str = include_str!("../config/lxbridge.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        for (text, ms) in [
            ("250ms", 250),
            ("10s", 10_000),
            ("5m", 300_000),
            ("24h", 86_400_000),
            ("7d", 604_800_000),
        ] {
            assert_eq!(
                text.parse::<Duration>().unwrap(),
                Duration::from_millis(ms),
                "{text}"
            );
        }
        for bad in ["10", "s", "10x", "-1s", ""] {
            assert!(bad.parse::<Duration>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn example_config_validates() {
        let config = Config::parse(EXAMPLE, "example").expect("example parses");
        assert_eq!(config.validate(), Vec::<String>::new());
        assert!(config.push_targets().count() >= 1);
    }

    fn with_connections(broker: &str, store: &str) -> Vec<String> {
        let text = format!(
            "[broker]\n{broker}\n[store]\n{store}\n[[node]]\nname = \"a\"\ntoken = \"t\"\n"
        );
        Config::parse(&text, "t").expect("parses").validate()
    }

    #[test]
    fn broker_url_is_one_url_or_a_list_of_one_scheme() {
        let list = r#"url = ["amqp://h1:5672/%2f", "amqp://h2:5672/%2f"]"#;
        assert_eq!(with_connections(list, ""), Vec::<String>::new());
        let config = Config::parse(&format!("[broker]\n{list}\n"), "t").unwrap();
        assert_eq!(config.broker.url.0.len(), 2);
        let mixed = with_connections(r#"url = ["amqp://h1/%2f", "amqps://h2/%2f"]"#, "");
        assert!(
            mixed
                .iter()
                .any(|p| p.contains("mixes amqp:// and amqps://")),
            "{mixed:?}"
        );
        let empty = with_connections("url = []", "");
        assert!(
            empty.iter().any(|p| p.contains("lists no URL")),
            "{empty:?}"
        );
        let http = with_connections(r#"url = "http://h1/""#, "");
        assert!(
            http.iter()
                .any(|p| p.contains("must start with amqp:// or amqps://")),
            "{http:?}"
        );
        let number = Config::parse("[broker]\nurl = 5\n", "t").unwrap_err();
        assert!(
            number.to_string().contains("a URL or a list of URLs"),
            "{number}"
        );
    }

    #[test]
    fn tls_without_a_tls_url_and_sentinels_without_a_name_are_refused() {
        let plain = with_connections(
            "url = \"amqp://h/%2f\"\ntls = { ca_file = \"/nonexistent/ca.pem\" }",
            "",
        );
        assert!(
            plain
                .iter()
                .any(|p| p.contains("would connect in plain text")),
            "{plain:?}"
        );
        assert!(
            plain
                .iter()
                .any(|p| p.contains("broker.tls.ca_file /nonexistent/ca.pem")),
            "{plain:?}"
        );
        let sentinel = with_connections("", r#"sentinels = ["redis://s1:26379"]"#);
        assert!(
            sentinel
                .iter()
                .any(|p| p.contains("needs store.master_name")),
            "{sentinel:?}"
        );
        let name = with_connections("", r#"master_name = "m""#);
        assert!(
            name.iter().any(|p| p.contains("store.sentinels is empty")),
            "{name:?}"
        );
        let rediss = with_connections("", r#"redis_url = "rediss://r:6380/0""#);
        assert_eq!(rediss, Vec::<String>::new());
        let zero = with_connections("quorum_replicas = 0", "");
        assert!(
            zero.iter().any(|p| p.contains("quorum_replicas")),
            "{zero:?}"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err =
            Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n", "t").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn env_values_are_expanded() {
        std::env::set_var("LXB_TEST_TOKEN", "from-env");
        let config = Config::parse(
            "[[node]]\nname = \"a\"\ntoken = \"x-${LXB_TEST_TOKEN}-y\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(config.nodes[0].token, "x-from-env-y");
        let err = Config::parse(
            "[[node]]\nname = \"a\"\ntoken = \"${LXB_NOT_SET_ANYWHERE}\"\n",
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("LXB_NOT_SET_ANYWHERE"), "{err}");
    }

    #[test]
    fn validate_reports_every_problem() {
        let config = Config::parse(
            r#"
[[node]]
name = "a"
token = "t"
[[node]]
name = "a"
token = "t"
[[node]]
name = "Shop"
token = "t"
[node.deliver]
mode = "push"
[[route]]
from = "a"
to = ["nowhere"]
types = ["Catalog.Prod*"]
"#,
            "t",
        )
        .unwrap();
        let problems = config.validate();
        let joined = problems.join("\n");
        for needle in [
            "used twice",
            "\"Shop\" must match",
            "needs a url",
            "\"nowhere\" is not a configured node",
            "Prod*",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in:\n{joined}");
        }
        assert_eq!(problems.len(), 5, "{joined}");
    }

    #[test]
    fn type_patterns() {
        assert!(type_pattern_problem("Catalog.*").is_none());
        assert!(type_pattern_problem("Справочник.Номенклатура").is_none());
        assert!(type_pattern_problem("#").is_none());
        assert!(type_pattern_problem("Catalog.Pr*").is_some());
        assert!(type_pattern_problem("Catalog..X").is_some());
    }
}
