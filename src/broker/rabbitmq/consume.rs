//! The consuming side of [`RabbitBroker`]: one connection, kept by a supervisor, carrying
//!
//! - a control channel: the topology, this instance's own queue (`<prefix>.instance.<id>`,
//!   exclusive), bound to the `<prefix>.instances` fanout; the announcements heard there keep
//!   [`Members`], and the answers to this instance's inbox requests arrive there;
//! - a channel per delivery queue partition this instance delivers ([`Forward`]): a push
//!   target's partitions are shared out among the live instances ([`owner`]); each queue has
//!   a single active consumer, so even while two instances disagree about the share-out only
//!   one delivers a partition. A partition given up is first drained (every message handed on
//!   is settled) and then its channel is closed, so the next consumer starts right after the
//!   last change this one settled, and returned messages come back first, in order;
//! - a channel per pull target's request queue (`<prefix>.inbox.<target>`, single active
//!   consumer): the instance that receives a request there serves that inbox from then on
//!   (and only then consumes the target's delivery queue) until this connection goes; the
//!   others pass their nodes' polls and acks to it and relay its answers (`inbox`).
//!
//! [`Consuming`] is what this side keeps across connections; `reconcile` starts and stops
//! consumers to match `desired`, and `restart_stalled` subscribes again a consumer idle 15 s
//! beside ready changes it doesn't hold.

use super::forward::{Forward, Lease};
use super::members::{owner, Members, BEAT};
use super::{backoff, RabbitBroker, Role};
use crate::broker::{BrokerError, InboxCall, Incoming};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// A target whose deliveries are wanted, and where they go.
struct Wanted {
    prefetch: u16,
    tx: mpsc::Sender<Incoming>,
}

/// The control channel while connected, and this instance's queue on it.
#[derive(Clone)]
pub(super) struct Link {
    pub(super) channel: Channel,
    pub(super) reply_to: String,
}

/// What the consuming side keeps across connections.
pub(super) struct Consuming {
    /// This instance, as the others know it.
    id: String,
    wanted: Mutex<HashMap<String, Wanted>>,
    /// The inboxes this process can serve, and where their requests go.
    serving: Mutex<HashMap<String, mpsc::Sender<InboxCall>>>,
    /// The pull targets whose inbox this instance serves now.
    owned: Mutex<HashSet<String>>,
    members: Mutex<Members>,
    link: Mutex<Option<Link>>,
    /// Inbox requests sent to another instance, by correlation id.
    calls: Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>,
    next_call: AtomicU64,
    changed: Notify,
    /// Woken when the control link comes up.
    linked: Notify,
}

impl Consuming {
    pub(super) fn new() -> Consuming {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Consuming {
            id: format!("{:016x}", random ^ u64::from(std::process::id())),
            wanted: Mutex::default(),
            serving: Mutex::default(),
            owned: Mutex::default(),
            members: Mutex::default(),
            link: Mutex::default(),
            calls: Mutex::default(),
            next_call: AtomicU64::new(1),
            changed: Notify::new(),
            linked: Notify::new(),
        }
    }

    pub(super) fn want(&self, target: &str, prefetch: u16) -> mpsc::Receiver<Incoming> {
        let (tx, rx) = mpsc::channel(usize::from(prefetch.max(1)));
        let wanted = Wanted { prefetch, tx };
        lock(&self.wanted).insert(target.to_string(), wanted);
        self.changed.notify_one();
        rx
    }

    pub(super) fn serve(&self, target: &str) -> mpsc::Receiver<InboxCall> {
        let (tx, rx) = mpsc::channel(64);
        lock(&self.serving).insert(target.to_string(), tx);
        self.changed.notify_one();
        rx
    }

    /// True while this instance hears the others and can reach every inbox.
    pub(super) fn linked(&self) -> bool {
        lock(&self.link).is_some()
    }

    /// The control link while connected.
    pub(super) fn link(&self) -> Option<Link> {
        lock(&self.link).clone()
    }

