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

use crate::broker::{reject_unreadable, Broker, Failure, Incoming};
use crate::config::{Format, MissingRefs};
use crate::metrics::TargetMetrics;
use crate::model::{Op, OutgoingChange, StoredChange};
use crate::store::{unix_ms_now, HistoryEvent, Mark, MarkKey, Record, State, StatusUpdate, Store};
use crate::transform::{self, Compiled, Outcome, Remap};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub mod pull;
pub mod push;

pub use push::{announce, PushTarget};

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Everything a target's delivery needs.
/// The changes of a batch as the target receives them (API.md), reshaped where `Shaped`.
pub(crate) fn outgoing(
    send: &[(Incoming, StoredChange, Option<Shaped>)],
) -> Vec<OutgoingChange<'_>> {
    send.iter()
        .map(|(m, c, shaped)| match shaped {
            None => OutgoingChange {
                id: &c.id,
                kind: &c.kind,
                reference: &c.reference,
                op: c.op,
                data: c.data.as_deref(),
                source: &c.source,
                seq: c.seq,
                attempt: m.attempt,
                target_ref: None,
            },
            Some(s) => OutgoingChange {
                id: &c.id,
                kind: &s.kind,
                reference: &s.reference,
                op: s.op,
                data: s.data.as_deref(),
                source: &c.source,
                seq: c.seq,
                attempt: m.attempt,
                target_ref: s.target_ref.as_deref(),
            },
        })
        .collect()
}

/// What push and pull delivery share for one target.
pub struct Core {
    pub name: String,
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn Store>,
    pub metrics: TargetMetrics,
    pub shaping: Shaping,
    /// The `[[group]]` this target is a member of.
    pub group: Option<Arc<crate::group::Group>>,
    /// The delivery marks this process raised, kept beside the store's.
    pub seen: SeenMarks,
}

/// The delivery marks a process raised for one target, kept in memory: after the store lost
/// its marks (Redis restarted empty, or an older replica took over), an older change coming
/// back from a retry step is still recognised as superseded by the newer one this process
/// delivered. The marks check uses the higher of the store's mark and this one. Bounded: at
/// most [`SeenMarks::MAX`] objects, forgotten all at once when full. It protects only what
/// this process delivered, so only while the same instance keeps serving the object.
#[derive(Default)]
pub struct SeenMarks {
    /// A hash of (source, type, ref) → the last seq the target confirmed. Hashed (SipHash,
    /// keyed per process) so a remembered object costs 16 bytes and no allocation; with
    /// 100,000 remembered, a new object shares a 64-bit hash with one of them with a chance
    /// of about 5 × 10^-15.
    marks: std::sync::Mutex<HashMap<u64, i64>>,
    keys: std::collections::hash_map::RandomState,
}

impl SeenMarks {
    /// Objects remembered at most.
    pub const MAX: usize = 100_000;

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, i64>> {
        // A panic while holding the lock can't leave the map inconsistent: use it as it is.
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, source: &str, kind: &str, reference: &str) -> u64 {
        use std::hash::BuildHasher;
        self.keys.hash_one((source, kind, reference))
    }

    /// Raises the mark of (source, type, ref) to `seq` (never lowers it).
    pub fn raise(&self, source: &str, kind: &str, reference: &str, seq: i64) {
        let key = self.key(source, kind, reference);
        let mut marks = self.lock();
        if let Some(m) = marks.get_mut(&key) {
            *m = (*m).max(seq);
            return;
        }
        if marks.len() >= Self::MAX {
            marks.clear();
        }
        marks.insert(key, seq);
    }

    /// The higher of `stored` (the store's mark) and the one remembered, per key.
    pub fn merge(&self, keys: &[MarkKey<'_>], stored: Vec<Option<i64>>) -> Vec<Option<i64>> {
        let hashed: Vec<u64> = keys
            .iter()
            .map(|k| self.key(k.source, k.kind, k.reference))
            .collect();
        let marks = self.lock();
        if marks.is_empty() {
            return stored;
        }
        hashed
            .iter()
            .zip(stored)
            .map(|(k, s)| match (s, marks.get(k).copied()) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            })
            .collect()
    }

