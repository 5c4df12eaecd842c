//! Accepting the items of a changes request: each becomes one [`Item`] whose [`Fate`] is
//! decided step by step — routing, dedupe by id (in the request, then against the store's
//! idempotency keys), parallel copies, publishing with confirms — then its id is committed
//! or released, its status and history recorded, and the answer built from the fates.
//!
//! Invariant: 202 (or 207) is never sent before the broker confirmed every change it
//! reports as accepted.

use crate::broker::{BrokerError, Held, HeldIn, Outgoing, PublishOutcome};
use crate::copies::{self, Arrival};
use crate::group::Admit;
use crate::http::error_response;
use crate::model::{Change, Envelope};
use crate::store::{
    Admission, HistoryEvent, IdState, Record, State as ObjState, StatusUpdate, PENDING_ID_RENEW,
};
use crate::AppState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use std::collections::HashSet;
use tracing::{info, warn};

/// One item of a request on its way through.
struct Item {
    /// `None` when the item is not a change.
    change: Option<Change>,
    fate: Fate,
    /// The id answered: the client's, or the one given when published.
    id: Option<String>,
    /// The seq it was published with.
    seq: i64,
}

/// What became of one item.
enum Fate {
    Rejected(String),
    /// No route takes its type from this node (recorded as `unroutable`).
    Unroutable(String),
    Duplicate,
    Publish {
        targets: Vec<String>,
    },
    Accepted {
        targets: Vec<String>,
    },
    /// A group member's change its group does not take (`event`: echo, conflict, loop,
    /// superseded): answered accepted, recorded, not published.
    Dropped {
        event: &'static str,
        detail: String,
    },
}

impl Item {
    fn publishing(&self) -> bool {
        matches!(self.fate, Fate::Publish { .. })
    }

    /// The client's id, when the item is a change that has one.
    fn given_id(&self) -> Option<&str> {
        self.change.as_ref()?.id.as_deref()
    }
}

/// The messages to publish, each with the index of its item (kept in step here only).
#[derive(Default)]
struct Outbox {
    messages: Vec<Outgoing>,
    items: Vec<usize>,
}

impl Outbox {
    fn push(&mut self, item: usize, message: Outgoing) {
        self.items.push(item);
        self.messages.push(message);
    }

    /// (item index, message) pairs.
    fn iter(&self) -> impl Iterator<Item = (usize, &Outgoing)> {
        self.items.iter().copied().zip(&self.messages)
    }

    /// Keeps the messages whose item `keep` says.
    fn retain(&mut self, keep: impl Fn(usize) -> bool) {
        let flags: Vec<bool> = self.items.iter().map(|&i| keep(i)).collect();
        let mut f = flags.iter();
        self.messages
            .retain(|_| *f.next().expect("one flag per message"));
        let mut f = flags.iter();
        self.items
            .retain(|_| *f.next().expect("one flag per message"));
    }
}

