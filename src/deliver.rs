//! Push delivery: consumes a target's queue and POSTs batches of changes to the target
//! (API.md "Delivering to a push node"), then settles each change by the answer.
//!
//! Per-object order: a dispatcher hashes each change's ref to one of `concurrency` lanes;
//! a lane sends one batch at a time, so changes to one object leave in queue order. Before
//! sending, each change's seq is checked against the target's delivery mark for its ref:
//! an older one is dropped as `superseded`, an equal one (a redelivery of what the target
//! already has) is acked without sending. Marks are raised only after the target said ok.
//!
//! Invariant: a message is acked only after the target answered for it, or after its move
//! to a retry step or the DLQ was confirmed by the broker.

use crate::broker::{reject_unreadable, Broker, Failure, Incoming};
use crate::config::{Auth, DeliverConfig, Format, MissingRefs};
use crate::metrics::TargetMetrics;
use crate::model::{Op, OutgoingChange, StoredChange};
use crate::store::{unix_ms_now, HistoryEvent, Mark, MarkKey, Record, State, StatusUpdate, Store};
use crate::transform::{self, Compiled, Outcome, Remap};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Everything a target's delivery needs.
pub struct PushTarget {
    pub name: String,
    pub url: String,
    pub auth: Option<Auth>,
    pub batch_max: usize,
    pub timeout: Duration,
    pub gzip: bool,
    pub concurrency: usize,
    pub client: reqwest::Client,
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn Store>,
    pub metrics: TargetMetrics,
    breaker: Breaker,
    shaping: Shaping,
}