    /// The control link; while the connection is being made, waits for it until `deadline`.
    pub(super) async fn link_by(&self, deadline: tokio::time::Instant) -> Option<Link> {
        loop {
            // Registered before the check, so a link made in between still wakes it.
            let up = self.linked.notified();
            if let Some(link) = lock(&self.link).clone() {
                return Some(link);
            }
            tokio::time::timeout_at(deadline, up).await.ok()?;
        }
    }

    /// The inbox of `target` when this instance serves it.
    pub(super) fn local_inbox(&self, target: &str) -> Option<mpsc::Sender<InboxCall>> {
        if !lock(&self.owned).contains(target) {
            return None;
        }
        lock(&self.serving).get(target).cloned()
    }

    /// A request to this instance's inbox came: it serves that inbox from now on.
    pub(super) fn serving_starts(&self, target: &str) {
        if lock(&self.owned).insert(target.to_string()) {
            info!(%target, "this instance serves the inbox");
            self.changed.notify_one();
        }
    }

    /// Its request queue's consumer stopped: this instance no longer serves the inbox.
    pub(super) fn serving_ends(&self, target: &str) {
        lock(&self.owned).remove(target);
        self.changed.notify_one();
    }

    /// Registers where the answer to an inbox request sent to another instance goes, under
    /// a new correlation id.
    pub(super) fn expect_answer(&self, answer: oneshot::Sender<Vec<u8>>) -> String {
        let id = self.next_call.fetch_add(1, Ordering::SeqCst).to_string();
        lock(&self.calls).insert(id.clone(), answer);
        id
    }

    /// No answer is expected any more under `id`.
    pub(super) fn forget_call(&self, id: &str) {
        lock(&self.calls).remove(id);
    }

    /// The connection is gone: nothing is served or answered here until the next one.
    fn disconnected(&self) {
        lock(&self.owned).clear();
        *lock(&self.link) = None;
        lock(&self.calls).clear();
    }

    /// Handles what arrived on this instance's own queue.
    fn heard(&self, delivery: lapin::message::Delivery) {
        let props = &delivery.properties;
        let kind = props.kind().as_ref().map(|k| k.as_str());
        let sender = String::from_utf8_lossy(&delivery.data);
        match kind {
            Some("beat") => {
                if lock(&self.members).saw(&sender, Instant::now()) {
                    info!(instance = %sender, "an lxbridge instance joined");
                    self.changed.notify_one();
                }
            }
            Some("leave") => {
                lock(&self.members).left(&sender);
                info!(instance = %sender, "an lxbridge instance left");
                self.changed.notify_one();
            }
            _ => {
                let Some(id) = props.correlation_id() else {
                    return;
                };
                if let Some(call) = lock(&self.calls).remove(id.as_str()) {
                    let _ = call.send(delivery.data);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("consuming state lock")
}

/// A running consumer of one queue: how to stop it and whether it has stopped.
struct Running {
    release: CancellationToken,
    done: Arc<AtomicBool>,
    /// A delivery queue consumer's queue, lease and last delivery (ms since the Unix epoch),
    /// for the stall check.
    watch: Option<(String, Arc<Lease>, Arc<AtomicU64>)>,
}

/// A delivery queue consumer that received nothing for this long while its queue has ready
/// changes and it holds none is subscribed again (a consumer RabbitMQ no longer serves, as
/// seen once after a RabbitMQ restart, must not hold a queue up).
const STALL: Duration = Duration::from_secs(15);

/// Milliseconds since the Unix epoch, for the atomics that keep a consumer's last delivery.
pub(super) fn now_ms() -> u64 {
    crate::clock::unix_ms_now().max(0) as u64
}

impl Running {
    fn finished(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }
}

/// A delivery queue consumer to run: target, partition, queue, prefetch, where to, and
/// whether to drain before giving it up.
struct Desired {
    queue: String,
    prefetch: u16,
    tx: mpsc::Sender<Incoming>,
    drain: bool,
}

/// How long a set-up step on the consuming connection may take: a RabbitMQ that is still
/// recovering its queues may leave a declare or a consume unanswered; the connection is then
/// started again instead of waiting for ever.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

async fn bounded<T>(
    step: impl std::future::Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    tokio::time::timeout(SETUP_TIMEOUT, step)
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::Unavailable(format!(
                "RabbitMQ did not answer a set-up step within {} s",
                SETUP_TIMEOUT.as_secs()
            )))
        })
}

pub(super) fn unavailable(e: lapin::Error) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// Consumes a queue whose messages need no ack (announcements, requests, answers: one lost
/// is made good by the next, or by the asker's time-out).
async fn consume_no_ack(
    ch: &Channel,
    queue: &str,
    tag: &str,
) -> Result<lapin::Consumer, BrokerError> {
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    ch.basic_consume(queue.into(), tag.into(), no_ack, FieldTable::default())
        .await
        .map_err(unavailable)
}

impl RabbitBroker {
    pub(super) async fn consuming_supervisor(self: Arc<Self>) {
        let mut attempt = 0u32;
        while !self.cancel.is_cancelled() {
            let began = Instant::now();
            let result = match self.nodes.connect(Role::Consume).await {
                Ok(conn) => {
                    let result = self.consume_on(&conn).await;
                    self.consuming.disconnected();
                    self.nodes.lost(Role::Consume);
                    // Closing returns every unacked message to its queue.
                    let _ = conn.close(200, "lxbridge consumer restart".into()).await;
                    result
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => attempt = 0,
                Err(e) => {
                    if !self.cancel.is_cancelled() {
                        warn!(error = %e, attempt, "consuming from RabbitMQ failed; reconnecting");
                    }
                    if began.elapsed() > Duration::from_secs(30) {
                        attempt = 0; // it ran well before it failed: start the backoff again
                    }
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(attempt)) => {}
                        _ = self.cancel.cancelled() => break,
                    }
                }
            }
        }
    }

