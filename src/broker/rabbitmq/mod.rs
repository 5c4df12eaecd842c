//! [`RabbitBroker`]: the [`Broker`] on RabbitMQ. This file holds the broker's state, its
//! start, and the trait's implementation, each method a call into the file of its concern:
//!
//! - `topology`: the names of every exchange and queue, and what is declared on connect;
//! - `publish`: the publishing connection's supervisor (reconnect with backoff, flow
//!   control, a node refusing every publish left for the next), confirmed publishing;
//! - `consume` (with `forward`, `inbox` and `members`): the consuming connection,
//!   the partitions shared out among the instances, the inboxes of pull targets;
//! - `dlq`: settling (ack, the move to a retry step or the DLQ) and the DLQ's admin side;
//! - `held`: copying a target's messages out and putting them back (`export`, `import`,
//!   `enqueue`);
//! - `headers`: lxbridge's AMQP headers written and read; `connect`: reaching the nodes.
//!
//! Two connections, as RabbitMQ advises: one publishes (ingress, retry and DLQ moves), one
//! consumes (a channel per delivery queue partition). Each is kept by a supervisor task that
//! reconnects with backoff and jitter and redeclares the topology; while the publishing side
//! is down or blocked by the broker's flow control, [`Broker::ready`] is false and ingress
//! answers 503.
//!
//! Several instances share the work through the broker: a push target's delivery queue is
//! split into `broker.partitions` quorum queues by a hash of the object's ref (the
//! `lx-partition` header, routed by the target's headers exchange), each with a single
//! active consumer, so one object is delivered by one instance at a time; the instances
//! share the partitions out among themselves (`consume`). A pull target's inbox is served
//! by one instance, the active consumer of its request queue; the others pass polls and acks
//! to it ([`Broker::inbox_call`]).

mod connect;
mod consume;
mod dlq;
mod forward;
mod headers;
mod held;
mod inbox;
mod members;
mod publish;
mod topology;

pub use connect::{endpoint, probe, Role, CONNECT_TIMEOUT};
pub(crate) use forward::Handle;
pub use topology::{declared_names, Names};

use crate::broker::{
    Broker, BrokerError, DeadItem, Endpoints, Failure, Held, InboxCall, Incoming, Outgoing,
    PublishOutcome,
};
use crate::config::Config;
use crate::route::Routes;
use crate::tls::Material;
use futures_util::future::BoxFuture;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct RabbitBroker {
    nodes: connect::Nodes,
    topology: topology::Topology,
    publisher: Mutex<Option<Arc<publish::Publisher>>>,
    blocked: Arc<AtomicBool>,
    /// Asks the publishing supervisor to reconnect now (a publish saw the channel die).
    reconnect: tokio::sync::Notify,
    /// With `reconnect`: leave this node even though the connection is up.
    move_on: AtomicBool,
    /// Since when (ms) every publish was refused; 0 while they are not.
    refused_since: AtomicI64,
    /// The consuming side: what to consume, the instances, the inboxes served here.
    consuming: consume::Consuming,
    up: Arc<AtomicBool>,
    cancel: CancellationToken,
}

