//! The broker: topology, confirmed publishing, consuming, retry and dead-letter publishing,
//! and reconnecting. [`Broker`] is what the rest of lxbridge sees; [`RabbitBroker`] is the
//! RabbitMQ implementation. Knows nothing about 1C.
//!
//! Two connections, as RabbitMQ advises: one publishes (ingress, retry and DLQ moves), one
//! consumes (a channel per delivery queue partition, see [`consume`]). Each is kept by a
//! supervisor task that reconnects with backoff and jitter and redeclares the topology; while
//! the publishing side is down or blocked by the broker's flow control, [`Broker::ready`] is
//! false and ingress answers 503.
//!
//! Several instances share the work through the broker: a push target's delivery queue is
//! split into `broker.partitions` quorum queues by a hash of the object's ref (the
//! `lx-partition` header, routed by the target's headers exchange), each with a single
//! active consumer, so one object is delivered by one instance at a time; the instances
//! share the partitions out among themselves ([`consume`]). A pull target's inbox is served
//! by one instance, the active consumer of its request queue; the others pass polls and acks
//! to it ([`Broker::inbox_call`]).

mod connect;
mod consume;
mod members;

pub use connect::{endpoint, probe, Role, CONNECT_TIMEOUT};

use crate::config::{Config, DeliverMode};
use crate::route::Routes;
use crate::tls::Material;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

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

/// How a consumed message is settled with the backend it came from.
pub enum AckHandle {
    /// The delivery's acker, and its place among its consumer's unsettled messages.
    Rabbit {
        acker: lapin::Acker,
        slot: consume::Slot,
    },
    /// The embedded queue's row, and the prefetch slot it holds until settled.
    Embedded {
        row: i64,
        _slot: tokio::sync::OwnedSemaphorePermit,
    },
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
            AckHandle::Rabbit { slot, .. } => slot.is_stale(),
            AckHandle::Embedded { .. } => false,
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
    /// `alone`; `Dlq` ones to its DLQ with their facts. For `lxbridge import`.
    fn import<'a>(
        &'a self,
        target: &'a str,
        held: Vec<Held>,
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

/// Queue and exchange names under the prefix (API.md "Broker topology").
#[derive(Clone, Debug)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn exchange(&self, source: &str) -> String {
        format!("{}.node.{source}", self.prefix)
    }
    /// The target's delivery queue: its partition 0.
    pub fn deliver(&self, target: &str) -> String {
        format!("{}.deliver.{target}", self.prefix)
    }
    /// Partition `p` of the target's delivery queue: `<prefix>.deliver.<target>` for 0,
    /// `<prefix>.deliver.<target>.<p>` for the others.
    pub fn partition(&self, target: &str, p: u16) -> String {
        match p {
            0 => self.deliver(target),
            p => format!("{}.deliver.{target}.{p}", self.prefix),
        }
    }
    /// The target's headers exchange: routes each change to its partition, from the source
    /// exchanges and from the retry steps.
    pub fn target_exchange(&self, target: &str) -> String {
        format!("{}.target.{target}", self.prefix)
    }
    /// A pull target's inbox requests (polls, acks), for the instance that serves it.
    pub fn inbox(&self, target: &str) -> String {
        format!("{}.inbox.{target}", self.prefix)
    }
    /// The fanout exchange the instances announce themselves on.
    pub fn instances(&self) -> String {
        format!("{}.instances", self.prefix)
    }
    /// An instance's own queue: the others' announcements and answers to its inbox requests.
    pub fn instance(&self, id: &str) -> String {
        format!("{}.instance.{id}", self.prefix)
    }
    pub fn retry(&self, target: &str, step: usize) -> String {
        format!("{}.retry.{target}.{step}", self.prefix)
    }
    pub fn dlq(&self, target: &str) -> String {
        format!("{}.dlq.{target}", self.prefix)
    }
}

/// Everything to declare, computed once from the config.
#[derive(Clone, Debug)]
struct Topology {
    names: Names,
    sources: Vec<String>,
    /// Push targets, in config order (the order the partitions are shared out in).
    push: Vec<String>,
    /// Pull targets: one delivery queue each, served by one instance.
    pull: Vec<String>,
    /// Partitions of each push target's delivery queue.
    partitions: u16,
    retry_delays: Vec<Duration>,
    bindings: Vec<(String, String, String)>, // (source exchange, target, pattern)
    /// `broker.quorum_replicas`: the replicas a quorum queue starts with.
    quorum_replicas: Option<u8>,
}