    /// Runs everything the consuming connection carries until it fails or lxbridge stops.
    async fn consume_on(self: &Arc<Self>, conn: &Connection) -> Result<(), BrokerError> {
        let ctl = conn.create_channel().await.map_err(unavailable)?;
        bounded(self.topology.declare(&ctl)).await?;
        let listener = bounded(self.listen_on(&ctl)).await?;
        // Not a child of `self.cancel`: at shutdown this instance's queue must still be
        // consumed (an auto-delete queue goes with its last consumer, and the fanout with
        // it) while it says it leaves; everything here stops right after.
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let deaf = self.spawn_listener(&tasks, listener, &stop);
        tasks.spawn(announce(self.clone(), ctl.clone(), stop.clone()));
        info!(instance = %self.consuming.id, "consuming connection to RabbitMQ is up");
        let mut running: HashMap<(String, u16), Running> = HashMap::new();
        let mut inboxes: HashMap<String, Running> = HashMap::new();
        let mut events = conn.events_listener();
        let result = loop {
            if let Err(e) = self
                .reconcile(conn, &mut running, &mut inboxes, &stop, &tasks)
                .await
            {
                break Err(e);
            }
            tokio::select! {
                _ = self.cancel.cancelled() => break Ok(()),
                _ = self.consuming.changed.notified() => {}
                _ = deaf.cancelled() => break Err(BrokerError::Unavailable(
                    "this instance's own queue stopped delivering".into(),
                )),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                event = events.next() => match event {
                    Some(lapin::Event::Error(e)) => break Err(unavailable(e)),
                    Some(_) => {}
                    None => break Err(BrokerError::Unavailable("consuming connection closed".into())),
                }
            }
            if !conn.status().connected() {
                break Err(BrokerError::Unavailable("consuming connection lost".into()));
            }
        };
        if self.cancel.is_cancelled() {
            let leave = BasicProperties::default().with_type("leave".into());
            let fanout = self.topology.names.instances();
            let _ = publish_control(&ctl, &fanout, "", leave, self.consuming.id.as_bytes()).await;
        }
        stop.cancel();
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
        result
    }

