//! HTTP ingress: `POST /api/v1/nodes/{node}/changes` (API.md "Publishing changes"), plus
//! `/healthz`, `/readyz` and `/metrics`. Authenticates the node, bounds and decompresses
//! the body, parses both change forms, dedupes by id, publishes through [`Broker`] and
//! answers only after every accepted change was confirmed.
//!
//! Invariant: 202 (or 207) is never sent before the broker confirmed every change it
//! reports as accepted.

use crate::broker::{BrokerError, Held, HeldIn, Outgoing, PublishOutcome};
use crate::deliver::pull;
use crate::group::{self, Admit, Candidate};
use crate::model::{parse_change, Change, Envelope, Op};
use crate::store::{
    HistoryEvent, IdState, Record, State as ObjState, StatusUpdate, PENDING_ID_RENEW,
};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};
use std::io::Read;
use std::sync::Arc;
use tracing::{info, warn};

/// Seconds a client is told to wait after a 503.
pub const RETRY_AFTER_SECS: u32 = 5;

/// A JSON error answer: `{"error": "..."}` with the status.
pub fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    let mut response = (status, Json(json!({ "error": message.into() }))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    response
}

/// A 401 for a node endpoint, with the Basic challenge some 1C platform versions wait for
/// before they send credentials.
fn node_unauthorized(why: &str) -> Response {
    let mut response = error_response(StatusCode::UNAUTHORIZED, why);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"lxbridge\", charset=\"UTF-8\""),
    );
    response
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks `Authorization` for a node: Bearer token, or Basic with user = node name.
fn authorised(headers: &HeaderMap, node: &str, token: &str) -> Result<(), &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err("missing Authorization header (Bearer <node token>, or Basic node:token)");
    };
    let value = value
        .to_str()
        .map_err(|_| "Authorization header is not ASCII")?;
    if let Some(given) = value.strip_prefix("Bearer ") {
        return if same_secret(given.trim().as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err("wrong bearer token for this node")
        };
    }
    if let Some(encoded) = value.strip_prefix("Basic ") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| "Basic credentials are not valid base64")?;
        let (user, password) = match decoded.iter().position(|&b| b == b':') {
            Some(i) => (&decoded[..i], &decoded[i + 1..]),
            None => return Err("Basic credentials have no ':' between user and password"),
        };
        return if user == node.as_bytes() && same_secret(password, token.as_bytes()) {
            Ok(())
        } else {
            Err("wrong Basic credentials: the user must be the node name and the password its token")
        };
    }
    Err("unsupported Authorization scheme (use Bearer or Basic)")
}

enum BodyKind {
    Json,
    NdJson,
}

fn body_kind(headers: &HeaderMap) -> Result<BodyKind, String> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(BodyKind::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(BodyKind::NdJson),
        "" => Err("missing Content-Type: use application/json or application/x-ndjson".into()),
        other => Err(format!(
            "Content-Type {other:?} is not supported: use application/json or application/x-ndjson"
        )),
    }
}

/// Reads the body within `max` bytes, decompressing gzip; a bomb stops at `max` + 1 bytes.
async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Vec<u8>, Response> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than server.max_body_bytes ({max} bytes) after decompression"),
        )
    };
    // gzip of incompressible data is slightly larger than the data: allow a margin on the wire.
    let raw = axum::body::to_bytes(body, max + max / 64 + 1024)
        .await
        .map_err(|_| too_large())?;
    match encoding.as_str() {
        "identity" | "" => {
            if raw.len() > max {
                return Err(too_large());
            }
            Ok(raw.to_vec())
        }
        "gzip" | "x-gzip" => {
            let mut out = Vec::with_capacity((raw.len() * 4).min(max));
            flate2::read::MultiGzDecoder::new(&raw[..])
                .take(max as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| {
                    error_response(
                        StatusCode::BAD_REQUEST,
                        format!("gzip body is corrupt: {e}"),
                    )
                })?;
            if out.len() > max {
                return Err(too_large());
            }
            Ok(out)
        }
        other => Err(error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding {other:?} is not supported: use gzip or none"),
        )),
    }
}

