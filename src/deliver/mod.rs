//! Delivery: what happens to a change between its target's queue and the target, for push
//! targets ([`push`]: lxbridge POSTs batches) and pull targets ([`pull`]: the node polls its
//! inbox and confirms). [`Core`] is what both share: deciding each consumed change's fate
//! (superseded, a redelivery the target already has, or to send), reshaping it for the target
//! (mapping, script, references, remap, format), and settling the answer (delivery marks,
//! status and history, acks, retry/DLQ moves).
//!
//! Per-object order: for a push target a dispatcher hashes each change's ref to one of
//! `concurrency` lanes and a lane sends one batch at a time; a pull target hands out one
//! message at a time. Before sending, each change's seq is checked against the target's
//! delivery mark for its (source, type, ref): an older one is dropped as `superseded`, an
//! equal one (a redelivery of what the target already has) is acked without sending. Marks
//! are raised only after the target confirmed.
//!
//! Invariant: a message is acked only after the target answered for it, or after its move
//! to a retry step or the DLQ was confirmed by the broker.

use crate::broker::{reject_unreadable, Broker, Incoming};
use crate::copies;
use crate::group::Group;
use crate::metrics::TargetMetrics;
use crate::model::{OutgoingChange, StoredChange};
use crate::store::{HistoryEvent, MarkKey, Record, State, StatusUpdate, Store};
use crate::transform;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub mod marks;
pub mod preview;
pub mod pull;
pub mod push;
mod rest;
mod settle;
pub mod shape;
pub mod site;

pub use marks::SeenMarks;
pub use push::{announce, PushTarget};
pub(crate) use settle::{parse_answer, Answer};
pub(crate) use shape::Shaped;
pub use shape::{RouteShape, Shaping};

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// One consumed change on its way to the target, reshaped where the target needs it.
pub(crate) struct Item {
    pub message: Incoming,
    pub change: StoredChange,
    pub shaped: Option<Shaped>,
}

impl Item {
    pub fn unshaped((message, change): (Incoming, StoredChange)) -> Item {
        Item {
            message,
            change,
            shaped: None,
        }
    }

    /// The change as the target receives it (docs/api.md), reshaped where `shaped`.
    fn outgoing(&self) -> OutgoingChange<'_> {
        let (m, c) = (&self.message, &self.change);
        let mut out = OutgoingChange {
            id: &c.id,
            kind: &c.kind,
            reference: &c.reference,
            op: c.op,
            data: c.data.as_deref(),
            source: &c.source,
            seq: c.seq,
            attempt: m.attempt,
            target_ref: None,
        };
        if let Some(s) = &self.shaped {
            out.kind = &s.kind;
            out.reference = &s.reference;
            out.op = s.op;
            out.data = s.data.as_deref();
            out.target_ref = s.target_ref.as_deref();
        }
        out
    }
}

/// The changes of a batch as the target receives them.
pub(crate) fn outgoing(items: &[Item]) -> Vec<OutgoingChange<'_>> {
    items.iter().map(Item::outgoing).collect()
}

/// A batch on its way: the items to send, and what failed or was recorded on the way
/// (settled together with the target's answer by [`Core::settle`]).
#[derive(Default)]
pub(crate) struct Batch {
    pub items: Vec<Item>,
    pub failed: Vec<FailedChange>,
    pub records: Vec<Record>,
}

impl Batch {
    /// Sent items only (a pull target's confirmed message).
    pub fn of(items: Vec<Item>) -> Batch {
        Batch {
            items,
            ..Batch::default()
        }
    }
}

/// A change that failed, at the target or before sending.
pub(crate) struct FailedChange {
    message: Incoming,
    change: StoredChange,
    error: String,
    dead: bool,
    /// Its whole batch failed: retry it in a batch of its own.
    alone: bool,
    /// The history event: `failed`, or `waiting` for a missing reference.
    event: &'static str,
}

/// A failed change once its message went to the broker to be moved.
struct Moved {
    change: StoredChange,
    error: String,
    dead: bool,
    alone: bool,
    event: &'static str,
    attempt: u32,
}

impl FailedChange {
    fn split(self) -> (Incoming, Moved) {
        let attempt = self.message.attempt;
        let moved = Moved {
            change: self.change,
            error: self.error,
            dead: self.dead,
            alone: self.alone,
            event: self.event,
            attempt,
        };
        (self.message, moved)
    }
}

/// What push and pull delivery share for one target.
pub struct Core {
    pub name: String,
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn Store>,
    pub metrics: TargetMetrics,
    pub shaping: Shaping,
    /// The `[[group]]` this target is a member of.
    pub group: Option<Arc<Group>>,
    /// The delivery marks this process raised, kept beside the store's.
    pub seen: SeenMarks,
}