    /// Objects remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A batch ready to hand to the target, with what was settled or failed on the way.
pub(crate) struct Prepared {
    pub send: Vec<(Incoming, StoredChange, Option<Shaped>)>,
    pub failed: Vec<FailedChange>,
    pub records: Vec<Record>,
}

impl Core {
    /// Decides each change's fate (superseded and redelivered ones are settled here) and
    /// reshapes the rest for the target (filtered ones are settled here). `None` when
    /// cancelled while the store was away (nothing is acked then).
    pub(crate) async fn prepare(
        &self,
        batch: Vec<(Incoming, StoredChange)>,
        cancel: &CancellationToken,
    ) -> Option<Prepared> {
        // Decide each change's fate from the batch and the marks before moving anything:
        // within the batch only the newest change per object is worth sending.
        let decisions: Vec<Decision> = {
            let mut newest: HashMap<ObjectKey<'_>, i64> = HashMap::with_capacity(batch.len());
            for (_, c) in &batch {
                let e = newest.entry(object_key(c)).or_insert(c.seq);
                *e = (*e).max(c.seq);
            }
            let keys: Vec<MarkKey<'_>> = newest
                .keys()
                .map(|&(source, kind, reference)| MarkKey {
                    source,
                    kind,
                    reference,
                })
                .collect();
            let Some(marks) = self
                .until_store(cancel, || self.store.marks(&self.name, &keys))
                .await
            else {
                return None; // unacked: redelivered after restart
            };
            // The store's marks, raised to what this process delivered (the store may have
            // lost them).
            let marks = self.seen.merge(&keys, marks);
            let marks: HashMap<ObjectKey<'_>, i64> = keys
                .iter()
                .zip(marks)
                .filter_map(|(k, m)| m.map(|m| ((k.source, k.kind, k.reference), m)))
                .collect();
            batch
                .iter()
                .map(|(_, c)| {
                    let key = object_key(c);
                    let mark = marks.get(&key).copied();
                    if c.seq < newest[&key] || mark.is_some_and(|m| c.seq < m) {
                        Decision::Superseded
                    } else if mark == Some(c.seq) {
                        Decision::AlreadyDelivered
                    } else {
                        Decision::Send
                    }
                })
                .collect()
        };
        let mut send = Vec::with_capacity(batch.len());
        let mut superseded = Vec::new();
        let mut already = Vec::new();
        for (item, decision) in batch.into_iter().zip(decisions) {
            match decision {
                Decision::Send => send.push(item),
                Decision::Superseded => superseded.push(item),
                Decision::AlreadyDelivered => already.push(item.0),
            }
        }

        let mut records = Vec::new();
        for (message, change) in superseded {
            records.push(
                self.superseded(
                    message,
                    &change,
                    "a newer change to this object was accepted",
                )
                .await,
            );
        }
        for message in already {
            debug!(target = %self.name, "redelivered change already delivered; acking");
            self.settle_ack(message).await;
        }
        // Parallel copies: only the group's current version of an object goes to a member.
        let send = match &self.group {
            Some(group) => {
                let (send, behind) = self.group_outbound(group, send, cancel).await?;
                for (message, change, why) in behind {
                    records.push(self.superseded(message, &change, &why).await);
                }
                send
            }
            None => send,
        };
        // Reshape for the target (mapping, script, references, remap, format).
        let mut failed: Vec<FailedChange> = Vec::new();
        let mut filtered = Vec::new();
        let Some(send) = self.shape(send, &mut filtered, &mut failed, cancel).await else {
            return None; // shutting down while the store was away: unacked, redelivered later
        };
        for (message, change, reason) in filtered {
            records.push(record(
                &change,
                &self.name,
                State::Filtered,
                message.attempt,
                None,
                "filtered",
                &reason,
            ));
            self.metrics.filtered.inc();
            self.settle_ack(message).await;
        }
        Some(Prepared {
            send,
            failed,
            records,
        })
    }

