//! The broker: what the rest of lxbridge sees of the queues. This file holds only the
//! [`Broker`] trait and the backend-neutral types it speaks in ([`Outgoing`], [`Incoming`]
//! and its `AckHandle`, [`Failure`], [`Held`], [`DeadItem`], ...), the names of the
//! headers a retried or dead change carries ([`header`]) and the few body readers both
//! backends use. Knows nothing about 1C. Two backends implement it, each in its own module:
//!
//! - [`rabbitmq`]: [`RabbitBroker`], RabbitMQ (topology, confirmed publishing, consuming with
//!   the partitions shared out among the instances, retry steps and the DLQ);
//! - [`sqlite`]: [`EmbeddedBroker`], the same semantics on the embedded database
//!   ([`crate::embedded`]).

pub mod rabbitmq;
pub mod sqlite;

pub use rabbitmq::{declared_names, endpoint, probe, Names, RabbitBroker, Role, CONNECT_TIMEOUT};
pub use sqlite::EmbeddedBroker;

use futures_util::future::BoxFuture;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker topology problem: {0}")]
    Topology(String),
    #[error("{0}")]
    Tls(String),
}

/// One message to publish to a source node's exchange.
pub struct Outgoing {
    /// The routing key: the change's type.
    pub kind: String,
    pub id: String,
    /// The delivery queue partition: `route::partition` of the change's ref.
    pub partition: u16,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Stored: the broker confirmed it.
    Confirmed,
    /// No queue is bound for it: returned by the broker, nothing stored.
    Unroutable,
    /// The broker refused it (nack): nothing stored.
    Refused,
}

/// How a consumed message is settled with the backend it came from: each backend's own
/// handle, defined in that backend's module (an enum, so handing a message on allocates
/// nothing). A backend given another's message refuses to settle it.
pub(crate) enum AckHandle {
    /// A RabbitMQ delivery: its acker and its place among its consumer's unsettled messages.
    Rabbit(rabbitmq::Handle),
    /// An embedded queue row and the prefetch slot it holds until settled.
    Embedded(sqlite::Handle),
}

/// A change taken from a target's delivery queue.
pub struct Incoming {
    pub body: Vec<u8>,
    /// 1 on the first delivery, raised each time it comes back from a retry step.
    pub attempt: u32,
    pub first_failed_ms: Option<i64>,
    /// Its last failure took its whole batch down: deliver it in a batch of its own.
    pub alone: bool,
    /// The delivery queue partition it came from (0 for the embedded backend).
    pub partition: u16,
    pub(crate) handle: AckHandle,
}

impl Incoming {
    /// True once the consumer it came from is gone (its connection was lost): it can no
    /// longer be settled, and the broker gives it out again, so it must not be delivered.
    pub fn is_stale(&self) -> bool {
        match &self.handle {
            AckHandle::Rabbit(handle) => handle.is_stale(),
            AckHandle::Embedded(_) => false,
        }
    }
}

/// A request to a pull target's inbox, handed to the instance that serves it, and where its
/// answer goes. The bodies are the inbox's own (`deliver::pull`); the broker only carries them.
pub struct InboxCall {
    pub body: Vec<u8>,
    pub reply: tokio::sync::oneshot::Sender<Vec<u8>>,
}

/// Why a change failed and what failure is the next step.
pub struct Failure<'a> {
    pub target: &'a str,
    pub error: &'a str,
    /// Publish to the DLQ instead of the next retry step.
    pub dead: bool,
    /// The whole batch failed (not this change alone): retry it in a batch of its own.
    pub alone: bool,
    pub source: &'a str,
    pub kind: &'a str,
    pub reference: &'a str,
    pub now_ms: i64,
}