/// The object a change is about, as its source sees it.
fn object_of(c: &StoredChange) -> MarkKey<'_> {
    MarkKey {
        source: &c.source,
        kind: &c.kind,
        reference: &c.reference,
    }
}

/// What to do with a consumed change before sending.
enum Decision {
    Send,
    /// A newer change to the object is in the batch or was delivered.
    Superseded,
    /// The target already has exactly this change (a redelivery).
    AlreadyDelivered,
}

impl Core {
    /// Decides each change's fate (superseded and redelivered ones are settled here) and
    /// reshapes the rest for the target (filtered ones are settled here). `None` when
    /// cancelled while the store was away (nothing is acked then).
    pub(crate) async fn prepare(
        &self,
        batch: Vec<(Incoming, StoredChange)>,
        cancel: &CancellationToken,
    ) -> Option<Batch> {
        let decisions = self.decide(&batch, cancel).await?;
        let mut out = Batch::default();
        let mut send = Vec::with_capacity(batch.len());
        for ((message, change), decision) in batch.into_iter().zip(decisions) {
            match decision {
                Decision::Send => send.push((message, change)),
                Decision::Superseded => {
                    let why = "a newer change to this object was accepted";
                    out.records
                        .push(self.superseded(message, &change, why).await);
                }
                Decision::AlreadyDelivered => {
                    debug!(target = %self.name, "redelivered change already delivered; acking");
                    self.settle_ack(message).await;
                }
            }
        }
        // Parallel copies: only the group's current version of an object goes to a member.
        let send = self
            .current_versions(send, &mut out.records, cancel)
            .await?;
        let mut filtered = Vec::new();
        out.items = self
            .shape(send, &mut filtered, &mut out.failed, cancel)
            .await?;
        for (message, change, reason) in filtered {
            let attempt = message.attempt;
            let r = record(
                &change,
                &self.name,
                State::Filtered,
                attempt,
                None,
                "filtered",
                &reason,
            );
            out.records.push(r);
            self.metrics.filtered.inc();
            self.settle_ack(message).await;
        }
        Some(out)
    }

    /// Each change's fate from the batch and the marks: within the batch only the newest
    /// change per object is worth sending; one older than (or equal to) the target's mark
    /// is superseded (or already there).
    async fn decide(
        &self,
        batch: &[(Incoming, StoredChange)],
        cancel: &CancellationToken,
    ) -> Option<Vec<Decision>> {
        let mut newest: HashMap<MarkKey<'_>, i64> = HashMap::with_capacity(batch.len());
        for (_, c) in batch {
            let e = newest.entry(object_of(c)).or_insert(c.seq);
            *e = (*e).max(c.seq);
        }
        let keys: Vec<MarkKey<'_>> = newest.keys().copied().collect();
        let marks = self
            .until_store(cancel, || self.store.marks(&self.name, &keys))
            .await?; // None: unacked, redelivered after restart
                     // The store's marks, raised to what this process delivered (the store may have
                     // lost them).
        let marks = self.seen.merge(&keys, marks);
        let marks: HashMap<MarkKey<'_>, i64> = keys
            .iter()
            .zip(marks)
            .filter_map(|(k, m)| m.map(|m| (*k, m)))
            .collect();
        let decide = |c: &StoredChange| {
            let key = object_of(c);
            let mark = marks.get(&key).copied();
            if c.seq < newest[&key] || mark.is_some_and(|m| c.seq < m) {
                Decision::Superseded
            } else if mark == Some(c.seq) {
                Decision::AlreadyDelivered
            } else {
                Decision::Send
            }
        };
        Some(batch.iter().map(|(_, c)| decide(c)).collect())
    }

    /// For a group member, keeps the changes that are their object's current group version
    /// (see [`crate::copies::outbound`]); the others are acked and recorded as superseded.
    /// `None` when cancelled while the store was away.
    async fn current_versions(
        &self,
        send: Vec<(Incoming, StoredChange)>,
        records: &mut Vec<Record>,
        cancel: &CancellationToken,
    ) -> Option<Vec<(Incoming, StoredChange)>> {
        let Some(group) = &self.group else {
            return Some(send);
        };
        let changes: Vec<&StoredChange> = send.iter().map(|(_, c)| c).collect();
        let now = crate::clock::unix_ms_now();
        let behind = self
            .until_store(cancel, || {
                copies::outbound(self.store.as_ref(), group, &self.name, &changes, now)
            })
            .await?;
        let mut keep = Vec::with_capacity(send.len());
        for ((message, change), why) in send.into_iter().zip(behind) {
            match why {
                Some(why) => records.push(self.superseded(message, &change, &why).await),
                None => keep.push((message, change)),
            }
        }
        Some(keep)
    }

