//! The broker on the embedded database, with RabbitMQ's semantics as lxbridge uses them:
//! a change published from a source is stored once per target its routes give (computed by
//! [`Routes`], as RabbitMQ's topic bindings would), in publish order; a target's consumer
//! takes changes in order, up to `prefetch` unsettled at a time; a failed change moves to its
//! retry step (a `retry` row due after the step's delay) and comes back at the end of the
//! queue when due, or to the DLQ; settling is one transaction, so a move is never half done.
//!
//! Unsettled changes are only "taken" in memory: after a restart every change still in the
//! queue is delivered again, as RabbitMQ redelivers unacked messages.

use super::{now_ms, Db, DbError};
use crate::broker::{
    body_ids, AckHandle, Broker, BrokerError, DeadItem, Failure, Held, HeldIn, InboxCall, Incoming,
    Outgoing, PublishOutcome,
};
use crate::config::Config;
use crate::route::Routes;
use futures_util::future::BoxFuture;
use rusqlite::{params, OptionalExtension};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

pub struct EmbeddedBroker {
    me: std::sync::Weak<EmbeddedBroker>,
    db: Arc<Db>,
    routes: Arc<Routes>,
    retry_delays: Vec<Duration>,
    /// Wakes a target's consumer when changes are added to its queue.
    wake: HashMap<String, Arc<Notify>>,
    /// Wakes the retry mover when a change is put into a retry step.
    retry_wake: Arc<Notify>,
    stop: CancellationToken,
    tasks: TaskTracker,
    consumers: Mutex<HashSet<String>>,
    /// Where each pull target's inbox requests go: one process serves them all.
    inboxes: Mutex<HashMap<String, mpsc::Sender<InboxCall>>>,
}