pub trait Broker: Send + Sync + 'static {
    /// Publishes messages to `<prefix>.node.<source>`, persistent and mandatory, pipelined,
    /// and waits for every confirm. `Err` means the broker is unavailable; outcomes are
    /// per message otherwise.
    fn publish<'a>(
        &'a self,
        source: &'a str,
        messages: &'a [Outgoing],
    ) -> BoxFuture<'a, Result<Vec<PublishOutcome>, BrokerError>>;
    /// True while publishing can succeed (connected, not flow-controlled).
    fn ready(&self) -> bool;
    /// True while every pull inbox can be reached from here, wherever it is served.
    fn inboxes_reachable(&self) -> bool;
    /// Which broker node each connection is on, for `/readyz` (nothing in-process).
    fn endpoints(&self) -> Endpoints {
        Endpoints::default()
    }
    /// The stream of a target's deliveries; it survives reconnects.
    fn consume(&self, target: &str, prefetch: u16) -> mpsc::Receiver<Incoming>;
    fn ack(&self, message: Incoming) -> BoxFuture<'_, Result<(), BrokerError>>;
    /// Moves a failed change to its next retry step, or to the DLQ when `failure.dead` or the
    /// steps are exhausted, then acks it. Returns true if it went to the DLQ.
    fn fail<'a>(
        &'a self,
        message: Incoming,
        failure: Failure<'a>,
    ) -> BoxFuture<'a, Result<bool, BrokerError>>;
    /// The DLQ's message count and up to `limit` of its items, left in place.
    fn dead_letters<'a>(
        &'a self,
        target: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<(u32, Vec<DeadItem>), BrokerError>>;
    /// Removes the DLQ items with the given ids (all when `None`); with `replay` each is
    /// first republished to the target's delivery queue at attempt 1. Returns those taken.
    fn take_dead<'a>(
        &'a self,
        target: &'a str,
        ids: Option<&'a HashSet<String>>,
        replay: bool,
    ) -> BoxFuture<'a, Result<Vec<DeadItem>, BrokerError>>;
    /// Messages in the target's DLQ and, summed, in its retry queues.
    fn queue_depths<'a>(
        &'a self,
        target: &'a str,
    ) -> BoxFuture<'a, Result<(u32, u32), BrokerError>>;
    /// Copies of every message held for the target (its delivery queue, its retry steps,
    /// its DLQ), in that order, each queue in its own order; nothing is taken or changed.
    /// For `lxbridge export`: lxbridge must be stopped (a running one holds prefetched
    /// messages that no one else can see).
    fn export<'a>(&'a self, target: &'a str) -> BoxFuture<'a, Result<Vec<Held>, BrokerError>>;
    /// Adds messages for the target, in order: `Deliver` and `Retry` ones at the end of its
    /// delivery queue (a retry is due at once) with their attempt, first failure and
    /// `alone`; `Dlq` ones to its DLQ with their facts. For `lxbridge import` (see
    /// [`Broker::enqueue`] for adding changes while lxbridge runs).
    fn import<'a>(
        &'a self,
        target: &'a str,
        held: Vec<Held>,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// Adds changes at the end of the target's delivery queue, each with the attempt, first
    /// failure and `alone` it carries (whatever its `queue` says: it never writes a retry
    /// step or the DLQ); the partition comes from the ref in its body. For parallel copies
    /// (a conflict's winner sent back to its author, a resync request), while lxbridge runs.
    fn enqueue<'a>(
        &'a self,
        target: &'a str,
        changes: Vec<Held>,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// The requests to a pull target's inbox that this instance is to answer (all of them
    /// while it serves that inbox; none otherwise).
    fn inbox_serve(&self, target: &str) -> mpsc::Receiver<InboxCall>;
    /// Hands a request to whichever instance serves the pull target's inbox and waits at
    /// most `timeout` for its answer.
    fn inbox_call<'a>(
        &'a self,
        target: &'a str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, BrokerError>>;
}

/// Where a backend's connections are now (`host:port`), and why none can be made.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Endpoints {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consume: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a [`Held`] message waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldIn {
    /// The target's delivery queue.
    Deliver,
    /// One of the target's retry steps.
    Retry,
    /// The target's DLQ, with the facts the admin API lists.
    Dlq {
        source: String,
        kind: String,
        reference: String,
        dead_at_ms: i64,
    },
}

/// A message a backend holds for a target, as `lxbridge export` writes it and
/// `lxbridge import` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub queue: HeldIn,
    /// The attempt it is delivered as next (`Deliver`, `Retry`: 1 or more); in the DLQ,
    /// the attempts made.
    pub attempt: u32,
    pub first_failed_ms: Option<i64>,
    /// Its last failure took its whole batch down: deliver it in a batch of its own.
    pub alone: bool,
    /// Its last error, when the backend keeps one.
    pub error: Option<String>,
    /// The message body, byte for byte (an lxbridge envelope, unless it is an unreadable
    /// message in the DLQ).
    pub body: Vec<u8>,
}

/// A dead change as the admin API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadItem {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(rename = "ref")]
    pub reference: String,
    pub source: String,
    pub attempts: u32,
    pub error: String,
    pub dead_at: String,
    #[serde(skip)]
    pub seq: i64,
}