    /// Settles a batch by the target's answer (`Err`: the whole batch failed with that error):
    /// delivered changes get their marks and status before their acks; failed ones (and
    /// those `prepare` failed) move to their retry step or the DLQ.
    pub(crate) async fn settle(
        &self,
        send: Vec<(Incoming, StoredChange, Option<Shaped>)>,
        answer: Result<Answer, String>,
        mut failed: Vec<FailedChange>,
        mut records: Vec<Record>,
    ) {
        let now_ms = unix_ms_now();
        let mut delivered = Vec::with_capacity(send.len());
        let mut learned: Vec<(String, String, String)> = Vec::new();
        for (message, change, _) in send {
            let outcome = match &answer {
                Ok(a) => a
                    .errors
                    .get(change.id.as_str())
                    .map(|(e, retry)| (e.clone(), !retry)),
                Err(error) => Some((error.clone(), false)),
            };
            match outcome {
                None => {
                    if let Some(target_ref) = answer
                        .as_ref()
                        .ok()
                        .and_then(|a| a.target_refs.get(&change.id))
                    {
                        learned.push((
                            change.kind.clone(),
                            change.reference.clone(),
                            target_ref.clone(),
                        ));
                        if let Some(key) = self.key_pair(&change) {
                            learned.push((change.kind.clone(), key, target_ref.clone()));
                        }
                    }
                    delivered.push((message, change));
                }
                Some((error, dead)) => failed.push(FailedChange {
                    message,
                    change,
                    error,
                    dead,
                    alone: answer.is_err(),
                    event: "failed",
                }),
            }
        }
        if self.shaping.remap && !learned.is_empty() {
            let triples: Vec<(&str, &str, &str)> = learned
                .iter()
                .map(|(k, s, t)| (k.as_str(), s.as_str(), t.as_str()))
                .collect();
            if let Err(e) = self.store.remap_put(&self.name, &triples).await {
                warn!(target = %self.name, error = %e, "could not store target refs from the answer");
            }
        }
        // Marks go with the delivered status and are written before the acks, so a
        // redelivery of what the target already has is recognised.
        for (message, change) in &delivered {
            let attempt = message.attempt;
            let mut r = record(
                change,
                &self.name,
                State::Delivered,
                attempt,
                None,
                "delivered",
                &format!("attempt {attempt}"),
            );
            r.mark = Some(Mark {
                target: self.name.clone(),
                source: change.source.clone(),
                kind: change.kind.clone(),
                seq: change.seq,
            });
            self.seen
                .raise(&change.source, &change.kind, &change.reference, change.seq);
            records.push(r);
        }
        self.write_records(std::mem::take(&mut records)).await;
        if self.group.is_some() {
            let answered: Vec<(&StoredChange, bool)> = delivered
                .iter()
                .map(|(_, c)| (c, true))
                .chain(failed.iter().map(|f| (&f.change, false)))
                .collect();
            self.group_answered(&answered).await;
        }
        let acks = delivered.into_iter().map(|(message, change)| {
            self.metrics.ok.inc();
            self.metrics
                .end_to_end
                .observe((now_ms - change.accepted_ms).max(0) as f64 / 1000.0);
            self.settle_ack(message)
        });
        futures_util::future::join_all(acks).await;

        // Moves to retry/DLQ run side by side, so their confirms are waited for together.
        let mut messages = Vec::with_capacity(failed.len());
        let mut failures = Vec::with_capacity(failed.len());
        for f in failed {
            failures.push((
                f.change,
                f.error,
                f.dead,
                f.alone,
                f.event,
                f.message.attempt,
            ));
            messages.push(f.message);
        }
        let moves = messages.into_iter().zip(&failures).map(
            |(message, (change, error, dead, alone, _, _))| {
                let failure = Failure {
                    target: &self.name,
                    error,
                    dead: *dead,
                    alone: *alone,
                    source: &change.source,
                    kind: &change.kind,
                    reference: &change.reference,
                    now_ms,
                };
                self.broker.fail(message, failure)
            },
        );
        let results = futures_util::future::join_all(moves).await;
        for ((change, error, _, _, event, attempt), result) in failures.iter().zip(results) {
            records.push(record(
                change,
                &self.name,
                State::Retrying,
                *attempt,
                Some(error),
                event,
                error,
            ));
            match result {
                Ok(true) => {
                    self.metrics.dead.inc();
                    records.push(record(
                        change,
                        &self.name,
                        State::Dead,
                        *attempt,
                        Some(error),
                        "dead",
                        error,
                    ));
                }
                Ok(false) => self.metrics.retry.inc(),
                Err(e) => {
                    warn!(target = %self.name, error = %e, change_id = %change.id, "could not move a failed change to retry; it will be redelivered")
                }
            }
        }
        self.write_records(records).await;
    }
    /// Calls the store until it answers: without it, order and references can't be checked,
    /// so the batch is held (unacked). `None` when cancelled meanwhile.
    /// Splits a batch for a group member: the changes that are their object's current
    /// group version (their content is then remembered as sent, awaiting the echo) and those
    /// that are not, with why. `None` when cancelled while the store was away.
    #[allow(clippy::type_complexity)]
    async fn group_outbound(
        &self,
        group: &crate::group::Group,
        batch: Vec<(Incoming, StoredChange)>,
        cancel: &CancellationToken,
    ) -> Option<(
        Vec<(Incoming, StoredChange)>,
        Vec<(Incoming, StoredChange, String)>,
    )> {
        let mut keys = Vec::new();
        let mut hashes = Vec::new();
        let mut owners = Vec::new();
        for (i, (_, c)) in batch.iter().enumerate() {
            if !group.takes(&c.source, &c.kind) {
                continue;
            }
            let data: Option<Value> = c
                .data
                .as_deref()
                .and_then(|raw| serde_json::from_str(raw.get()).ok());
            keys.push(group.key(&c.kind, &c.reference));
            hashes.push(crate::group::content_hash(
                c.op == Op::Delete,
                data.as_ref(),
            ));
            owners.push(i);
        }
        if keys.is_empty() {
            return Some((batch, Vec::new()));
        }
        let now = unix_ms_now();
        let verdicts = self
            .until_store(cancel, || {
                crate::group::update(self.store.as_ref(), &keys, |j, state| {
                    let c = &batch[owners[j]].1;
                    crate::group::outbound(
                        state,
                        &crate::group::Outbound {
                            target: &self.name,
                            source: &c.source,
                            seq: c.seq,
                            hash: &hashes[j],
                            initial: c.initial,
                            at_ms: now,
                        },
                    )
                })
            })
            .await?;
        let mut why: Vec<Option<String>> = vec![None; batch.len()];
        for (j, verdict) in verdicts.into_iter().enumerate() {
            if let Err(reason) = verdict {
                why[owners[j]] = Some(reason);
            }
        }
        let mut send = Vec::with_capacity(batch.len());
        let mut behind = Vec::new();
        for ((message, change), why) in batch.into_iter().zip(why) {
            match why {
                Some(reason) => behind.push((message, change, reason)),
                None => send.push((message, change)),
            }
        }
        Some((send, behind))
    }

