//! `POST /api/v1/nodes/{node}/webhook` (docs/integrations.md "Webhook ingress"): a
//! service's own webhook, authenticated by the node's `[node.webhook] auth`, its body (JSON,
//! or a form with bracket keys: [`super::form`]) turned into changes by the node's entries,
//! and those accepted as `/changes` accepts them ([`accept_with_ids`]).
//!
//! Order of the checks: the node (404), the content type (415), the size (413), a header or
//! HMAC secret (401, on the raw body), the body (400), a secret field in it (401), the
//! entries (422: the event is taken whole or not at all), the broker (503).
//!
//! Invariant: 200 is never sent before the broker confirmed every change it reports as
//! accepted.

use super::accept::{accept_with_ids, Unavailable, Verdict};
use super::{body, form};
use crate::config::{WebhookAuth, WebhookConfig, WebhookEntry};
use crate::http::{error_response, same_secret};
use crate::model::{parse_change, Change};
use crate::template::{lookup, plain, Template};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// Every webhook node's entries, compiled once at start.
#[derive(Default)]
pub struct Webhooks(HashMap<String, Arc<Webhook>>);

/// One node's webhook: its auth and its compiled entries.
pub struct Webhook {
    auth: WebhookAuth,
    entries: Vec<WebhookEntry>,
}

impl Webhooks {
    /// The webhooks of a validated config (an entry that doesn't compile was reported by
    /// `validate`, which refuses to start).
    pub fn from_config(config: &crate::config::Config) -> Webhooks {
        let compiled = config.nodes.iter().filter_map(|n| {
            let w: &WebhookConfig = n.webhook.as_ref()?;
            let entries = w
                .changes
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.compile(&format!("changes[{i}]")).ok())
                .collect();
            let hook = Webhook {
                auth: w.auth.clone(),
                entries,
            };
            Some((n.name.clone(), Arc::new(hook)))
        });
        Webhooks(compiled.collect())
    }
}

/// `POST /api/v1/nodes/{node}/webhook`
pub async fn post_webhook(
    State(app): State<Arc<AppState>>,
    Path(node): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request = Request {
        headers: &headers,
        query: query.as_deref().unwrap_or(""),
    };
    let response = match app.webhooks.0.get(&node) {
        Some(hook) => handle(&app, &node, hook, &request, body)
            .await
            .unwrap_or_else(|refusal| refusal),
        None => error_response(
            StatusCode::NOT_FOUND,
            format!("node {node:?} is unknown or has no [node.webhook]"),
        ),
    };
    let label = if app.webhooks.0.contains_key(&node) {
        node.as_str()
    } else {
        "_unknown"
    };
    app.metrics
        .integrations
        .webhook_requests
        .with_label_values(&[label, response.status().as_str()])
        .inc();
    response
}

/// What a webhook request carries besides its body.
struct Request<'a> {
    headers: &'a HeaderMap,
    /// The URL's query, as sent.
    query: &'a str,
}

/// The checks in order, then the changes accepted; `Err` is the refusal to answer.
async fn handle(
    app: &AppState,
    node: &str,
    hook: &Webhook,
    request: &Request<'_>,
    body: Body,
) -> Result<Response, Response> {
    let refuse = error_response;
    let headers = request.headers;
    let is_form =
        content_kind(headers).map_err(|why| refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, why))?;
    let raw = body::read_body(headers, body, app.config.server.max_body_bytes).await?;
    signed(&hook.auth, request, &raw).map_err(|why| refuse(StatusCode::UNAUTHORIZED, why))?;
    let root = if is_form {
        form::decode(&raw)
    } else {
        serde_json::from_slice(&raw).map_err(|e| format!("body is not valid JSON: {e}"))
    }
    .map_err(|why| refuse(StatusCode::BAD_REQUEST, why))?;
    drop(raw);
    field_secret(&hook.auth, &root).map_err(|why| refuse(StatusCode::UNAUTHORIZED, why))?;
    let changes = changes_of(&hook.entries, &root)
        .map_err(|why| refuse(StatusCode::UNPROCESSABLE_ENTITY, why))?;
    if changes.is_empty() {
        return Ok(answer(&[]));
    }
    if !app.broker.ready() {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker (RabbitMQ) is unavailable or applying flow control; nothing was accepted, retry later".to_string(),
        ));
    }
    let verdicts = accept_with_ids(app, node, changes)
        .await
        .map_err(|Unavailable(why)| refuse(StatusCode::SERVICE_UNAVAILABLE, why))?;
    if let Some((Verdict::Rejected(why), _)) = verdicts
        .iter()
        .find(|(v, _)| matches!(v, Verdict::Rejected(_)))
    {
        let why = format!("not every change of the event was accepted ({why}); send it again");
        return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, why));
    }
    Ok(answer(&verdicts))
}

/// JSON or a form (`true`); anything else is refused, naming what is taken.
fn content_kind(headers: &HeaderMap) -> Result<bool, String> {
    let (ct, essence) = body::media_type(headers);
    match essence.as_str() {
        "application/json" => Ok(false),
        "application/x-www-form-urlencoded" => Ok(true),
        _ => Err(format!(
            "Content-Type {ct:?} is not taken by a webhook: use application/json or application/x-www-form-urlencoded"
        )),
    }
}