/// The headers lxbridge's messages carry (README "Dead letters"), named once here: the
/// delivery queue partition, and the facts of a change in a retry step or the DLQ. The
/// RabbitMQ backend writes and reads them (`rabbitmq::headers`); the embedded one keeps the
/// same facts in columns.
pub mod header {
    /// The delivery queue partition a message belongs to (a string, as the bindings match
    /// it). Not `x-`: a headers exchange ignores binding arguments that start with `x-`.
    pub const PARTITION: &str = "lx-partition";
    /// The attempt a change coming back from a retry step is delivered as.
    pub const ATTEMPT: &str = "x-lx-attempt";
    /// Its last failure took its whole batch down: deliver it in a batch of its own.
    pub const ALONE: &str = "x-lx-alone";
    /// Its last error.
    pub const ERROR: &str = "x-lx-error";
    /// When it first failed (ms since the Unix epoch).
    pub const FIRST_FAILED: &str = "x-lx-first-failed";
    /// When it last failed (ms since the Unix epoch); in the DLQ, when it died.
    pub const LAST_FAILED: &str = "x-lx-last-failed";
    /// In the DLQ: the attempts made.
    pub const ATTEMPTS: &str = "x-lx-attempts";
    /// In the DLQ: the change's source node.
    pub const SOURCE: &str = "x-lx-source";
    /// In the DLQ: the change's type.
    pub const TYPE: &str = "x-lx-type";
    /// In the DLQ: the change's object ref.
    pub const REF: &str = "x-lx-ref";
}

/// A message body's change id and seq (empty and 0 if it is not an lxbridge envelope).
pub(crate) fn body_ids(body: &[u8]) -> (String, i64) {
    #[derive(serde::Deserialize, Default)]
    struct Ids {
        #[serde(default)]
        id: String,
        #[serde(default)]
        seq: i64,
    }
    let ids: Ids = serde_json::from_slice(body).unwrap_or_default();
    (ids.id, ids.seq)
}

/// A message body's object ref (empty if it is not an lxbridge envelope).
pub(crate) fn body_ref(body: &[u8]) -> String {
    #[derive(serde::Deserialize, Default)]
    struct Ref {
        #[serde(default, rename = "ref")]
        reference: String,
    }
    serde_json::from_slice::<Ref>(body)
        .unwrap_or_default()
        .reference
}

/// Rejects a message that can never be processed (its body is not an lxbridge envelope)
/// into the DLQ with the reason, so it neither blocks nor loops.
pub async fn reject_unreadable(broker: &dyn Broker, message: Incoming, target: &str, error: &str) {
    let failure = Failure {
        target,
        error,
        dead: true,
        alone: false,
        source: "",
        kind: "",
        reference: "",
        now_ms: crate::clock::unix_ms_now(),
    };
    if let Err(e) = broker.fail(message, failure).await {
        warn!(%target, error = %e, "could not dead-letter an unreadable message; it stays unacked");
    }
}

/// What every backend must do alike, run against each ([`sqlite`]'s tests and
/// [`rabbitmq`]'s): the config's one push target `shop`, routed `Catalog.*` from `central`,
/// one retry step.
#[cfg(test)]
pub(crate) mod contract {
    use super::*;

    /// The config of the contract, with the backend's own lines.
    pub(crate) fn config(backend: &str) -> crate::config::Config {
        let text = format!(
            r#"{backend}
[retry]
delays = ["50ms"]
[[node]]
name = "central"
token = "central-secret"
[[node]]
name = "shop"
token = "shop-secret"
[node.deliver]
mode = "push"
url = "http://127.0.0.1:9/"
[[route]]
from = "central"
to = ["shop"]
types = ["Catalog.*"]
"#
        );
        crate::config::Config::parse(&text, "contract").expect("the contract's config parses")
    }

    fn body(id: &str, seq: i64, reference: &str) -> Vec<u8> {
        format!(r#"{{"id":"{id}","seq":{seq},"ref":"{reference}","type":"Catalog.X"}}"#)
            .into_bytes()
    }

    async fn next(rx: &mut mpsc::Receiver<Incoming>) -> Incoming {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a delivery within 20 s")
            .expect("the consumer runs")
    }

    fn failure(now_ms: i64, alone: bool) -> Failure<'static> {
        Failure {
            target: "shop",
            error: "warehouse busy",
            dead: false,
            alone,
            source: "central",
            kind: "Catalog.X",
            reference: "r-1",
            now_ms,
        }
    }