impl PushTarget {
    pub fn new(
        name: &str,
        d: &DeliverConfig,
        broker: Arc<dyn Broker>,
        store: Arc<dyn Store>,
        metrics: TargetMetrics,
        shaping: Shaping,
    ) -> Result<PushTarget, DeliverError> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(d.concurrency)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| DeliverError::Client(e.to_string()))?;
        Ok(PushTarget {
            name: name.to_string(),
            url: d.url.clone().unwrap_or_default(),
            auth: d.auth.clone(),
            batch_max: d.batch_max,
            timeout: d.timeout.0,
            gzip: d.gzip,
            concurrency: d.concurrency,
            client,
            broker,
            store,
            breaker: Breaker::new(metrics.breaker_open.clone()),
            metrics,
            shaping,
        })
    }

    /// Prefetch for this target's consumer: enough to keep every lane's next batch ready.
    fn prefetch(&self) -> u16 {
        (self.batch_max * self.concurrency * 2).clamp(1, 10_000) as u16
    }

    /// Starts the dispatcher and lanes on `tracker`; they stop after `cancel`, finishing
    /// the batch each lane has in flight.
    pub fn start(self, cancel: CancellationToken, tracker: &TaskTracker) {
        let target = Arc::new(self);
        let mut incoming = target.broker.consume(&target.name, target.prefetch());
        let mut lanes = Vec::with_capacity(target.concurrency);
        for lane in 0..target.concurrency {
            let (tx, rx) = mpsc::channel::<(Incoming, StoredChange)>(target.batch_max);
            lanes.push(tx);
            tracker.spawn(target.clone().lane(lane, rx, cancel.clone()));
        }
        let t = target.clone();
        tracker.spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = cancel.cancelled() => break,
                    m = incoming.recv() => match m { Some(m) => m, None => break },
                };
                let change: StoredChange = match serde_json::from_slice(&message.body) {
                    Ok(c) => c,
                    Err(e) => {
                        let why = format!("message is not an lxbridge change: {e}");
                        warn!(target = %t.name, error = %why, "dead-lettering unreadable message");
                        reject_unreadable(t.broker.as_ref(), message, &t.name, &why).await;
                        continue;
                    }
                };
                let mut h = std::collections::hash_map::DefaultHasher::new();
                change.reference.hash(&mut h);
                let lane = (h.finish() % lanes.len() as u64) as usize;
                if lanes[lane].send((message, change)).await.is_err() {
                    break;
                }
            }
            debug!(target = %t.name, "dispatcher stopped");
        });
    }

    async fn lane(
        self: Arc<Self>,
        lane: usize,
        mut rx: mpsc::Receiver<(Incoming, StoredChange)>,
        cancel: CancellationToken,
    ) {
        // A change whose whole batch failed is retried alone, so a change the target can't
        // take (one that fails its whole batch) can't take the changes beside it down with it.
        let mut next: Option<(Incoming, StoredChange)> = None;
        loop {
            let first = match next.take() {
                Some(m) => m,
                None => tokio::select! {
                    _ = cancel.cancelled() => break,
                    m = rx.recv() => match m { Some(m) => m, None => break },
                },
            };
            let alone = first.0.alone;
            let mut batch = vec![first];
            while !alone && batch.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(m) if m.0.alone => {
                        next = Some(m);
                        break;
                    }
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            self.deliver_batch(batch, &cancel).await;
            if cancel.is_cancelled() {
                break;
            }
        }
        debug!(target = %self.name, lane, "lane stopped");
    }

    /// Delivers one batch and settles every message in it.
    async fn deliver_batch(
        &self,
        batch: Vec<(Incoming, StoredChange)>,
        cancel: &CancellationToken,
    ) {
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
            let marks = loop {
                match self.store.marks(&self.name, &keys).await {
                    Ok(m) => break m,
                    Err(e) => {
                        // Without marks, order can't be checked: hold the batch until the store is back.
                        warn!(target = %self.name, error = %e, "store unavailable; holding deliveries");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = cancel.cancelled() => return, // unacked: redelivered after restart
                        }
                    }
                }
            };
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
            records.push(record(
                &change,
                &self.name,
                State::Superseded,
                message.attempt,
                None,
                "superseded",
                "a newer change to this object was accepted",
            ));
            self.metrics.superseded.inc();
            self.settle_ack(message).await;
        }
        for message in already {
            debug!(target = %self.name, "redelivered change already delivered; acking");
            self.settle_ack(message).await;
        }
        // Reshape for the target (mapping, script, references, remap, format).
        let mut failed: Vec<FailedChange> = Vec::new();
        let mut filtered = Vec::new();
        let Some(send) = self.shape(send, &mut filtered, &mut failed, cancel).await else {
            return; // shutting down while the store was away: unacked, redelivered later
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

        // Send; while the breaker says the target is down, hold the batch and try again
        // (a held batch uses no retry step, so an outage does not walk changes to the DLQ).
        let answer = if send.is_empty() {
            Ok(Answer::default())
        } else {
            loop {
                let Some(probe) = self.breaker.admit(cancel).await else {
                    return; // shutting down: unacked, redelivered after restart
                };
                self.metrics.inflight.add(send.len() as i64);
                let started = Instant::now();
                let answer = self.post(&send).await;
                self.metrics
                    .duration
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.inflight.sub(send.len() as i64);
                match answer {
                    Err(SendError::Unreachable(e)) => {
                        if self.breaker.unreachable(probe, &self.name, &e) {
                            continue;
                        }
                        break Err(e);
                    }
                    Err(SendError::Refused(e)) => {
                        self.breaker.reachable(probe, &self.name);
                        break Err(e);
                    }
                    Ok(answer) => {
                        self.breaker.reachable(probe, &self.name);
                        break Ok(answer);
                    }
                }
            }
        };

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
            records.push(r);
        }
        self.write_records(std::mem::take(&mut records)).await;
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

    /// The mapping of the route that brings `kind` from `source` to this target.
    fn mapping_for(&self, source: &str, kind: &str) -> Arc<Compiled> {
        self.shaping
            .routes
            .iter()
            .find(|r| {
                r.source == source
                    && r.patterns
                        .iter()
                        .any(|p| crate::route::topic_matches(p, kind))
            })
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
            items.push(ShapeItem {
                message,
                stored,
                change,
                mapping,
                refs,
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

        if wait {
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
            let marks = loop {
                match self.store.marks(&self.name, &mark_keys).await {
                    Ok(m) => break m,
                    Err(e) => {
                        warn!(target = %self.name, error = %e, "store unavailable; holding deliveries");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = cancel.cancelled() => return None,
                        }
                    }
                }
            };
            let mut present: HashSet<(String, String, String)> = keys
                .iter()
                .zip(marks)
                .filter(|(_, m)| m.is_some())
                .map(|(k, _)| k.clone())
                .collect();
            let mut kept = Vec::with_capacity(items.len());
            for item in items {
                let missing: Vec<String> = item
                    .refs
                    .iter()
                    .filter(|r| {
                        !present.contains(&(
                            item.stored.source.clone(),
                            r.kind.clone(),
                            r.reference.clone(),
                        ))
                    })
                    .map(|r| format!("{} {}", r.kind, r.reference))
                    .collect();
                if missing.is_empty() {
                    present.insert((
                        item.stored.source.clone(),
                        item.stored.kind.clone(),
                        item.stored.reference.clone(),
                    ));
                    kept.push(item);
                } else {
                    let error = format!("missing reference {}", missing.join(", "));
                    failed.push(FailedChange {
                        message: item.message,
                        change: item.stored,
                        error,
                        dead: false,
                        alone: false,
                        event: "waiting",
                    });
                }
            }
            items = kept;
        }

        let remap: Remap = if self.shaping.remap {
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
                })
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let borrowed: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, r)| (k.as_str(), r.as_str()))
                .collect();
            let found = loop {
                match self.store.remap_get(&self.name, &borrowed).await {
                    Ok(found) => break found,
                    Err(e) => {
                        warn!(target = %self.name, error = %e, "store unavailable; holding deliveries");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = cancel.cancelled() => return None,
                        }
                    }
                }
            };
            pairs
                .into_iter()
                .zip(found)
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect()
        } else {
            Remap::new()
        };

        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let target_ref = remap
                .get(&(item.stored.kind.clone(), item.stored.reference.clone()))
                .cloned();
            match item.mapping.apply(item.change, &remap) {
                Outcome::Deliver(c) => {
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

    /// POSTs the batch. `Ok` maps the ids the target reported in error to (error, retry);
    /// `Err` is a whole-batch failure (transport, timeout, non-2xx).
    async fn post(
        &self,
        send: &[(Incoming, StoredChange, Option<Shaped>)],
    ) -> Result<Answer, SendError> {
        #[derive(Serialize)]
        struct Body<'a> {
            node: &'a str,
            changes: Vec<OutgoingChange<'a>>,
        }
        let body = Body {
            node: &self.name,
            changes: send
                .iter()
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
                .collect(),
        };
        let json = serde_json::to_vec(&body).expect("delivery body serialises");
        let mut request = self
            .client
            .post(&self.url)
            .timeout(self.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        let payload = if self.gzip {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(json.len() / 4),
                flate2::Compression::fast(),
            );
            enc.write_all(&json).expect("writing to a Vec");
            request = request.header(reqwest::header::CONTENT_ENCODING, "gzip");
            enc.finish().expect("finishing a Vec")
        } else {
            json
        };
        request = match &self.auth {
            Some(Auth::Bearer(token)) => request.bearer_auth(token),
            Some(Auth::Basic { user, password }) => request.basic_auth(user, Some(password)),
            None => request,
        };
        let unreachable = |e: reqwest::Error| SendError::Unreachable(describe(&e, self.timeout));
        let response = request.body(payload).send().await.map_err(unreachable)?;
        let status = response.status();
        let text = response.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let snippet = String::from_utf8_lossy(&text[..text.len().min(300)]).into_owned();
            let error = format!("target answered HTTP {}: {snippet}", status.as_u16());
            // A gateway in front of a target that is down, or a target asking for air.
            return Err(match status.as_u16() {
                429 | 502 | 503 | 504 => SendError::Unreachable(error),
                _ => SendError::Refused(error),
            });
        }
        Ok(parse_answer(&text))
    }
}

