//! The publishing side of [`RabbitBroker`]: one connection and one confirm-mode channel,
//! kept by a supervisor (reconnect with backoff, flow control, the refusal watch: a node
//! refusing every publish for [`REFUSING_FOR`] is left for the next), and every confirmed
//! publish: changes from ingress, single messages to a queue or a target's exchange (retry
//! and DLQ moves, replays), and the admin channels the DLQ and export work on.

use super::{backoff, RabbitBroker, Role};
use crate::broker::{body_ref, BrokerError, Outgoing, PublishOutcome};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

pub(super) struct Publisher {
    conn: Arc<Connection>,
    /// One confirm-mode channel for every publish: measured faster than several, as RabbitMQ
    /// coalesces confirms better (BENCHMARKS.md).
    channel: Channel,
}

/// How long moving a failed change to a retry step waits for a publishing connection.
const PUBLISH_WAIT: Duration = Duration::from_secs(30);

/// How long a node may refuse every publish before the publishing connection moves on.
const REFUSING_FOR: Duration = Duration::from_secs(5);

/// A change's confirm as its outcome.
fn outcome(confirmation: lapin::Confirmation) -> PublishOutcome {
    match confirmation {
        lapin::Confirmation::Ack(None) => PublishOutcome::Confirmed,
        lapin::Confirmation::Ack(Some(_)) => PublishOutcome::Unroutable,
        _ => PublishOutcome::Refused,
    }
}

/// A persistent JSON message with these headers.
pub(super) fn properties(headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers)
}

/// Mandatory: a message no queue takes is returned, not dropped.
pub(super) fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    }
}

impl RabbitBroker {
    pub(super) async fn publishing_supervisor(self: Arc<Self>, up_gauge: prometheus::IntGauge) {
        let mut attempt = 0u32;
        while !self.cancel.is_cancelled() {
            let Some(conn) = self.connect_publisher(attempt).await else {
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff(attempt)) => continue,
                    _ = self.cancel.cancelled() => break,
                }
            };
            attempt = 0;
            self.blocked.store(false, Ordering::SeqCst);
            self.up.store(true, Ordering::SeqCst);
            up_gauge.set(1);
            info!("publishing connection to RabbitMQ is up");
            self.watch_publishing(&conn).await;
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

    /// Connects, declares the topology and opens the publishing channel; `None` (logged)
    /// when any of it failed: the caller backs off and tries again.
    async fn connect_publisher(&self, attempt: u32) -> Option<Arc<Connection>> {
        let conn = match self.nodes.connect(Role::Publish).await {
            Ok(conn) => Arc::new(conn),
            Err(e) => {
                if attempt == 0 {
                    error!(error = %e, "cannot connect to RabbitMQ for publishing; retrying");
                } else {
                    warn!(error = %e, attempt, "cannot connect to RabbitMQ for publishing; retrying");
                }
                return None;
            }
        };
        match self.open_publisher(&conn).await {
            Ok(p) => {
                *self.publisher.lock().expect("publisher lock") = Some(Arc::new(p));
                Some(conn)
            }
            Err(e) => {
                error!(error = %e, "cannot set up the broker topology; retrying");
                self.nodes.lost(Role::Publish);
                let _ = conn.close(200, "setup failed".into()).await;
                None
            }
        }
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

    /// Follows the publishing connection until it is lost, a publish asks for another node,
    /// or lxbridge stops; flow control blocks and unblocks publishing meanwhile.
    async fn watch_publishing(&self, conn: &Connection) {
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
    }

    /// [`Broker::publish`](crate::broker::Broker::publish): every message pipelined on the
    /// publishing channel, then every confirm awaited.
    pub(super) async fn publish_changes(
        &self,
        source: &str,
        messages: &[Outgoing],
    ) -> Result<Vec<PublishOutcome>, BrokerError> {
        let ch = self.channel()?;
        let exchange: ShortString = self.topology.names.exchange(source).into();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            confirms.push(self.publish_change(&ch, &exchange, m, now).await?);
        }
        let mut outcomes = Vec::with_capacity(confirms.len());
        for confirm in confirms {
            outcomes.push(outcome(confirm.await.map_err(|e| self.lost(e))?));
        }
        self.note_refusals(&outcomes);
        Ok(outcomes)
    }

    /// Publishes one change to its source exchange (routing key: its type) with its
    /// partition header; the confirm is the caller's to await.
    async fn publish_change(
        &self,
        ch: &Channel,
        exchange: &ShortString,
        m: &Outgoing,
        now: u64,
    ) -> Result<PublisherConfirm, BrokerError> {
        let mut headers = FieldTable::default();
        self.topology.mark_partition(&mut headers, m.partition);
        let props = properties(headers)
            .with_message_id(m.id.as_str().into())
            .with_timestamp(now);
        ch.basic_publish(
            exchange.clone(),
            m.kind.as_str().into(),
            mandatory(),
            &m.body,
            props,
        )
        .await
        .map_err(|e| self.lost(e))
    }

    pub(super) fn publisher(&self) -> Result<Arc<Publisher>, BrokerError> {
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

    pub(super) fn channel(&self) -> Result<Channel, BrokerError> {
        let p = self.publisher()?;
        Ok(p.channel.clone())
    }

    pub(super) fn lost(&self, e: lapin::Error) -> BrokerError {
        self.reconnect.notify_one();
        BrokerError::Unavailable(e.to_string())
    }

    /// Watches the broker's answers: a node that has refused every publish for
    /// [`REFUSING_FOR`] (quorum queues it cannot reach the leaders of) is left for the next.
    pub(super) fn note_refusals(&self, outcomes: &[PublishOutcome]) {
        if outcomes.iter().any(|o| *o != PublishOutcome::Refused) || outcomes.is_empty() {
            if self.refused_since.load(Ordering::Relaxed) != 0 {
                self.refused_since.store(0, Ordering::SeqCst);
            }
            return;
        }
        let now = crate::clock::unix_ms_now();
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
    pub(super) async fn publish_to_queue(
        &self,
        queue: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<(), BrokerError> {
        self.publish_confirmed("", queue, body, headers).await
    }

    /// [`Self::publish_to_queue`], waiting up to [`PUBLISH_WAIT`] for a publishing
    /// connection that is being made again (a failed change is held meanwhile).
    pub(super) async fn publish_waiting(
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

    /// Publishes one change back into the target's delivery queues (its partition from the
    /// ref in its body) and waits for the confirm.
    pub(super) async fn publish_to_target(
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
    pub(super) async fn publish_confirmed(
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
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                mandatory(),
                body,
                properties(headers),
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
    pub(super) async fn admin_channel(&self) -> Result<Channel, BrokerError> {
        let p = self.publisher()?;
        let ch = p.conn.create_channel().await.map_err(|e| self.lost(e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| self.lost(e))?;
        Ok(ch)
    }
}