    /// For a group member, drops (acks and records) the items of a held batch that are no
    /// longer their object's current version: while the batch waited for its target, a
    /// newer version may have been accepted, and the member must not get the older one
    /// after it. Store trouble keeps the batch as it is.
    pub(crate) async fn group_recheck(&self, items: Vec<Item>) -> Vec<Item> {
        let Some(group) = &self.group else {
            return items;
        };
        let changes: Vec<&StoredChange> = items.iter().map(|i| &i.change).collect();
        let behind = match copies::still_current(self.store.as_ref(), group, &changes).await {
            Ok(behind) => behind,
            Err(e) => {
                warn!(target = %self.name, error = %e, "could not check a held batch against its group; sending it as it is");
                return items;
            }
        };
        let mut keep = Vec::with_capacity(items.len());
        let mut records = Vec::new();
        for (item, why) in items.into_iter().zip(behind) {
            match why {
                Some(why) => records.push(self.superseded(item.message, &item.change, &why).await),
                None => keep.push(item),
            }
        }
        self.write_records(records).await;
        keep
    }

    /// Remembers, for a group member, what it answered for (see [`crate::copies::answered`]).
    async fn group_answered(&self, answered: &[(&StoredChange, bool)]) {
        let Some(group) = &self.group else { return };
        let now = crate::clock::unix_ms_now();
        let result = copies::answered(self.store.as_ref(), group, &self.name, answered, now).await;
        if let Err(e) = result {
            warn!(target = %self.name, error = %e, "could not record group deliveries; a later change from this member may count as a conflict");
        }
    }

    /// Acks a change that won't be sent because a newer one replaces it; its record.
    async fn superseded(&self, message: Incoming, change: &StoredChange, why: &str) -> Record {
        let attempt = message.attempt;
        let r = record(
            change,
            &self.name,
            State::Superseded,
            attempt,
            None,
            "superseded",
            why,
        );
        self.metrics.superseded.inc();
        self.settle_ack(message).await;
        r
    }

    /// Calls the store until it answers: without it, order and references can't be checked,
    /// so the batch is held (unacked). `None` when cancelled meanwhile.
    async fn until_store<T, F, Fut>(&self, cancel: &CancellationToken, mut call: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::store::StoreError>>,
    {
        loop {
            match call().await {
                Ok(answer) => return Some(answer),
                Err(e) => {
                    warn!(target = %self.name, error = %e, "store unavailable; holding deliveries");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = cancel.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Reads a consumed message as a change; one that is not (it can never be delivered) is
    /// dead-lettered with the reason at once.
    pub(crate) async fn read(&self, message: Incoming) -> Option<(Incoming, StoredChange)> {
        if message.is_stale() {
            // Its consumer is gone; the broker gives it out again.
            return None;
        }
        match serde_json::from_slice(&message.body) {
            Ok(change) => Some((message, change)),
            Err(e) => {
                let why = format!("message is not an lxbridge change: {e}");
                warn!(target = %self.name, error = %why, "dead-lettering unreadable message");
                reject_unreadable(self.broker.as_ref(), message, &self.name, &why).await;
                None
            }
        }
    }

    /// The key match pair (`key:ИНН=…`) of a delivered change, if its type names a key.
    fn key_pair(&self, change: &StoredChange) -> Option<String> {
        let mapping = self.shaping.mapping_for(&change.source, &change.kind);
        mapping.key_field(&change.kind)?; // parse the data only for types with a key
        let data = serde_json::from_str(change.data.as_deref()?.get()).ok()?;
        let probe = transform::Change {
            id: String::new(),
            kind: change.kind.clone(),
            reference: change.reference.clone(),
            op: change.op,
            data: Some(data),
            source: change.source.clone(),
            seq: change.seq,
        };
        mapping.key_of(&probe).map(|k| format!("key:{k}"))
    }

    async fn settle_ack(&self, message: Incoming) {
        if let Err(e) = self.broker.ack(message).await {
            warn!(target = %self.name, error = %e, "ack failed; the change will be redelivered and recognised");
        }
    }

    async fn write_records(&self, records: Vec<Record>) {
        if let Err(e) = self.store.record(records).await {
            warn!(target = %self.name, error = %e, "could not record delivery status");
        }
    }
}

/// The status and history record of what delivery did with a change.
pub(crate) fn record(
    change: &StoredChange,
    target: &str,
    state: State,
    attempts: u32,
    error: Option<&str>,
    event: &str,
    detail: &str,
) -> Record {
    Record {
        reference: change.reference.clone(),
        statuses: vec![StatusUpdate {
            kind: change.kind.clone(),
            target: target.to_string(),
            source: change.source.clone(),
            seq: change.seq,
            state,
            attempts,
            last_error: error.map(String::from),
            revive: false,
        }],
        event: Some(HistoryEvent {
            at: crate::clock::rfc3339_now(),
            target: target.to_string(),
            event: event.to_string(),
            detail: detail.to_string(),
        }),
        mark: None,
    }
}