/// Why a whole batch failed.
enum SendError {
    /// The target could not be reached or is unavailable: counts toward the breaker.
    Unreachable(String),
    /// The target answered, but not 2xx: the batch goes to its retry step.
    Refused(String),
}

/// A circuit breaker per target: after `THRESHOLD` unreachable answers in a row it opens;
/// while open, lanes wait; after a cool-down (1 s doubling to 30 s) one lane probes with its
/// batch; a reachable answer closes it.
pub struct Breaker {
    state: std::sync::Mutex<BreakerState>,
    gauge: prometheus::IntGauge,
}

#[derive(Default)]
struct BreakerState {
    failures: u32,
    open: bool,
    probing: bool,
    until: Option<Instant>,
    cooldown: Duration,
}

impl Breaker {
    const THRESHOLD: u32 = 5;
    const FIRST_COOLDOWN: Duration = Duration::from_secs(1);
    const MAX_COOLDOWN: Duration = Duration::from_secs(30);

    pub fn new(gauge: prometheus::IntGauge) -> Breaker {
        gauge.set(0);
        Breaker {
            state: std::sync::Mutex::new(BreakerState::default()),
            gauge,
        }
    }

    /// Waits until a batch may be sent; `Some(true)` when it is the half-open probe,
    /// `None` when cancelled.
    async fn admit(&self, cancel: &CancellationToken) -> Option<bool> {
        loop {
            let wait = {
                let mut s = self.state.lock().expect("breaker lock");
                if !s.open {
                    return Some(false);
                }
                let now = Instant::now();
                match s.until {
                    Some(until) if now < until => until - now,
                    _ if s.probing => Duration::from_millis(50),
                    _ => {
                        s.probing = true;
                        return Some(true);
                    }
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(wait.min(Duration::from_millis(500))) => {}
            }
        }
    }

    fn reachable(&self, probe: bool, target: &str) {
        let mut s = self.state.lock().expect("breaker lock");
        s.failures = 0;
        if s.open && (probe || !s.probing) {
            *s = BreakerState::default();
            self.gauge.set(0);
            info!(%target, "target answers again; breaker closed");
        }
    }

    /// Records an unreachable answer; true means hold the batch and send it again later.
    fn unreachable(&self, probe: bool, target: &str, error: &str) -> bool {
        let mut s = self.state.lock().expect("breaker lock");
        if probe {
            s.probing = false;
            s.cooldown = (s.cooldown * 2).min(Self::MAX_COOLDOWN);
            s.until = Some(Instant::now() + s.cooldown);
            return true;
        }
        if s.open {
            return true;
        }
        s.failures += 1;
        if s.failures < Self::THRESHOLD {
            return false;
        }
        s.open = true;
        s.cooldown = Self::FIRST_COOLDOWN;
        s.until = Some(Instant::now() + s.cooldown);
        self.gauge.set(1);
        warn!(%target, %error, "target unreachable {} times in a row; breaker open, deliveries paused", Self::THRESHOLD);
        true
    }
}

fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        format!("target did not answer within {}s", timeout.as_secs_f64())
    } else if e.is_connect() {
        format!("cannot connect to target: {}", root_cause(e))
    } else {
        format!("HTTP request failed: {}", root_cause(e))
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    cause
}

/// The target's optional per-change results.
#[derive(Debug, Default)]
struct Answer {
    /// Ids the target reported in error → (error, retry).
    errors: HashMap<String, (String, bool)>,
    /// Ids delivered with the target's own ref for the object (for remapping).
    target_refs: HashMap<String, String>,
}

fn parse_answer(body: &[u8]) -> Answer {
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

fn record(
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
struct Shaped {
    kind: String,
    reference: String,
    op: Op,
    data: Option<Box<RawValue>>,
    target_ref: Option<String>,
}

/// A change on its way through `shape`.
struct ShapeItem {
    message: Incoming,
    stored: StoredChange,
    change: transform::Change,
    mapping: Arc<Compiled>,
    refs: Vec<transform::Reference>,
}

/// A change that failed, at the target or before sending.
struct FailedChange {
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

/// Logs the delivery set-up once at start.
pub fn announce(target: &PushTarget) {
    info!(target = %target.name, url = %target.url, batch_max = target.batch_max, concurrency = target.concurrency, "push delivery configured");
}

#[cfg(test)]
mod tests {
    use super::*;

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