/// A header or query secret, or the HMAC of the body (and its timestamp's window).
fn signed(auth: &WebhookAuth, request: &Request<'_>, raw: &[u8]) -> Result<(), String> {
    let header_text = |name: &str| {
        request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .ok_or_else(|| format!("missing {name} header"))
    };
    match auth {
        WebhookAuth::Header { header, secret } => {
            let given = header_text(header)?;
            if same_secret(given.as_bytes(), secret.as_bytes()) {
                Ok(())
            } else {
                Err(format!("wrong {header} for this node"))
            }
        }
        WebhookAuth::Hmac {
            secret,
            header,
            timestamp_header,
            window,
        } => {
            let given = header_text(header)?;
            let hex = given
                .strip_prefix("sha256=")
                .ok_or_else(|| format!("{header} is not sha256=<hex>"))?;
            let tag = from_hex(hex).ok_or_else(|| format!("{header} is not sha256=<hex>"))?;
            let mut message = Vec::with_capacity(raw.len() + 16);
            if let Some(ts_header) = timestamp_header {
                let ts = header_text(ts_header)?;
                within_window(ts, window.0).map_err(|why| format!("{ts_header}: {why}"))?;
                message.extend_from_slice(ts.as_bytes());
                message.push(b'.');
            }
            message.extend_from_slice(raw);
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
            ring::hmac::verify(&key, &message, &tag).map_err(|_| {
                format!("{header} does not match the body signed with this node's secret")
            })
        }
        WebhookAuth::Query { param, secret } => {
            let given = query_param(request.query, param).ok_or_else(|| {
                format!("the URL has no ?{param}= (the secret given to the service)")
            })?;
            if same_secret(given.as_bytes(), secret.as_bytes()) {
                Ok(())
            } else {
                Err(format!("wrong ?{param}= for this node"))
            }
        }
        WebhookAuth::Field { .. } => Ok(()),
    }
}

/// The first value of `name` in a URL query (percent-decoded).
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = form::unescape(key.as_bytes()).ok()?;
        (key == name).then(|| form::unescape(value.as_bytes()).ok())?
    })
}

/// A Unix-seconds timestamp within `window` of now, either way (against replays).
fn within_window(ts: &str, window: std::time::Duration) -> Result<(), String> {
    let ts: i64 = ts
        .parse()
        .map_err(|_| format!("{ts:?} is not a Unix time in seconds"))?;
    let now = crate::clock::unix_ms_now() / 1000;
    if (now - ts).unsigned_abs() > window.as_secs() {
        return Err(format!(
            "signed {}s from now, outside the {}s window (a replay, or a clock off)",
            now - ts,
            window.as_secs()
        ));
    }
    Ok(())
}

fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A secret field in the decoded body (Bitrix24's `auth[application_token]`).
fn field_secret(auth: &WebhookAuth, root: &Value) -> Result<(), String> {
    let WebhookAuth::Field { path, secret } = auth else {
        return Ok(());
    };
    match lookup(root, path).and_then(Value::as_str) {
        Some(given) if same_secret(given.as_bytes(), secret.as_bytes()) => Ok(()),
        Some(_) => Err(format!("wrong {path} for this node")),
        None => Err(format!("the body has no {path}")),
    }
}

/// The changes the entries make of a body, in order; the first that can't be made, named.
fn changes_of(entries: &[WebhookEntry], root: &Value) -> Result<Vec<Change>, String> {
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        if entry.filter.check(root).is_err() {
            continue;
        }
        let elements: Vec<&Value> = match lookup(root, &entry.each) {
            None => continue,
            Some(Value::Array(items)) => items.iter().collect(),
            Some(one) => vec![one],
        };
        for (n, element) in elements.into_iter().enumerate() {
            let at = || format!("changes[{i}] (each {:?}) element {n}", entry.each);
            let change =
                change_of(entry, root, element).map_err(|why| format!("{}: {why}", at()))?;
            out.push(change);
        }
    }
    Ok(out)
}

/// One element's change: its templates rendered, its data taken, checked as any change.
fn change_of(entry: &WebhookEntry, root: &Value, element: &Value) -> Result<Change, String> {
    let find = |f: &str| match f.strip_prefix("$.") {
        Some(path) => lookup(root, path),
        None => lookup(element, f),
    };
    let text =
        |key: &str, t: &Template| t.render(find, plain).map_err(|why| format!("{key}: {why}"));
    let mut change = Map::new();
    change.insert("type".into(), text("type", &entry.kind)?.into());
    change.insert("ref".into(), text("ref", &entry.reference)?.into());
    let op = text("op", &entry.op)?;
    if let Some(id) = &entry.id {
        change.insert("id".into(), text("id", id)?.into());
    }
    if op != "delete" {
        let data = lookup(element, &entry.data)
            .ok_or_else(|| format!("data: {:?} is absent", entry.data))?;
        change.insert("data".into(), data.clone());
    }
    change.insert("op".into(), op.into());
    parse_change(Value::Object(change)).map_err(|e| e.to_string())
}