    /// For a group member, drops (acks and records) the changes of a held batch that are no
    /// longer their object's current version: while the batch waited for its target, a
    /// newer version may have been accepted, and the member must not get the older one
    /// after it. Store trouble keeps the batch as it is.
    pub(crate) async fn group_recheck(
        &self,
        send: Vec<(Incoming, StoredChange, Option<Shaped>)>,
    ) -> Vec<(Incoming, StoredChange, Option<Shaped>)> {
        let Some(group) = &self.group else {
            return send;
        };
        let keys: Vec<String> = send
            .iter()
            .filter(|(_, c, _)| group.takes(&c.source, &c.kind))
            .map(|(_, c, _)| group.key(&c.kind, &c.reference))
            .collect();
        if keys.is_empty() {
            return send;
        }
        let states = match self.store.group_load(&keys).await {
            Ok(states) => states,
            Err(e) => {
                warn!(target = %self.name, error = %e, "could not check a held batch against its group; sending it as it is");
                return send;
            }
        };
        let mut states = states.into_iter();
        let mut keep = Vec::with_capacity(send.len());
        let mut records = Vec::new();
        for (message, change, shaped) in send {
            if !group.takes(&change.source, &change.kind) {
                keep.push((message, change, shaped));
                continue;
            }
            let state = crate::group::ObjectState::parse(states.next().flatten().as_deref());
            match crate::group::still_current(&state, &change.source, change.seq, change.initial) {
                Ok(()) => keep.push((message, change, shaped)),
                Err(why) => records.push(self.superseded(message, &change, &why).await),
            }
        }
        self.write_records(records).await;
        keep
    }

