//! [`EmbeddedBroker`]: the [`Broker`] on the embedded database ([`crate::embedded::Db`]),
//! with RabbitMQ's semantics as lxbridge uses them:
//! a change published from a source is stored once per target its routes give (computed by
//! [`Routes`], as RabbitMQ's topic bindings would), in publish order; a target's consumer
//! takes changes in order, up to `prefetch` unsettled at a time; a failed change moves to its
//! retry step (a `retry` row due after the step's delay) and comes back at the end of the
//! queue when due, or to the DLQ; settling is one transaction, so a move is never half done.
//!
//! Unsettled changes are only "taken" in memory: after a restart every change still in the
//! queue is delivered again, as RabbitMQ redelivers unacked messages.
//!
//! This file holds the broker, its feeders and retry mover, publishing and settling; the
//! DLQ's admin side is in `dlq`, `export`/`import` in `held` (the same split as
//! `broker::rabbitmq`).

mod dlq;
mod held;

use crate::broker::{
    body_ids, AckHandle, Broker, BrokerError, DeadItem, Failure, Held, HeldIn, InboxCall, Incoming,
    Outgoing, PublishOutcome,
};
use crate::clock::unix_ms_now;
use crate::config::Config;
use crate::embedded::{Db, DbError};
use crate::route::Routes;
use dlq::{insert_dead, DeadRow};
use futures_util::future::BoxFuture;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// How a change taken from the embedded queue is settled (`AckHandle::Embedded`): its
/// `queue` row, and the prefetch slot it holds until settled.
pub(crate) struct Handle {
    row: i64,
    _slot: OwnedSemaphorePermit,
}

/// A `queue` row as the feeder reads it: id, attempt, first failure, `alone`, body.
type QueueRow = (i64, i64, Option<i64>, bool, Vec<u8>);

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
                    let now = unix_ms_now();
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
                    next.map(|due| {
                        Duration::from_millis((due - unix_ms_now()).clamp(0, 1000) as u64)
                    })
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
            let rows = match self.read_queue(&target, cursor, room).await {
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
            match hand_on(rows, first, &slots, &tx, cursor).await {
                Some(last) => cursor = last,
                None => {
                    debug!(%target, "embedded consumer stopped");
                    return;
                }
            }
        }
        debug!(%target, "embedded consumer stopped");
    }

    /// Up to `room` rows of the target's queue past `cursor`, in id order.
    async fn read_queue(
        &self,
        target: &str,
        cursor: i64,
        room: usize,
    ) -> Result<Vec<QueueRow>, DbError> {
        let t = target.to_string();
        self.db
            .call(move |c| {
                c.prepare_cached(
                    "SELECT id, attempt, first_failed, alone, body FROM queue
                     WHERE target = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                )?
                .query_map(params![t, cursor, room as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .await
    }

    /// Where a failed change goes: its next retry step, or the DLQ when `f.dead` or the
    /// steps are exhausted.
    fn failure_move(&self, message: &Incoming, f: &Failure<'_>) -> Move {
        let attempt = message.attempt;
        let first_failed = message.first_failed_ms.unwrap_or(f.now_ms);
        let error = f.error.to_string();
        if f.dead || attempt as usize > self.retry_delays.len() {
            let (id, seq) = body_ids(&message.body);
            return Move::Dead(DeadRow {
                id,
                seq,
                kind: f.kind.to_string(),
                reference: f.reference.to_string(),
                source: f.source.to_string(),
                attempts: attempt,
                error,
                first_failed,
                dead_at: f.now_ms,
            });
        }
        let delay = self.retry_delays[attempt as usize - 1].as_millis() as i64;
        Move::Retry(RetryRow {
            step: attempt,
            due: f.now_ms + delay,
            attempt: attempt + 1,
            first_failed,
            alone: f.alone,
            error,
        })
    }
}

/// Hands rows on in order while prefetch slots are free (`first` is one already taken);
/// the cursor past the last row handed on, or `None` once the consumer is gone.
async fn hand_on(
    rows: Vec<QueueRow>,
    first: OwnedSemaphorePermit,
    slots: &Arc<Semaphore>,
    tx: &mpsc::Sender<Incoming>,
    mut cursor: i64,
) -> Option<i64> {
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
            handle: AckHandle::Embedded(Handle { row, _slot: slot }),
        };
        if tx.send(incoming).await.is_err() {
            return None;
        }
    }
    Some(cursor)
}

/// A failed change's next place.
enum Move {
    Retry(RetryRow),
    Dead(DeadRow),
}

/// A `retry` row: the step it waits out, until when, and what it comes back with.
struct RetryRow {
    step: u32,
    due: i64,
    /// The attempt it comes back as.
    attempt: u32,
    first_failed: i64,
    alone: bool,
    error: String,
}

/// Moves a `queue` row to `to` (nothing when it was settled before), in one call.
fn move_row(c: &Connection, row: i64, target: &str, to: Move) -> rusqlite::Result<()> {
    let body: Option<Vec<u8>> = c
        .prepare_cached("DELETE FROM queue WHERE id = ?1 RETURNING body")?
        .query_row([row], |r| r.get(0))
        .optional()?;
    let Some(body) = body else {
        return Ok(()); // settled before: nothing to move
    };
    match to {
        Move::Dead(dead) => insert_dead(c, target, &dead, &body),
        Move::Retry(r) => c
            .prepare_cached(
                "INSERT INTO retry (target, step, due, attempt, first_failed, alone,
                     error, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                target,
                r.step,
                r.due,
                r.attempt,
                r.first_failed,
                r.alone,
                r.error,
                body
            ])
            .map(|_| ()),
    }
}