/// `200 {"accepted", "duplicate", "unroutable", "ids"}`.
fn answer(verdicts: &[(Verdict, Option<String>)]) -> Response {
    let count = |want: fn(&Verdict) -> bool| verdicts.iter().filter(|(v, _)| want(v)).count();
    let ids: Vec<&str> = verdicts
        .iter()
        .filter_map(|(_, id)| id.as_deref())
        .collect();
    let body = json!({
        "accepted": count(|v| *v == Verdict::Accepted),
        "duplicate": count(|v| *v == Verdict::Duplicate),
        "unroutable": count(|v| *v == Verdict::Unroutable),
        "ids": ids,
    });
    (StatusCode::OK, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WebhookChange;

    fn entry(toml_text: &str) -> WebhookEntry {
        let c: WebhookChange = toml::from_str(toml_text).unwrap();
        c.compile("t").unwrap()
    }

    #[test]
    fn entries_make_a_change_per_element_or_name_what_is_missing() {
        let leads = entry("each = \"leads.status\"\ntype = \"AmoCRM.Lead\"\nref = \"{id}\"\nid = \"amo-{$.account.id}-{id}\"");
        let deal = entry("filter = [{ field = \"event\", eq = \"ONCRMDEALUPDATE\" }]\ntype = \"B.Deal\"\nref = \"{data.FIELDS.ID}\"\ndata = \"data.FIELDS\"");
        let root =
            json!({"leads": {"status": [{"id": "7"}, {"id": "8"}]}, "account": {"id": "29"}});
        let made = changes_of(&[leads, deal], &root).unwrap();
        let ids: Vec<_> = made.iter().map(|c| c.id.clone().unwrap()).collect();
        assert_eq!(ids, ["amo-29-7", "amo-29-8"]);
        assert_eq!(made[1].data, Some(json!({"id": "8"})));

        let deal = entry("filter = [{ field = \"event\", eq = \"ONCRMDEALUPDATE\" }]\ntype = \"B.Deal\"\nref = \"{data.FIELDS.ID}\"\ndata = \"data.FIELDS\"");
        let event = json!({"event": "ONCRMDEALUPDATE", "data": {"FIELDS": {"ID": "55"}}});
        let made = changes_of(std::slice::from_ref(&deal), &event).unwrap();
        assert_eq!(
            (made[0].reference.as_str(), made[0].data.clone()),
            ("55", Some(json!({"ID": "55"})))
        );
        let missing = json!({"event": "ONCRMDEALUPDATE", "data": {"FIELDS": {}}});
        let why = changes_of(&[deal], &missing).unwrap_err();
        assert!(
            why.contains("changes[0]") && why.contains("{data.FIELDS.ID} is absent"),
            "{why}"
        );
    }

    #[test]
    fn a_query_secret_is_read_decoded() {
        let auth: WebhookAuth =
            toml::from_str("kind = \"query\"\nparam = \"secret\"\nsecret = \"a b+c/d=e\"").unwrap();
        let headers = HeaderMap::new();
        let check = |query: &str| {
            signed(
                &auth,
                &Request {
                    headers: &headers,
                    query,
                },
                b"",
            )
        };
        assert_eq!(check("x=1&secret=a%20b%2Bc%2Fd%3De"), Ok(()));
        assert!(check("secret=a+b").unwrap_err().contains("wrong ?secret="));
        assert!(check("x=1").unwrap_err().contains("no ?secret="));
        assert_eq!(query_param("a=1&b=2&a=3", "a").as_deref(), Some("1"));
    }

    #[test]
    fn hmac_with_a_timestamp_is_checked_on_the_raw_body() {
        let auth: WebhookAuth = toml::from_str(
            "kind = \"hmac\"\nsecret = \"s3cret-key\"\ntimestamp_header = \"X-Timestamp\"",
        )
        .unwrap();
        let body = b"{\"a\":1}";
        let now = (crate::clock::unix_ms_now() / 1000).to_string();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cret-key");
        let sign = |ts: &str| {
            let tag = ring::hmac::sign(&key, format!("{ts}.{{\"a\":1}}").as_bytes());
            let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            format!("sha256={hex}")
        };
        let headers = |sig: String, ts: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-signature", sig.parse().unwrap());
            h.insert("x-timestamp", ts.parse().unwrap());
            h
        };
        let check = |h: &HeaderMap, body: &[u8]| {
            let request = Request {
                headers: h,
                query: "",
            };
            signed(&auth, &request, body)
        };
        assert_eq!(check(&headers(sign(&now), &now), body), Ok(()));
        let other = b"{\"a\":2}";
        assert!(check(&headers(sign(&now), &now), other)
            .unwrap_err()
            .contains("does not match"));
        let old = (crate::clock::unix_ms_now() / 1000 - 600).to_string();
        assert!(check(&headers(sign(&old), &old), body)
            .unwrap_err()
            .contains("window"));
        assert!(check(&HeaderMap::new(), body)
            .unwrap_err()
            .contains("missing X-Signature"));
    }
}