/// Splits the body into items: each a change or what is wrong with it.
fn parse_items(kind: BodyKind, body: &[u8]) -> Result<Vec<Result<Change, String>>, String> {
    match kind {
        BodyKind::Json => {
            let value: Value =
                serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
            let items = match value {
                Value::Array(items) => items,
                obj @ Value::Object(_) => vec![obj],
                _ => {
                    return Err("body must be a change object or an array of change objects".into())
                }
            };
            if items.is_empty() {
                return Err("body holds no changes (empty array)".into());
            }
            Ok(items
                .into_iter()
                .map(|v| parse_change(v).map_err(|e| e.0))
                .collect())
        }
        BodyKind::NdJson => {
            let text = std::str::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?;
            let items: Vec<Result<Change, String>> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|line| match serde_json::from_str::<Value>(line) {
                    Ok(v) => parse_change(v).map_err(|e| e.0),
                    Err(e) => Err(format!("line is not valid JSON: {e}")),
                })
                .collect();
            if items.is_empty() {
                return Err("body holds no changes (no non-blank line)".into());
            }
            if items
                .iter()
                .all(|i| matches!(i, Err(e) if e.starts_with("line is not valid JSON")))
            {
                return Err("body is not NDJSON: no line is valid JSON".into());
            }
            Ok(items)
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

#[derive(Serialize)]
struct PublishAnswer {
    /// Set on 422 only: every 4xx answer carries a top-level error.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    accepted: usize,
    rejected: usize,
    results: Vec<ItemResult>,
}

/// `POST /api/v1/nodes/{node}/changes`
pub async fn post_changes(
    State(app): State<Arc<AppState>>,
    Path(node): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = handle_changes(&app, &node, &headers, body).await;
    let label = if app.config.node(&node).is_some() {
        node.as_str()
    } else {
        "_unknown"
    };
    app.metrics
        .ingress_requests
        .with_label_values(&[label, response.status().as_str()])
        .inc();
    response
}

/// The node, checked before its credentials (404 then 401, as API.md orders them).
fn authenticated_node(app: &AppState, node: &str, headers: &HeaderMap) -> Result<(), Response> {
    let Some(node_config) = app.config.node(node) else {
        return Err(error_response(
            StatusCode::NOT_FOUND,
            format!("unknown node {node:?}"),
        ));
    };
    authorised(headers, node, &node_config.token).map_err(node_unauthorized)
}

async fn handle_changes(app: &AppState, node: &str, headers: &HeaderMap, body: Body) -> Response {
    if let Err(response) = authenticated_node(app, node, headers) {
        return response;
    }
    let kind = match body_kind(headers) {
        Ok(kind) => kind,
        Err(why) => return error_response(StatusCode::UNSUPPORTED_MEDIA_TYPE, why),
    };
    let body = match read_body(headers, body, app.config.server.max_body_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let items = match parse_items(kind, &body) {
        Ok(items) => items,
        Err(why) => return error_response(StatusCode::BAD_REQUEST, why),
    };
    drop(body);
    if !app.broker.ready() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker (RabbitMQ) is unavailable or applying flow control; nothing was accepted, retry later",
        );
    }
    accept(app, node, items).await
}

/// What became of one item on its way through.
enum Fate {
    Rejected(String),
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

async fn accept(app: &AppState, node: &str, items: Vec<Result<Change, String>>) -> Response {
    let mut changes: Vec<Option<Change>> = Vec::with_capacity(items.len());
    let mut fates: Vec<Fate> = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Ok(change) => {
                let targets: Vec<String> = app
                    .routes
                    .targets(node, &change.kind)
                    .into_iter()
                    .map(String::from)
                    .collect();
                if targets.is_empty() {
                    fates.push(Fate::Rejected(format!(
                        "type: no route from node {node:?} takes type {:?}",
                        change.kind
                    )));
                } else {
                    fates.push(Fate::Publish { targets });
                }
                changes.push(Some(change));
            }
            Err(e) => {
                fates.push(Fate::Rejected(e));
                changes.push(None);
            }
        }
    }

    // Idempotency keys (for client-given ids) and sequence numbers, in one round trip.
    let mut given_ids: Vec<&str> = Vec::new();
    let mut id_owner: Vec<usize> = Vec::new();
    let mut seen_in_request = std::collections::HashSet::new();
    for (i, fate) in fates.iter_mut().enumerate() {
        if let (Fate::Publish { .. }, Some(change)) = (&*fate, &changes[i]) {
            if let Some(id) = change.id.as_deref() {
                if !seen_in_request.insert(id) {
                    *fate = Fate::Duplicate;
                    continue;
                }
                given_ids.push(id);
                id_owner.push(i);
            }
        }
    }
    let to_publish = fates
        .iter()
        .filter(|f| matches!(f, Fate::Publish { .. }))
        .count();
    let admission = if to_publish == 0 {
        None
    } else {
        match app.store.admit(node, &given_ids, to_publish).await {
            Ok(a) => {
                app.metrics.store_up.set(1);
                Some(a)
            }
            Err(e) => {
                app.metrics.store_up.set(0);
                warn!(%node, error = %e, "store unavailable at ingress");
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the store (Redis) is unavailable ({e}); nothing was accepted, retry later"
                    ),
                );
            }
        }
    };
    let mut reserved: Vec<&str> = Vec::new();
    if let Some(a) = &admission {
        for ((id, &owner), state) in given_ids.iter().zip(&id_owner).zip(&a.ids) {
            match state {
                IdState::Fresh => reserved.push(id),
                IdState::Duplicate => fates[owner] = Fate::Duplicate,
                IdState::InFlight => {
                    fates[owner] = Fate::Rejected(
                        "id: a change with this id is being accepted by another request right now; retry it"
                            .into(),
                    )
                }
            }
        }
    }
    // The reservations are short (a dead instance's expire within seconds): renewed while
    // this request publishes, until it commits or releases them (or this guard drops).
    let renewal = KeepReserved::start(app, node, &reserved);

    // Envelopes for everything still to publish.
    let accepted_ms = crate::store::unix_ms_now();
    let mut next_seq = admission.as_ref().map(|a| a.first_seq).unwrap_or(0);
    let mut outgoing = Vec::new();
    let mut outgoing_owner = Vec::new();
    let mut ids: Vec<Option<String>> = vec![None; fates.len()];
    let mut seqs: Vec<i64> = vec![0; fates.len()];
    for (i, fate) in fates.iter().enumerate() {
        let Some(change) = &changes[i] else { continue };
        ids[i] = change.id.clone();
        if !matches!(fate, Fate::Publish { .. }) {
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
        let body = serde_json::to_vec(&envelope).expect("envelope serialises");
        outgoing.push(Outgoing {
            kind: change.kind.clone(),
            id: id.clone(),
            partition: crate::route::partition(&change.reference, app.config.broker.partitions),
            body,
        });
        outgoing_owner.push(i);
        ids[i] = Some(id);
        seqs[i] = seq;
    }

    // Parallel copies: a group member's change meets its group's state before publishing.
    let mut conflicts: Vec<(usize, String)> = Vec::new();
    match group_admission(app, node, &changes, &outgoing_owner, &seqs, accepted_ms).await {
        Ok(verdicts) => {
            for (i, verdict) in verdicts {
                let dropped = |event: &'static str, detail: String| Fate::Dropped { event, detail };
                match verdict {
                    Admit::Publish { conflict } => conflicts.extend(conflict.map(|d| (i, d))),
                    Admit::Echo(d) => fates[i] = dropped("echo", d),
                    Admit::Lost(d) => fates[i] = dropped("conflict", d),
                    Admit::Stale(d) => fates[i] = dropped("superseded", d),
                    Admit::Loop(d) => fates[i] = dropped("loop", d),
                }
            }
            let keep: Vec<bool> = outgoing_owner
                .iter()
                .map(|&i| matches!(fates[i], Fate::Publish { .. }))
                .collect();
            let mut k = keep.iter();
            outgoing.retain(|_| *k.next().expect("one flag per message"));
            let mut k = keep.iter();
            outgoing_owner.retain(|_| *k.next().expect("one flag per message"));
        }
        Err(e) => {
            app.metrics.store_up.set(0);
            warn!(%node, error = %e, "store unavailable for group state at ingress");
            if let Err(e) = app.store.release_ids(node, &reserved).await {
                warn!(%node, error = %e, "could not release idempotency keys; they expire by themselves");
            }
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the store is unavailable ({e}); nothing was accepted, retry later"),
            );
        }
    }

    // A member whose change won a conflict may have applied the loser meanwhile: it gets
    // its own change back (what the "+ conflicts" in the delivery bound pays for).
    let refeed: Vec<Held> = outgoing
        .iter()
        .zip(&outgoing_owner)
        .filter(|(_, i)| conflicts.iter().any(|(c, _)| c == *i))
        .map(|(m, _)| Held {
            queue: HeldIn::Deliver,
            attempt: 1,
            first_failed_ms: None,
            alone: false,
            error: None,
            body: m.body.clone(),
        })
        .collect();
    if !outgoing.is_empty() {
        // A queue without its leader (a cluster electing one) refuses everything: that is
        // the broker being unavailable, and nothing was accepted.
        let published = app
            .broker
            .publish(node, &outgoing)
            .await
            .and_then(|outcomes| {
                if outcomes.iter().all(|o| *o == PublishOutcome::Refused) {
                    Err(BrokerError::Unavailable(
                        "it refused to store every change (a queue without a leader?)".into(),
                    ))
                } else {
                    Ok(outcomes)
                }
            });
        match published {
            Ok(outcomes) => {
                for (outcome, &i) in outcomes.iter().zip(&outgoing_owner) {
                    let fate = std::mem::replace(&mut fates[i], Fate::Duplicate);
                    fates[i] = match (outcome, fate) {
                        (PublishOutcome::Confirmed, Fate::Publish { targets }) => Fate::Accepted { targets },
                        (PublishOutcome::Unroutable, _) => Fate::Rejected(
                            "type: the broker has no queue bound for this type (topology out of date?)".into(),
                        ),
                        (_, _) => Fate::Rejected("the broker refused to store this change; retry it".into()),
                    };
                }
            }
            Err(e) => {
                warn!(%node, error = %e, "publish failed");
                if let Err(e) = app.store.release_ids(node, &reserved).await {
                    warn!(%node, error = %e, "could not release idempotency keys; they expire by themselves");
                }
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the broker (RabbitMQ) is unavailable ({e}); retry later"),
                );
            }
        }
    }

    if !refeed.is_empty() {
        if let Err(e) = app.broker.import(node, refeed).await {
            warn!(%node, error = %e, "could not send a conflict's winner back to its author; that member may keep the losing version");
        }
    }

    // Remember accepted ids for the dedupe window; forget the rest so a retry is fresh.
    drop(renewal);
    let mut commit: Vec<&str> = Vec::new();
    let mut release: Vec<&str> = Vec::new();
    for (id, &owner) in given_ids.iter().zip(&id_owner) {
        if !reserved.contains(id) {
            continue;
        }
        if matches!(fates[owner], Fate::Accepted { .. } | Fate::Dropped { .. }) {
            commit.push(id);
        } else {
            release.push(id);
        }
    }
    let store_results = tokio::join!(
        app.store.commit_ids(node, &commit),
        app.store.release_ids(node, &release),
        app.store.record(history(
            node,
            accepted_ms,
            &fates,
            &changes,
            &ids,
            &seqs,
            &conflicts
        )),
    );
    for r in [store_results.0, store_results.1, store_results.2] {
        if let Err(e) = r {
            warn!(%node, error = %e, "store write after accepting failed; the changes are stored in the broker");
        }
    }

    let node_metrics = app.node_metrics.get(node);
    let mut answer = PublishAnswer {
        error: None,
        accepted: 0,
        rejected: 0,
        results: Vec::with_capacity(fates.len()),
    };
    for (index, fate) in fates.into_iter().enumerate() {
        let mut dropped = None;
        let (status, error) = match fate {
            Fate::Accepted { .. } => ("accepted", None),
            Fate::Duplicate => ("duplicate", None),
            Fate::Rejected(e) => ("rejected", Some(e)),
            Fate::Publish { .. } => ("rejected", Some("not published".to_string())),
            Fate::Dropped { event, detail } => {
                dropped = Some((event, detail));
                ("accepted", None)
            }
        };
        match status {
            "rejected" => answer.rejected += 1,
            _ => answer.accepted += 1,
        }
        let (dropped, detail) = match dropped {
            Some((event, detail)) => (Some(event), Some(detail)),
            None => (None, None),
        };
        answer.results.push(ItemResult {
            index,
            id: ids[index].take(),
            status,
            error,
            dropped,
            detail,
        });
    }
    if let Some(m) = node_metrics {
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

/// Parallel copies: the group verdict for each message about to be published whose change
/// is a group member's (by index into `changes`).
async fn group_admission(
    app: &AppState,
    node: &str,
    changes: &[Option<Change>],
    owners: &[usize],
    seqs: &[i64],
    accepted_ms: i64,
) -> Result<Vec<(usize, Admit)>, crate::store::StoreError> {
    let mut items = Vec::new();
    for &i in owners {
        let Some(change) = &changes[i] else { continue };
        let Some(g) = app.routes.group(node, &change.kind) else {
            continue;
        };
        let ts_ms = change
            .ts
            .as_deref()
            .and_then(|ts| {
                time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()
            })
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .unwrap_or(accepted_ms);
        let candidate = Candidate {
            node: node.to_string(),
            seq: seqs[i],
            ts_ms,
            hash: group::content_hash(change.op == Op::Delete, change.data.as_ref()),
            initial: change.initial,
        };
        items.push((
            i,
            g.clone(),
            g.key(&change.kind, &change.reference),
            candidate,
        ));
    }
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = items.iter().map(|(_, _, k, _)| k.clone()).collect();
    let verdicts = group::update(app.store.as_ref(), &keys, |j, state| {
        let (_, g, _, candidate) = &items[j];
        group::admit(g, state, candidate)
    })
    .await?;
    for ((_, g, _, _), verdict) in items.iter().zip(&verdicts) {
        let result = match verdict {
            Admit::Publish { conflict: None } => "published",
            Admit::Publish { conflict: Some(_) } => "conflict_won",
            Admit::Echo(_) => "echo",
            Admit::Lost(_) => "conflict_lost",
            Admit::Stale(_) => "superseded",
            Admit::Loop(_) => "loop",
        };
        app.metrics
            .group_changes
            .with_label_values(&[&g.name, result])
            .inc();
    }
    Ok(items.into_iter().map(|(i, ..)| i).zip(verdicts).collect())
}

/// Status and history records for what ingress did with each item.
/// `accepted_ms` is taken before publishing, so `accepted` sorts before any `delivered`.
fn history(
    node: &str,
    accepted_ms: i64,
    fates: &[Fate],
    changes: &[Option<Change>],
    ids: &[Option<String>],
    seqs: &[i64],
    conflicts: &[(usize, String)],
) -> Vec<Record> {
    let now = crate::store::rfc3339_ms(accepted_ms);
    let mut records = Vec::new();
    for (i, detail) in conflicts {
        if let Some(change) = &changes[*i] {
            records.push(Record {
                reference: change.reference.clone(),
                statuses: Vec::new(),
                event: Some(HistoryEvent {
                    at: now.clone(),
                    target: node.to_string(),
                    event: "conflict".into(),
                    detail: detail.clone(),
                }),
                mark: None,
            });
        }
    }
    for (i, fate) in fates.iter().enumerate() {
        let Some(change) = &changes[i] else { continue };
        let id = ids[i].as_deref().unwrap_or("");
        match fate {
            Fate::Accepted { targets } => records.push(Record {
                reference: change.reference.clone(),
                statuses: targets
                    .iter()
                    .map(|target| StatusUpdate {
                        kind: change.kind.clone(),
                        target: target.clone(),
                        source: node.to_string(),
                        seq: seqs[i],
                        state: ObjState::Queued,
                        attempts: 0,
                        last_error: None,
                        revive: false,
                    })
                    .collect(),
                event: Some(HistoryEvent {
                    at: now.clone(),
                    target: node.to_string(),
                    event: "accepted".into(),
                    detail: format!(
                        "id {id}, seq {}, {:?}, to {}",
                        seqs[i],
                        change.op,
                        targets.join(", ")
                    ),
                }),
                mark: None,
            }),
            Fate::Dropped { event, detail } => records.push(Record {
                reference: change.reference.clone(),
                statuses: Vec::new(),
                event: Some(HistoryEvent {
                    at: now.clone(),
                    target: node.to_string(),
                    event: (*event).into(),
                    detail: format!("id {id}: {detail}"),
                }),
                mark: None,
            }),
            Fate::Rejected(why) if why.starts_with("type: no route") => records.push(Record {
                reference: change.reference.clone(),
                event: Some(HistoryEvent {
                    at: now.clone(),
                    target: node.to_string(),
                    event: "unroutable".into(),
                    detail: why.clone(),
                }),
                ..Record::default()
            }),
            _ => {}
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn auth_accepts_bearer_and_basic() {
        let basic = base64::engine::general_purpose::STANDARD.encode("central:secret");
        assert!(authorised(&headers("Bearer secret"), "central", "secret").is_ok());
        assert!(authorised(&headers(&format!("Basic {basic}")), "central", "secret").is_ok());
        assert!(authorised(&headers("Bearer wrong"), "central", "secret").is_err());
        let other = base64::engine::general_purpose::STANDARD.encode("shop:secret");
        assert!(authorised(&headers(&format!("Basic {other}")), "central", "secret").is_err());
        assert!(authorised(&HeaderMap::new(), "central", "secret").is_err());
    }

    #[test]
    fn ndjson_lines_are_items_and_all_broken_is_an_error() {
        let body =
            b"{\"type\":\"Catalog.X\",\"ref\":\"a\",\"data\":{}}\n\nnot json\n{\"ref\":\"b\"}\n";
        let items = parse_items(BodyKind::NdJson, body).unwrap();
        assert_eq!(items.len(), 3);
        assert!(items[0].is_ok());
        assert!(items[1].as_ref().unwrap_err().contains("not valid JSON"));
        assert!(items[2].as_ref().unwrap_err().contains("type: missing"));
        assert!(parse_items(BodyKind::NdJson, b"nope\nnada\n").is_err());
        assert!(parse_items(BodyKind::Json, b"{broken").is_err());
        assert!(parse_items(BodyKind::Json, b"[]").is_err());
        assert!(parse_items(BodyKind::Json, b"42").is_err());
    }
}

#[derive(serde::Deserialize)]
pub struct InboxQuery {
    limit: Option<usize>,
    wait: Option<u64>,
}

/// The longest a poll may wait for changes.
const MAX_WAIT_SECS: u64 = 120;

/// Node auth and that the node pulls, or the error answer.
fn check_puller(app: &AppState, node: &str, headers: &HeaderMap) -> Result<(), Response> {
    let Some(node_config) = app.config.node(node) else {
        return Err(error_response(
            StatusCode::NOT_FOUND,
            format!("unknown node {node:?}"),
        ));
    };
    if let Err(why) = authorised(headers, node, &node_config.token) {
        return Err(node_unauthorized(why));
    }
    let pulls = node_config
        .deliver
        .as_ref()
        .is_some_and(|d| d.mode == crate::config::DeliverMode::Pull);
    if !pulls {
        return Err(error_response(
            StatusCode::NOT_FOUND,
            format!("node {node:?} has no inbox: its [node.deliver] mode is not \"pull\""),
        ));
    }
    Ok(())
}

/// The inbox's answer as the node gets it.
fn inbox_response(reply: pull::Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if status.is_success() {
        return (status, Json(reply.body)).into_response();
    }
    let error = reply.body["error"]
        .as_str()
        .unwrap_or("inbox failed")
        .to_string();
    error_response(status, error)
}

/// How long an ack may take at the instance serving the inbox.
const ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `GET /api/v1/nodes/{node}/inbox?limit=100&wait=25`
pub async fn get_inbox(
    State(app): State<Arc<AppState>>,
    Path(node): Path<String>,
    query: Result<axum::extract::Query<InboxQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check_puller(&app, &node, &headers) {
        return r;
    }
    let Ok(axum::extract::Query(query)) = query else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "limit and wait must be whole numbers",
        );
    };
    let wait = std::time::Duration::from_secs(query.wait.unwrap_or(25).min(MAX_WAIT_SECS));
    let request = pull::Request::Poll {
        limit: query.limit.unwrap_or(usize::MAX),
        wait_ms: wait.as_millis() as u64,
    };
    // The instance serving the inbox may be another one: give it time to answer.
    let timeout = wait + std::time::Duration::from_secs(10);
    tokio::select! {
        reply = pull::call(app.broker.as_ref(), &node, &request, timeout) => inbox_response(reply),
        _ = app.shutdown.cancelled() => Json(json!({ "message_no": null, "changes": [] })).into_response(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InboxAck {
    message_no: i64,
    results: Option<Value>,
}

/// `POST /api/v1/nodes/{node}/inbox/ack` `{"message_no": N, "results": [...]}`
pub async fn post_inbox_ack(
    State(app): State<Arc<AppState>>,
    Path(node): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = check_puller(&app, &node, &headers) {
        return r;
    }
    let ack: InboxAck = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"message_no\": N, \"results\": [...]}}: {e}"),
            )
        }
    };
    if ack.results.as_ref().is_some_and(|r| !r.is_array()) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "results: expected an array of {id, status, error, retry}",
        );
    }
    let request = pull::Request::Ack {
        message_no: ack.message_no,
        results: ack.results,
    };
    inbox_response(pull::call(app.broker.as_ref(), &node, &request, ACK_TIMEOUT).await)
}
