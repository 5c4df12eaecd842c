//! One delivery queue partition's consumer on the consuming connection: [`Forward`] hands
//! its deliveries on to the target's delivery task, each with a [`Slot`] in the consumer's
//! [`Lease`] inside its [`Handle`]; giving the partition up drains (every message handed on
//! is settled) before the channel closes. Messages of a consumer that is gone are stale
//! ([`Handle::is_stale`]): the broker gives them out again, so delivery drops them instead
//! of sending them twice.
//!
//! Acks are coalesced per consumer through its [`Ledger`]: an ack is sent as one `multiple`
//! ack for the whole run of acked tags below the lowest tag still unsettled, so a batch of
//! 100 changes costs a frame or two instead of 100, and a `multiple` ack never covers a
//! message another lane still holds.

use super::consume::now_ms;
use super::headers;
use crate::broker::{AckHandle, Incoming};
use futures_util::StreamExt;
use lapin::Channel;
use std::collections::{BTreeMap, BTreeSet};
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

/// One consumer channel's delivery tags between handing on and their ack frame: those not
/// settled yet, and those acked whose ack waits for a lower tag to be settled.
///
/// Invariant: a `multiple` ack of tag T is sent only when every tag below T handed on by
/// this channel was acked (then it is in the run) or nacked (its frame already sent: it is
/// no longer unacked at the broker). A tag handed on and never settled (its consumer going
/// away, shutdown) stays unsettled, so nothing above it is acked: those come back, and
/// their delivery marks make them acked without sending.
///
/// A `multiple` ack covers every unacked tag below it, those of runs taken before it too: so
/// runs are taken and sent one at a time ([`Ledger::sending`]), in the order they were taken.
pub(crate) struct Ledger<A = lapin::Acker> {
    inner: std::sync::Mutex<LedgerInner<A>>,
    sending: tokio::sync::Mutex<()>,
}

struct LedgerInner<A> {
    unsettled: BTreeSet<u64>,
    acked: BTreeMap<u64, A>,
}

impl<A> Default for Ledger<A> {
    fn default() -> Self {
        Ledger {
            inner: std::sync::Mutex::new(LedgerInner {
                unsettled: BTreeSet::new(),
                acked: BTreeMap::new(),
            }),
            sending: tokio::sync::Mutex::new(()),
        }
    }
}

impl<A> Ledger<A> {
    fn handed_on(&self, tag: u64) {
        self.lock().unsettled.insert(tag);
    }

    /// Held from taking a run ([`Ledger::acked`], [`Ledger::settled`]) until its ack is sent.
    pub(super) async fn sending(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.sending.lock().await
    }

    /// `tag` acked: the acker to send a `multiple` ack with, when that completes a run.
    pub(super) fn acked(&self, tag: u64, acker: A) -> Option<A> {
        let mut inner = self.lock();
        inner.unsettled.remove(&tag);
        inner.acked.insert(tag, acker);
        inner.run()
    }

    /// `tag` settled otherwise (its nack was sent): the run it completed, if any.
    pub(super) fn settled(&self, tag: u64) -> Option<A> {
        let mut inner = self.lock();
        inner.unsettled.remove(&tag);
        inner.run()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerInner<A>> {
        self.inner.lock().expect("ledger lock")
    }
}

impl<A> LedgerInner<A> {
    /// Takes the acked tags below the lowest unsettled one; the acker of the highest.
    fn run(&mut self) -> Option<A> {
        let floor = self.unsettled.first().copied().unwrap_or(u64::MAX);
        let above = self.acked.split_off(&floor);
        let below = std::mem::replace(&mut self.acked, above);
        below.into_values().next_back()
    }
}

/// How a message consumed from RabbitMQ is settled: its delivery's acker and tag, its
/// consumer's [`Ledger`], and its place among its consumer's unsettled messages
/// (`AckHandle::Rabbit`).
pub(crate) struct Handle {
    pub(super) acker: lapin::Acker,
    pub(super) tag: u64,
    pub(super) ledger: Arc<Ledger>,
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
    pub(super) ledger: Arc<Ledger>,
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
                tag: {
                    self.ledger.handed_on(delivery.delivery_tag);
                    delivery.delivery_tag
                },
                ledger: self.ledger.clone(),
                slot: Slot::take(&self.lease),
            }),
            body: delivery.data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Ledger;

    /// Lanes settle out of order: an ack goes out only for a run below every unsettled tag,
    /// as one `multiple` ack of the run's highest tag.
    #[test]
    fn a_multiple_ack_never_covers_an_unsettled_tag() {
        let ledger: Ledger<u64> = Ledger::default();
        for tag in 1..=6 {
            ledger.handed_on(tag);
        }
        assert_eq!(ledger.acked(2, 2), None, "1 is still out");
        assert_eq!(ledger.acked(3, 3), None);
        assert_eq!(ledger.acked(1, 1), Some(3), "1..=3 in one ack");
        assert_eq!(ledger.acked(5, 5), None, "4 is still out");
        assert_eq!(
            ledger.settled(4),
            Some(5),
            "4 was returned: 5 alone is acked"
        );
        // 6 is never settled (its consumer went away): nothing above it goes.
        ledger.handed_on(7);
        assert_eq!(ledger.acked(7, 7), None);
        assert_eq!(ledger.settled(99), None, "an unknown tag changes nothing");
    }
}
