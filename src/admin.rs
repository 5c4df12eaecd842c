//! Operating lxbridge: the admin API (bearer admin token) and the CLI subcommands that call
//! it over HTTP. Reads through the store; never bypasses `broker` or `store`.

use crate::ingress::{error_response, same_secret};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
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
