//! Settling what [`RabbitBroker`] consumed, and the DLQ's admin side: `ack`; `fail`, the
//! move of a failed change to its next retry step (`<prefix>.retry.<target>.<n>`, dead-
//! lettering back to the target's exchange) or to the DLQ with the facts of [`Dead`], then
//! the ack; the DLQ listing, taking (purge, replay) and the DLQ and retry queue depths.

use super::forward::Handle;
use super::headers::{self, Dead};
use super::RabbitBroker;
use crate::broker::{body_ids, header, AckHandle, BrokerError, DeadItem, Failure, Incoming};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use std::collections::HashSet;
use std::time::Duration;
use tracing::warn;

/// How long an ack or a nack may take to be written.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The RabbitMQ handle of a message, or why it has none.
fn rabbit_handle(message: Incoming) -> Result<Handle, BrokerError> {
    match message.handle {
        AckHandle::Rabbit(handle) => Ok(handle),
        _ => Err(BrokerError::Unavailable(
            "a message of the embedded backend cannot be settled with RabbitMQ".into(),
        )),
    }
}

/// A dead-lettered message as the admin API lists it (its facts from its headers, id and
/// seq from its body).
fn dead_item(delivery: &lapin::message::Delivery) -> DeadItem {
    let (id, seq) = body_ids(&delivery.data);
    let dead = Dead::read(&delivery.properties);
    DeadItem {
        id,
        kind: dead.kind,
        reference: dead.reference,
        source: dead.source,
        attempts: dead.attempts,
        error: dead.error.unwrap_or_default(),
        dead_at: crate::clock::rfc3339_ms(dead.dead_at_ms),
        seq,
    }
}

/// Sends the `multiple` ack that ends a run of acked tags, if there is one.
async fn ack_run(run: Option<lapin::Acker>) -> Result<(), BrokerError> {
    let Some(acker) = run else {
        return Ok(());
    };
    let multiple = BasicAckOptions { multiple: true };
    match tokio::time::timeout(SETTLE_TIMEOUT, acker.ack(multiple)).await {
        Ok(result) => result
            .map(|_| ())
            .map_err(|e| BrokerError::Unavailable(e.to_string())),
        Err(_) => Err(BrokerError::Unavailable(format!(
            "the ack was not sent within {} s",
            SETTLE_TIMEOUT.as_secs()
        ))),
    }
}

impl RabbitBroker {
    /// Acks a consumed message: with the run of acked messages it completes, in one
    /// `multiple` ack, or later with the run a lower message completes (see `Ledger`).
    /// Bounded: an ack on a connection that died unnoticed must not hold its lane (the
    /// broker gives the change out again when the channel closes).
    pub(super) async fn ack_delivery(&self, message: Incoming) -> Result<(), BrokerError> {
        let handle = rabbit_handle(message)?;
        let sending = handle.ledger.sending().await;
        let run = handle.ledger.acked(handle.tag, handle.acker.clone());
        let sent = ack_run(run).await;
        drop(sending);
        // Its slot in the lease is given back once the run's ack is sent.
        drop(handle);
        sent
    }

    /// Moves a failed change to its next retry step, or to the DLQ when `f.dead` or the
    /// steps are exhausted, then acks it; true if it went to the DLQ.
    pub(super) async fn fail_delivery(
        &self,
        message: Incoming,
        f: Failure<'_>,
    ) -> Result<bool, BrokerError> {
        let steps = self.topology.retry_delays.len();
        let dead = f.dead || message.attempt as usize > steps;
        let (queue, headers) = if dead {
            (
                self.topology.names.dlq(f.target),
                dead_headers(&message, &f),
            )
        } else {
            let step = self
                .topology
                .names
                .retry(f.target, message.attempt as usize);
            (step, self.retry_headers(&message, &f))
        };
        if let Err(e) = self.publish_waiting(&queue, &message.body, headers).await {
            // Back to its queue now, to be tried again, rather than held unacked by a
            // consumer that will not look at it again.
            self.requeue(message).await;
            return Err(e);
        }
        self.ack_delivery(message).await?;
        Ok(dead)
    }

    /// A change's headers for its next retry step: the attempt it comes back as, its
    /// failure, `alone`, and its partition (kept through the dead-lettering back).
    fn retry_headers(&self, message: &Incoming, f: &Failure<'_>) -> FieldTable {
        let first_failed = message.first_failed_ms.unwrap_or(f.now_ms);
        let attempt = message.attempt + 1;
        let mut headers = headers::waiting(attempt, Some(first_failed), f.alone, Some(f.error));
        headers.insert(header::LAST_FAILED.into(), AMQPValue::LongLongInt(f.now_ms));
        self.topology
            .mark_partition(&mut headers, message.partition);
        headers
    }

