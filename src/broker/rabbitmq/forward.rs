//! One delivery queue partition's consumer on the consuming connection: [`Forward`] hands
//! its deliveries on to the target's delivery task, each with a [`Slot`] in the consumer's
//! [`Lease`] inside its [`Handle`]; giving the partition up drains (every message handed on
//! is settled) before the channel closes. Messages of a consumer that is gone are stale
//! ([`Handle::is_stale`]): the broker gives them out again, so delivery drops them instead
//! of sending them twice.

use super::consume::now_ms;
use super::headers;
use crate::broker::{AckHandle, Incoming};
use futures_util::StreamExt;
use lapin::Channel;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// One consumer's messages: whether they can still be settled, and how many are handed on
/// and not settled yet.
pub(super) struct Lease {
    alive: AtomicBool,
    open: AtomicUsize,
}

impl Lease {
    pub(super) fn new() -> Arc<Lease> {
        Arc::new(Lease {
            alive: AtomicBool::new(true),
            open: AtomicUsize::new(0),
        })
    }

    /// How many of its messages are handed on and not settled yet.
    pub(super) fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// A consumed message's place in its consumer's [`Lease`]; settling (or dropping) the
/// message gives it back.
struct Slot(Arc<Lease>);

impl Slot {
    fn take(lease: &Arc<Lease>) -> Slot {
        lease.open.fetch_add(1, Ordering::SeqCst);
        Slot(lease.clone())
    }

    fn is_stale(&self) -> bool {
        !self.0.alive.load(Ordering::SeqCst)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a message consumed from RabbitMQ is settled: its delivery's acker, and its place
/// among its consumer's unsettled messages (`AckHandle::Rabbit`).
pub(crate) struct Handle {
    pub(super) acker: lapin::Acker,
    slot: Slot,
}

impl Handle {
    /// True once the consumer it came from is gone: it can no longer be settled.
    pub(crate) fn is_stale(&self) -> bool {
        self.slot.is_stale()
    }
}

/// Hands one queue's deliveries on to the target's delivery task.
pub(super) struct Forward {
    pub(super) target: String,
    pub(super) partition: u16,
    pub(super) lease: Arc<Lease>,
    /// When the last delivery came (ms since the Unix epoch).
    pub(super) last: Arc<AtomicU64>,
    pub(super) tx: mpsc::Sender<Incoming>,
    pub(super) drain: bool,
}

impl Forward {
    pub(super) async fn run(
        self,
        ch: Channel,
        mut consumer: lapin::Consumer,
        release: CancellationToken,
        stop: CancellationToken,
        done: Arc<AtomicBool>,
    ) {
        // True when this instance gives the queue up; false when the consumer is gone.
        let released = loop {
            let next = tokio::select! {
                _ = release.cancelled() => break true,
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    self.last.store(now_ms(), Ordering::SeqCst);
                    let incoming = self.incoming(delivery);
                    tokio::select! {
                        _ = release.cancelled() => break true,
                        sent = self.tx.send(incoming) => if sent.is_err() { break false },
                    }
                }
                Some(Err(e)) => {
                    warn!(target = %self.target, partition = self.partition, error = %e, "consumer failed");
                    break false;
                }
                None => break false,
            }
        };
        // Given up: everything handed on is settled before the channel closes, so whoever
        // consumes the queue next starts right after it (what was prefetched and not handed
        // on goes back). Gone: nothing of it can be settled any more.
        let drain = released && self.drain;
        while drain && self.lease.open.load(Ordering::SeqCst) > 0 && !stop.is_cancelled() {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        self.lease.alive.store(false, Ordering::SeqCst);
        let _ = ch.close(200, "consumer released".into()).await;
        debug!(target = %self.target, partition = self.partition, "consumer stopped");
        done.store(true, Ordering::SeqCst);
    }

    fn incoming(&self, delivery: lapin::message::Delivery) -> Incoming {
        let p = &delivery.properties;
        Incoming {
            attempt: headers::attempt(p),
            first_failed_ms: headers::first_failed(p),
            alone: headers::alone(p),
            partition: self.partition,
            handle: AckHandle::Rabbit(Handle {
                acker: delivery.acker,
                slot: Slot::take(&self.lease),
            }),
            body: delivery.data,
        }
    }
}
