//! Operating lxbridge: the admin API (bearer admin token) and the CLI subcommands that call
//! it over HTTP. Reads through the store; never bypasses `broker` or `store`.

use crate::clock::rfc3339_now;
use crate::http::{error_response, same_secret};
use crate::store::{HistoryEvent, Record, State as ObjState, StatusUpdate};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::collections::HashSet;
use std::sync::Arc;

/// `None` when the request carries the admin token, else the 401 answer.
pub fn check_admin(app: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(expected) = app.config.admin.token.as_deref() else {
        return Some(error_response(
            StatusCode::UNAUTHORIZED,
            "the admin API is disabled: set [admin] token in the config",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(token) if same_secret(token.as_bytes(), expected.as_bytes()) => None,
        Some(_) => Some(error_response(
            StatusCode::UNAUTHORIZED,
            "wrong admin token",
        )),
        None => Some(error_response(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <admin token>",
        )),
    }
}

/// `GET /api/v1/objects/{ref}`
pub async fn get_object(
    State(app): State<Arc<AppState>>,
    Path(reference): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = check_admin(&app, &headers) {
        return r;
    }
    match app.store.object(&reference).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => error_response(
            StatusCode::NOT_FOUND,
            format!("object {reference:?} was never seen (or its status expired)"),
        ),
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
pub struct DlqQuery {
    limit: Option<usize>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    ids: Option<Vec<String>>,
}

/// Parses `{}` or `{"ids": [...]}`; an id list selects, no list means all.
fn selection(body: &[u8]) -> Result<Option<HashSet<String>>, Response> {
    let parsed: Selection = serde_json::from_slice(body).map_err(|e| {
        error_response(
            StatusCode::BAD_REQUEST,
            format!("body must be {{}} (all) or {{\"ids\": [\"...\"]}}: {e}"),
        )
    })?;
    Ok(parsed.ids.map(|ids| ids.into_iter().collect()))
}

fn known_target(app: &AppState, target: &str) -> Option<Response> {
    match app.config.node(target) {
        Some(n) if n.deliver.is_some() => None,
        _ => Some(error_response(
            StatusCode::NOT_FOUND,
            format!("{target:?} is not a node that receives deliveries"),
        )),
    }
}

/// `GET /api/v1/dlq/{target}?limit=100`
pub async fn list_dlq(
    State(app): State<Arc<AppState>>,
    Path(target): Path<String>,
    query: Result<Query<DlqQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let Ok(Query(query)) = query else {
        return error_response(StatusCode::BAD_REQUEST, "limit must be a whole number");
    };
    if let Some(r) = check_admin(&app, &headers).or_else(|| known_target(&app, &target)) {
        return r;
    }
    let limit = query.limit.unwrap_or(100).min(10_000);
    let _guard = app.dlq_lock.lock().await;
    match app.broker.dead_letters(&target, limit).await {
        Ok((count, items)) => {
            Json(json!({"target": target, "count": count, "items": items})).into_response()
        }
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `POST /api/v1/dlq/{target}/replay` and `DELETE /api/v1/dlq/{target}`.
async fn take_dlq(
    app: &AppState,
    target: &str,
    headers: &HeaderMap,
    body: &[u8],
    replay: bool,
) -> Response {
    if let Some(r) = check_admin(app, headers).or_else(|| known_target(app, target)) {
        return r;
    }
    let ids = match selection(body) {
        Ok(ids) => ids,
        Err(r) => return r,
    };
    // Taken before the moves, so `replayed` sorts before the delivery that may follow at once.
    let at = rfc3339_now();
    let taken = {
        let _guard = app.dlq_lock.lock().await;
        match app.broker.take_dead(target, ids.as_ref(), replay).await {
            Ok(taken) => taken,
            Err(e) => return error_response(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    };
    let records = taken
        .iter()
        .map(|item| Record {
            reference: item.reference.clone(),
            statuses: if replay {
                vec![StatusUpdate {
                    kind: item.kind.clone(),
                    target: target.to_string(),
                    source: item.source.clone(),
                    seq: item.seq,
                    state: ObjState::Queued,
                    attempts: 0,
                    last_error: None,
                    revive: true,
                }]
            } else {
                Vec::new()
            },
            event: Some(HistoryEvent {
                at: at.clone(),
                target: target.to_string(),
                event: if replay { "replayed" } else { "purged" }.into(),
                detail: format!("id {} from the DLQ (was: {})", item.id, item.error),
            }),
            mark: None,
        })
        .collect();
    if let Err(e) = app.store.record(records).await {
        tracing::warn!(%target, error = %e, "could not record DLQ replay/purge in history");
    }
    if let Ok((dlq, _)) = app.broker.queue_depths(target).await {
        app.metrics
            .dlq_messages
            .with_label_values(&[target])
            .set(i64::from(dlq));
    }
    let key = if replay { "replayed" } else { "purged" };
    Json(json!({ key: taken.len() })).into_response()
}

pub async fn replay_dlq(
    State(app): State<Arc<AppState>>,
    Path(target): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    take_dlq(&app, &target, &headers, &body, true).await
}

pub async fn purge_dlq(
    State(app): State<Arc<AppState>>,
    Path(target): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    take_dlq(&app, &target, &headers, &body, false).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RemapPairs {
    pairs: Vec<RemapPair>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RemapPair {
    #[serde(rename = "type")]
    kind: String,
    source: String,
    target: String,
}

/// `PUT /api/v1/remap/{target}` `{"pairs": [{"type", "source", "target"}]}` → `{"stored": N}`
pub async fn put_remap(
    State(app): State<Arc<AppState>>,
    Path(target): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = check_admin(&app, &headers).or_else(|| known_target(&app, &target)) {
        return r;
    }
    let parsed: RemapPairs = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"pairs\": [{{\"type\", \"source\", \"target\"}}]}}: {e}"),
            )
        }
    };
    if let Some((i, _)) = parsed
        .pairs
        .iter()
        .enumerate()
        .find(|(_, p)| p.kind.is_empty() || p.source.is_empty() || p.target.is_empty())
    {
        return error_response(
            StatusCode::BAD_REQUEST,
            format!("pairs[{i}]: type, source and target must not be empty"),
        );
    }
    let triples: Vec<(&str, &str, &str)> = parsed
        .pairs
        .iter()
        .map(|p| (p.kind.as_str(), p.source.as_str(), p.target.as_str()))
        .collect();
    match app.store.remap_put(&target, &triples).await {
        Ok(()) => Json(json!({ "stored": triples.len() })).into_response(),
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
pub struct RemapQuery {
    #[serde(rename = "type")]
    kind: Option<String>,
    source: Option<String>,
}

/// `GET /api/v1/remap/{target}?type=…&source=…` → `{"target": "<ref>"}` or 404.
pub async fn get_remap(
    State(app): State<Arc<AppState>>,
    Path(target): Path<String>,
    query: Result<Query<RemapQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let Ok(Query(query)) = query else {
        return error_response(StatusCode::BAD_REQUEST, "give ?type= and ?source=");
    };
    if let Some(r) = check_admin(&app, &headers).or_else(|| known_target(&app, &target)) {
        return r;
    }
    let (Some(kind), Some(source)) = (query.kind, query.source) else {
        return error_response(StatusCode::BAD_REQUEST, "give both ?type= and ?source=");
    };
    match app
        .store
        .remap_get(&target, &[(kind.as_str(), source.as_str())])
        .await
    {
        Ok(found) => match found.into_iter().next().flatten() {
            Some(t) => Json(json!({ "target": t })).into_response(),
            None => error_response(
                StatusCode::NOT_FOUND,
                format!("no remap for {kind} {source} at {target:?}"),
            ),
        },
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResyncRequest {
    node: String,
    from: Option<String>,
}

pub use crate::copies::RESYNC_TYPE;

/// `DELETE /api/v1/nodes/{node}/commerceml/hashes`: forgets the content hashes of a
/// CommerceML node's elements, so its next upload is delivered in full (a resend).
/// → `200 {"forgotten": N}`.
pub async fn forget_commerceml_hashes(
    State(app): State<Arc<AppState>>,
    Path(node): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = check_admin(&app, &headers) {
        return r;
    }
    let talks_commerceml = app.config.node(&node).is_some_and(|n| {
        n.commerceml.is_some()
            || n.deliver
                .as_ref()
                .is_some_and(|d| d.mode == crate::config::DeliverMode::Commerceml)
    });
    if !talks_commerceml {
        return error_response(
            StatusCode::NOT_FOUND,
            format!(
                "node {node:?} has no [node.commerceml] and is not a mode = \"commerceml\" site"
            ),
        );
    }
    match app.store.forget_content_hashes(&node).await {
        Ok(n) => {
            tracing::info!(%node, forgotten = n, "CommerceML content hashes forgotten: the next upload is delivered in full");
            Json(serde_json::json!({ "forgotten": n })).into_response()
        }
        Err(e) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store is unavailable: {e}"),
        ),
    }
}

/// `POST /api/v1/groups/{group}/resync` `{"node": "N", "from": "S"}` (extension): asks member
/// `S` (default: the first other member in `nodes`) to send its snapshot, every object of
/// the group's types as an ordinary change marked `"initial": true`, so that `N` is fed
/// again. The request reaches `S` as a change of type `lxbridge.Resync` in its delivery
/// (push or inbox), `data` = `{"group", "node", "requested_at"}`. → `202`.
pub async fn resync_group(
    State(app): State<Arc<AppState>>,
    Path(group): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = check_admin(&app, &headers) {
        return r;
    }
    let Some(g) = app.routes.group_named(&group) else {
        return error_response(StatusCode::NOT_FOUND, format!("no group {group:?}"));
    };
    let request: ResyncRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"node\": \"<member>\", \"from\": \"<member>\"}} (from optional): {e}"),
            )
        }
    };
    if !g.has(&request.node) {
        return error_response(
            StatusCode::BAD_REQUEST,
            format!(
                "node: {:?} is not a member of group {group:?}",
                request.node
            ),
        );
    }
    let from = match request.from {
        Some(from) if from == request.node => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "from: a member can't be re-fed from itself",
            )
        }
        Some(from) if !g.has(&from) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!("from: {from:?} is not a member of group {group:?}"),
            )
        }
        Some(from) => from,
        None => match g.members.iter().find(|m| **m != request.node) {
            Some(m) => m.clone(),
            None => {
                return error_response(StatusCode::BAD_REQUEST, "the group has no other member")
            }
        },
    };
    let (id, reference) = match crate::copies::resync(&app, &group, &request.node, &from).await {
        Ok(answer) => answer,
        Err(e) => return error_response(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    (
        StatusCode::ACCEPTED,
        Json(
            json!({"group": group, "node": request.node, "from": from, "id": id, "ref": reference}),
        ),
    )
        .into_response()
}
