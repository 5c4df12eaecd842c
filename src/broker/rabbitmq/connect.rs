//! Reaching RabbitMQ: the nodes of `broker.url` (one URL or a cluster's list) tried in turn
//! with each attempt bounded, TLS for `amqps://` with `broker.tls`, and which node each
//! connection is on now (for `/readyz` and `lx_broker_endpoint`).
//!
//! A connection that is lost starts again at the next node, so a dead node costs one
//! bounded attempt, not a wait for it to come back.

use super::BrokerError;
use crate::tls::Material;
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tracing::{info, warn};

/// How long one node may take to accept a connection (TCP, TLS and AMQP handshakes).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The two connections an instance keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Publish,
    Consume,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Publish => "publish",
            Role::Consume => "consume",
        }
    }
}

/// The cluster's nodes and where each connection is.
pub struct Nodes {
    urls: Vec<String>,
    tls: lapin::tcp::OwnedTLSConfig,
    /// Per role, the node to try first next time.
    next: [AtomicUsize; 2],
    /// Per role, the node it is connected to now (`host:port`).
    on: Mutex<HashMap<Role, usize>>,
    /// The last reason no node could be reached, for `/readyz`.
    last_error: Mutex<Option<String>>,
    gauge: prometheus::IntGaugeVec,
}

impl Nodes {
    pub fn new(urls: &[String], tls: &Material, gauge: prometheus::IntGaugeVec) -> Nodes {
        Nodes {
            urls: urls.to_vec(),
            tls: tls.for_lapin(),
            next: [AtomicUsize::new(0), AtomicUsize::new(0)],
            on: Mutex::default(),
            last_error: Mutex::default(),
            gauge,
        }
    }

    /// Connects `role` to the first node that answers, starting where the last connection
    /// of that role left off; every node failing is one error naming each with its reason.
    pub async fn connect(&self, role: Role) -> Result<Connection, BrokerError> {
        let first = self.next[role as usize].load(Ordering::SeqCst);
        let mut failures = Vec::new();
        for k in 0..self.urls.len() {
            let i = (first + k) % self.urls.len();
            match self.attempt(i, role).await {
                Ok(conn) => {
                    self.connected(role, i);
                    return Ok(conn);
                }
                Err(why) => {
                    warn!(node = %endpoint(&self.urls[i]), role = role.as_str(), error = %why, "cannot connect to this RabbitMQ node");
                    failures.push(format!("{}: {why}", redacted(&self.urls[i])));
                }
            }
        }
        let error = failures.join("; ");
        *lock(&self.last_error) = Some(error.clone());
        Err(BrokerError::Unavailable(error))
    }

    async fn attempt(&self, i: usize, role: Role) -> Result<Connection, String> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("lxbridge-{}", role.as_str()).into());
        let builder = DefaultConnectionBuilder::new()
            .map_err(|e| e.to_string())?
            .with_uri_str(self.urls[i].clone())
            .with_properties(props)
            .with_tls_config(self.tls.clone());
        match tokio::time::timeout(CONNECT_TIMEOUT, builder.connect()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no AMQP handshake within {} s",
                CONNECT_TIMEOUT.as_secs()
            )),
        }
    }

    fn connected(&self, role: Role, i: usize) {
        let node = endpoint(&self.urls[i]);
        info!(%node, role = role.as_str(), "connected to RabbitMQ");
        if let Some(old) = lock(&self.on).insert(role, i) {
            let _ = self
                .gauge
                .remove_label_values(&[role.as_str(), &endpoint(&self.urls[old])]);
        }
        self.gauge.with_label_values(&[role.as_str(), &node]).set(1);
        self.next[role as usize].store(i, Ordering::SeqCst);
        *lock(&self.last_error) = None;
    }

    /// `role`'s connection is gone: the next attempt starts at the following node.
    pub fn lost(&self, role: Role) {
        if let Some(i) = lock(&self.on).remove(&role) {
            let _ = self
                .gauge
                .remove_label_values(&[role.as_str(), &endpoint(&self.urls[i])]);
            self.next[role as usize].store((i + 1) % self.urls.len(), Ordering::SeqCst);
        }
    }

    /// Where each connection is now (`host:port`), by role.
    pub fn endpoints(&self) -> HashMap<Role, String> {
        lock(&self.on)
            .iter()
            .map(|(role, i)| (*role, endpoint(&self.urls[*i])))
            .collect()
    }

    /// Why no node could be reached last time, while that holds.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }
}

/// Connects once to every node of `broker.url` (TLS included) and closes again: one line
/// per node that can't be reached, naming it and why (`lxbridge validate --connect`).
pub async fn probe(urls: &[String], tls: &Material) -> Vec<String> {
    // Nothing scrapes it: the nodes want somewhere to show where they are.
    let gauge = crate::metrics::Metrics::new().broker_endpoint;
    let nodes = Nodes::new(urls, tls, gauge);
    let mut problems = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        match nodes.attempt(i, Role::Publish).await {
            Ok(conn) => {
                let _ = conn.close(200, "lxbridge validate".into()).await;
            }
            Err(why) => problems.push(format!("broker.url {}: {why}", redacted(url))),
        }
    }
    problems
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `host:port` of a URL: what the dashboards and logs show of a node.
pub fn endpoint(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("?");
            match u
                .port_or_known_default()
                .or_else(|| default_port(u.scheme()))
            {
                Some(port) => format!("{host}:{port}"),
                None => host.to_string(),
            }
        }
        Err(_) => "?".into(),
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "amqp" => Some(5672),
        "amqps" => Some(5671),
        "redis" => Some(6379),
        "rediss" => Some(6379),
        _ => None,
    }
}

/// The URL without its password, for error messages.
pub fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_name_host_and_port_and_hide_passwords() {
        assert_eq!(endpoint("amqp://u:p@rmq-1:5673/%2f"), "rmq-1:5673");
        assert_eq!(endpoint("amqps://u:p@rmq-2/%2f"), "rmq-2:5671");
        assert_eq!(endpoint("redis://10.0.0.1/0"), "10.0.0.1:6379");
        assert_eq!(
            redacted("amqps://guest:secret@rmq:5671/%2f"),
            "amqps://guest:***@rmq:5671/%2f"
        );
    }
}