    /// Acks a change that won't be sent because a newer one replaces it; its record.
    async fn superseded(&self, message: Incoming, change: &StoredChange, why: &str) -> Record {
        let r = record(
            change,
            &self.name,
            State::Superseded,
            message.attempt,
            None,
            "superseded",
            why,
        );
        self.metrics.superseded.inc();
        self.settle_ack(message).await;
        r
    }

    /// Remembers, for a group member, which changes it answered for and the versions it
    /// confirmed (and when): a change it writes later follows them instead of conflicting
    /// with them.
    async fn group_answered(&self, answered: &[(&StoredChange, bool)]) {
        let Some(group) = &self.group else { return };
        let taken: Vec<&(&StoredChange, bool)> = answered
            .iter()
            .filter(|(c, _)| group.takes(&c.source, &c.kind))
            .collect();
        if taken.is_empty() {
            return;
        }
        let keys: Vec<String> = taken
            .iter()
            .map(|(c, _)| group.key(&c.kind, &c.reference))
            .collect();
        let now = unix_ms_now();
        let result = crate::group::update(self.store.as_ref(), &keys, |j, state| {
            let (c, ok) = taken[j];
            crate::group::delivered(state, &self.name, &c.source, c.seq, now, *ok)
        })
        .await;
        if let Err(e) = result {
            warn!(target = %self.name, error = %e, "could not record group deliveries; a later change from this member may count as a conflict");
        }
    }

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
        let mapping = self.mapping_for(&change.source, &change.kind);
        mapping.key_field(&change.kind)?; // parse the data only for types with a key
        let data: Value = serde_json::from_str(change.data.as_deref()?.get()).ok()?;
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

    /// The route that brings `kind` from `source` to this target.
    fn route_for(&self, source: &str, kind: &str) -> Option<&RouteShape> {
        self.shaping.routes.iter().find(|r| {
            r.source == source
                && r.patterns
                    .iter()
                    .any(|p| crate::route::topic_matches(p, kind))
        })
    }

    /// True when a route brings `kind` from `source` to this target.
    fn routed(&self, source: &str, kind: &str) -> bool {
        self.route_for(source, kind).is_some()
    }

    /// The mapping of the route that brings `kind` from `source` to this target.
    fn mapping_for(&self, source: &str, kind: &str) -> Arc<Compiled> {
        self.route_for(source, kind)
            .map(|r| r.mapping.clone())
            .unwrap_or_else(|| self.shaping.identity.clone())
    }