/// Accepts what it can of `parsed` (each a change or why it is not one) and answers.
pub(super) async fn accept(
    app: &AppState,
    node: &str,
    parsed: Vec<Result<Change, String>>,
) -> Response {
    match decide(app, node, parsed).await {
        Ok(items) => answer(app, node, items),
        Err(Unavailable(why)) => error_response(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// The broker or the store is away: nothing was accepted (a 503, or `progress` to 1C).
#[derive(Debug)]
pub(crate) struct Unavailable(pub String);

/// What became of one change, for callers other than the changes endpoint (CommerceML).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Published with confirms (or dropped by its group, recorded).
    Accepted,
    Duplicate,
    /// No route takes its type from this node (recorded `unroutable`).
    Unroutable,
    /// Not accepted; the reason (a broker that refused it: retry).
    Rejected(String),
}

/// [`accept`]'s work without the HTTP answer: each change's verdict, in order.
pub(crate) async fn accept_changes(
    app: &AppState,
    node: &str,
    changes: Vec<Change>,
) -> Result<Vec<Verdict>, Unavailable> {
    let verdicts = accept_with_ids(app, node, changes).await?;
    Ok(verdicts.into_iter().map(|(verdict, _)| verdict).collect())
}

/// [`accept_changes`] with each change's id: the sender's, or the one given when published.
pub(crate) async fn accept_with_ids(
    app: &AppState,
    node: &str,
    changes: Vec<Change>,
) -> Result<Vec<(Verdict, Option<String>)>, Unavailable> {
    let items = decide(app, node, changes.into_iter().map(Ok).collect()).await?;
    let verdict = |item: Item| {
        let verdict = match item.fate {
            Fate::Accepted { .. } | Fate::Dropped { .. } => Verdict::Accepted,
            Fate::Duplicate => Verdict::Duplicate,
            Fate::Unroutable(_) => Verdict::Unroutable,
            Fate::Rejected(why) => Verdict::Rejected(why),
            Fate::Publish { .. } => Verdict::Rejected("not published".into()),
        };
        (verdict, item.id)
    };
    Ok(items.into_iter().map(verdict).collect())
}

/// Decides each item's fate: routed, deduped, admitted, published with confirms, recorded.
async fn decide(
    app: &AppState,
    node: &str,
    parsed: Vec<Result<Change, String>>,
) -> Result<Vec<Item>, Unavailable> {
    let mut items = routed(app, node, parsed);
    let given = dedupe_in_request(&mut items);
    let admission = admit_ids(app, node, &items, &given).await?;
    let reserved = apply_id_states(&mut items, &given, admission.as_ref());
    let reserved_ids: Vec<&str> = reserved
        .iter()
        .filter_map(|&i| items[i].given_id())
        .collect();
    // The reservations are short (a dead instance's expire within seconds): renewed while
    // this request publishes, until it commits or releases them (or this guard drops).
    let renewal = KeepReserved::start(app, node, &reserved_ids);
    let reserved_ids: Vec<String> = reserved_ids.into_iter().map(String::from).collect();
    let accepted_ms = crate::clock::unix_ms_now();
    let first_seq = admission.as_ref().map(|a| a.first_seq).unwrap_or(0);
    let mut outgoing = envelopes(app, node, &mut items, first_seq, accepted_ms);
    let conflicts = match group_verdicts(app, node, &mut items, &mut outgoing, accepted_ms).await {
        Ok(conflicts) => conflicts,
        Err(e) => {
            app.metrics.store_up.set(0);
            warn!(%node, error = %e, "store unavailable for group state at ingress");
            release(app, node, &reserved_ids).await;
            let why = format!("the store is unavailable ({e}); nothing was accepted, retry later");
            return Err(Unavailable(why));
        }
    };
    if let Err(e) = publish(app, node, &mut items, &outgoing).await {
        warn!(%node, error = %e, "publish failed");
        release(app, node, &reserved_ids).await;
        let why = format!("the broker (RabbitMQ) is unavailable ({e}); retry later");
        return Err(Unavailable(why));
    }
    refeed_winners(app, node, &outgoing, &conflicts).await;
    drop(renewal);
    finish(app, node, &items, &reserved, accepted_ms, &conflicts).await;
    Ok(items)
}

/// Each parsed item with the targets its type is routed to (or why it is not published).
fn routed(app: &AppState, node: &str, parsed: Vec<Result<Change, String>>) -> Vec<Item> {
    let item = |change, fate| Item {
        change,
        fate,
        id: None,
        seq: 0,
    };
    parsed
        .into_iter()
        .map(|parsed| match parsed {
            Err(e) => item(None, Fate::Rejected(e)),
            Ok(change) => {
                let targets: Vec<String> = app
                    .routes
                    .targets(node, &change.kind)
                    .into_iter()
                    .map(String::from)
                    .collect();
                let fate = if targets.is_empty() {
                    let why = format!(
                        "type: no route from node {node:?} takes type {:?}",
                        change.kind
                    );
                    Fate::Unroutable(why)
                } else {
                    Fate::Publish { targets }
                };
                item(Some(change), fate)
            }
        })
        .collect()
}

/// Marks a repeated client id within the request as a duplicate; the indexes of the items
/// whose (first) client id is to be checked against the store.
fn dedupe_in_request(items: &mut [Item]) -> Vec<usize> {
    let mut seen = HashSet::new();
    let mut given = Vec::new();
    for (i, item) in items.iter_mut().enumerate() {
        if !item.publishing() {
            continue;
        }
        let Some(id) = item.given_id() else { continue };
        if seen.insert(id.to_string()) {
            given.push(i);
        } else {
            item.fate = Fate::Duplicate;
        }
    }
    given
}

/// The store's verdict on the client ids and the seqs of what is to be published, in one
/// round trip; `None` when nothing is. A store that is away is a 503.
async fn admit_ids(
    app: &AppState,
    node: &str,
    items: &[Item],
    given: &[usize],
) -> Result<Option<Admission>, Unavailable> {
    let to_publish = items.iter().filter(|i| i.publishing()).count();
    if to_publish == 0 {
        return Ok(None);
    }
    let ids: Vec<&str> = given.iter().filter_map(|&i| items[i].given_id()).collect();
    match app.store.admit(node, &ids, to_publish).await {
        Ok(admission) => {
            app.metrics.store_up.set(1);
            Ok(Some(admission))
        }
        Err(e) => {
            app.metrics.store_up.set(0);
            warn!(%node, error = %e, "store unavailable at ingress");
            let why = format!(
                "the store (Redis) is unavailable ({e}); nothing was accepted, retry later"
            );
            Err(Unavailable(why))
        }
    }
}

/// Applies the store's id states; the indexes of the items whose id this request reserved.
fn apply_id_states(
    items: &mut [Item],
    given: &[usize],
    admission: Option<&Admission>,
) -> Vec<usize> {
    let Some(admission) = admission else {
        return Vec::new();
    };
    let mut reserved = Vec::new();
    for (&i, state) in given.iter().zip(&admission.ids) {
        match state {
            IdState::Fresh => reserved.push(i),
            IdState::Duplicate => items[i].fate = Fate::Duplicate,
            IdState::InFlight => {
                items[i].fate = Fate::Rejected(
                    "id: a change with this id is being accepted by another request right now; retry it"
                        .into(),
                )
            }
        }
    }
    reserved
}

/// Numbers what is to be published (ids and seqs) and writes its envelope, once.
fn envelopes(
    app: &AppState,
    node: &str,
    items: &mut [Item],
    first_seq: i64,
    accepted_ms: i64,
) -> Outbox {
    let mut next_seq = first_seq;
    let mut out = Outbox::default();
    for (i, item) in items.iter_mut().enumerate() {
        let Some(change) = &item.change else { continue };
        item.id = change.id.clone();
        if !matches!(item.fate, Fate::Publish { .. }) {
            continue;
        }
        let own = next_seq;
        next_seq += 1;
        let id = change.id.clone().unwrap_or_else(|| format!("{node}-{own}"));
        let seq = change.seq.unwrap_or(own);
        let envelope = Envelope {
            id: &id,
            kind: &change.kind,
            reference: &change.reference,
            op: change.op,
            data: change.data.as_ref(),
            source: node,
            seq,
            ts: change.ts.as_deref(),
            accepted_ms,
            initial: change.initial,
        };
        let message = Outgoing {
            kind: change.kind.clone(),
            id: id.clone(),
            partition: crate::route::partition(&change.reference, app.config.broker.partitions),
            body: serde_json::to_vec(&envelope).expect("envelope serialises"),
        };
        out.push(i, message);
        item.id = Some(id);
        item.seq = seq;
    }
    out
}

/// Parallel copies: a group member's change meets its group's state before publishing.
/// Dropped ones leave `outgoing`; returns the conflicts won, by item (a history record
/// each, and the winner goes back to its author).
async fn group_verdicts(
    app: &AppState,
    node: &str,
    items: &mut [Item],
    outgoing: &mut Outbox,
    accepted_ms: i64,
) -> Result<Vec<(usize, String)>, crate::store::StoreError> {
    let arrivals: Vec<Arrival<'_>> = outgoing
        .items
        .iter()
        .filter_map(|&i| {
            let item = &items[i];
            let change = item.change.as_ref()?;
            Some(Arrival {
                change,
                seq: item.seq,
            })
        })
        .collect();
    let verdicts = copies::admit(app, node, &arrivals, accepted_ms).await?;
    let mut conflicts = Vec::new();
    for (j, verdict) in verdicts {
        let i = outgoing.items[j];
        let dropped = |event: &'static str, detail: String| Fate::Dropped { event, detail };
        match verdict {
            Admit::Publish { conflict } => conflicts.extend(conflict.map(|d| (i, d))),
            Admit::Echo(d) => items[i].fate = dropped("echo", d),
            Admit::Lost(d) => items[i].fate = dropped("conflict", d),
            Admit::Stale(d) => items[i].fate = dropped("superseded", d),
            Admit::Loop(d) => items[i].fate = dropped("loop", d),
        }
    }
    outgoing.retain(|i| items[i].publishing());
    Ok(conflicts)
}

/// Publishes and waits for the confirms, setting each item's fate by its outcome. A broker
/// that refused every change (a queue without its leader: a cluster electing one) is a
/// broker that is unavailable, and nothing was accepted.
async fn publish(
    app: &AppState,
    node: &str,
    items: &mut [Item],
    outgoing: &Outbox,
) -> Result<(), BrokerError> {
    if outgoing.messages.is_empty() {
        return Ok(());
    }
    let outcomes = app.broker.publish(node, &outgoing.messages).await?;
    if outcomes.iter().all(|o| *o == PublishOutcome::Refused) {
        return Err(BrokerError::Unavailable(
            "it refused to store every change (a queue without a leader?)".into(),
        ));
    }
    for (outcome, &i) in outcomes.iter().zip(&outgoing.items) {
        let item = &mut items[i];
        item.fate = match (outcome, std::mem::replace(&mut item.fate, Fate::Duplicate)) {
            (PublishOutcome::Confirmed, Fate::Publish { targets }) => Fate::Accepted { targets },
            (PublishOutcome::Unroutable, _) => Fate::Rejected(
                "type: the broker has no queue bound for this type (topology out of date?)".into(),
            ),
            (_, _) => Fate::Rejected("the broker refused to store this change; retry it".into()),
        };
    }
    Ok(())
}

/// A member whose change won a conflict may have applied the loser meanwhile: it gets its
/// own change back (what the "+ conflicts" in the delivery bound pays for).
async fn refeed_winners(
    app: &AppState,
    node: &str,
    outgoing: &Outbox,
    conflicts: &[(usize, String)],
) {
    let refeed: Vec<Held> = outgoing
        .iter()
        .filter(|(i, _)| conflicts.iter().any(|(c, _)| c == i))
        .map(|(_, message)| Held {
            queue: HeldIn::Deliver,
            attempt: 1,
            first_failed_ms: None,
            alone: false,
            error: None,
            body: message.body.clone(),
        })
        .collect();
    if refeed.is_empty() {
        return;
    }
    if let Err(e) = app.broker.enqueue(node, refeed).await {
        warn!(%node, error = %e, "could not send a conflict's winner back to its author; that member may keep the losing version");
    }
}

/// Forgets the ids this request reserved, so a retry is fresh (they expire by themselves
/// if this fails).
async fn release(app: &AppState, node: &str, ids: &[String]) {
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    if let Err(e) = app.store.release_ids(node, &ids).await {
        warn!(%node, error = %e, "could not release idempotency keys; they expire by themselves");
    }
}

/// Remembers accepted ids for the dedupe window and forgets the rest; records what
/// ingress did with each item.
async fn finish(
    app: &AppState,
    node: &str,
    items: &[Item],
    reserved: &[usize],
    accepted_ms: i64,
    conflicts: &[(usize, String)],
) {
    let (kept, forgotten): (Vec<usize>, Vec<usize>) = reserved
        .iter()
        .partition(|&&i| matches!(items[i].fate, Fate::Accepted { .. } | Fate::Dropped { .. }));
    let ids =
        |of: &[usize]| -> Vec<&str> { of.iter().filter_map(|&i| items[i].given_id()).collect() };
    let (commit, release) = (ids(&kept), ids(&forgotten));
    let results = tokio::join!(
        app.store.commit_ids(node, &commit),
        app.store.release_ids(node, &release),
        app.store
            .record(history(node, accepted_ms, items, conflicts)),
    );
    for r in [results.0, results.1, results.2] {
        if let Err(e) = r {
            warn!(%node, error = %e, "store write after accepting failed; the changes are stored in the broker");
        }
    }
}

#[derive(Serialize)]
struct ItemResult {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Extension: why an accepted change of a group member was not passed on (`echo`,
    /// `conflict`, `loop`, `superseded`), with `detail`.
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl ItemResult {
    fn of(index: usize, item: Item) -> ItemResult {
        let mut r = ItemResult {
            index,
            id: item.id,
            status: "accepted",
            error: None,
            dropped: None,
            detail: None,
        };
        match item.fate {
            Fate::Accepted { .. } => {}
            Fate::Duplicate => r.status = "duplicate",
            Fate::Rejected(e) | Fate::Unroutable(e) => (r.status, r.error) = ("rejected", Some(e)),
            Fate::Publish { .. } => {
                (r.status, r.error) = ("rejected", Some("not published".into()))
            }
            Fate::Dropped { event, detail } => (r.dropped, r.detail) = (Some(event), Some(detail)),
        }
        r
    }
}

#[derive(Serialize)]
struct PublishAnswer {
    /// Set on 422 only: every 4xx answer carries a top-level error.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    accepted: usize,
    rejected: usize,
    results: Vec<ItemResult>,
}

/// 202 when every item was accepted (or a duplicate), 422 when none was, else 207.
fn answer(app: &AppState, node: &str, items: Vec<Item>) -> Response {
    let results: Vec<ItemResult> = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| ItemResult::of(i, item))
        .collect();
    let rejected = results.iter().filter(|r| r.status == "rejected").count();
    let mut answer = PublishAnswer {
        error: None,
        accepted: results.len() - rejected,
        rejected,
        results,
    };
    if let Some(m) = app.node_metrics.get(node) {
        m.accepted.inc_by(answer.accepted as u64);
        m.rejected.inc_by(answer.rejected as u64);
    }
    let status = if answer.rejected == 0 {
        StatusCode::ACCEPTED
    } else if answer.accepted == 0 {
        let first = answer
            .results
            .iter()
            .find_map(|r| r.error.as_deref())
            .unwrap_or("");
        answer.error = Some(format!(
            "every change was rejected ({} of them); the first: {first}",
            answer.rejected
        ));
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::MULTI_STATUS
    };
    if answer.rejected > 0 {
        info!(%node, accepted = answer.accepted, rejected = answer.rejected, "changes partly rejected");
    }
    (status, Json(answer)).into_response()
}

/// Renews a request's idempotency reservations every [`PENDING_ID_RENEW`] while it is
/// alive (a task; dropping the guard ends it). A reservation that is no longer pending is
/// left as it is, so a late renewal can't undo a commit or a release.
struct KeepReserved(Option<tokio::task::JoinHandle<()>>);

impl KeepReserved {
    fn start(app: &AppState, node: &str, ids: &[&str]) -> KeepReserved {
        if ids.is_empty() {
            return KeepReserved(None);
        }
        let store = app.store.clone();
        let node = node.to_string();
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        KeepReserved(Some(tokio::spawn(async move {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            loop {
                tokio::time::sleep(PENDING_ID_RENEW).await;
                if let Err(e) = store.renew_ids(&node, &ids).await {
                    warn!(%node, error = %e, "could not renew idempotency reservations; a retry may be accepted while this request still publishes");
                }
            }
        })))
    }
}

impl Drop for KeepReserved {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Status and history records for what ingress did with each item.
/// `accepted_ms` is taken before publishing, so `accepted` sorts before any `delivered`.
fn history(
    node: &str,
    accepted_ms: i64,
    items: &[Item],
    conflicts: &[(usize, String)],
) -> Vec<Record> {
    let at = crate::clock::rfc3339_ms(accepted_ms);
    let event = |event: &str, detail: String| HistoryEvent {
        at: at.clone(),
        target: node.to_string(),
        event: event.into(),
        detail,
    };
    let mut records = Vec::new();
    for (i, detail) in conflicts {
        if let Some(change) = &items[*i].change {
            records.push(Record {
                reference: change.reference.clone(),
                event: Some(event("conflict", detail.clone())),
                ..Record::default()
            });
        }
    }
    for item in items {
        let Some(change) = &item.change else { continue };
        let id = item.id.as_deref().unwrap_or("");
        let (statuses, event) = match &item.fate {
            Fate::Accepted { targets } => {
                let detail = format!(
                    "id {id}, seq {}, {:?}, to {}",
                    item.seq,
                    change.op,
                    targets.join(", ")
                );
                (
                    queued(node, change, item.seq, targets),
                    event("accepted", detail),
                )
            }
            Fate::Dropped { event: e, detail } => {
                (Vec::new(), event(e, format!("id {id}: {detail}")))
            }
            Fate::Unroutable(why) => (Vec::new(), event("unroutable", why.clone())),
            _ => continue,
        };
        records.push(Record {
            reference: change.reference.clone(),
            statuses,
            event: Some(event),
            mark: None,
        });
    }
    records
}

/// The `queued` status of an accepted change at each of its targets.
fn queued(node: &str, change: &Change, seq: i64, targets: &[String]) -> Vec<StatusUpdate> {
    targets
        .iter()
        .map(|target| StatusUpdate {
            kind: change.kind.clone(),
            target: target.clone(),
            source: node.to_string(),
            seq,
            state: ObjState::Queued,
            attempts: 0,
            last_error: None,
            revive: false,
        })
        .collect()
}
