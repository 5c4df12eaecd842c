//! A pull target's inbox across instances. One instance serves it, the active consumer of
//! its request queue `<prefix>.inbox.<target>`: [`RabbitBroker::serve_requests`] hands each
//! request to the local inbox (`deliver::pull`) and sends the answer back to the asker's own
//! queue. [`RabbitBroker::call_inbox`] is the asking side: local when this instance serves
//! the inbox, otherwise a request with `reply_to` and a correlation id, answered through
//! the control channel (`Consuming::heard`).

use super::consume::{publish_control, unavailable, Link};
use super::RabbitBroker;
use crate::broker::{BrokerError, InboxCall};
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// The longest an inbox request is waited for by the instance serving it.
const MAX_CALL: Duration = Duration::from_secs(180);

impl RabbitBroker {
    /// Answers the requests of a pull target's request queue until `cancel` or the consumer
    /// ends: the first makes this instance the inbox's server, until then.
    pub(super) async fn serve_requests(
        self: Arc<Self>,
        target: String,
        (ch, mut requests): (Channel, lapin::Consumer),
        serve: mpsc::Sender<InboxCall>,
        cancel: CancellationToken,
        finished: Arc<AtomicBool>,
    ) {
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => break,
                next = requests.next() => next,
            };
            let Some(Ok(delivery)) = next else { break };
            self.consuming.serving_starts(&target);
            if !self.answer_request(&serve, delivery).await {
                break;
            }
        }
        self.consuming.serving_ends(&target);
        let _ = ch.close(200, "inbox consumer stopped".into()).await;
        finished.store(true, Ordering::SeqCst);
    }

    /// Hands a request from another instance (or this one) to the inbox and sends its answer
    /// back when it comes. False when the inbox has stopped.
    async fn answer_request(
        &self,
        serve: &mpsc::Sender<InboxCall>,
        delivery: lapin::message::Delivery,
    ) -> bool {
        let props = &delivery.properties;
        let (Some(reply_to), Some(id)) = (props.reply_to().clone(), props.correlation_id().clone())
        else {
            return true;
        };
        let (tx, rx) = oneshot::channel();
        let call = InboxCall {
            body: delivery.data,
            reply: tx,
        };
        if serve.send(call).await.is_err() {
            return false;
        }
        let Some(link) = self.consuming.link() else {
            return true;
        };
        tokio::spawn(async move {
            if let Ok(Ok(answer)) = tokio::time::timeout(MAX_CALL, rx).await {
                let props = BasicProperties::default().with_correlation_id(id);
                let sent = publish_control(&link.channel, "", reply_to.as_str(), props, &answer);
                if let Err(e) = sent.await {
                    debug!(error = %e, "could not answer an inbox request");
                }
            }
        });
        true
    }

    /// Sends a request to the pull target's inbox, wherever it is served, and waits for the
    /// answer.
    pub(super) async fn call_inbox(
        &self,
        target: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, BrokerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (tx, rx) = oneshot::channel();
        let mut sent = None;
        if let Some(serve) = self.consuming.local_inbox(target) {
            let call = InboxCall { body, reply: tx };
            serve.send(call).await.map_err(|_| {
                BrokerError::Unavailable(format!("the inbox of {target} is not running"))
            })?;
        } else {
            let link = self.consuming.link_by(deadline).await.ok_or_else(|| {
                BrokerError::Unavailable(format!(
                    "not connected to RabbitMQ within {} s; try again",
                    timeout.as_secs()
                ))
            })?;
            sent = Some(self.send_request(&link, target, &body, tx, timeout).await?);
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(BrokerError::Unavailable(format!(
                "the lxbridge instance serving the inbox of {target} went away; try again"
            ))),
            Err(_) => {
                if let Some(id) = sent {
                    self.consuming.forget_call(&id);
                }
                Err(BrokerError::Unavailable(format!(
                    "no lxbridge instance answered for the inbox of {target} within {} s; try again",
                    timeout.as_secs()
                )))
            }
        }
    }

    /// Publishes a request to the target's request queue, its answer to come to this
    /// instance's own queue (expiring with the caller's `timeout`); the correlation id.
    async fn send_request(
        &self,
        link: &Link,
        target: &str,
        body: &[u8],
        answer: oneshot::Sender<Vec<u8>>,
        timeout: Duration,
    ) -> Result<String, BrokerError> {
        let id = self.consuming.expect_answer(answer);
        let props = BasicProperties::default()
            .with_reply_to(link.reply_to.as_str().into())
            .with_correlation_id(id.as_str().into())
            .with_expiration(timeout.as_millis().to_string().as_str().into());
        let queue = self.topology.names.inbox(target);
        let published = link
            .channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await;
        if let Err(e) = published {
            self.consuming.forget_call(&id);
            return Err(unavailable(e));
        }
        Ok(id)
    }
}