impl Topology {
    fn from_config(config: &Config, routes: &Routes) -> Topology {
        let names = Names {
            prefix: config.broker.prefix.clone(),
        };
        let bindings = routes
            .bindings()
            .map(|b| {
                (
                    names.exchange(&b.source),
                    b.target.clone(),
                    b.pattern.clone(),
                )
            })
            .collect();
        let with_mode = |mode: DeliverMode| {
            config
                .nodes
                .iter()
                .filter(|n| n.deliver.as_ref().is_some_and(|d| d.mode == mode))
                .map(|n| n.name.clone())
                .collect()
        };
        Topology {
            sources: config.nodes.iter().map(|n| n.name.clone()).collect(),
            push: with_mode(DeliverMode::Push),
            pull: with_mode(DeliverMode::Pull),
            partitions: config.broker.partitions.max(1),
            retry_delays: config.retry.delays.iter().map(|d| d.0).collect(),
            quorum_replicas: config.broker.quorum_replicas,
            names,
            bindings,
        }
    }

    fn targets(&self) -> impl Iterator<Item = &String> {
        self.push.iter().chain(&self.pull)
    }

    /// How many delivery queues the target has: `partitions` for a push target, one for a
    /// pull target.
    fn partitions_of(&self, target: &str) -> u16 {
        if self.pull.iter().any(|t| t == target) {
            1
        } else {
            self.partitions
        }
    }

    /// Puts the partition header on a message bound for a push target's delivery queues
    /// (with one partition the bindings take every message: no header needed).
    fn mark_partition(&self, headers: &mut FieldTable, partition: u16) {
        if self.partitions > 1 {
            headers.insert(H_PARTITION.into(), long_string(&partition.to_string()));
        }
    }

    /// Every delivery queue of the target, partition 0 first.
    fn delivery_queues(&self, target: &str) -> Vec<String> {
        (0..self.partitions_of(target))
            .map(|p| self.names.partition(target, p))
            .collect()
    }

    async fn declare(&self, ch: &Channel) -> Result<(), BrokerError> {
        let topo = |what: String, e: lapin::Error| {
            BrokerError::Topology(format!(
                "declaring {what} failed: {e}. If it exists with other arguments (for example \
                 after retry.delays changed, or declared by an lxbridge before 0.2), move its \
                 messages with `lxbridge export`/`import` or delete it with `rabbitmqctl \
                 delete_queue`, then restart"
            ))
        };
        for source in &self.sources {
            let name = self.names.exchange(source);
            declare_exchange(ch, &name, ExchangeKind::Topic)
                .await
                .map_err(|e| topo(format!("exchange {name}"), e))?;
        }
        // Gone with the last instance's queue: it carries nothing that must outlive them.
        let instances = self.names.instances();
        let transient = ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        };
        ch.exchange_declare(
            instances.as_str().into(),
            ExchangeKind::Fanout,
            transient,
            FieldTable::default(),
        )
        .await
        .map_err(|e| topo(format!("exchange {instances}"), e))?;
        for target in self.targets() {
            self.declare_target(ch, target)
                .await
                .map_err(|(what, e)| topo(what, e))?;
        }
        for target in &self.pull {
            let name = self.names.inbox(target);
            let mut args = FieldTable::default();
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            ch.queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args)
                .await
                .map_err(|e| topo(format!("queue {name}"), e))?;
        }
        for (source, target, pattern) in &self.bindings {
            self.bind_route(ch, source, target, pattern)
                .await
                .map_err(|(what, e)| topo(what, e))?;
        }
        Ok(())
    }

    /// Binds a route's pattern from the source exchange into the target: straight to its one
    /// delivery queue, or to its headers exchange, which picks the partition (one hop more
    /// in RabbitMQ, paid only where there are partitions to pick from).
    async fn bind_route(
        &self,
        ch: &Channel,
        source: &str,
        target: &str,
        pattern: &str,
    ) -> Result<(), (String, lapin::Error)> {
        let (opts, args) = (QueueBindOptions::default(), FieldTable::default());
        if self.partitions_of(target) == 1 {
            let queue = self.names.deliver(target);
            return ch
                .queue_bind(
                    queue.as_str().into(),
                    source.into(),
                    pattern.into(),
                    opts,
                    args,
                )
                .await
                .map_err(|e| (format!("binding {source} -> {queue} ({pattern})"), e));
        }
        let exchange = self.names.target_exchange(target);
        ch.exchange_bind(
            exchange.as_str().into(),
            source.into(),
            pattern.into(),
            ExchangeBindOptions::default(),
            args,
        )
        .await
        .map_err(|e| (format!("binding {source} -> {exchange} ({pattern})"), e))
    }

    /// The arguments of every quorum queue: its type and, when configured, how many
    /// cluster nodes it is replicated on from the start.
    fn quorum_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        if let Some(n) = self.quorum_replicas {
            args.insert(
                "x-quorum-initial-group-size".into(),
                AMQPValue::LongInt(i32::from(n)),
            );
        }
        args
    }

    /// A target's headers exchange, its delivery queues (single active consumer) bound to it
    /// by partition, its retry steps (dead-lettering back to the exchange, which routes by
    /// the partition header they keep) and its DLQ.
    async fn declare_target(
        &self,
        ch: &Channel,
        target: &str,
    ) -> Result<(), (String, lapin::Error)> {
        let exchange = self.names.target_exchange(target);
        declare_exchange(ch, &exchange, ExchangeKind::Headers)
            .await
            .map_err(|e| (format!("exchange {exchange}"), e))?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let partitions = self.partitions_of(target);
        for p in 0..partitions {
            let queue = self.names.partition(target, p);
            let mut args = self.quorum_args();
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            ch.queue_declare(queue.as_str().into(), durable, args)
                .await
                .map_err(|e| (format!("queue {queue}"), e))?;
            // A pull target's one queue takes every partition (an empty match takes all).
            let mut filter = FieldTable::default();
            filter.insert("x-match".into(), AMQPValue::LongString("all".into()));
            if partitions > 1 {
                filter.insert(H_PARTITION.into(), long_string(&p.to_string()));
            }
            ch.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                filter,
            )
            .await
            .map_err(|e| (format!("binding {exchange} -> {queue}"), e))?;
        }
        for (i, delay) in self.retry_delays.iter().enumerate() {
            let name = self.names.retry(target, i + 1);
            let mut args = self.quorum_args();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(exchange.as_str().into()),
            );
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            ch.queue_declare(name.as_str().into(), durable, args)
                .await
                .map_err(|e| (format!("queue {name}"), e))?;
        }
        let dlq = self.names.dlq(target);
        ch.queue_declare(dlq.as_str().into(), durable, self.quorum_args())
            .await
            .map_err(|e| (format!("queue {dlq}"), e))?;
        Ok(())
    }
}

