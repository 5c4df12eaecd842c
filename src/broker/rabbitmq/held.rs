//! A target's messages copied out of RabbitMQ and put back ([`Held`]): `export` (its
//! delivery queues, retry steps and DLQ, read on a channel of their own and left in place),
//! `import` (waiting changes to the target's exchange by partition, dead ones to its DLQ,
//! every confirm awaited) and `enqueue` (changes to the end of its delivery queues).

use super::headers::{self, Dead};
use super::publish::{mandatory, properties};
use super::topology::Topology;
use super::RabbitBroker;
use crate::broker::{body_ref, BrokerError, Held, HeldIn};
use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::Channel;
use std::time::Duration;

impl RabbitBroker {
    /// Copies every message held for the target; lxbridge must be stopped (checked: no
    /// consumer on its delivery queues). Everything is held unacked on a channel of its
    /// own, then returned when it closes.
    pub(super) async fn export_held(&self, target: &str) -> Result<Vec<Held>, BrokerError> {
        let ch = self.admin_channel().await?;
        let held = self.export_on(&ch, target).await;
        let _ = ch.close(200, "exported".into()).await;
        held
    }

    /// Adds messages for the target, in order, on a channel of their own.
    pub(super) async fn import_held(
        &self,
        target: &str,
        held: Vec<Held>,
    ) -> Result<(), BrokerError> {
        let ch = self.admin_channel().await?;
        let done = self.import_on(&ch, target, &held).await;
        let _ = ch.close(200, "imported".into()).await;
        done
    }

    /// Adds changes to the end of the target's delivery queues, whatever queue they say.
    pub(super) async fn enqueue_held(
        &self,
        target: &str,
        changes: Vec<Held>,
    ) -> Result<(), BrokerError> {
        let waiting = changes
            .into_iter()
            .map(|h| Held {
                queue: HeldIn::Deliver,
                ..h
            })
            .collect();
        self.import_held(target, waiting).await
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
            let confirm = ch
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    mandatory(),
                    &h.body,
                    properties(headers),
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

    /// Takes every ready message of `queue` on `ch`, unacked: they stay held by the channel
    /// until it closes, and then go back to the queue.
    async fn get_all(
        &self,
        ch: &Channel,
        queue: &str,
    ) -> Result<Vec<lapin::message::Delivery>, BrokerError> {
        let mut got = Vec::new();
        while let Some(delivery) = self.get_one(ch, queue).await? {
            got.push(delivery);
        }
        Ok(got)
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
}

/// A message of a delivery or retry queue as a [`Held`] (its headers as the consumer reads
/// them).
fn held_waiting(delivery: &lapin::message::Delivery, queue: HeldIn) -> Held {
    let p = &delivery.properties;
    Held {
        queue,
        attempt: headers::attempt(p),
        first_failed_ms: headers::first_failed(p),
        alone: headers::alone(p),
        error: headers::header_opt_str(p, crate::broker::header::ERROR),
        body: delivery.data.clone(),
    }
}

/// A DLQ message as a [`Held`] (its facts as the DLQ listing reads them).
fn held_dead(delivery: &lapin::message::Delivery) -> Held {
    let dead = Dead::read(&delivery.properties);
    Held {
        queue: HeldIn::Dlq {
            source: dead.source,
            kind: dead.kind,
            reference: dead.reference,
            dead_at_ms: dead.dead_at_ms,
        },
        attempt: dead.attempts,
        first_failed_ms: dead.first_failed_ms,
        alone: false,
        error: dead.error,
        body: delivery.data.clone(),
    }
}

/// The headers that carry a [`Held`] message's facts, and the exchange and routing key it
/// goes to: the target's exchange (by partition) for a waiting change, the DLQ for a dead one.
fn held_headers(topology: &Topology, target: &str, held: &Held) -> (String, String, FieldTable) {
    let names = &topology.names;
    match &held.queue {
        HeldIn::Deliver | HeldIn::Retry => {
            let mut headers = headers::waiting(
                held.attempt,
                held.first_failed_ms,
                held.alone,
                held.error.as_deref(),
            );
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
            let dead = Dead {
                source: source.clone(),
                kind: kind.clone(),
                reference: reference.clone(),
                attempts: held.attempt,
                error: held.error.clone(),
                first_failed_ms: held.first_failed_ms,
                dead_at_ms: *dead_at_ms,
            };
            (String::new(), names.dlq(target), dead.headers())
        }
    }
}
