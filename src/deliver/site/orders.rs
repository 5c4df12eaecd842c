//! `orders = "30s"`: the site's orders, fetched as 1C fetches them. Each round: `type=sale`
//! init and `mode=query`; the answer (windows-1251 or UTF-8, a BOM or not) read with the
//! CommerceML reader; each `Документ` published as a change of `CommerceML.Документ` from
//! the site's node (ref = its `Ид`; one whose content is the one last accepted is recorded
//! `unchanged` and not published); `mode=success` only once every order was accepted. On any
//! failure nothing is confirmed, so the site serves the same orders to the next round.
//!
//! The change ids come from the content alone, so two instances polling one site publish an
//! order once (the second is a `duplicate`).

use super::session::{Client, Failure, Kind, Status};
use crate::commerceml::{Element, ReadError, Reader, DOCUMENT};
use crate::config::DeliverMode;
use crate::ingress::accept::{accept_changes, Verdict};
use crate::ingress::commerceml::Hashed;
use crate::store::{HistoryEvent, Record};
use crate::AppState;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// What a round came to.
#[derive(Debug, Default, PartialEq, Eq)]
struct Round {
    accepted: u64,
    unchanged: u64,
    unreadable: u64,
}

/// Starts a poller for every `mode = "commerceml"` node with `orders`.
pub fn start(app: &Arc<AppState>, cancel: CancellationToken, tracker: &TaskTracker) {
    for node in &app.config.nodes {
        let Some(d) = node.deliver.as_ref() else {
            continue;
        };
        let (DeliverMode::Commerceml, Some(every)) = (d.mode, d.orders) else {
            continue;
        };
        match Client::new(&node.name, d) {
            Ok(client) => {
                tracker.spawn(poll(app.clone(), client, every.0, cancel.clone()));
            }
            Err(e) => warn!(node = %node.name, error = %e, "no orders poller"),
        }
    }
}

async fn poll(app: Arc<AppState>, client: Client, every: Duration, cancel: CancellationToken) {
    info!(node = %client.target, every_s = every.as_secs_f64(), "CommerceML orders poller started");
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let result = round_renewing(&app, &client).await;
        let label = if result.is_ok() { "ok" } else { "failed" };
        app.metrics
            .commerceml
            .order_rounds
            .with_label_values(&[&client.target, label])
            .inc();
        match result {
            Ok(round) if round != Round::default() => {
                info!(node = %client.target, ?round, "CommerceML orders fetched and confirmed")
            }
            Ok(_) => {}
            Err(why) => {
                warn!(node = %client.target, %why, "CommerceML orders round failed; nothing confirmed, the next round asks again")
            }
        }
    }
}

/// A round, again in a new session when the site says the session is gone.
async fn round_renewing(app: &AppState, client: &Client) -> Result<Round, String> {
    match round(app, client).await {
        Err(Failure::Renew(_)) => {
            client.forget_session().await;
            round(app, client).await.map_err(reason)
        }
        other => other.map_err(reason),
    }
}

fn reason(failure: Failure) -> String {
    match failure {
        Failure::Unreachable(why) | Failure::Refused(why) | Failure::Renew(why) => why,
    }
}

async fn round(app: &AppState, client: &Client) -> Result<Round, Failure> {
    client.init(Kind::Sale).await?;
    let reply = client.call(Kind::Sale, "query", None, None).await?;
    if !reply
        .text
        .trim_start_matches('\u{feff}')
        .trim_start()
        .starts_with('<')
    {
        // Not XML: a status line (a `failure` naming the session gone renews it).
        reply.status("type=sale&mode=query")?;
        return Err(Failure::Refused(
            "the site answered type=sale&mode=query with a status line, not the orders' XML".into(),
        ));
    }
    let node = client.target.as_str();
    let (orders, unreadable) = read_orders(&reply.body)?;
    let mut round = Round {
        unreadable,
        ..Round::default()
    };
    if !orders.is_empty() {
        let hashed: Vec<Hashed> = orders.into_iter().map(|e| Hashed::of(e, "")).collect();
        let fresh = changed_only(app, node, hashed, &mut round).await?;
        accept(app, node, fresh, &mut round).await?;
    }
    if round.unreadable > 0 {
        return Err(Failure::Refused(format!(
            "{} orders of the site's answer can't be read (see the log); nothing confirmed, so the site keeps them",
            round.unreadable
        )));
    }
    let confirmed = client.call(Kind::Sale, "success", None, None).await?;
    if confirmed.status("type=sale&mode=success")? != Status::Success {
        return Err(Failure::Refused(
            "the site answered progress to type=sale&mode=success".into(),
        ));
    }
    count(app, node, "accepted", round.accepted);
    count(app, node, "unchanged", round.unchanged);
    count(app, node, "rejected", round.unreadable);
    Ok(round)
}