    /// Publish, consume, a retry step and back, the DLQ (listing, import, purge, replay),
    /// enqueue, and the depths on the way; `export` too where lxbridge may run meanwhile
    /// (RabbitMQ's refuses while a delivery queue has a consumer).
    pub(crate) async fn run(broker: &dyn Broker, exports: bool) {
        let now = crate::clock::unix_ms_now();
        let partition = crate::route::partition("r-1", 1);
        let messages = [
            Outgoing {
                kind: "Catalog.X".into(),
                id: "c-1".into(),
                partition,
                body: body("c-1", 7, "r-1"),
            },
            Outgoing {
                kind: "Document.Y".into(),
                id: "c-2".into(),
                partition,
                body: body("c-2", 8, "r-2"),
            },
        ];
        let outcomes = broker.publish("central", &messages).await.unwrap();
        assert_eq!(
            outcomes,
            [PublishOutcome::Confirmed, PublishOutcome::Unroutable]
        );
        let mut rx = broker.consume("shop", 10);
        let first = next(&mut rx).await;
        assert_eq!((first.attempt, first.alone), (1, false));
        assert_eq!(first.first_failed_ms, None);
        assert_eq!(first.body, body("c-1", 7, "r-1"));
        assert!(!first.is_stale());

        // The one retry step, and back as attempt 2, alone, with its first failure.
        assert!(!broker.fail(first, failure(now, true)).await.unwrap());
        let again = next(&mut rx).await;
        assert_eq!((again.attempt, again.alone), (2, true));
        assert_eq!(again.first_failed_ms, Some(now));

        // The steps are exhausted: the DLQ, with its facts.
        assert!(broker.fail(again, failure(now + 5, false)).await.unwrap());
        assert_eq!(broker.queue_depths("shop").await.unwrap(), (1, 0));
        let (count, items) = broker.dead_letters("shop", 10).await.unwrap();
        assert_eq!((count, items.len()), (1, 1));
        let item = &items[0];
        assert_eq!(
            (item.id.as_str(), item.seq, item.kind.as_str()),
            ("c-1", 7, "Catalog.X")
        );
        assert_eq!(
            (item.reference.as_str(), item.source.as_str()),
            ("r-1", "central")
        );
        assert_eq!((item.attempts, item.error.as_str()), (2, "warehouse busy"));
        assert_eq!(item.dead_at, crate::clock::rfc3339_ms(now + 5));

        // Import puts a dead change into the DLQ with the facts it carries.
        let imported = Held {
            queue: HeldIn::Dlq {
                source: "central".into(),
                kind: "Catalog.X".into(),
                reference: "r-3".into(),
                dead_at_ms: now,
            },
            attempt: 3,
            first_failed_ms: Some(now - 10),
            alone: false,
            error: Some("INN is invalid".into()),
            body: body("c-3", 9, "r-3"),
        };
        let imported_copy = imported.clone();
        broker.import("shop", vec![imported]).await.unwrap();
        let (count, items) = broker.dead_letters("shop", 10).await.unwrap();
        assert_eq!(count, 2);
        let item = items.iter().find(|i| i.id == "c-3").expect("imported");
        assert_eq!((item.attempts, item.error.as_str()), (3, "INN is invalid"));
        assert_eq!((item.reference.as_str(), item.seq), ("r-3", 9));
        if exports {
            let held = broker.export("shop").await.unwrap();
            assert_eq!(held.len(), 2);
            assert!(held.iter().all(|h| matches!(h.queue, HeldIn::Dlq { .. })));
            assert_eq!(held[0].attempt, 2);
            assert_eq!(held[0].first_failed_ms, Some(now));
            assert_eq!(held[0].error.as_deref(), Some("warehouse busy"));
            assert_eq!(held[1], imported_copy);
        }

        // Purge one, replay the other: it comes back as a fresh change.
        let purge: HashSet<String> = ["c-3".to_string()].into();
        let purged = broker.take_dead("shop", Some(&purge), false).await.unwrap();
        assert_eq!(purged.len(), 1);
        let replayed = broker.take_dead("shop", None, true).await.unwrap();
        assert_eq!(replayed.len(), 1);
        assert_eq!(broker.queue_depths("shop").await.unwrap(), (0, 0));
        let fresh = next(&mut rx).await;
        assert_eq!((fresh.attempt, fresh.alone), (1, false));
        assert_eq!(fresh.first_failed_ms, None);
        assert_eq!(fresh.body, body("c-1", 7, "r-1"));
        broker.ack(fresh).await.unwrap();

        // Enqueue: to the end of the delivery queue, whatever queue the change names.
        let enqueued = Held {
            queue: HeldIn::Retry,
            attempt: 1,
            first_failed_ms: None,
            alone: false,
            error: None,
            body: body("c-4", 10, "r-1"),
        };
        broker.enqueue("shop", vec![enqueued]).await.unwrap();
        let got = next(&mut rx).await;
        assert_eq!((got.attempt, got.body.clone()), (1, body("c-4", 10, "r-1")));
        broker.ack(got).await.unwrap();
        assert_eq!(broker.queue_depths("shop").await.unwrap(), (0, 0));
    }
}