    /// Hands what this instance's own queue delivers to [`Consuming::heard`] until `stop`;
    /// the token returned is cancelled when the queue stops delivering (its channel
    /// closed): then nothing is heard or answered here, so the connection is started again.
    fn spawn_listener(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        mut listener: lapin::Consumer,
        stop: &CancellationToken,
    ) -> CancellationToken {
        let deaf = CancellationToken::new();
        let (this, listening, deafened) = (self.clone(), stop.clone(), deaf.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = listening.cancelled() => break,
                    next = listener.next() => match next {
                        Some(Ok(delivery)) => this.consuming.heard(delivery),
                        _ => break,
                    },
                }
            }
            deafened.cancel();
        });
        deaf
    }

    /// Declares this instance's own queue on the control channel and consumes it.
    async fn listen_on(&self, ctl: &Channel) -> Result<lapin::Consumer, BrokerError> {
        let names = &self.topology.names;
        let queue = names.instance(&self.consuming.id);
        let own = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        ctl.queue_declare(queue.as_str().into(), own, FieldTable::default())
            .await
            .map_err(unavailable)?;
        ctl.queue_bind(
            queue.as_str().into(),
            names.instances().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
        let tag = format!("lxbridge-{}", self.consuming.id);
        let listener = consume_no_ack(ctl, &queue, &tag).await?;
        *lock(&self.consuming.link) = Some(Link {
            channel: ctl.clone(),
            reply_to: queue,
        });
        self.consuming.linked.notify_waiters();
        Ok(listener)
    }

    /// Starts and stops consumers to match what is wanted now.
    async fn reconcile(
        self: &Arc<Self>,
        conn: &Connection,
        running: &mut HashMap<(String, u16), Running>,
        inboxes: &mut HashMap<String, Running>,
        stop: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<(), BrokerError> {
        running.retain(|_, r| !r.finished());
        inboxes.retain(|_, r| !r.finished());
        self.restart_stalled(running).await;
        let desired = self.desired();
        for ((target, partition), r) in running.iter() {
            if !desired.contains_key(&(target.clone(), *partition)) && !r.release.is_cancelled() {
                info!(%target, partition, "giving this partition to another instance");
                r.release.cancel();
            }
        }
        for (key, want) in desired {
            if running.contains_key(&key) {
                continue;
            }
            let r = bounded(self.start_partition(conn, &key, want, stop, tasks)).await?;
            info!(target = %key.0, partition = key.1, "consuming");
            running.insert(key, r);
        }
        let serving: Vec<(String, mpsc::Sender<InboxCall>)> = lock(&self.consuming.serving)
            .iter()
            .map(|(t, tx)| (t.clone(), tx.clone()))
            .collect();
        for (target, tx) in serving {
            if let std::collections::hash_map::Entry::Vacant(slot) = inboxes.entry(target) {
                let r = bounded(self.start_inbox(conn, slot.key(), tx, stop, tasks)).await?;
                slot.insert(r);
            }
        }
        Ok(())
    }

    /// Subscribes again each delivery queue consumer that idles beside ready changes.
    async fn restart_stalled(&self, running: &HashMap<(String, u16), Running>) {
        let Some(link) = lock(&self.consuming.link).clone() else {
            return;
        };
        for ((target, partition), r) in running {
            let Some((queue, lease, last)) = &r.watch else {
                continue;
            };
            let idle = now_ms().saturating_sub(last.load(Ordering::SeqCst));
            if idle < STALL.as_millis() as u64 || lease.open() > 0 {
                continue;
            }
            last.store(now_ms(), Ordering::SeqCst);
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let declared =
                link.channel
                    .queue_declare(queue.as_str().into(), passive, FieldTable::default());
            let ready = match tokio::time::timeout(SETUP_TIMEOUT, declared).await {
                Ok(Ok(q)) => q.message_count(),
                _ => continue,
            };
            if ready > 0 && !r.release.is_cancelled() {
                warn!(%target, partition, ready, "no delivery for 15 s beside ready changes; subscribing again");
                r.release.cancel();
            }
        }
    }

    /// The delivery queue consumers this instance should run now.
    fn desired(&self) -> HashMap<(String, u16), Desired> {
        let wanted = lock(&self.consuming.wanted);
        let live = lock(&self.consuming.members).live(&self.consuming.id, Instant::now());
        let topology = &self.topology;
        let mut desired = HashMap::new();
        for (i, target) in topology.push.iter().enumerate() {
            let Some(w) = wanted.get(target) else {
                continue;
            };
            let prefetch = w.prefetch.div_ceil(topology.partitions).max(1);
            for p in 0..topology.partitions {
                if owner(&live, i, p) == self.consuming.id {
                    let queue = topology.names.partition(target, p);
                    let tx = w.tx.clone();
                    let drain = true;
                    desired.insert(
                        (target.clone(), p),
                        Desired {
                            queue,
                            prefetch,
                            tx,
                            drain,
                        },
                    );
                }
            }
        }
        let owned = lock(&self.consuming.owned);
        for target in topology.pull.iter().filter(|t| owned.contains(*t)) {
            if let Some(w) = wanted.get(target) {
                let queue = topology.names.deliver(target);
                let (prefetch, tx) = (w.prefetch, w.tx.clone());
                // Only a lost connection ends serving an inbox: nothing of it can be settled.
                let drain = false;
                desired.insert(
                    (target.clone(), 0),
                    Desired {
                        queue,
                        prefetch,
                        tx,
                        drain,
                    },
                );
            }
        }
        desired
    }

    /// Consumes one delivery queue on a channel of its own.
    async fn start_partition(
        &self,
        conn: &Connection,
        (target, partition): &(String, u16),
        want: Desired,
        stop: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Running, BrokerError> {
        let ch = conn.create_channel().await.map_err(unavailable)?;
        ch.basic_qos(want.prefetch, BasicQosOptions::default())
            .await
            .map_err(unavailable)?;
        let consumer = ch
            .basic_consume(
                want.queue.as_str().into(),
                format!("lxbridge-{}-{target}-{partition}", self.consuming.id)
                    .as_str()
                    .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        let release = stop.child_token();
        let done = Arc::new(AtomicBool::new(false));
        let lease = Lease::new();
        let last = Arc::new(AtomicU64::new(now_ms()));
        let forward = Forward {
            target: target.clone(),
            partition: *partition,
            lease: lease.clone(),
            ledger: Default::default(),
            last: last.clone(),
            tx: want.tx,
            drain: want.drain,
        };
        tasks.spawn(forward.run(ch, consumer, release.clone(), stop.clone(), done.clone()));
        let watch = Some((want.queue, lease, last));
        Ok(Running {
            release,
            done,
            watch,
        })
    }

    /// Consumes a pull target's request queue: the first request makes this instance the
    /// inbox's server, until this consumer ends.
    async fn start_inbox(
        self: &Arc<Self>,
        conn: &Connection,
        target: &str,
        serve: mpsc::Sender<InboxCall>,
        stop: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Running, BrokerError> {
        let ch = conn.create_channel().await.map_err(unavailable)?;
        let tag = format!("lxbridge-{}-inbox-{target}", self.consuming.id);
        let requests = consume_no_ack(&ch, &self.topology.names.inbox(target), &tag).await?;
        let release = stop.child_token();
        let done = Arc::new(AtomicBool::new(false));
        let serving = self.clone().serve_requests(
            target.to_string(),
            (ch, requests),
            serve,
            release.clone(),
            done.clone(),
        );
        tasks.spawn(serving);
        Ok(Running {
            release,
            done,
            watch: None,
        })
    }
}

/// Publishes on the control channel, unconfirmed (an announcement or an answer that is lost
/// is made good by the next one, or by the asker's time-out).
pub(super) async fn publish_control(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    props: BasicProperties,
    body: &[u8],
) -> Result<(), lapin::Error> {
    ch.basic_publish(
        exchange.into(),
        routing_key.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .map(|_| ())
}

/// Announces this instance every [`BEAT`] until `stop`.
async fn announce(broker: Arc<RabbitBroker>, ctl: Channel, stop: CancellationToken) {
    let fanout = broker.topology.names.instances();
    loop {
        let beat = BasicProperties::default().with_type("beat".into());
        let sent = publish_control(&ctl, &fanout, "", beat, broker.consuming.id.as_bytes()).await;
        if let Err(e) = sent {
            debug!(error = %e, "could not announce this instance");
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(BEAT) => {}
        }
    }
}
