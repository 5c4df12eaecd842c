//! `[[node]]`: a 1C base (or site) that sends changes, and, with `[node.deliver]`, receives
//! them by push or pull; with `[node.commerceml]`, it talks CommerceML 2 to lxbridge (1C's
//! built-in site exchange, docs/commerceml.md).

use super::Duration;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct NodeConfig {
    pub name: String,
    pub token: String,
    pub deliver: Option<DeliverConfig>,
    pub commerceml: Option<CommerceMlConfig>,
    /// `[node.webhook]`: the node is a service sending its own webhooks.
    pub webhook: Option<super::WebhookConfig>,
}

/// `[node.commerceml]`: the node is a 1C base whose "Обмен с сайтом" points at lxbridge.
#[derive(Debug, Clone, Deserialize)]
pub struct CommerceMlConfig {
    /// Bytes per uploaded part, announced by `mode=init`.
    #[serde(default = "default_file_limit")]
    pub file_limit: usize,
    /// Accept zip archives (announced by `mode=init`).
    #[serde(default = "default_true")]
    pub zip: bool,
    /// Extension: the most an exchange session may upload (parts, and what its zip holds).
    #[serde(default = "default_session_limit")]
    pub session_limit: u64,
    /// Extension: how long an imported file is kept for audit (0: removed once imported).
    #[serde(default = "default_keep_files")]
    pub keep_files: Duration,
    /// Extension: how long `mode=import` works before it answers `progress`.
    #[serde(default = "default_import_wait")]
    pub import_wait: Duration,
    /// Extension: where the sessions' files are (default `<data dir>/commerceml`); the
    /// instances behind one address share it, or the balancer keeps a session on one.
    pub dir: Option<std::path::PathBuf>,
    /// Extension: the encoding of the `mode=query` answer.
    #[serde(default)]
    pub query_encoding: QueryEncoding,
}

/// The encoding 1C is answered `mode=query` in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum QueryEncoding {
    #[default]
    #[serde(rename = "utf-8")]
    Utf8,
    #[serde(rename = "windows-1251")]
    Windows1251,
}

impl QueryEncoding {
    pub fn encoding(self) -> &'static encoding_rs::Encoding {
        match self {
            QueryEncoding::Utf8 => encoding_rs::UTF_8,
            QueryEncoding::Windows1251 => encoding_rs::WINDOWS_1251,
        }
    }
}

fn default_file_limit() -> usize {
    1024 * 1024
}
fn default_session_limit() -> u64 {
    1024 * 1024 * 1024
}
fn default_keep_files() -> Duration {
    Duration::from_secs(0)
}
fn default_import_wait() -> Duration {
    Duration::from_secs(2)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliverMode {
    Push,
    Pull,
    /// Delivered to a site's CommerceML endpoint as 1C's site exchange does.
    Commerceml,
    /// One REST request per change, from a template per type (docs/integrations.md).
    Http,
}

#[derive(Debug, Clone, Deserialize)]
pub enum Auth {
    #[serde(rename = "bearer")]
    Bearer(String),
    #[serde(rename = "basic")]
    Basic { user: String, password: String },
}

#[derive(Debug, Clone, Deserialize)]
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
    /// `mode = "commerceml"`: ask the site for its orders this often.
    pub orders: Option<Duration>,
    /// `mode = "commerceml"`, extension: the most `progress` answers to one file's import.
    #[serde(default = "default_import_rounds")]
    pub import_rounds: u32,
    /// `mode = "commerceml"`, extension: the most time one file's import rounds may take.
    #[serde(default = "default_import_time")]
    pub import_time: Duration,
    /// `mode = "commerceml"`, extension: the `Ид` of the `Каталог` (and `ИдКаталога`) the
    /// packages carry; a site keys its catalog by it.
    #[serde(default = "default_catalog_id")]
    pub catalog_id: String,
    /// `mode = "commerceml"`, extension: the `Ид` of the `Классификатор`.
    #[serde(default = "default_catalog_id")]
    pub classifier_id: String,
    /// `mode = "http"`: at most this many requests per period, for all instances together.
    pub rate: Option<super::Rate>,
    /// `mode = "http"`: the request of each delivered type (or `"*"`).
    #[serde(default)]
    pub requests: std::collections::BTreeMap<String, super::RequestConfig>,
}

fn default_import_rounds() -> u32 {
    1000
}
fn default_import_time() -> Duration {
    Duration::from_secs(600)
}
fn default_catalog_id() -> String {
    "lxbridge".into()
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

impl DeliverConfig {
    /// Rewrites references through the remap table: `remap`, or a REST target whose
    /// requests learn the service's ids.
    pub fn remaps(&self) -> bool {
        self.remap
            || (self.mode == DeliverMode::Http
                && self.requests.values().any(|r| {
                    [Some(r), r.update.as_deref(), r.delete.as_deref()]
                        .into_iter()
                        .flatten()
                        .any(|r| r.id.is_some())
                }))
    }
}

/// `[a-z0-9_-]{1,64}`: node names appear in exchange names, queue names and URLs.
pub fn valid_node_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}
