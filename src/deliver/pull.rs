//! Pull delivery: the inbox of a node that can't accept connections (docs/api.md "Pulling").
//!
//! The node long-polls; lxbridge hands out one numbered message at a time, built from the
//! target's queue through [`Core`] like a push batch. The changes stay unacked in RabbitMQ
//! (held by this process up to the consumer's prefetch) until the node confirms the message;
//! nothing is copied to memory beyond that or to Redis.
//!
//! Numbering, like an exchange plan's MessageNo/ReceivedNo:
//! - numbers come from a counter in the store, so they only grow, across restarts too;
//! - until it is confirmed, polling returns the same message: same number, same changes (a
//!   second poller gets that same message, never another);
//! - after the lease runs out, the unconfirmed message is offered again under a new number
//!   (the same changes); confirming any number it was offered under confirms it;
//! - confirming N confirms everything up to N: there is never more than one unconfirmed
//!   message, so that is the outstanding one when N is at least its first number; a number
//!   below that was confirmed before (or belonged to a process that was restarted: its changes
//!   went back to the queue and come again in a new message) and confirms nothing;
//! - one instance serves the inbox ([`crate::broker::Broker::inbox_serve`]): a poll or an
//!   ack that reaches another instance is handed to it and its answer relayed ([`call`]),
//!   so a node may poll one instance and ack another. Only the serving instance consumes
//!   the target's queue; when it goes, another serves, and the changes of its unconfirmed
//!   message come again in a new message (as after a restart).

use super::{outgoing, parse_answer, Batch, Core, Item};
use crate::broker::{Broker, InboxCall, Incoming};
use crate::model::StoredChange;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("message_no {given} was never sent to this node (the last is {last})")]
    NeverSent { given: i64, last: i64 },
    #[error("results: {0}")]
    BadResults(String),
}

/// A pull target's inbox.
pub struct Inbox {
    core: Core,
    batch_max: usize,
    lease: Duration,
    state: Mutex<State>,
    /// Bumped whenever a change arrives from the queue.
    arrived: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// Taken from the queue, not yet in a message.
    pending: VecDeque<(Incoming, StoredChange)>,
    outstanding: Option<Outstanding>,
}

/// The one message handed out and not yet confirmed.
struct Outstanding {
    first_no: i64,
    no: i64,
    leased_until: Instant,
    items: Vec<Item>,
}

impl Outstanding {
    fn body(&self) -> Value {
        json!({ "message_no": self.no, "changes": outgoing(&self.items) })
    }
}

impl Inbox {
    pub fn new(core: Core, batch_max: usize, lease: Duration) -> Arc<Inbox> {
        Arc::new(Inbox {
            core,
            batch_max,
            lease,
            state: Mutex::new(State::default()),
            arrived: watch::channel(0).0,
        })
    }

