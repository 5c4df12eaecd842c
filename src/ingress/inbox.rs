//! The pull endpoints of a node: `GET …/inbox` and `POST …/inbox/ack` (docs/api.md "Pull
//! delivery"). They check the node and its credentials, answer `404` for a node that doesn't
//! pull, and pass the request to whichever instance serves the inbox
//! ([`pull::call`]), answering with its [`pull::Reply`].

use crate::deliver::pull;
use crate::http::error_response;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(serde::Deserialize)]
pub struct InboxQuery {
    limit: Option<usize>,
    wait: Option<u64>,
}

/// The longest a poll may wait for changes.
const MAX_WAIT_SECS: u64 = 120;

/// Node auth and that the node pulls, or the error answer.
fn check_puller(app: &AppState, node: &str, headers: &HeaderMap) -> Result<(), Response> {
    super::authenticated_node(app, node, headers)?;
    let pulls = app
        .config
        .node(node)
        .and_then(|n| n.deliver.as_ref())
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
