//! `[[node]]`: a 1C base (or site) that sends changes, and, with `[node.deliver]`, receives
//! them by push or pull.

use super::Duration;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
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

/// `[a-z0-9_-]{1,64}`: node names appear in exchange names, queue names and URLs.
pub fn valid_node_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}