    /// Starts answering the inbox's requests and taking the target's queue into the inbox,
    /// until `cancel`.
    pub fn start(self: &Arc<Self>, cancel: CancellationToken, tracker: &TaskTracker) {
        let mut calls = self.core.broker.inbox_serve(&self.core.name);
        let (inbox, stop) = (self.clone(), cancel.clone());
        tracker.spawn(async move {
            loop {
                let call = tokio::select! {
                    _ = stop.cancelled() => break,
                    c = calls.recv() => match c { Some(c) => c, None => break },
                };
                tokio::spawn(inbox.clone().answer(call, stop.clone()));
            }
        });
        let prefetch = (self.batch_max * 4).clamp(1, 10_000) as u16;
        let mut incoming = self.core.broker.consume(&self.core.name, prefetch);
        let inbox = self.clone();
        tracker.spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = cancel.cancelled() => break,
                    m = incoming.recv() => match m { Some(m) => m, None => break },
                };
                let Some(item) = inbox.core.read(message).await else {
                    continue;
                };
                inbox.state.lock().await.pending.push_back(item);
                inbox.arrived.send_modify(|n| *n += 1);
            }
            debug!(target = %inbox.core.name, "inbox stopped taking changes");
        });
    }

    /// Answers one request handed over by the broker.
    async fn answer(self: Arc<Self>, call: InboxCall, cancel: CancellationToken) {
        let reply = match serde_json::from_slice::<Request>(&call.body) {
            Ok(Request::Poll { limit, wait_ms }) => {
                match self
                    .poll(limit, Duration::from_millis(wait_ms), &cancel)
                    .await
                {
                    Ok(body) => Reply::new(200, body),
                    Err(e) => Reply::error(503, e.to_string()),
                }
            }
            Ok(Request::Ack {
                message_no,
                results,
            }) => match self.ack(message_no, results.as_ref()).await {
                Ok(confirmed) => Reply::new(200, json!({ "confirmed": confirmed })),
                Err(e @ InboxError::Unavailable(_)) => Reply::error(503, e.to_string()),
                Err(e) => Reply::error(400, e.to_string()),
            },
            Err(e) => Reply::error(400, format!("not an inbox request: {e}")),
        };
        let body = serde_json::to_vec(&reply).expect("reply serialises");
        let _ = call.reply.send(body);
    }

    /// Drops what can no longer be settled (its consumer is gone): pending changes, and the
    /// outstanding message if any of its changes is such. The broker gives them out again.
    fn drop_stale(&self, state: &mut State) {
        state.pending.retain(|(m, _)| !m.is_stale());
        let stale = state
            .outstanding
            .as_ref()
            .is_some_and(|o| o.items.iter().any(|i| i.message.is_stale()));
        if stale {
            let o = state.outstanding.take().expect("checked above");
            self.core.metrics.inflight.sub(o.items.len() as i64);
            warn!(target = %self.core.name, message_no = o.no, "the unconfirmed inbox message was lost with the broker connection; its changes come again in a new message");
        }
    }

    /// `GET …/inbox?limit=&wait=`: the outstanding message, or a new one once changes are
    /// there (waiting up to `wait`), or `{"message_no": null, "changes": []}`.
    pub async fn poll(
        &self,
        limit: usize,
        wait: Duration,
        cancel: &CancellationToken,
    ) -> Result<Value, InboxError> {
        let limit = limit.clamp(1, self.batch_max);
        let deadline = tokio::time::Instant::now() + wait;
        let mut arrived = self.arrived.subscribe();
        loop {
            arrived.borrow_and_update();
            {
                let mut state = self.state.lock().await;
                self.drop_stale(&mut state);
                if let Some(o) = state.outstanding.as_mut() {
                    if Instant::now() >= o.leased_until {
                        // The lease ran out: offer the same changes again under a new number.
                        o.no = self.next_no().await?;
                        o.leased_until = Instant::now() + self.lease;
                    }
                    return Ok(o.body());
                }
                while !state.pending.is_empty() {
                    let take = limit.min(state.pending.len());
                    let batch: Vec<_> = state.pending.drain(..take).collect();
                    let Some(Batch {
                        items: send,
                        failed,
                        records,
                    }) = self.core.prepare(batch, cancel).await
                    else {
                        return Ok(empty());
                    };
                    // What was superseded, filtered or failed on the way is settled now.
                    let aside = Batch {
                        items: Vec::new(),
                        failed,
                        records,
                    };
                    self.core.settle(aside, Ok(Default::default())).await;
                    if send.is_empty() {
                        continue;
                    }
                    let no = match self.next_no().await {
                        Ok(no) => no,
                        Err(e) => {
                            // Back to the front, in order, for the next poll.
                            for item in send.into_iter().rev() {
                                state.pending.push_front((item.message, item.change));
                            }
                            return Err(e);
                        }
                    };
                    self.core.metrics.inflight.add(send.len() as i64);
                    let o = Outstanding {
                        first_no: no,
                        no,
                        leased_until: Instant::now() + self.lease,
                        items: send,
                    };
                    let body = o.body();
                    state.outstanding = Some(o);
                    return Ok(body);
                }
            }
            tokio::select! {
                _ = arrived.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(empty()),
                _ = cancel.cancelled() => return Ok(empty()),
            }
        }
    }

    /// `POST …/inbox/ack`: confirms the outstanding message if `message_no` is one it was
    /// offered under (or later than its first), settling each change by `results`. Returns
    /// how many changes were confirmed.
    pub async fn ack(&self, message_no: i64, results: Option<&Value>) -> Result<usize, InboxError> {
        let answer = match results {
            None => Default::default(),
            Some(r) if r.is_array() => parse_answer(json!({ "results": r }).to_string().as_bytes()),
            Some(_) => {
                return Err(InboxError::BadResults(
                    "expected an array of {id, status, error, retry}".into(),
                ))
            }
        };
        let mut state = self.state.lock().await;
        self.drop_stale(&mut state);
        let Some(o) = state.outstanding.as_ref() else {
            return Ok(0);
        };
        if message_no > o.no {
            return Err(InboxError::NeverSent {
                given: message_no,
                last: o.no,
            });
        }
        if message_no < o.first_no {
            return Ok(0);
        }
        let o = state.outstanding.take().expect("checked above");
        drop(state);
        let confirmed = o.items.len();
        self.core.metrics.inflight.sub(confirmed as i64);
        self.core.settle(Batch::of(o.items), Ok(answer)).await;
        Ok(confirmed)
    }

    async fn next_no(&self) -> Result<i64, InboxError> {
        self.core
            .store
            .next_message_no(&self.core.name)
            .await
            .map_err(|e| {
                warn!(target = %self.core.name, error = %e, "cannot number an inbox message");
                InboxError::Unavailable(e.to_string())
            })
    }
}

fn empty() -> Value {
    json!({ "message_no": null, "changes": [] })
}

/// A request to an inbox, as it travels to the instance that serves it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Poll {
        limit: usize,
        wait_ms: u64,
    },
    Ack {
        message_no: i64,
        results: Option<Value>,
    },
}

/// An inbox's answer: the HTTP status and JSON body the node gets.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    fn new(status: u16, body: Value) -> Reply {
        Reply { status, body }
    }

    fn error(status: u16, error: String) -> Reply {
        Reply::new(status, json!({ "error": error }))
    }
}

/// Sends a request to the target's inbox, wherever it is served, and waits at most
/// `timeout` for the answer; a broker that can't carry it answers 503.
pub async fn call(
    broker: &dyn Broker,
    target: &str,
    request: &Request,
    timeout: Duration,
) -> Reply {
    let body = serde_json::to_vec(request).expect("request serialises");
    match broker.inbox_call(target, body, timeout).await {
        Ok(answer) => serde_json::from_slice(&answer).unwrap_or_else(|e| {
            Reply::error(
                502,
                format!("the instance serving this inbox answered badly: {e}"),
            )
        }),
        Err(e) => Reply::error(503, e.to_string()),
    }
}