    /// Returns a message to the front of its queue (best effort: a closed channel returns
    /// it anyway).
    async fn requeue(&self, message: Incoming) {
        if let AckHandle::Rabbit(handle) = message.handle {
            let requeue = BasicNackOptions {
                requeue: true,
                multiple: false,
            };
            let nacked = tokio::time::timeout(SETTLE_TIMEOUT, handle.acker.nack(requeue)).await;
            match nacked {
                Ok(Ok(_)) => {
                    // Sent: it no longer holds back the acks above it.
                    let _sending = handle.ledger.sending().await;
                    let run = handle.ledger.settled(handle.tag);
                    if let Err(e) = ack_run(run).await {
                        warn!(error = %e, "could not ack the messages after a returned one; they return when their channel closes");
                    }
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "could not return a message to its queue; it returns when its channel closes")
                }
                Err(_) => warn!("returning a message to its queue timed out; it returns when its channel closes"),
            }
        }
    }

    /// The DLQ's message count and up to `limit` of its items, left in place: held unacked
    /// on a channel of their own, and returned to the queue when it closes.
    pub(super) async fn list_dead(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<(u32, Vec<DeadItem>), BrokerError> {
        let ch = self.admin_channel().await?;
        let queue = self.topology.names.dlq(target);
        let count = self.passive_count(&ch, &queue).await?;
        let mut items = Vec::new();
        while items.len() < limit {
            match self.get_one(&ch, &queue).await? {
                Some(delivery) => items.push(dead_item(&delivery)),
                None => break,
            }
        }
        let _ = ch.close(200, "dlq listed".into()).await;
        Ok((count, items))
    }

    /// Takes the DLQ items with the given ids (all when `None`), each first republished to
    /// the target at attempt 1 with `replay`; the others stay unacked until the channel
    /// closes, then go back.
    pub(super) async fn take_dead_items(
        &self,
        target: &str,
        ids: Option<&HashSet<String>>,
        replay: bool,
    ) -> Result<Vec<DeadItem>, BrokerError> {
        let ch = self.admin_channel().await?;
        let queue = self.topology.names.dlq(target);
        let mut taken = Vec::new();
        while let Some(delivery) = self.get_one(&ch, &queue).await? {
            let item = dead_item(&delivery);
            if ids.is_some_and(|ids| !ids.contains(&item.id)) {
                continue;
            }
            if replay {
                // A fresh start: no attempt or error headers.
                self.publish_to_target(target, &delivery.data, FieldTable::default())
                    .await?;
            }
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| self.lost(e))?;
            taken.push(item);
        }
        let _ = ch.close(200, "dlq taken".into()).await;
        Ok(taken)
    }

    /// Messages in the target's DLQ and, summed, in its retry queues.
    pub(super) async fn dlq_and_retry_depths(
        &self,
        target: &str,
    ) -> Result<(u32, u32), BrokerError> {
        let ch = self.admin_channel().await?;
        let names = &self.topology.names;
        let dlq = self.passive_count(&ch, &names.dlq(target)).await?;
        let mut retry = 0;
        for step in 1..=self.topology.retry_delays.len() {
            retry += self.passive_count(&ch, &names.retry(target, step)).await?;
        }
        let _ = ch.close(200, "depths".into()).await;
        Ok((dlq, retry))
    }

    /// The next ready message of `queue`, taken unacked on `ch`.
    pub(super) async fn get_one(
        &self,
        ch: &Channel,
        queue: &str,
    ) -> Result<Option<lapin::message::Delivery>, BrokerError> {
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
        {
            Ok(message) => Ok(message.map(|m| m.delivery)),
            Err(e) => Err(self.lost(e)),
        }
    }

    pub(super) async fn passive_count(
        &self,
        ch: &Channel,
        queue: &str,
    ) -> Result<u32, BrokerError> {
        Ok(self.passive(ch, queue).await?.message_count())
    }

    /// The queue as it is (its counts), declared passively: an error if it does not exist.
    pub(super) async fn passive(
        &self,
        ch: &Channel,
        queue: &str,
    ) -> Result<lapin::Queue, BrokerError> {
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
}

/// A change's headers in the DLQ: its failure and the facts the admin API lists.
fn dead_headers(message: &Incoming, f: &Failure<'_>) -> FieldTable {
    Dead {
        source: f.source.to_string(),
        kind: f.kind.to_string(),
        reference: f.reference.to_string(),
        attempts: message.attempt,
        error: Some(f.error.to_string()),
        first_failed_ms: Some(message.first_failed_ms.unwrap_or(f.now_ms)),
        dead_at_ms: f.now_ms,
    }
    .headers()
}
