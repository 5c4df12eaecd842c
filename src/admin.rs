//! Operating lxbridge: the admin API (bearer admin token) and the CLI subcommands that call
//! it over HTTP. Reads through the store; never bypasses `broker` or `store`.

use crate::ingress::{error_response, same_secret};
use crate::store::{rfc3339_now, HistoryEvent, Record, State as ObjState, StatusUpdate};
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

/// The CLI side: calls the admin API of the lxbridge configured in `config`.
pub mod cli {
    use crate::config::Config;

    #[derive(Debug, thiserror::Error)]
    pub enum CliError {
        #[error("the config has no [admin] token, so the admin API can't be called")]
        NoToken,
        #[error(
            "cannot reach lxbridge at {url}: {error} (is `lxbridge run` running with this config?)"
        )]
        Unreachable { url: String, error: String },
        #[error("lxbridge answered HTTP {status}: {body}")]
        Status { status: u16, body: String },
    }

    fn base_url(config: &Config) -> String {
        let listen = config.server.listen.replace("0.0.0.0", "127.0.0.1");
        format!("http://{listen}")
    }

    /// Percent-encodes a path segment (refs may hold `/`, `;`, `=` and Cyrillic).
    pub fn encode_segment(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    /// Sends a request to the admin API and returns the pretty-printed JSON answer.
    pub async fn call(
        config: &Config,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<String, CliError> {
        let token = config.admin.token.as_deref().ok_or(CliError::NoToken)?;
        let url = format!("{}{path}", base_url(config));
        let mut request = reqwest::Client::new()
            .request(method, &url)
            .bearer_auth(token);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.map_err(|e| CliError::Unreachable {
            url: url.clone(),
            error: e.to_string(),
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(CliError::Status {
                status: status.as_u16(),
                body: text,
            });
        }
        Ok(match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or(text),
            Err(_) => text,
        })
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

/// `lxbridge transform`: what each target of a route would receive for a change, offline.
pub mod preview {
    use crate::config::{Config, Format, MissingRefs};
    use crate::transform::{self, Outcome, Remap};
    use serde_json::{json, Value};

    /// One JSON line per target of the route: the change as delivered, or why it would be
    /// filtered or fail, with the references it carries (and, with `missing_refs = "wait"`,
    /// that it waits for them unless they were delivered before).
    pub fn run(config: &Config, route_name: &str, input: &str) -> Result<Vec<String>, String> {
        let route = config
            .routes
            .iter()
            .find(|r| r.name.as_deref() == Some(route_name))
            .ok_or_else(|| {
                let names: Vec<&str> = config
                    .routes
                    .iter()
                    .filter_map(|r| r.name.as_deref())
                    .collect();
                format!(
                    "no route named {route_name:?} (named routes: {})",
                    names.join(", ")
                )
            })?;
        let value: Value =
            serde_json::from_str(input).map_err(|e| format!("the input is not JSON: {e}"))?;
        let parsed = crate::model::parse_change(value)
            .map_err(|e| format!("the input is not a change: {e}"))?;
        if !route
            .types
            .iter()
            .any(|p| crate::route::topic_matches(&crate::route::topic_pattern(p), &parsed.kind))
        {
            return Ok(vec![json!({"outcome": "not routed", "reason": format!(
                "route {route_name:?} does not take type {:?} (types: {})", parsed.kind, route.types.join(", "))})
            .to_string()]);
        }
        let mapping = config.compiled_mapping(route).map_err(|p| p.join("; "))?;
        let change = transform::Change {
            id: parsed.id.clone().unwrap_or_else(|| "preview".into()),
            kind: parsed.kind,
            reference: parsed.reference,
            op: parsed.op,
            data: parsed.data,
            source: route.from.clone(),
            seq: parsed.seq.unwrap_or(1),
        };
        let references: Vec<Value> = mapping
            .references(&change)
            .into_iter()
            .map(|r| json!({"type": r.kind, "ref": r.reference}))
            .collect();
        let mut lines = Vec::new();
        for target in &route.to {
            let deliver = config.node(target).and_then(|n| n.deliver.as_ref());
            let format = deliver.map(|d| d.format).unwrap_or_default();
            let wait = deliver.is_some_and(|d| d.missing_refs == MissingRefs::Wait);
            let mut line = match mapping.apply(change.clone(), &Remap::new()) {
                Outcome::Deliver(c) => {
                    let data = match format {
                        Format::Lxbridge => c.data.clone(),
                        Format::Xdto => Some(transform::to_xdto(&c)),
                    };
                    json!({"target": target, "outcome": "deliver", "change": {
                        "id": c.id, "type": c.kind, "ref": c.reference, "op": c.op,
                        "data": data, "source": c.source, "seq": c.seq, "attempt": 1}})
                }
                Outcome::Filtered(reason) => {
                    json!({"target": target, "outcome": "filtered", "reason": reason})
                }
                Outcome::Failed(error) => {
                    json!({"target": target, "outcome": "failed", "reason": error})
                }
            };
            line["references"] = Value::Array(references.clone());
            if wait && !references.is_empty() {
                line["waits_for"] =
                    json!("each reference above, unless it was delivered to this target before");
            }
            lines.push(line.to_string());
        }
        Ok(lines)
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResyncRequest {
    node: String,
    from: Option<String>,
}

/// The type of the change that asks a group member for its snapshot.
pub const RESYNC_TYPE: &str = "lxbridge.Resync";

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
    let now = crate::store::unix_ms_now();
    let requested_at = crate::store::rfc3339_ms(now);
    let id = format!("resync-{group}-{}-{now}", request.node);
    let reference = format!("{group}/{}", request.node);
    let data = json!({"group": group, "node": request.node, "requested_at": requested_at});
    let envelope = crate::model::Envelope {
        id: &id,
        kind: RESYNC_TYPE,
        reference: &reference,
        op: crate::model::Op::Upsert,
        data: Some(&data),
        source: &request.node,
        seq: now,
        ts: Some(&requested_at),
        accepted_ms: now,
        initial: false,
    };
    let held = crate::broker::Held {
        queue: crate::broker::HeldIn::Deliver,
        attempt: 1,
        first_failed_ms: None,
        alone: false,
        error: None,
        body: serde_json::to_vec(&envelope).expect("envelope serialises"),
    };
    if let Err(e) = app.broker.import(&from, vec![held]).await {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    let record = Record {
        reference: reference.clone(),
        statuses: Vec::new(),
        event: Some(HistoryEvent {
            at: requested_at,
            target: from.clone(),
            event: "resync".into(),
            detail: format!(
                "{from} asked for its snapshot of group {group} for {}",
                request.node
            ),
        }),
        mark: None,
    };
    if let Err(e) = app.store.record(vec![record]).await {
        tracing::warn!(error = %e, "could not record the resync request");
    }
    (
        StatusCode::ACCEPTED,
        Json(
            json!({"group": group, "node": request.node, "from": from, "id": id, "ref": reference}),
        ),
    )
        .into_response()
}