fn unavailable(e: DbError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl EmbeddedBroker {
    /// Starts the retry mover; consumers start with [`Broker::consume`].
    pub fn start(
        db: Arc<Db>,
        config: &Config,
        routes: Arc<Routes>,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Arc<EmbeddedBroker> {
        let broker = Self::new(db, config, routes, stop, tasks);
        tasks.spawn(broker.clone().move_due_retries());
        broker
    }

    /// The broker without its retry mover, for `lxbridge export`/`import`: it reads and
    /// writes the tables and moves nothing by itself.
    pub fn offline(db: Arc<Db>, config: &Config) -> Arc<EmbeddedBroker> {
        let routes = Arc::new(Routes::from_config(config));
        Self::new(
            db,
            config,
            routes,
            CancellationToken::new(),
            &TaskTracker::new(),
        )
    }

    fn new(
        db: Arc<Db>,
        config: &Config,
        routes: Arc<Routes>,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Arc<EmbeddedBroker> {
        let wake = config
            .nodes
            .iter()
            .filter(|n| n.deliver.is_some())
            .map(|n| (n.name.clone(), Arc::new(Notify::new())))
            .collect();
        let broker = Arc::new_cyclic(|me| EmbeddedBroker {
            me: me.clone(),
            db,
            routes,
            retry_delays: config.retry.delays.iter().map(|d| d.0).collect(),
            wake,
            retry_wake: Arc::new(Notify::new()),
            stop,
            tasks: tasks.clone(),
            consumers: Mutex::new(HashSet::new()),
            inboxes: Mutex::new(HashMap::new()),
        });
        broker
    }

    fn wake(&self, target: &str) {
        if let Some(n) = self.wake.get(target) {
            n.notify_one();
        }
    }

    /// Moves retry rows whose delay is over to the end of their target's queue, then sleeps
    /// until the next is due (or a new one arrives).
    async fn move_due_retries(self: Arc<Self>) {
        loop {
            let moved = self
                .db
                .call(|c| {
                    let now = now_ms();
                    let targets: Vec<String> = c
                        .prepare_cached("SELECT DISTINCT target FROM retry WHERE due <= ?1")?
                        .query_map([now], |r| r.get(0))?
                        .collect::<Result<_, _>>()?;
                    if !targets.is_empty() {
                        c.prepare_cached(
                            "INSERT INTO queue (target, attempt, first_failed, alone, body)
                             SELECT target, attempt, first_failed, alone, body FROM retry
                             WHERE due <= ?1 ORDER BY due, id",
                        )?
                        .execute([now])?;
                        c.prepare_cached("DELETE FROM retry WHERE due <= ?1")?
                            .execute([now])?;
                    }
                    let next: Option<i64> = c
                        .prepare_cached("SELECT min(due) FROM retry")?
                        .query_row([], |r| r.get(0))?;
                    Ok((targets, next))
                })
                .await;
            let wait = match moved {
                Ok((targets, next)) => {
                    for t in &targets {
                        self.wake(t);
                    }
                    next.map(|due| Duration::from_millis((due - now_ms()).clamp(0, 1000) as u64))
                        .unwrap_or(Duration::from_secs(1))
                }
                Err(e) => {
                    warn!(error = %e, "embedded broker: moving due retries failed");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.retry_wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Feeds a target's queue to `tx` in order, at most `prefetch` unsettled.
    async fn feed(self: Arc<Self>, target: String, prefetch: u16, tx: mpsc::Sender<Incoming>) {
        let slots = Arc::new(Semaphore::new(usize::from(prefetch.max(1))));
        let wake = self.wake.get(&target).cloned().unwrap_or_default();
        let mut cursor = 0i64;
        loop {
            let first = tokio::select! {
                _ = self.stop.cancelled() => break,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(s) => s,
                    Err(_) => break,
                },
            };
            let room = slots.available_permits() + 1;
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let t = target.clone();
            let rows = self
                .db
                .call(move |c| {
                    c.prepare_cached(
                        "SELECT id, attempt, first_failed, alone, body FROM queue
                         WHERE target = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                    )?
                    .query_map(params![t, cursor, room as i64], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, Option<i64>>(2)?,
                            r.get::<_, bool>(3)?,
                            r.get::<_, Vec<u8>>(4)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()
                })
                .await;
            let rows = match rows {
                Ok(rows) => rows,
                Err(e) => {
                    warn!(%target, error = %e, "embedded broker: reading the queue failed");
                    drop(first);
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            if rows.is_empty() {
                drop(first);
                tokio::select! {
                    _ = self.stop.cancelled() => break,
                    _ = &mut woken => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let mut first = Some(first);
            for (row, attempt, first_failed, alone, body) in rows {
                let slot = match first.take() {
                    Some(s) => s,
                    None => match slots.clone().try_acquire_owned() {
                        Ok(s) => s,
                        Err(_) => break,
                    },
                };
                cursor = row;
                let incoming = Incoming {
                    body,
                    attempt: u32::try_from(attempt).unwrap_or(1).max(1),
                    first_failed_ms: first_failed,
                    alone,
                    partition: 0,
                    handle: AckHandle::Embedded { row, _slot: slot },
                };
                if tx.send(incoming).await.is_err() {
                    debug!(%target, "embedded consumer stopped");
                    return;
                }
            }
        }
        debug!(%target, "embedded consumer stopped");
    }
}

fn row_of(message: &Incoming) -> Result<i64, BrokerError> {
    match message.handle {
        AckHandle::Embedded { row, .. } => Ok(row),
        AckHandle::Rabbit { .. } => Err(BrokerError::Unavailable(
            "a RabbitMQ message cannot be settled with the embedded backend".into(),
        )),
    }
}

/// A DLQ row as the admin API lists it.
fn dead_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadItem> {
    Ok(DeadItem {
        id: r.get("change_id")?,
        kind: r.get("type")?,
        reference: r.get("ref")?,
        source: r.get("source")?,
        attempts: r.get("attempts")?,
        error: r.get("error")?,
        dead_at: crate::store::rfc3339_ms(r.get("dead_at")?),
        seq: r.get("seq")?,
    })
}

impl Broker for EmbeddedBroker {
    fn publish<'a>(
        &'a self,
        source: &'a str,
        messages: &'a [Outgoing],
    ) -> BoxFuture<'a, Result<Vec<PublishOutcome>, BrokerError>> {
        Box::pin(async move {
            let rows: Vec<(Vec<String>, Vec<u8>)> = messages
                .iter()
                .map(|m| {
                    let targets = self
                        .routes
                        .targets(source, &m.kind)
                        .into_iter()
                        .map(str::to_string)
                        .collect();
                    (targets, m.body.clone())
                })
                .collect();
            let (outcomes, touched) = self
                .db
                .call(move |c| {
                    let mut insert = c.prepare_cached(
                        "INSERT INTO queue (target, attempt, alone, body) VALUES (?1, 1, 0, ?2)",
                    )?;
                    let mut outcomes = Vec::with_capacity(rows.len());
                    let mut touched = HashSet::new();
                    for (targets, body) in &rows {
                        for t in targets {
                            insert.execute(params![t, body])?;
                            touched.insert(t.clone());
                        }
                        outcomes.push(if targets.is_empty() {
                            PublishOutcome::Unroutable
                        } else {
                            PublishOutcome::Confirmed
                        });
                    }
                    Ok((outcomes, touched))
                })
                .await
                .map_err(unavailable)?;
            for t in &touched {
                self.wake(t);
            }
            Ok(outcomes)
        })
    }

    fn ready(&self) -> bool {
        self.db.healthy()
    }

    fn inboxes_reachable(&self) -> bool {
        true // served in this process
    }

    fn consume(&self, target: &str, prefetch: u16) -> mpsc::Receiver<Incoming> {
        let (tx, rx) = mpsc::channel(usize::from(prefetch.max(1)));
        let fresh = self
            .consumers
            .lock()
            .expect("consumers lock")
            .insert(target.to_string());
        if !fresh {
            warn!(%target, "a second consumer of one embedded queue is not supported; it gets nothing");
            return rx;
        }
        // Whoever calls consume holds the broker in an Arc, so it is alive.
        if let Some(me) = self.me.upgrade() {
            self.tasks.spawn(me.feed(target.to_string(), prefetch, tx));
        }
        rx
    }

    fn ack(&self, message: Incoming) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let row = row_of(&message)?;
            self.db
                .call(move |c| {
                    c.prepare_cached("DELETE FROM queue WHERE id = ?1")?
                        .execute([row])
                        .map(|_| ())
                })
                .await
                .map_err(unavailable)?;
            drop(message);
            Ok(())
        })
    }

    fn fail<'a>(
        &'a self,
        message: Incoming,
        f: Failure<'a>,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        Box::pin(async move {
            let row = row_of(&message)?;
            let steps = self.retry_delays.len();
            let attempt = message.attempt;
            let dead = f.dead || attempt as usize > steps;
            let first_failed = message.first_failed_ms.unwrap_or(f.now_ms);
            let error = f.error.to_string();
            let target = f.target.to_string();
            let now = f.now_ms;
            let dead_facts = dead.then(|| {
                let (id, seq) = body_ids(&message.body);
                (
                    id,
                    seq,
                    f.kind.to_string(),
                    f.reference.to_string(),
                    f.source.to_string(),
                )
            });
            let due = if dead {
                0
            } else {
                now + self.retry_delays[attempt as usize - 1].as_millis() as i64
            };
            let alone = f.alone;
            self.db
                .call(move |c| {
                    let body: Option<Vec<u8>> = c
                        .prepare_cached("DELETE FROM queue WHERE id = ?1 RETURNING body")?
                        .query_row([row], |r| r.get(0))
                        .optional()?;
                    let Some(body) = body else {
                        return Ok(()); // settled before: nothing to move
                    };
                    match dead_facts {
                        Some((id, seq, kind, reference, source)) => {
                            c.prepare_cached(
                                "INSERT INTO dlq (target, change_id, seq, type, ref, source, attempts,
                                     error, first_failed, dead_at, body)
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                            )?
                            .execute(params![
                                target,
                                id,
                                seq,
                                kind,
                                reference,
                                source,
                                attempt,
                                error,
                                first_failed,
                                now,
                                body
                            ])?;
                        }
                        None => {
                            c.prepare_cached(
                                "INSERT INTO retry (target, step, due, attempt, first_failed, alone,
                                     error, body)
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                            )?
                            .execute(params![
                                target,
                                attempt,
                                due,
                                attempt + 1,
                                first_failed,
                                alone,
                                error,
                                body
                            ])?;
                        }
                    }
                    Ok(())
                })
                .await
                .map_err(unavailable)?;
            if !dead {
                self.retry_wake.notify_one();
            }
            drop(message);
            Ok(dead)
        })
    }

    fn dead_letters<'a>(
        &'a self,
        target: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<(u32, Vec<DeadItem>), BrokerError>> {
        Box::pin(async move {
            let t = target.to_string();
            self.db
                .call(move |c| {
                    let count: u32 = c
                        .prepare_cached("SELECT count(*) FROM dlq WHERE target = ?1")?
                        .query_row([&t], |r| r.get(0))?;
                    let items = c
                        .prepare_cached("SELECT * FROM dlq WHERE target = ?1 ORDER BY id LIMIT ?2")?
                        .query_map(params![t, limit as i64], dead_from_row)?
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok((count, items))
                })
                .await
                .map_err(unavailable)
        })
    }

    fn take_dead<'a>(
        &'a self,
        target: &'a str,
        ids: Option<&'a HashSet<String>>,
        replay: bool,
    ) -> BoxFuture<'a, Result<Vec<DeadItem>, BrokerError>> {
        Box::pin(async move {
            let t = target.to_string();
            let ids = ids.cloned();
            let taken = self
                .db
                .call(move |c| {
                    let rows = c
                        .prepare_cached("SELECT * FROM dlq WHERE target = ?1 ORDER BY id")?
                        .query_map([&t], |r| {
                            Ok((r.get::<_, i64>("id")?, dead_from_row(r)?, r.get::<_, Vec<u8>>("body")?))
                        })?
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut taken = Vec::new();
                    for (row, item, body) in rows {
                        if ids.as_ref().is_some_and(|ids| !ids.contains(&item.id)) {
                            continue;
                        }
                        if replay {
                            // A fresh start: attempt 1, no failure facts.
                            c.prepare_cached(
                                "INSERT INTO queue (target, attempt, alone, body) VALUES (?1, 1, 0, ?2)",
                            )?
                            .execute(params![t, body])?;
                        }
                        c.prepare_cached("DELETE FROM dlq WHERE id = ?1")?
                            .execute([row])?;
                        taken.push(item);
                    }
                    Ok(taken)
                })
                .await
                .map_err(unavailable)?;
            if replay && !taken.is_empty() {
                self.wake(target);
            }
            Ok(taken)
        })
    }

    fn queue_depths<'a>(
        &'a self,
        target: &'a str,
    ) -> BoxFuture<'a, Result<(u32, u32), BrokerError>> {
        Box::pin(async move {
            let t = target.to_string();
            self.db
                .call(move |c| {
                    let dlq: u32 = c
                        .prepare_cached("SELECT count(*) FROM dlq WHERE target = ?1")?
                        .query_row([&t], |r| r.get(0))?;
                    let retry: u32 = c
                        .prepare_cached("SELECT count(*) FROM retry WHERE target = ?1")?
                        .query_row([&t], |r| r.get(0))?;
                    Ok((dlq, retry))
                })
                .await
                .map_err(unavailable)
        })
    }

    fn export<'a>(&'a self, target: &'a str) -> BoxFuture<'a, Result<Vec<Held>, BrokerError>> {
        Box::pin(async move {
            let t = target.to_string();
            self.db
                .call(move |c| {
                    let mut held = c
                        .prepare_cached(
                            "SELECT attempt, first_failed, alone, body FROM queue
                             WHERE target = ?1 ORDER BY id",
                        )?
                        .query_map([&t], |r| {
                            Ok(Held {
                                queue: HeldIn::Deliver,
                                attempt: r.get(0)?,
                                first_failed_ms: r.get(1)?,
                                alone: r.get(2)?,
                                error: None,
                                body: r.get(3)?,
                            })
                        })?
                        .collect::<Result<Vec<_>, _>>()?;
                    let retry = c
                        .prepare_cached(
                            "SELECT attempt, first_failed, alone, error, body FROM retry
                             WHERE target = ?1 ORDER BY due, id",
                        )?
                        .query_map([&t], |r| {
                            Ok(Held {
                                queue: HeldIn::Retry,
                                attempt: r.get(0)?,
                                first_failed_ms: r.get(1)?,
                                alone: r.get(2)?,
                                error: Some(r.get(3)?),
                                body: r.get(4)?,
                            })
                        })?
                        .collect::<Result<Vec<_>, _>>()?;
                    held.extend(retry);
                    let dead = c
                        .prepare_cached(
                            "SELECT source, type, ref, dead_at, attempts, first_failed, error, body
                             FROM dlq WHERE target = ?1 ORDER BY id",
                        )?
                        .query_map([&t], |r| {
                            Ok(Held {
                                queue: HeldIn::Dlq {
                                    source: r.get(0)?,
                                    kind: r.get(1)?,
                                    reference: r.get(2)?,
                                    dead_at_ms: r.get(3)?,
                                },
                                attempt: r.get(4)?,
                                first_failed_ms: r.get(5)?,
                                alone: false,
                                error: Some(r.get(6)?),
                                body: r.get(7)?,
                            })
                        })?
                        .collect::<Result<Vec<_>, _>>()?;
                    held.extend(dead);
                    Ok(held)
                })
                .await
                .map_err(unavailable)
        })
    }

    fn import<'a>(
        &'a self,
        target: &'a str,
        held: Vec<Held>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let t = target.to_string();
            // One call: all of the target's messages are imported, or none.
            self.db
                .call(move |c| {
                    for h in held {
                        match h.queue {
                            HeldIn::Deliver | HeldIn::Retry => {
                                c.prepare_cached(
                                    "INSERT INTO queue (target, attempt, first_failed, alone, body)
                                     VALUES (?1, ?2, ?3, ?4, ?5)",
                                )?
                                .execute(params![
                                    t,
                                    h.attempt,
                                    h.first_failed_ms,
                                    h.alone,
                                    h.body
                                ])?;
                            }
                            HeldIn::Dlq {
                                source,
                                kind,
                                reference,
                                dead_at_ms,
                            } => {
                                let (id, seq) = body_ids(&h.body);
                                c.prepare_cached(
                                    "INSERT INTO dlq (target, change_id, seq, type, ref, source,
                                         attempts, error, first_failed, dead_at, body)
                                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                                )?
                                .execute(params![
                                    t,
                                    id,
                                    seq,
                                    kind,
                                    reference,
                                    source,
                                    h.attempt,
                                    h.error.unwrap_or_default(),
                                    h.first_failed_ms.unwrap_or(dead_at_ms),
                                    dead_at_ms,
                                    h.body
                                ])?;
                            }
                        }
                    }
                    Ok(())
                })
                .await
                .map_err(unavailable)?;
            self.wake(target);
            Ok(())
        })
    }

    fn inbox_serve(&self, target: &str) -> mpsc::Receiver<InboxCall> {
        let (tx, rx) = mpsc::channel(64);
        self.inboxes
            .lock()
            .expect("inboxes lock")
            .insert(target.to_string(), tx);
        rx
    }

    fn inbox_call<'a>(
        &'a self,
        target: &'a str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, BrokerError>> {
        Box::pin(async move {
            let serve = self
                .inboxes
                .lock()
                .expect("inboxes lock")
                .get(target)
                .cloned();
            let stopped =
                || BrokerError::Unavailable(format!("the inbox of {target} is not running"));
            let (reply, answer) = tokio::sync::oneshot::channel();
            serve
                .ok_or_else(stopped)?
                .send(InboxCall { body, reply })
                .await
                .map_err(|_| stopped())?;
            match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(answer)) => Ok(answer),
                _ => Err(stopped()),
            }
        })
    }
}
