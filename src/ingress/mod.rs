//! The node endpoints: `POST /api/v1/nodes/{node}/changes` (docs/api.md "Publishing changes"),
//! the pull endpoints ([`inbox`]), CommerceML ([`commerceml`]) and webhooks ([`webhook`]). A changes request is authenticated here, its body
//! read and split into items ([`body`]), and each item accepted or rejected ([`accept`]:
//! routing, dedupe by id, parallel copies, publishing through the broker, records).
//!
//! Invariant: 202 (or 207) is never sent before the broker confirmed every change it
//! reports as accepted.

use crate::http::error_response;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine;
use std::sync::Arc;

pub(crate) mod accept;
mod body;
pub mod commerceml;
mod form;
mod inbox;
pub mod webhook;

pub use inbox::{get_inbox, post_inbox_ack, InboxQuery};
pub use webhook::post_webhook;

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

/// The node, checked before its credentials (404 then 401, as docs/api.md orders them).
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
    let kind = match body::body_kind(headers) {
        Ok(kind) => kind,
        Err(why) => return error_response(StatusCode::UNSUPPORTED_MEDIA_TYPE, why),
    };
    let body = match body::read_body(headers, body, app.config.server.max_body_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let items = match body::parse_items(kind, &body) {
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
    accept::accept(app, node, items).await
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

/// Checks `Authorization` for a node: Bearer token, or Basic with user = node name.
pub(crate) fn authorised(headers: &HeaderMap, node: &str, token: &str) -> Result<(), &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err("missing Authorization header (Bearer <node token>, or Basic node:token)");
    };
    let value = value
        .to_str()
        .map_err(|_| "Authorization header is not ASCII")?;
    if let Some(given) = value.strip_prefix("Bearer ") {
        return if crate::http::same_secret(given.trim().as_bytes(), token.as_bytes()) {
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
        return if user == node.as_bytes() && crate::http::same_secret(password, token.as_bytes()) {
            Ok(())
        } else {
            Err("wrong Basic credentials: the user must be the node name and the password its token")
        };
    }
    Err("unsupported Authorization scheme (use Bearer or Basic)")
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
}