/// The `Документ`s of a query answer, and how many could not be read.
fn read_orders(body: &[u8]) -> Result<(Vec<Element>, u64), Failure> {
    let mut orders = Vec::new();
    let mut unreadable = 0;
    for item in Reader::new(body) {
        match item {
            Ok(e) if e.kind == DOCUMENT => orders.push(e),
            Ok(_) => {}
            Err(ReadError::Element(e)) => {
                warn!(error = %e, "an order of the site's answer can't be read; left out");
                unreadable += 1;
            }
            Err(ReadError::File(e)) => {
                return Err(Failure::Refused(format!(
                    "the site's answer to type=sale&mode=query is not CommerceML: {e}"
                )))
            }
        }
    }
    Ok((orders, unreadable))
}

/// Leaves out (and records) the orders whose content is the one last accepted.
async fn changed_only(
    app: &AppState,
    node: &str,
    hashed: Vec<Hashed>,
    round: &mut Round,
) -> Result<Vec<Hashed>, Failure> {
    let keys: Vec<(&str, &str)> = hashed
        .iter()
        .map(|h| (h.kind, h.change.reference.as_str()))
        .collect();
    let stored = app
        .store
        .content_hashes(node, &keys)
        .await
        .map_err(|e| Failure::Unreachable(format!("the store: {e}")))?;
    let mut fresh = Vec::new();
    let mut records = Vec::new();
    for (h, stored) in hashed.into_iter().zip(stored) {
        if stored.as_deref() == Some(h.hash.as_str()) {
            records.push(event(node, &h.change.reference, "unchanged", "an order the site served again, with the content last accepted: not published again"));
            round.unchanged += 1;
        } else {
            fresh.push(h);
        }
    }
    if !records.is_empty() {
        if let Err(e) = app.store.record(records).await {
            warn!(%node, error = %e, "could not record unchanged orders");
        }
    }
    Ok(fresh)
}

/// Publishes the orders; every one must be accepted (or be a duplicate, or unroutable).
async fn accept(
    app: &AppState,
    node: &str,
    fresh: Vec<Hashed>,
    round: &mut Round,
) -> Result<(), Failure> {
    if fresh.is_empty() {
        return Ok(());
    }
    let changes = fresh.iter().map(|h| h.change.clone()).collect();
    let verdicts = accept_changes(app, node, changes)
        .await
        .map_err(|e| Failure::Unreachable(format!("orders not accepted: {}", e.0)))?;
    let mut kept = Vec::new();
    let mut refused = None;
    for (h, verdict) in fresh.iter().zip(verdicts) {
        match verdict {
            Verdict::Accepted | Verdict::Duplicate => {
                kept.push((h.kind, h.change.reference.as_str(), h.hash.as_str()))
            }
            Verdict::Unroutable => {
                warn!(%node, order = %h.change.reference, "an order of the site no route takes; confirmed to the site unpublished (route CommerceML.Документ from this node)")
            }
            Verdict::Rejected(why) => {
                refused = Some(format!(
                    "order {:?} not accepted: {why}",
                    h.change.reference
                ))
            }
        }
    }
    round.accepted += kept.len() as u64;
    // The accepted ones are kept even when another was refused: the next round finds them
    // unchanged instead of publishing them again.
    if let Err(e) = app.store.keep_content_hashes(node, &kept).await {
        warn!(%node, error = %e, "could not keep the orders' content hashes; they are published again next round");
    }
    refused.map_or(Ok(()), |why| Err(Failure::Unreachable(why)))
}

fn event(node: &str, reference: &str, event: &str, detail: &str) -> Record {
    Record {
        reference: reference.to_string(),
        event: Some(HistoryEvent {
            at: crate::clock::rfc3339_now(),
            target: node.to_string(),
            event: event.into(),
            detail: detail.into(),
        }),
        ..Record::default()
    }
}

fn count(app: &AppState, node: &str, outcome: &str, n: u64) {
    app.metrics
        .commerceml
        .orders
        .with_label_values(&[node, outcome])
        .inc_by(n);
}
