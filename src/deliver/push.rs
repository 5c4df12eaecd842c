//! Push delivery: consumes a target's queue and POSTs batches of changes to the target
//! (docs/api.md "Delivering to a push node"), through [`Core`] for everything but the HTTP.
//! A circuit breaker per target pauses deliveries while the target is unreachable.

use super::rest::{Rest, Trouble};
use super::site::{Sent, Site};
use super::{Answer, Batch, Core, DeliverError, Item};
use crate::broker::Incoming;
use crate::config::{Auth, DeliverConfig, DeliverMode};
use crate::metrics::Metrics;
use crate::model::{OutgoingChange, StoredChange};
use serde::Serialize;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub struct PushTarget {
    pub name: String,
    pub url: String,
    pub auth: Option<Auth>,
    pub batch_max: usize,
    pub timeout: Duration,
    pub gzip: bool,
    pub concurrency: usize,
    pub client: reqwest::Client,
    pub core: Core,
    breaker: Breaker,
    wire: Wire,
}

/// How a batch goes to the target.
enum Wire {
    /// lxbridge's delivery body (docs/api.md "Delivering to a push node").
    Json,
    /// `mode = "commerceml"`: a package to a CommerceML site.
    Site(Site),
    /// `mode = "http"`: one REST request per change.
    Rest(Rest),
}

impl PushTarget {
    pub fn new(
        d: &DeliverConfig,
        core: Core,
        metrics: &Metrics,
    ) -> Result<PushTarget, DeliverError> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(d.concurrency)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| DeliverError::Client(e.to_string()))?;
        let wire = match d.mode {
            DeliverMode::Commerceml => Wire::Site(Site::new(&core.name, d)?),
            DeliverMode::Http => {
                let rest = metrics.integrations.rest(&core.name);
                Wire::Rest(Rest::new(
                    &core.name,
                    d,
                    client.clone(),
                    core.store.clone(),
                    rest,
                )?)
            }
            _ => Wire::Json,
        };
        Ok(PushTarget {
            name: core.name.clone(),
            url: d.url.clone().unwrap_or_default(),
            auth: d.auth.clone(),
            // A REST service takes one change per request.
            batch_max: if matches!(wire, Wire::Rest(_)) {
                1
            } else {
                d.batch_max
            },
            timeout: d.timeout.0,
            gzip: d.gzip,
            // A site takes one exchange at a time (init wipes what it was sent).
            concurrency: if matches!(wire, Wire::Site(_)) {
                1
            } else {
                d.concurrency
            },
            client,
            wire,
            breaker: Breaker::new(core.metrics.breaker_open.clone()),
            core,
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
        let mut incoming = target
            .core
            .broker
            .consume(&target.core.name, target.prefetch());
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
                let Some((message, change)) = t.core.read(message).await else {
                    continue;
                };
                let mut h = std::collections::hash_map::DefaultHasher::new();
                change.reference.hash(&mut h);
                let lane = (h.finish() % lanes.len() as u64) as usize;
                if lanes[lane].send((message, change)).await.is_err() {
                    break;
                }
            }
            debug!(target = %t.core.name, "dispatcher stopped");
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
        debug!(target = %self.core.name, lane, "lane stopped");
    }
    /// Delivers one batch and settles every message in it.
    async fn deliver_batch(
        &self,
        batch: Vec<(Incoming, StoredChange)>,
        cancel: &CancellationToken,
    ) {
        // A change whose consumer is gone (connection lost, partition handed over) is given
        // out again by the broker: sending it now could overtake its own newer version.
        let batch: Vec<_> = batch.into_iter().filter(|(m, _)| !m.is_stale()).collect();
        if batch.is_empty() {
            return;
        }
        let Some(Batch {
            items: mut send,
            failed,
            records,
        }) = self.core.prepare(batch, cancel).await
        else {
            return;
        };
        // Send; while the breaker says the target is down, hold the batch and try again
        // (a held batch uses no retry step, so an outage does not walk changes to the DLQ).
        let mut held = false;
        let answer = loop {
            if send.is_empty() {
                break Ok(Answer::default());
            }
            {
                let Some(probe) = self.breaker.admit(cancel).await else {
                    return; // shutting down: unacked, redelivered after restart
                };
                if held {
                    // Held while the target was down: a group member gets only the current
                    // versions, checked again right before they go.
                    send = self.core.group_recheck(send).await;
                    if send.is_empty() {
                        self.breaker.release(probe);
                        break Ok(Answer::default());
                    }
                }
                self.core.metrics.inflight.add(send.len() as i64);
                let started = Instant::now();
                let answer = match &self.wire {
                    Wire::Site(site) => sent(site.send(&send).await),
                    Wire::Rest(rest) => rest.send(&send, cancel).await.map_err(SendError::from),
                    Wire::Json => self.post(&send).await,
                };
                self.core
                    .metrics
                    .duration
                    .observe(started.elapsed().as_secs_f64());
                self.core.metrics.inflight.sub(send.len() as i64);
                match answer {
                    Err(SendError::Cancelled) => return, // unacked, redelivered after restart
                    Err(SendError::Unreachable(e)) => {
                        if self.breaker.unreachable(probe, &self.core.name, &e) {
                            held = true;
                            continue;
                        }
                        break Err(e);
                    }
                    Err(SendError::Refused(e)) => {
                        self.breaker.reachable(probe, &self.core.name);
                        break Err(e);
                    }
                    Ok(answer) => {
                        self.breaker.reachable(probe, &self.core.name);
                        break Ok(answer);
                    }
                }
            }
        };
        let batch = Batch {
            items: send,
            failed,
            records,
        };
        self.core.settle(batch, answer).await;
    }

    /// POSTs the batch. `Ok` maps the ids the target reported in error to (error, retry);
    /// `Err` is a whole-batch failure (transport, timeout, non-2xx).
    async fn post(&self, send: &[Item]) -> Result<Answer, SendError> {
        #[derive(Serialize)]
        struct Body<'a> {
            node: &'a str,
            changes: Vec<OutgoingChange<'a>>,
        }
        let body = Body {
            node: &self.core.name,
            changes: super::outgoing(send),
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
        Ok(super::parse_answer(&text))
    }
}

/// A site's package outcome as a batch's.
fn sent(outcome: Sent) -> Result<Answer, SendError> {
    match outcome {
        Sent::Delivered(answer) => Ok(answer),
        Sent::Unreachable(why) => Err(SendError::Unreachable(why)),
        Sent::Refused(why) => Err(SendError::Refused(why)),
    }
}

/// Why a whole batch failed.
enum SendError {
    /// The target could not be reached or is unavailable: counts toward the breaker.
    Unreachable(String),
    /// The target answered, but not 2xx: the batch goes to its retry step.
    Refused(String),
    /// Shutting down while the batch waited (for a rate slot, a pause): not settled.
    Cancelled,
}

impl From<Trouble> for SendError {
    fn from(t: Trouble) -> SendError {
        match t {
            Trouble::Unreachable(why) => SendError::Unreachable(why),
            Trouble::Cancelled => SendError::Cancelled,
        }
    }
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

    /// Gives back a probe that sent nothing, so another lane may probe.
    fn release(&self, probe: bool) {
        if probe {
            self.state.lock().expect("breaker lock").probing = false;
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
pub(super) fn describe(e: &reqwest::Error, timeout: Duration) -> String {
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
/// Logs the delivery set-up once at start.
pub fn announce(target: &PushTarget) {
    info!(target = %target.core.name, url = %target.url, batch_max = target.batch_max, concurrency = target.concurrency, "push delivery configured");
}