    /// Reshapes changes for the target: route mapping and script, 1C XDTO format, reference
    /// analysis (`missing_refs = "wait"`: a change whose references never reached the target
    /// waits; referenced objects in the batch go first) and remapping. Filtered and failed
    /// changes are handed back; `None` when cancelled while the store was away.
    async fn shape(
        &self,
        send: Vec<(Incoming, StoredChange)>,
        filtered: &mut Vec<(Incoming, StoredChange, String)>,
        failed: &mut Vec<FailedChange>,
        cancel: &CancellationToken,
    ) -> Option<Vec<(Incoming, StoredChange, Option<Shaped>)>> {
        if !self.shaping.needed {
            return Some(send.into_iter().map(|(m, c)| (m, c, None)).collect());
        }
        let wait = self.shaping.missing_refs == MissingRefs::Wait;
        let mut items = Vec::with_capacity(send.len());
        for (message, stored) in send {
            let data = match stored
                .data
                .as_deref()
                .map(|raw| serde_json::from_str::<Value>(raw.get()))
            {
                None => None,
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => {
                    let error = format!("data is not JSON: {e}");
                    failed.push(FailedChange {
                        message,
                        change: stored,
                        error,
                        dead: true,
                        alone: false,
                        event: "failed",
                    });
                    continue;
                }
            };
            let mapping = self.mapping_for(&stored.source, &stored.kind);
            let change = transform::Change {
                id: stored.id.clone(),
                kind: stored.kind.clone(),
                reference: stored.reference.clone(),
                op: stored.op,
                data,
                source: stored.source.clone(),
                seq: stored.seq,
            };
            let refs = if wait || self.shaping.remap {
                mapping.references(&change)
            } else {
                Vec::new()
            };
            let key = if self.shaping.remap {
                mapping.key_of(&change).map(|k| format!("key:{k}"))
            } else {
                None
            };
            items.push(ShapeItem {
                message,
                stored,
                change,
                mapping,
                refs,
                key,
            });
        }

        // Referenced objects first, so the target has them before what refers to them.
        let in_batch: HashSet<(String, String)> = items
            .iter()
            .map(|i| (i.stored.kind.clone(), i.stored.reference.clone()))
            .collect();
        let referenced: HashSet<(String, String)> = items
            .iter()
            .flat_map(|i| i.refs.iter().map(|r| (r.kind.clone(), r.reference.clone())))
            .filter(|k| in_batch.contains(k))
            .collect();
        items.sort_by_key(|i| {
            !referenced.contains(&(i.stored.kind.clone(), i.stored.reference.clone()))
        });

        // With `missing_refs = "wait"`: which references the target already has. Only
        // references to types routed from the same source to this target count (anything
        // else would never arrive and wait forever).
        let mut present: Option<HashSet<(String, String, String)>> = None;
        if wait {
            for item in &mut items {
                let source = item.stored.source.clone();
                item.refs.retain(|r| self.routed(&source, &r.kind));
            }
            let keys: Vec<(String, String, String)> = items
                .iter()
                .flat_map(|i| {
                    i.refs
                        .iter()
                        .map(|r| (i.stored.source.clone(), r.kind.clone(), r.reference.clone()))
                })
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let mark_keys: Vec<MarkKey<'_>> = keys
                .iter()
                .map(|(s, k, r)| MarkKey {
                    source: s,
                    kind: k,
                    reference: r,
                })
                .collect();
            let Some(marks) = self
                .until_store(cancel, || self.store.marks(&self.name, &mark_keys))
                .await
            else {
                return None; // unacked: redelivered after restart
            };
            present = Some(
                keys.iter()
                    .zip(marks)
                    .filter(|(_, m)| m.is_some())
                    .map(|(k, _)| k.clone())
                    .collect(),
            );
        }

        let mut remap: Remap = if self.shaping.remap {
            let pairs: Vec<(String, String)> = items
                .iter()
                .flat_map(|i| {
                    i.refs
                        .iter()
                        .map(|r| (r.kind.clone(), r.reference.clone()))
                        .chain(std::iter::once((
                            i.stored.kind.clone(),
                            i.stored.reference.clone(),
                        )))
                        .chain(i.key.iter().map(|k| (i.stored.kind.clone(), k.clone())))
                })
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let borrowed: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, r)| (k.as_str(), r.as_str()))
                .collect();
            let Some(found) = self
                .until_store(cancel, || self.store.remap_get(&self.name, &borrowed))
                .await
            else {
                return None; // unacked: redelivered after restart
            };
            pairs
                .into_iter()
                .zip(found)
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect()
        } else {
            Remap::new()
        };
        // The key match rule: an object the target doesn't know by ref, but whose key value
        // it knows from another object, takes that target ref (remembered from now on).
        let mut matched: Vec<(String, String, String)> = Vec::new();
        for item in &items {
            let own = (item.stored.kind.clone(), item.stored.reference.clone());
            let Some(key) = &item.key else { continue };
            if remap.contains_key(&own) {
                continue;
            }
            if let Some(target_ref) = remap.get(&(own.0.clone(), key.clone())).cloned() {
                matched.push((own.0.clone(), own.1.clone(), target_ref.clone()));
                remap.insert(own, target_ref);
            }
        }
        if !matched.is_empty() {
            let triples: Vec<(&str, &str, &str)> = matched
                .iter()
                .map(|(k, s, t)| (k.as_str(), s.as_str(), t.as_str()))
                .collect();
            if let Err(e) = self.store.remap_put(&self.name, &triples).await {
                warn!(target = %self.name, error = %e, "could not store key-matched target refs");
            }
        }

        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let target_ref = remap
                .get(&(item.stored.kind.clone(), item.stored.reference.clone()))
                .cloned();
            match item.mapping.apply(item.change, &remap) {
                Outcome::Deliver(c) => {
                    // A change to deliver waits for references the target doesn't have yet
                    // (delivered before, or earlier in this batch).
                    if let Some(present) = present.as_mut() {
                        let source = &item.stored.source;
                        let missing: Vec<String> = item
                            .refs
                            .iter()
                            .filter(|r| {
                                !present.contains(&(
                                    source.clone(),
                                    r.kind.clone(),
                                    r.reference.clone(),
                                ))
                            })
                            .map(|r| format!("{} {}", r.kind, r.reference))
                            .collect();
                        if !missing.is_empty() {
                            failed.push(FailedChange {
                                message: item.message,
                                change: item.stored,
                                error: format!("missing reference {}", missing.join(", ")),
                                dead: false,
                                alone: false,
                                event: "waiting",
                            });
                            continue;
                        }
                        present.insert((
                            source.clone(),
                            item.stored.kind.clone(),
                            item.stored.reference.clone(),
                        ));
                    }
                    let data = match self.shaping.format {
                        Format::Lxbridge => c.data.clone(),
                        Format::Xdto => Some(transform::to_xdto(&c)),
                    };
                    let data = data.map(|d| {
                        serde_json::value::to_raw_value(&d).expect("JSON values serialise")
                    });
                    let shaped = Shaped {
                        kind: c.kind,
                        reference: c.reference,
                        op: c.op,
                        data,
                        target_ref,
                    };
                    out.push((item.message, item.stored, Some(shaped)));
                }
                Outcome::Filtered(reason) => filtered.push((item.message, item.stored, reason)),
                Outcome::Failed(error) => failed.push(FailedChange {
                    message: item.message,
                    change: item.stored,
                    error,
                    dead: false,
                    alone: false,
                    event: "failed",
                }),
            }
        }
        Some(out)
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