async fn declare_exchange(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(name.into(), kind, durable, FieldTable::default())
        .await
}

/// The names of every exchange and queue lxbridge declares for `config` (for clean-up
/// tools and tests): (exchanges, queues). The instances' own queues go when they stop.
pub fn declared_names(config: &Config) -> (Vec<String>, Vec<String>) {
    let t = Topology::from_config(config, &Routes::from_config(config));
    let mut exchanges: Vec<String> = t.sources.iter().map(|s| t.names.exchange(s)).collect();
    exchanges.push(t.names.instances());
    let mut queues = Vec::new();
    for target in t.targets() {
        exchanges.push(t.names.target_exchange(target));
        queues.extend(t.delivery_queues(target));
        queues.extend((1..=t.retry_delays.len()).map(|step| t.names.retry(target, step)));
        queues.push(t.names.dlq(target));
    }
    queues.extend(t.pull.iter().map(|target| t.names.inbox(target)));
    (exchanges, queues)
}

/// The delivery queue partition a message belongs to (a string, as the bindings match it).
/// Not `x-`: a headers exchange ignores binding arguments that start with `x-`.
const H_PARTITION: &str = "lx-partition";
const H_ATTEMPT: &str = "x-lx-attempt";
const H_ERROR: &str = "x-lx-error";
const H_FIRST_FAILED: &str = "x-lx-first-failed";
const H_LAST_FAILED: &str = "x-lx-last-failed";
const H_ALONE: &str = "x-lx-alone";

fn header_i64(props: &BasicProperties, name: &str) -> Option<i64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

fn header_str(props: &BasicProperties, name: &str) -> String {
    header_opt_str(props, name).unwrap_or_default()
}