fn row_of(message: &Incoming) -> Result<i64, BrokerError> {
    match &message.handle {
        AckHandle::Embedded(handle) => Ok(handle.row),
        _ => Err(BrokerError::Unavailable(
            "a RabbitMQ message cannot be settled with the embedded backend".into(),
        )),
    }
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
            let to = self.failure_move(&message, &f);
            let dead = matches!(to, Move::Dead(_));
            let target = f.target.to_string();
            self.db
                .call(move |c| move_row(c, row, &target, to))
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
        Box::pin(self.list_dead(target, limit))
    }

    fn take_dead<'a>(
        &'a self,
        target: &'a str,
        ids: Option<&'a HashSet<String>>,
        replay: bool,
    ) -> BoxFuture<'a, Result<Vec<DeadItem>, BrokerError>> {
        Box::pin(self.take_dead_rows(target, ids, replay))
    }

    fn queue_depths<'a>(
        &'a self,
        target: &'a str,
    ) -> BoxFuture<'a, Result<(u32, u32), BrokerError>> {
        Box::pin(self.depths(target))
    }

    fn export<'a>(&'a self, target: &'a str) -> BoxFuture<'a, Result<Vec<Held>, BrokerError>> {
        Box::pin(self.export_rows(target))
    }

    fn import<'a>(
        &'a self,
        target: &'a str,
        held: Vec<Held>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.import_rows(target, held))
    }

    fn enqueue<'a>(
        &'a self,
        target: &'a str,
        changes: Vec<Held>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let waiting = changes
            .into_iter()
            .map(|h| Held {
                queue: HeldIn::Deliver,
                ..h
            })
            .collect();
        // One call, as import's: all of them are added, or none.
        self.import(target, waiting)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_broker_contract() {
        let dir = std::env::temp_dir().join(format!("lxbridge-contract-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let section = format!("[embedded]\ndata_dir = {:?}", dir.display().to_string());
        let config = crate::broker::contract::config(&section);
        let db = Db::open(&dir).unwrap();
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let routes = Arc::new(Routes::from_config(&config));
        let broker = EmbeddedBroker::start(db.clone(), &config, routes, stop.clone(), &tasks);
        crate::broker::contract::run(broker.as_ref(), true).await;
        stop.cancel();
        tasks.close();
        tasks.wait().await;
        db.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