impl RabbitBroker {
    /// Creates the broker and starts its two supervisors on `tracker`; they connect (and
    /// keep reconnecting) in the background until `cancel`.
    pub fn start(
        config: &Config,
        routes: &Routes,
        cancel: CancellationToken,
        tracker: &TaskTracker,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Arc<RabbitBroker>, BrokerError> {
        let broker_tls = config.broker.tls.as_ref();
        let tls = Material::of(broker_tls, &config.base_dir, "broker.tls")
            .map_err(|problems| BrokerError::Tls(problems.join("; ")))?;
        let gauge = metrics.broker_endpoint.clone();
        let broker = Arc::new(RabbitBroker {
            nodes: connect::Nodes::new(&config.broker.url.0, &tls, gauge),
            topology: topology::Topology::from_config(config, routes),
            publisher: Mutex::new(None),
            blocked: Arc::new(AtomicBool::new(false)),
            reconnect: tokio::sync::Notify::new(),
            move_on: AtomicBool::new(false),
            refused_since: AtomicI64::new(0),
            consuming: consume::Consuming::new(),
            up: Arc::new(AtomicBool::new(false)),
            cancel,
        });
        tracker.spawn(
            broker
                .clone()
                .publishing_supervisor(metrics.broker_up.clone()),
        );
        tracker.spawn(broker.clone().consuming_supervisor());
        Ok(broker)
    }

    pub fn names(&self) -> &Names {
        &self.topology.names
    }
}

impl Broker for RabbitBroker {
    fn publish<'a>(
        &'a self,
        source: &'a str,
        messages: &'a [Outgoing],
    ) -> BoxFuture<'a, Result<Vec<PublishOutcome>, BrokerError>> {
        Box::pin(self.publish_changes(source, messages))
    }

    fn ready(&self) -> bool {
        self.up.load(Ordering::SeqCst) && !self.blocked.load(Ordering::SeqCst)
    }

    fn inboxes_reachable(&self) -> bool {
        self.consuming.linked()
    }

    fn endpoints(&self) -> Endpoints {
        let mut on = self.nodes.endpoints();
        Endpoints {
            publish: on.remove(&Role::Publish),
            consume: on.remove(&Role::Consume),
            error: self.nodes.last_error(),
        }
    }

    fn consume(&self, target: &str, prefetch: u16) -> mpsc::Receiver<Incoming> {
        self.consuming.want(target, prefetch)
    }

    fn ack(&self, message: Incoming) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(self.ack_delivery(message))
    }

    fn fail<'a>(
        &'a self,
        message: Incoming,
        failure: Failure<'a>,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        Box::pin(self.fail_delivery(message, failure))
    }

    fn dead_letters<'a>(
        &'a self,
        target: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<(u32, Vec<DeadItem>), BrokerError>> {
        Box::pin(self.list_dead(target, limit))
    }

    fn take_dead<'a>(
        &'a self,
        target: &'a str,
        ids: Option<&'a HashSet<String>>,
        replay: bool,
    ) -> BoxFuture<'a, Result<Vec<DeadItem>, BrokerError>> {
        Box::pin(self.take_dead_items(target, ids, replay))
    }

    fn queue_depths<'a>(
        &'a self,
        target: &'a str,
    ) -> BoxFuture<'a, Result<(u32, u32), BrokerError>> {
        Box::pin(self.dlq_and_retry_depths(target))
    }

    fn export<'a>(&'a self, target: &'a str) -> BoxFuture<'a, Result<Vec<Held>, BrokerError>> {
        Box::pin(self.export_held(target))
    }

    fn import<'a>(
        &'a self,
        target: &'a str,
        held: Vec<Held>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.import_held(target, held))
    }

    fn enqueue<'a>(
        &'a self,
        target: &'a str,
        changes: Vec<Held>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.enqueue_held(target, changes))
    }

    fn inbox_serve(&self, target: &str) -> mpsc::Receiver<InboxCall> {
        self.consuming.serve(target)
    }

    fn inbox_call<'a>(
        &'a self,
        target: &'a str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, BrokerError>> {
        Box::pin(self.call_inbox(target, body, timeout))
    }
}

/// Backoff with jitter for reconnects: 100 ms doubling to 10 s, ±25 %.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(7)).min(10_000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let jitter = base / 4;
    Duration::from_millis(base - jitter + nanos % (2 * jitter + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs the local RabbitMQ (127.0.0.1:5672, guest); declares everything under a prefix
    /// of its own and deletes it after.
    #[tokio::test]
    async fn keeps_the_broker_contract() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let prefix = format!("lxunit-contract-{}-{nanos:x}", std::process::id());
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        let section = format!("[broker]\nurl = \"{url}\"\nprefix = \"{prefix}\"");
        let config = crate::broker::contract::config(&section);
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        let metrics = crate::metrics::Metrics::new();
        let routes = Routes::from_config(&config);
        let broker = RabbitBroker::start(&config, &routes, cancel.clone(), &tracker, &metrics)
            .expect("the broker starts");
        let began = std::time::Instant::now();
        while !broker.ready() {
            assert!(
                began.elapsed() < Duration::from_secs(20),
                "RabbitMQ not ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        crate::broker::contract::run(broker.as_ref(), false).await;
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        delete_declared(url, &config).await;
    }

    async fn delete_declared(url: &str, config: &Config) {
        let conn = lapin::DefaultConnectionBuilder::new()
            .unwrap()
            .with_uri_str(url.to_string())
            .connect()
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let (exchanges, queues) = declared_names(config);
        for queue in queues {
            let _ = ch
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
        for exchange in exchanges {
            let _ = ch
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
        let _ = conn.close(200, "contract done".into()).await;
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(0) <= Duration::from_millis(125));
        assert!(backoff(3) >= Duration::from_millis(600));
        for a in 0..40 {
            assert!(backoff(a) <= Duration::from_millis(12_500));
        }
    }
}