/// The target's optional per-change results.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    /// Ids the target reported in error → (error, retry).
    errors: HashMap<String, (String, bool)>,
    /// Ids delivered with the target's own ref for the object (for remapping).
    target_refs: HashMap<String, String>,
}

pub(crate) fn parse_answer(body: &[u8]) -> Answer {
    #[derive(Deserialize)]
    struct Wire {
        #[serde(default)]
        results: Vec<ChangeResult>,
    }
    #[derive(Deserialize)]
    struct ChangeResult {
        id: String,
        #[serde(default)]
        status: String,
        #[serde(default)]
        error: Option<String>,
        #[serde(default = "yes")]
        retry: bool,
        #[serde(default)]
        target_ref: Option<String>,
    }
    fn yes() -> bool {
        true
    }
    let Ok(wire) = serde_json::from_slice::<Wire>(body) else {
        return Answer::default();
    };
    let mut answer = Answer::default();
    for r in wire.results {
        if r.status == "error" {
            let error = r
                .error
                .unwrap_or_else(|| "target reported an error without a message".into());
            answer.errors.insert(r.id, (error, r.retry));
        } else if let Some(target_ref) = r.target_ref.filter(|t| !t.is_empty()) {
            answer.target_refs.insert(r.id, target_ref);
        }
    }
    answer
}
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
            at: crate::store::rfc3339_now(),
            target: target.to_string(),
            event: event.to_string(),
            detail: detail.to_string(),
        }),
        mark: None,
    }
}
/// A change reshaped for its target by the route mapping, format and remap.
pub(crate) struct Shaped {
    kind: String,
    reference: String,
    op: Op,
    data: Option<Box<RawValue>>,
    target_ref: Option<String>,
}