fn header_opt_str(props: &BasicProperties, name: &str) -> Option<String> {
    let value = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned());
    match value {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The attempt a consumed message is delivered as: 1, or what its retry step said.
fn header_attempt(props: &BasicProperties) -> u32 {
    header_i64(props, H_ATTEMPT)
        .and_then(|a| u32::try_from(a).ok())
        .unwrap_or(1)
        .max(1)
}

fn header_alone(props: &BasicProperties) -> bool {
    props
        .headers()
        .as_ref()
        .is_some_and(|h| matches!(h.inner().get(H_ALONE), Some(AMQPValue::Boolean(true))))
}

/// A message of a delivery or retry queue as a [`Held`] (its headers as the consumer reads
/// them).
fn held_waiting(delivery: &lapin::message::Delivery, queue: HeldIn) -> Held {
    let p = &delivery.properties;
    Held {
        queue,
        attempt: header_attempt(p),
        first_failed_ms: header_i64(p, H_FIRST_FAILED),
        alone: header_alone(p),
        error: header_opt_str(p, H_ERROR),
        body: delivery.data.clone(),
    }
}

/// A DLQ message as a [`Held`] (its facts as [`dead_item`] reads them).
fn held_dead(delivery: &lapin::message::Delivery) -> Held {
    let p = &delivery.properties;
    Held {
        queue: HeldIn::Dlq {
            source: header_str(p, "x-lx-source"),
            kind: header_str(p, "x-lx-type"),
            reference: header_str(p, "x-lx-ref"),
            dead_at_ms: header_i64(p, H_LAST_FAILED).unwrap_or(0),
        },
        attempt: header_i64(p, "x-lx-attempts")
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(0),
        first_failed_ms: header_i64(p, H_FIRST_FAILED),
        alone: false,
        error: Some(header_str(p, H_ERROR)),
        body: delivery.data.clone(),
    }
}

/// The headers that carry a [`Held`] message's facts, and the exchange and routing key it
/// goes to: the target's exchange (by partition) for a waiting change, the DLQ for a dead one.
fn held_headers(topology: &Topology, target: &str, held: &Held) -> (String, String, FieldTable) {
    let names = &topology.names;
    let mut headers = FieldTable::default();
    if let Some(error) = &held.error {
        headers.insert(H_ERROR.into(), long_string(error));
    }
    match &held.queue {
        HeldIn::Deliver | HeldIn::Retry => {
            headers.insert(
                H_ATTEMPT.into(),
                AMQPValue::LongLongInt(i64::from(held.attempt)),
            );
            if let Some(first) = held.first_failed_ms {
                headers.insert(H_FIRST_FAILED.into(), AMQPValue::LongLongInt(first));
            }
            if held.alone {
                headers.insert(H_ALONE.into(), AMQPValue::Boolean(true));
            }
            let partition = crate::route::partition(&body_ref(&held.body), topology.partitions);
            topology.mark_partition(&mut headers, partition);
            (names.target_exchange(target), String::new(), headers)
        }
        HeldIn::Dlq {
            source,
            kind,
            reference,
            dead_at_ms,
        } => {
            headers.insert(
                H_FIRST_FAILED.into(),
                AMQPValue::LongLongInt(held.first_failed_ms.unwrap_or(*dead_at_ms)),
            );
            headers.insert(H_LAST_FAILED.into(), AMQPValue::LongLongInt(*dead_at_ms));
            headers.insert(
                "x-lx-attempts".into(),
                AMQPValue::LongLongInt(i64::from(held.attempt)),
            );
            headers.insert("x-lx-source".into(), long_string(source));
            headers.insert("x-lx-type".into(), long_string(kind));
            headers.insert("x-lx-ref".into(), long_string(reference));
            (String::new(), names.dlq(target), headers)
        }
    }
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
fn body_ref(body: &[u8]) -> String {
    #[derive(serde::Deserialize, Default)]
    struct Ref {
        #[serde(default, rename = "ref")]
        reference: String,
    }
    serde_json::from_slice::<Ref>(body)
        .unwrap_or_default()
        .reference
}

/// Reads a dead-lettered message's facts from its headers (and id/seq from its body).
fn dead_item(delivery: &lapin::message::Delivery) -> DeadItem {
    let (id, seq) = body_ids(&delivery.data);
    let p = &delivery.properties;
    DeadItem {
        id,
        kind: header_str(p, "x-lx-type"),
        reference: header_str(p, "x-lx-ref"),
        source: header_str(p, "x-lx-source"),
        attempts: header_i64(p, "x-lx-attempts")
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(0),
        error: header_str(p, H_ERROR),
        dead_at: crate::store::rfc3339_ms(header_i64(p, H_LAST_FAILED).unwrap_or(0)),
        seq,
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
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

struct Publisher {
    conn: Arc<Connection>,
    /// One confirm-mode channel for every publish: measured faster than several, as RabbitMQ
    /// coalesces confirms better (BENCHMARKS.md).
    channel: Channel,
}

/// How long moving a failed change to a retry step waits for a publishing connection.
const PUBLISH_WAIT: Duration = Duration::from_secs(30);

/// How long an ack or a nack may take to be written.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a node may refuse every publish before the publishing connection moves on.
const REFUSING_FOR: Duration = Duration::from_secs(5);

pub struct RabbitBroker {
    nodes: connect::Nodes,
    topology: Topology,
    publisher: Mutex<Option<Arc<Publisher>>>,
    blocked: Arc<AtomicBool>,
    /// Asks the publishing supervisor to reconnect now (a publish saw the channel die).
    reconnect: tokio::sync::Notify,
    /// With `reconnect`: leave this node even though the connection is up.
    move_on: AtomicBool,
    /// Since when (ms) every publish was refused; 0 while they are not.
    refused_since: std::sync::atomic::AtomicI64,
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
            topology: Topology::from_config(config, routes),
            publisher: Mutex::new(None),
            blocked: Arc::new(AtomicBool::new(false)),
            reconnect: tokio::sync::Notify::new(),
            move_on: AtomicBool::new(false),
            refused_since: std::sync::atomic::AtomicI64::new(0),
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

    async fn open_publisher(&self, conn: &Arc<Connection>) -> Result<Publisher, BrokerError> {
        let unavailable = |e: lapin::Error| BrokerError::Unavailable(e.to_string());
        let channel = conn.create_channel().await.map_err(unavailable)?;
        self.topology.declare(&channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        Ok(Publisher {
            conn: conn.clone(),
            channel,
        })
    }

    async fn publishing_supervisor(self: Arc<Self>, up_gauge: prometheus::IntGauge) {
        let mut attempt = 0u32;
        while !self.cancel.is_cancelled() {
            let conn = match self.nodes.connect(Role::Publish).await {
                Ok(conn) => Arc::new(conn),
                Err(e) => {
                    if attempt == 0 {
                        error!(error = %e, "cannot connect to RabbitMQ for publishing; retrying");
                    } else {
                        warn!(error = %e, attempt, "cannot connect to RabbitMQ for publishing; retrying");
                    }
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(attempt)) => continue,
                        _ = self.cancel.cancelled() => break,
                    }
                }
            };
            match self.open_publisher(&conn).await {
                Ok(p) => {
                    *self.publisher.lock().expect("publisher lock") = Some(Arc::new(p));
                    self.blocked.store(false, Ordering::SeqCst);
                    self.up.store(true, Ordering::SeqCst);
                    up_gauge.set(1);
                    attempt = 0;
                    info!("publishing connection to RabbitMQ is up");
                }
                Err(e) => {
                    error!(error = %e, "cannot set up the broker topology; retrying");
                    self.nodes.lost(Role::Publish);
                    let _ = conn.close(200, "setup failed".into()).await;
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(attempt)) => continue,
                        _ = self.cancel.cancelled() => break,
                    }
                }
            }
            let mut events = conn.events_listener();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = self.cancel.cancelled() => break,
                    _ = self.reconnect.notified() => {
                        if !conn.status().connected() || self.move_on.swap(false, Ordering::SeqCst) { break }
                    }
                    _ = tick.tick() => {
                        if !conn.status().connected() { break }
                    }
                    event = events.next() => match event {
                        Some(lapin::Event::ConnectionBlocked(reason)) => {
                            warn!(%reason, "RabbitMQ blocked publishing (flow control)");
                            self.blocked.store(true, Ordering::SeqCst);
                        }
                        Some(lapin::Event::ConnectionUnblocked) => {
                            info!("RabbitMQ unblocked publishing");
                            self.blocked.store(false, Ordering::SeqCst);
                        }
                        Some(lapin::Event::Error(e)) => {
                            warn!(error = %e, "publishing connection failed");
                            break;
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
            }
            self.up.store(false, Ordering::SeqCst);
            up_gauge.set(0);
            self.nodes.lost(Role::Publish);
            *self.publisher.lock().expect("publisher lock") = None;
            if self.cancel.is_cancelled() {
                let _ = conn.close(200, "lxbridge shutting down".into()).await;
                break;
            }
            warn!("publishing connection to RabbitMQ lost; reconnecting");
            let _ = conn.close(200, "reconnecting".into()).await;
        }
    }

    fn publisher(&self) -> Result<Arc<Publisher>, BrokerError> {
        if self.blocked.load(Ordering::SeqCst) {
            return Err(BrokerError::Unavailable(
                "RabbitMQ is applying flow control".into(),
            ));
        }
        self.publisher
            .lock()
            .expect("publisher lock")
            .clone()
            .ok_or_else(|| BrokerError::Unavailable("not connected to RabbitMQ".into()))
    }

    fn channel(&self) -> Result<Channel, BrokerError> {
        let p = self.publisher()?;
        Ok(p.channel.clone())
    }

    fn lost(&self, e: lapin::Error) -> BrokerError {
        self.reconnect.notify_one();
        BrokerError::Unavailable(e.to_string())
    }

    /// Watches the broker's answers: a node that has refused every publish for
    /// [`REFUSING_FOR`] (quorum queues it cannot reach the leaders of) is left for the next.
    fn note_refusals(&self, outcomes: &[PublishOutcome]) {
        if outcomes.iter().any(|o| *o != PublishOutcome::Refused) || outcomes.is_empty() {
            if self.refused_since.load(Ordering::Relaxed) != 0 {
                self.refused_since.store(0, Ordering::SeqCst);
            }
            return;
        }
        let now = crate::store::unix_ms_now();
        let since =
            match self
                .refused_since
                .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => now,
                Err(since) => since,
            };
        if now - since >= REFUSING_FOR.as_millis() as i64 {
            warn!(
                seconds = REFUSING_FOR.as_secs(),
                "this RabbitMQ node refused every publish; connecting to the next"
            );
            self.refused_since.store(0, Ordering::SeqCst);
            self.move_on.store(true, Ordering::SeqCst);
            self.reconnect.notify_one();
        }
    }

    /// Publishes one message to a queue through the default exchange and waits for the confirm.
    async fn publish_to_queue(
        &self,
        queue: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<(), BrokerError> {
        self.publish_confirmed("", queue, body, headers).await
    }

    /// [`Self::publish_to_queue`], waiting up to [`PUBLISH_WAIT`] for a publishing
    /// connection that is being made again (a failed change is held meanwhile).
    async fn publish_waiting(
        &self,
        queue: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<(), BrokerError> {
        let deadline = tokio::time::Instant::now() + PUBLISH_WAIT;
        loop {
            match self.publish_to_queue(queue, body, headers.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if self.cancel.is_cancelled() => return Err(e),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Returns a message to the front of its queue (best effort: a closed channel returns
    /// it anyway).
    async fn requeue(&self, message: Incoming) {
        if let AckHandle::Rabbit { acker, .. } = message.handle {
            let requeue = BasicNackOptions {
                requeue: true,
                multiple: false,
            };
            let nacked = tokio::time::timeout(SETTLE_TIMEOUT, acker.nack(requeue)).await;
            if let Ok(Err(e)) = nacked {
                warn!(error = %e, "could not return a message to its queue; it returns when its channel closes");
            }
        }
    }

    /// Publishes one change back into the target's delivery queues (its partition from the
    /// ref in its body) and waits for the confirm.
    async fn publish_to_target(
        &self,
        target: &str,
        body: &[u8],
        mut headers: FieldTable,
    ) -> Result<(), BrokerError> {
        let partition = crate::route::partition(&body_ref(body), self.topology.partitions);
        self.topology.mark_partition(&mut headers, partition);
        let exchange = self.topology.names.target_exchange(target);
        self.publish_confirmed(&exchange, "", body, headers).await
    }

    /// Publishes one message, mandatory, and waits for the confirm.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<(), BrokerError> {
        let queue = if exchange.is_empty() {
            routing_key
        } else {
            exchange
        };
        let ch = self.channel()?;
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(headers);
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .map_err(|e| self.lost(e))?
            .await
            .map_err(|e| self.lost(e))?;
        match confirm {
            lapin::Confirmation::Ack(None) => Ok(()),
            lapin::Confirmation::Ack(Some(_)) => Err(BrokerError::Topology(format!(
                "{queue} does not exist or routes nowhere"
            ))),
            _ => Err(BrokerError::Unavailable(format!(
                "RabbitMQ refused a message for {queue}"
            ))),
        }
    }

    /// A channel of its own on the publishing connection, for admin work on queues.
    async fn admin_channel(&self) -> Result<Channel, BrokerError> {
        let p = self.publisher()?;
        let ch = p.conn.create_channel().await.map_err(|e| self.lost(e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| self.lost(e))?;
        Ok(ch)
    }

    async fn passive_count(&self, ch: &Channel, queue: &str) -> Result<u32, BrokerError> {
        Ok(self.passive(ch, queue).await?.message_count())
    }

    async fn passive(&self, ch: &Channel, queue: &str) -> Result<lapin::Queue, BrokerError> {
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::Topology(format!("queue {queue}: {e}")))
    }

    /// Takes every ready message of `queue` on `ch`, unacked: they stay held by the channel
    /// until it closes, and then go back to the queue.
    async fn get_all(
        &self,
        ch: &Channel,
        queue: &str,
    ) -> Result<Vec<lapin::message::Delivery>, BrokerError> {
        let mut got = Vec::new();
        loop {
            match ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
            {
                Ok(Some(message)) => got.push(message.delivery),
                Ok(None) => return Ok(got),
                Err(e) => return Err(self.lost(e)),
            }
        }
    }

    /// Takes every ready message of a delivery queue on `ch`, unacked, as [`Self::get_all`]
    /// does; by consuming, since a queue with a single active consumer refuses `basic.get`.
    /// No one else may consume it (export checks that there is no consumer).
    async fn consume_all(
        &self,
        ch: &Channel,
        queue: &str,
    ) -> Result<Vec<lapin::message::Delivery>, BrokerError> {
        let ready = self.passive_count(ch, queue).await? as usize;
        let mut got = Vec::with_capacity(ready);
        if ready == 0 {
            return Ok(got);
        }
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "lxbridge-export".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.lost(e))?;
        while got.len() < ready {
            match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
                Ok(Some(Ok(delivery))) => got.push(delivery),
                Ok(Some(Err(e))) => return Err(self.lost(e)),
                Ok(None) | Err(_) => {
                    return Err(BrokerError::Unavailable(format!(
                        "queue {queue} gave {} of its {ready} messages within 10 s",
                        got.len()
                    )))
                }
            }
        }
        Ok(got)
    }

    async fn export_on(&self, ch: &Channel, target: &str) -> Result<Vec<Held>, BrokerError> {
        let names = &self.topology.names;
        let queues = self.topology.delivery_queues(target);
        for queue in &queues {
            let consumers = self.passive(ch, queue).await?.consumer_count();
            if consumers > 0 {
                return Err(BrokerError::Unavailable(format!(
                    "queue {queue} has {consumers} consumer(s): stop lxbridge before exporting \
                     (a running lxbridge holds the changes it has prefetched, which export cannot see)"
                )));
            }
        }
        // The retry steps first: a message held here can no longer expire into the delivery
        // queue, and one that expired before is read there next.
        let mut retry = Vec::new();
        for step in 1..=self.topology.retry_delays.len() {
            for d in self.get_all(ch, &names.retry(target, step)).await? {
                retry.push(held_waiting(&d, HeldIn::Retry));
            }
        }
        let mut held = Vec::new();
        for queue in &queues {
            for d in self.consume_all(ch, queue).await? {
                held.push(held_waiting(&d, HeldIn::Deliver));
            }
        }
        held.append(&mut retry);
        for d in self.get_all(ch, &names.dlq(target)).await? {
            held.push(held_dead(&d));
        }
        Ok(held)
    }

    async fn import_on(
        &self,
        ch: &Channel,
        target: &str,
        held: &[Held],
    ) -> Result<(), BrokerError> {
        let mut confirms = Vec::with_capacity(held.len());
        for h in held {
            let (exchange, routing_key, headers) = held_headers(&self.topology, target, h);
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_headers(headers);
            let confirm = ch
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &h.body,
                    props,
                )
                .await
                .map_err(|e| self.lost(e))?;
            let queue = if exchange.is_empty() {
                routing_key
            } else {
                exchange
            };
            confirms.push((queue, confirm));
        }
        for (queue, confirm) in confirms {
            match confirm.await.map_err(|e| self.lost(e))? {
                lapin::Confirmation::Ack(None) => {}
                lapin::Confirmation::Ack(Some(_)) => {
                    return Err(BrokerError::Topology(format!(
                        "queue {queue} does not exist"
                    )))
                }
                _ => {
                    return Err(BrokerError::Unavailable(format!(
                        "RabbitMQ refused a message for {queue}"
                    )))
                }
            }
        }
        Ok(())
    }
}

impl Broker for RabbitBroker {
    fn publish<'a>(
        &'a self,
        source: &'a str,
        messages: &'a [Outgoing],
    ) -> BoxFuture<'a, Result<Vec<PublishOutcome>, BrokerError>> {
        Box::pin(async move {
            let ch = self.channel()?;
            let exchange: ShortString = self.topology.names.exchange(source).into();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let mut confirms = Vec::with_capacity(messages.len());
            for m in messages {
                let mut headers = FieldTable::default();
                self.topology.mark_partition(&mut headers, m.partition);
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(m.id.as_str().into())
                    .with_timestamp(now)
                    .with_headers(headers);
                let confirm = ch
                    .basic_publish(
                        exchange.clone(),
                        m.kind.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &m.body,
                        props,
                    )
                    .await
                    .map_err(|e| self.lost(e))?;
                confirms.push(confirm);
            }
            let mut outcomes = Vec::with_capacity(confirms.len());
            for confirm in confirms {
                let outcome = match confirm.await.map_err(|e| self.lost(e))? {
                    lapin::Confirmation::Ack(None) => PublishOutcome::Confirmed,
                    lapin::Confirmation::Ack(Some(_)) => PublishOutcome::Unroutable,
                    _ => PublishOutcome::Refused,
                };
                outcomes.push(outcome);
            }
            self.note_refusals(&outcomes);
            Ok(outcomes)
        })
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
        Box::pin(async move {
            match message.handle {
                // Bounded: an ack on a connection that died unnoticed must not hold its
                // lane (the broker gives the change out again when the channel closes).
                AckHandle::Rabbit { acker, .. } => {
                    match tokio::time::timeout(
                        SETTLE_TIMEOUT,
                        acker.ack(BasicAckOptions::default()),
                    )
                    .await
                    {
                        Ok(result) => result
                            .map(|_| ())
                            .map_err(|e| BrokerError::Unavailable(e.to_string())),
                        Err(_) => Err(BrokerError::Unavailable(format!(
                            "the ack was not sent within {} s",
                            SETTLE_TIMEOUT.as_secs()
                        ))),
                    }
                }
                AckHandle::Embedded { .. } => Err(BrokerError::Unavailable(
                    "a message of the embedded backend cannot be settled with RabbitMQ".into(),
                )),
            }
        })
    }

    fn fail<'a>(
        &'a self,
        message: Incoming,
        f: Failure<'a>,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        Box::pin(async move {
            let steps = self.topology.retry_delays.len();
            let dead = f.dead || message.attempt as usize > steps;
            let first_failed = message.first_failed_ms.unwrap_or(f.now_ms);
            let mut headers = FieldTable::default();
            headers.insert(H_ERROR.into(), long_string(f.error));
            headers.insert(H_FIRST_FAILED.into(), AMQPValue::LongLongInt(first_failed));
            headers.insert(H_LAST_FAILED.into(), AMQPValue::LongLongInt(f.now_ms));
            let queue = if dead {
                headers.insert(
                    "x-lx-attempts".into(),
                    AMQPValue::LongLongInt(i64::from(message.attempt)),
                );
                headers.insert("x-lx-source".into(), long_string(f.source));
                headers.insert("x-lx-type".into(), long_string(f.kind));
                headers.insert("x-lx-ref".into(), long_string(f.reference));
                self.topology.names.dlq(f.target)
            } else {
                headers.insert(
                    H_ATTEMPT.into(),
                    AMQPValue::LongLongInt(i64::from(message.attempt) + 1),
                );
                if f.alone {
                    headers.insert(H_ALONE.into(), AMQPValue::Boolean(true));
                }
                self.topology
                    .mark_partition(&mut headers, message.partition);
                self.topology
                    .names
                    .retry(f.target, message.attempt as usize)
            };
            if let Err(e) = self.publish_waiting(&queue, &message.body, headers).await {
                // Back to its queue now, to be tried again, rather than held unacked by a
                // consumer that will not look at it again.
                self.requeue(message).await;
                return Err(e);
            }
            self.ack(message).await?;
            Ok(dead)
        })
    }

    fn dead_letters<'a>(
        &'a self,
        target: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<(u32, Vec<DeadItem>), BrokerError>> {
        Box::pin(async move {
            let ch = self.admin_channel().await?;
            let queue = self.topology.names.dlq(target);
            let count = self.passive_count(&ch, &queue).await?;
            let mut items = Vec::new();
            // Held unacked on this channel, then returned to the queue when it closes.
            while items.len() < limit {
                match ch
                    .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                    .await
                {
                    Ok(Some(message)) => items.push(dead_item(&message.delivery)),
                    Ok(None) => break,
                    Err(e) => return Err(self.lost(e)),
                }
            }
            let _ = ch.close(200, "dlq listed".into()).await;
            Ok((count, items))
        })
    }

    fn take_dead<'a>(
        &'a self,
        target: &'a str,
        ids: Option<&'a HashSet<String>>,
        replay: bool,
    ) -> BoxFuture<'a, Result<Vec<DeadItem>, BrokerError>> {
        Box::pin(async move {
            let ch = self.admin_channel().await?;
            let queue = self.topology.names.dlq(target);
            let mut taken = Vec::new();
            loop {
                let message = match ch
                    .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                    .await
                {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => return Err(self.lost(e)),
                };
                let item = dead_item(&message.delivery);
                if ids.is_some_and(|ids| !ids.contains(&item.id)) {
                    continue; // stays unacked until the channel closes, then goes back
                }
                if replay {
                    // A fresh start: no attempt or error headers.
                    self.publish_to_target(target, &message.delivery.data, FieldTable::default())
                        .await?;
                }
                message
                    .delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| self.lost(e))?;
                taken.push(item);
            }
            let _ = ch.close(200, "dlq taken".into()).await;
            Ok(taken)
        })
    }

    fn queue_depths<'a>(
        &'a self,
        target: &'a str,
    ) -> BoxFuture<'a, Result<(u32, u32), BrokerError>> {
        Box::pin(async move {
            let ch = self.admin_channel().await?;
            let dlq = self
                .passive_count(&ch, &self.topology.names.dlq(target))
                .await?;
            let mut retry = 0;
            for step in 1..=self.topology.retry_delays.len() {
                retry += self
                    .passive_count(&ch, &self.topology.names.retry(target, step))
                    .await?;
            }
            let _ = ch.close(200, "depths".into()).await;
            Ok((dlq, retry))
        })
    }

    fn export<'a>(&'a self, target: &'a str) -> BoxFuture<'a, Result<Vec<Held>, BrokerError>> {
        Box::pin(async move {
            // Everything is held unacked on this channel, then returned when it closes.
            let ch = self.admin_channel().await?;
            let held = self.export_on(&ch, target).await;
            let _ = ch.close(200, "exported".into()).await;
            held
        })
    }

    fn import<'a>(
        &'a self,
        target: &'a str,
        held: Vec<Held>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let ch = self.admin_channel().await?;
            let done = self.import_on(&ch, target, &held).await;
            let _ = ch.close(200, "imported".into()).await;
            done
        })
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
        now_ms: crate::store::unix_ms_now(),
    };
    if let Err(e) = broker.fail(message, failure).await {
        warn!(%target, error = %e, "could not dead-letter an unreadable message; it stays unacked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(0) <= Duration::from_millis(125));
        assert!(backoff(3) >= Duration::from_millis(600));
        for a in 0..40 {
            assert!(backoff(a) <= Duration::from_millis(12_500));
        }
    }

    #[test]
    fn names_follow_the_contract() {
        let n = Names {
            prefix: "lx".into(),
        };
        assert_eq!(n.exchange("central"), "lx.node.central");
        assert_eq!(n.deliver("shop"), "lx.deliver.shop");
        assert_eq!(n.retry("shop", 2), "lx.retry.shop.2");
        assert_eq!(n.dlq("shop"), "lx.dlq.shop");
    }
}
