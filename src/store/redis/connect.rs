//! Reaching Redis: `store.redis_url` (`redis://`, or `rediss://` with `store.tls`), or the
//! master that Redis Sentinel names (`store.sentinels`, `store.master_name`). Each
//! connection is made afresh after a failure, so a failover is followed by asking the
//! sentinels again; a server that is not the master (a demoted one) is refused.
//!
//! Which endpoint the store is on now is kept for `/readyz` and `lx_store_endpoint`.

use super::StoreError;
use crate::config::StoreConfig;
use crate::tls::Material;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use tracing::{info, warn};

/// How long connecting to one server (TCP, TLS, HELLO) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How the master is found.
enum Find {
    /// Always this server.
    Direct(ConnectionInfo),
    /// Whatever server the sentinels name as the master of `name`; `template` gives the
    /// scheme, credentials and database.
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        name: String,
        template: ConnectionInfo,
    },
}

pub(super) struct Endpoint {
    find: Find,
    tls: Material,
    /// `host:port` of the server connected to now.
    on: Mutex<Option<String>>,
    gauge: prometheus::IntGaugeVec,
}

fn bad_url(at: &str, url: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("bad {at} {url:?}: {e}"))
}

impl Endpoint {
    pub(super) fn new(
        config: &StoreConfig,
        base: &Path,
        gauge: prometheus::IntGaugeVec,
    ) -> Result<Endpoint, StoreError> {
        let tls = Material::of(config.tls.as_ref(), base, "store.tls")
            .map_err(|problems| StoreError::Unavailable(problems.join("; ")))?;
        let url = &config.redis_url;
        let template = url
            .as_str()
            .into_connection_info()
            .map_err(|e| bad_url("store.redis_url", url, e))?;
        let find = match &config.master_name {
            Some(name) if !config.sentinels.is_empty() => Find::Sentinel {
                sentinels: config
                    .sentinels
                    .iter()
                    .map(|s| {
                        s.as_str()
                            .into_connection_info()
                            .map_err(|e| bad_url("store.sentinels", s, e))
                    })
                    .collect::<Result<_, _>>()?,
                name: name.clone(),
                template,
            },
            _ => Find::Direct(template),
        };
        Ok(Endpoint {
            find,
            tls,
            on: Mutex::default(),
            gauge,
        })
    }

    /// A new connection to the master.
    pub(super) async fn connect(&self) -> Result<MultiplexedConnection, StoreError> {
        let (info, via) = match &self.find {
            Find::Direct(info) => (info.clone(), "direct"),
            Find::Sentinel { .. } => (self.ask_sentinels().await?, "sentinel"),
        };
        let (at, url) = (addr(&info), url_of(&info));
        let mut conn = open(info, &self.tls)
            .await
            .map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?;
        if via == "sentinel" {
            let role: Vec<redis::Value> = redis::cmd("ROLE")
                .query_async(&mut conn)
                .await
                .map_err(|e| StoreError::Unavailable(format!("{url}: ROLE: {e}")))?;
            if !matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                return Err(StoreError::Unavailable(format!(
                    "{url}, named master by the sentinels, is not a master (yet); asking again"
                )));
            }
        }
        self.connected(at, via);
        Ok(conn)
    }

    fn connected(&self, at: String, via: &str) {
        let mut on = self.on.lock().unwrap_or_else(|e| e.into_inner());
        if on.as_deref() == Some(at.as_str()) {
            return;
        }
        info!(endpoint = %at, via, "connected to Redis");
        self.gauge.reset();
        self.gauge.with_label_values(&[&at, via]).set(1);
        *on = Some(at);
    }

    /// The server the store is on now (`host:port`).
    pub(super) fn endpoint(&self) -> Option<String> {
        self.on.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The master's address as the first sentinel that knows it says.
    async fn ask_sentinels(&self) -> Result<ConnectionInfo, StoreError> {
        let Find::Sentinel {
            sentinels,
            name,
            template,
        } = &self.find
        else {
            unreachable!("only called with sentinels");
        };
        let mut failures = Vec::new();
        for sentinel in sentinels {
            match master_of(sentinel, name, &self.tls).await {
                Ok(Some((host, port))) => return Ok(with_addr(template, host, port)),
                Ok(None) => failures.push(format!("{}: does not know {name:?}", url_of(sentinel))),
                Err(e) => failures.push(format!("{}: {e}", url_of(sentinel))),
            }
        }
        warn!(failures = %failures.join("; "), "no sentinel named the Redis master");
        Err(StoreError::Unavailable(format!(
            "no sentinel named the master of {name:?}: {}",
            failures.join("; ")
        )))
    }
}

async fn master_of(
    sentinel: &ConnectionInfo,
    name: &str,
    tls: &Material,
) -> redis::RedisResult<Option<(String, u16)>> {
    let mut conn = open(sentinel.clone(), tls).await?;
    redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(name)
        .query_async(&mut conn)
        .await
}

/// The template's scheme, credentials and database, at `host:port`.
fn with_addr(template: &ConnectionInfo, host: String, port: u16) -> ConnectionInfo {
    let addr = match &template.addr {
        ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: None,
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    ConnectionInfo {
        addr,
        redis: template.redis.clone(),
    }
}

fn addr(info: &ConnectionInfo) -> String {
    match &info.addr {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        other => other.to_string(),
    }
}

/// `redis://host:port` (or `rediss://`), without credentials: how errors name a server.
fn url_of(info: &ConnectionInfo) -> String {
    let scheme = match info.addr {
        ConnectionAddr::TcpTls { .. } => "rediss",
        _ => "redis",
    };
    format!("{scheme}://{}", addr(info))
}

/// One multiplexed connection, TLS with the configured material for `rediss://`.
async fn open(info: ConnectionInfo, tls: &Material) -> redis::RedisResult<MultiplexedConnection> {
    let client = match info.addr {
        ConnectionAddr::TcpTls { .. } => Client::build_with_tls(info, tls.for_redis())?,
        _ => Client::open(info)?,
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(super::STORE_TIMEOUT);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}