/// A change on its way through `shape`.
pub(crate) struct ShapeItem {
    message: Incoming,
    stored: StoredChange,
    change: transform::Change,
    mapping: Arc<Compiled>,
    refs: Vec<transform::Reference>,
    /// The key match pair (`key:ИНН=…`) when remapping and the type names a key.
    key: Option<String>,
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

/// How this target's changes are reshaped, from the routes to it and its deliver config.
pub struct Shaping {
    pub routes: Vec<RouteShape>,
    pub identity: Arc<Compiled>,
    pub format: Format,
    pub missing_refs: MissingRefs,
    pub remap: bool,
    /// False when nothing reshapes (the zero-copy path).
    pub needed: bool,
}

/// One route into this target.
pub struct RouteShape {
    pub source: String,
    /// Topic patterns of the route's types.
    pub patterns: Vec<String>,
    pub mapping: Arc<Compiled>,
}

/// An object as one source sees it: (source, type, ref).
type ObjectKey<'a> = (&'a str, &'a str, &'a str);

fn object_key(c: &StoredChange) -> ObjectKey<'_> {
    (&c.source, &c.kind, &c.reference)
}

/// What to do with a consumed change before sending.
enum Decision {
    Send,
    /// A newer change to the object is in the batch or was delivered.
    Superseded,
    /// The target already has exactly this change (a redelivery).
    AlreadyDelivered,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_marks_raise_only_merge_the_higher_and_stay_bounded() {
        let seen = SeenMarks::default();
        let key = |reference| MarkKey {
            source: "central",
            kind: "Catalog.X",
            reference,
        };
        let keys = [key("a"), key("b"), key("c")];
        // Nothing remembered: the store's marks as they are.
        assert_eq!(
            seen.merge(&keys, vec![Some(5), None, None]),
            [Some(5), None, None]
        );
        seen.raise("central", "Catalog.X", "a", 7);
        seen.raise("central", "Catalog.X", "a", 3); // never lowered
        seen.raise("central", "Catalog.X", "b", 9);
        seen.raise("shop", "Catalog.X", "c", 9); // another source: another object
        assert_eq!(
            seen.merge(&keys, vec![Some(5), Some(12), None]),
            [Some(7), Some(12), None],
            "the higher of store and memory; the store lost a's mark, not c's"
        );
        assert_eq!(
            seen.merge(&keys, vec![None, None, None]),
            [Some(7), Some(9), None]
        );
        // Bounded: full, it forgets everything before remembering more.
        for i in 0..SeenMarks::MAX {
            seen.raise("central", "Catalog.Y", &i.to_string(), 1);
        }
        assert!(seen.len() <= SeenMarks::MAX);
        assert_eq!(seen.merge(&keys[..1], vec![None]), [None]);
    }

    #[test]
    fn per_change_results() {
        let body = br#"{"results": [{"id": "a", "status": "ok", "target_ref": "t-1"}, {"id": "b", "status": "error", "error": "bad", "retry": false}, {"id": "c", "status": "error", "error": "later"}]}"#;
        let r = parse_answer(body);
        assert_eq!(r.errors.len(), 2);
        assert_eq!(r.errors["b"], ("bad".to_string(), false));
        assert_eq!(r.errors["c"], ("later".to_string(), true));
        assert_eq!(r.target_refs["a"], "t-1");
        assert!(parse_answer(b"").errors.is_empty());
        assert!(parse_answer(b"OK").errors.is_empty());
    }
}
