//! What carries the changes: `[broker]` (RabbitMQ) and `[store]` (Redis), with their `tls`
//! files, or `[embedded]` (one SQLite database).

use super::Duration;
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::path::PathBuf;

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
#[serde(default)]
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
#[serde(default)]
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
pub struct TlsFiles {
    /// The CA that signed the server's certificate, when it is not a public one.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (chain), for servers that verify their clients.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PKCS#8, PKCS#1 or SEC1 PEM).
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
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

/// Whether a config's TOML writes `[broker]` or the Redis keys (`store.redis_url`,
/// `store.sentinels`): with no `[embedded]`, that chooses RabbitMQ + Redis.
pub(super) fn external_given(value: &toml::Value) -> bool {
    value.get("broker").is_some()
        || value
            .get("store")
            .is_some_and(|s| s.get("redis_url").is_some() || s.get("sentinels").is_some())
}
