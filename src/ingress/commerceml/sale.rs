//! `type=sale`: `mode=query` serves the node's inbox (the changes routed to it, its
//! `[node.deliver]` being `mode = "pull"`) as a `КоммерческаяИнформация` of `Документ`s,
//! the same message until `mode=success` confirms it (an inbox ack of the message the
//! session was served). A node that doesn't pull has no orders: the root element alone.

use super::answer::Answer;
use super::session::Session;
use crate::commerceml::write::{documents, Written};
use crate::config::DeliverMode;
use crate::deliver::pull;
use crate::AppState;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// How long the instance serving the inbox may take to answer.
const INBOX_TIMEOUT: Duration = Duration::from_secs(10);

fn pulls(app: &AppState, node: &str) -> Option<usize> {
    let deliver = app.config.node(node)?.deliver.as_ref()?;
    (deliver.mode == DeliverMode::Pull).then_some(deliver.batch_max)
}

/// `mode=query`.
pub async fn query(app: &AppState, node: &str, session: &Session) -> Response {
    let changes = match pulls(app, node) {
        None => Vec::new(),
        Some(limit) => {
            let request = pull::Request::Poll { limit, wait_ms: 0 };
            let reply = pull::call(app.broker.as_ref(), node, &request, INBOX_TIMEOUT).await;
            if reply.status != 200 {
                let why = reply.body["error"]
                    .as_str()
                    .unwrap_or("inbox failed")
                    .to_string();
                return Answer::failure(format!(
                    "заказы сейчас не получить ({why}); повторите обмен позже"
                ))
                .logged(
                    node,
                    format!("mode=query: the inbox answered {}: {why}", reply.status),
                )
                .into_response();
            }
            if let Some(n) = reply.body["message_no"].as_i64() {
                if let Err(e) = session.set_served(n) {
                    let why = format!("could not note the message served: {e}");
                    return Answer::failure("ошибка записи сеанса обмена на сервере lxbridge")
                        .logged(node, why)
                        .into_response();
                }
            }
            match reply.body.get("changes") {
                Some(Value::Array(changes)) => changes.clone(),
                _ => Vec::new(),
            }
        }
    };
    xml(app, node, &changes)
}

fn xml(app: &AppState, node: &str, changes: &[Value]) -> Response {
    let written: Vec<Written<'_>> = changes
        .iter()
        .map(|c| Written {
            name: "Документ",
            reference: c["ref"].as_str().unwrap_or(""),
            deleted: c["op"] == "delete",
            data: c.get("data").filter(|d| !d.is_null()),
        })
        .collect();
    let encoding = app
        .config
        .node(node)
        .and_then(|n| n.commerceml.as_ref())
        .map(|c| c.query_encoding.encoding())
        .unwrap_or(encoding_rs::UTF_8);
    let formed = crate::clock::rfc3339_now();
    let formed = formed.get(..19).unwrap_or(&formed);
    let body = documents(&written, formed, encoding);
    let content_type = format!("application/xml; charset={}", encoding.name());
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type).expect("an encoding name is a header value"),
    );
    tracing::info!(%node, documents = changes.len(), "CommerceML: orders served to mode=query");
    response
}

/// `mode=success`: confirms the message the last query served.
pub async fn success(app: &AppState, node: &str, session: &Session) -> Answer {
    let Some(message_no) = session.served() else {
        return Answer::success("нет отправленных заказов для подтверждения");
    };
    if pulls(app, node).is_none() {
        return Answer::success("");
    }
    let request = pull::Request::Ack {
        message_no,
        results: None,
    };
    let reply = pull::call(app.broker.as_ref(), node, &request, INBOX_TIMEOUT).await;
    if reply.status == 200 {
        let _ = std::fs::remove_file(session.root.join("sale"));
        let n = reply.body["confirmed"].as_u64().unwrap_or(0);
        return Answer::success(format!("подтверждено документов: {n}"));
    }
    let why = reply.body["error"]
        .as_str()
        .unwrap_or("inbox failed")
        .to_string();
    Answer::failure(format!(
        "подтверждение не принято ({why}); эти заказы придут снова при следующем обмене"
    ))
    .logged(
        node,
        format!("mode=success: the inbox answered {}: {why}", reply.status),
    )
}

/// `type=sale&mode=file`, after the part was appended: a file that is whole (its root element
/// closed) is imported now, as 1C's older flow expects, and `success` waits for every order
/// in it to be accepted; a later `mode=import` of it (the newer flow) gets the same answer.
/// A file not yet whole was only a part: `success`, the next part follows.
pub async fn file(app: &Arc<AppState>, node: &str, session: &Session, name: &str) -> Answer {
    let path = match super::session::safe_name(name) {
        Ok(relative) => session.files().join(relative),
        Err(bad) => return Answer::failure(bad.russian(name)).logged(node, bad.english(name)),
    };
    if !whole(&path) {
        return Answer::success("");
    }
    super::import::import_to_end(app, node, session, name).await
}

/// Whether an XML file ends with the closing tag of `КоммерческаяИнформация` (in UTF-8 or
/// windows-1251, the encodings 1C writes), trailing whitespace aside.
fn whole(path: &std::path::Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 256;
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut tail = Vec::new();
    if file
        .seek(SeekFrom::Start(len.saturating_sub(TAIL)))
        .is_err()
        || file.read_to_end(&mut tail).is_err()
    {
        return false;
    }
    let end = tail.trim_ascii_end();
    let close = "</КоммерческаяИнформация>";
    let (cp1251, _, _) = encoding_rs::WINDOWS_1251.encode(close);
    end.ends_with(close.as_bytes()) || end.ends_with(&cp1251)
}
