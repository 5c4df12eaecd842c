//! `mode = "http"`: a REST service as a push target's wire (docs/integrations.md "REST
//! target"). Each change is one request, built from its type's [`Request`] template, sent
//! once a rate slot is free ([`crate::store::rate`], shared by every instance), and judged
//! by the answer: the status, a path that must be absent (`error`) or hold a value
//! (`expect`), and the target's id for the object (`id`, learned into the remap table).
//!
//! Fate of a change: success delivers it (with its learned id); an answer that is a failure
//! refuses it with the answer's text (its retry step, then the DLQ); a request that cannot
//! be made for it (no entry for its type, a deletion without `delete`, `{target_ref}`
//! unknown) dead-letters it at once. `429`, and `503` with `Retry-After`, pause the target
//! for every instance and send the same request again: no retry step is spent. A refused
//! connection, a timeout, `502`/`504` or a `503` without `Retry-After` go to the breaker.

use super::push::describe;
use super::{Answer, Item};
use crate::config::{Auth, BodyTemplate, DeliverConfig, Rate, Request, TypeRequests};
use crate::metrics::RestMetrics;
use crate::store::{RateAsk, Store};
use crate::template::{lookup, plain, Template};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Without `rate`: slots are still taken (so a pause holds every instance), never short.
const UNLIMITED: Rate = Rate {
    max: 1_000_000,
    window: Duration::from_secs(1),
};

/// The longest a `Retry-After` pauses a target.
const MAX_PAUSE: Duration = Duration::from_secs(600);

/// How a request to the service ended, when not with a judged answer.
pub(super) enum Trouble {
    /// Unreachable or unavailable: counts toward the breaker.
    Unreachable(String),
    /// Shutting down while waiting: nothing was settled.
    Cancelled,
}

/// A REST service as a push target's wire.
pub struct Rest {
    target: String,
    base: String,
    requests: BTreeMap<String, TypeRequests>,
    rate: RateAsk,
    timeout: Duration,
    /// `[node.deliver] auth`, sent with every request (beside the templates' headers).
    auth: Option<Auth>,
    client: reqwest::Client,
    store: Arc<dyn Store>,
    metrics: RestMetrics,
    /// This process's slot names: `<random>-<n>`.
    slot_prefix: String,
    slots: AtomicU64,
}

/// The request for one change, rendered.
#[derive(Debug)]
struct Rendered<'r> {
    request: &'r Request,
    url: String,
    headers: Vec<(reqwest::header::HeaderName, String)>,
    body: Value,
}

/// What the service's answer made of a change.
enum Judged {
    Delivered(Option<String>),
    Refused(String),
    /// 429, or 503 with `Retry-After`: pause this long and send it again.
    Throttled(Duration),
    Unreachable(String),
}

impl Rest {
    pub fn new(
        target: &str,
        d: &DeliverConfig,
        client: reqwest::Client,
        store: Arc<dyn Store>,
        metrics: RestMetrics,
    ) -> Result<Rest, super::DeliverError> {
        let requests = crate::config::compile_requests(target, &d.requests)
            .map_err(|p| super::DeliverError::Client(p.join("; ")))?;
        let rate = d.rate.unwrap_or(UNLIMITED);
        Ok(Rest {
            target: target.to_string(),
            base: d.url.clone().unwrap_or_default(),
            requests,
            rate: RateAsk {
                max: rate.max,
                window_ms: rate.window.as_millis() as u64,
                hold_ms: d.timeout.0.as_millis() as u64 + 1000,
            },
            timeout: d.timeout.0,
            auth: d.auth.clone(),
            client,
            store,
            metrics,
            slot_prefix: format!("{:016x}", rand_u64()),
            slots: AtomicU64::new(0),
        })
    }

    /// Sends each item as its own request, in order; the answer of each. (A push target of
    /// this wire has `batch_max` 1: an unreachable service fails the one change sent.)
    pub(super) async fn send(
        &self,
        items: &[Item],
        cancel: &CancellationToken,
    ) -> Result<Answer, Trouble> {
        let mut answer = Answer::default();
        for item in items {
            let id = item.change.id.clone();
            let vars = variables(&self.base, item);
            let rendered = match self.request_for(&vars) {
                Ok(r) => r,
                Err((why, retry)) => {
                    answer.refuse(&id, why, retry);
                    continue;
                }
            };
            match self.exchange(&rendered, cancel).await? {
                Ok(Some(target_ref)) => answer.learned(&id, target_ref),
                Ok(None) => {}
                Err(why) => answer.refuse(&id, why, true),
            }
        }
        Ok(answer)
    }

    /// The request for a change's variables; `Err((why, retry))` when none can be made.
    fn request_for<'r>(&'r self, vars: &Value) -> Result<Rendered<'r>, (String, bool)> {
        let kind = vars["type"].as_str().unwrap_or_default();
        let Some(entry) = self.requests.get(kind).or_else(|| self.requests.get("*")) else {
            let why =
                format!("no request for type {kind:?} in [node.deliver.requests] (nor \"*\")");
            return Err((why, false));
        };
        let known = vars.get("target_ref").is_some();
        let request = match vars["op"].as_str() {
            Some("delete") => entry.delete.as_ref().ok_or_else(|| {
                let why = format!("a deletion of {kind:?}, and its entry has no delete request");
                (why, false)
            })?,
            _ => match &entry.update {
                Some(update) if known => update,
                _ => &entry.create,
            },
        };
        if !known && request.fields().contains(&"target_ref") {
            let why = format!(
                "the request of {kind:?} needs {{target_ref}}, and this target's id of the object is not known (it was not created through lxbridge)"
            );
            return Err((why, false));
        }
        render(request, vars).map_err(|why| (why, true))
    }

    /// Sends the request until it is answered other than "throttled"; the id it taught, or
    /// why it failed.
    async fn exchange(
        &self,
        r: &Rendered<'_>,
        cancel: &CancellationToken,
    ) -> Result<Result<Option<String>, String>, Trouble> {
        loop {
            let slot = self.take_slot(cancel).await?;
            let judged = self.call(r).await;
            if let Err(e) = self.store.rate_done(&self.target, &slot).await {
                warn!(target = %self.target, error = %e, "could not mark a rate slot answered; it counts until its hold ends");
            }
            match judged {
                Judged::Delivered(id) => {
                    self.metrics.ok.inc();
                    return Ok(Ok(id));
                }
                Judged::Refused(why) => {
                    self.metrics.refused.inc();
                    return Ok(Err(why));
                }
                Judged::Unreachable(why) => {
                    self.metrics.unreachable.inc();
                    return Err(Trouble::Unreachable(why));
                }
                Judged::Throttled(pause) => {
                    self.metrics.throttled.inc();
                    info!(target = %self.target, pause_ms = pause.as_millis() as u64, "the service asked to wait (429/503 with Retry-After); pausing, then sending again");
                    if let Err(e) = self
                        .store
                        .rate_pause(&self.target, pause.as_millis() as u64)
                        .await
                    {
                        warn!(target = %self.target, error = %e, "could not share the pause; pausing here");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Trouble::Cancelled),
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// Waits for a rate slot (the store away holds the request); its name.
    async fn take_slot(&self, cancel: &CancellationToken) -> Result<String, Trouble> {
        let n = self.slots.fetch_add(1, Ordering::Relaxed);
        let slot = format!("{}-{n}", self.slot_prefix);
        let mut waited = false;
        loop {
            let wait = match self.store.rate_take(&self.target, &slot, self.rate).await {
                Ok(None) => return Ok(slot),
                Ok(Some(ms)) => Duration::from_millis(ms.min(250)),
                Err(e) => {
                    warn!(target = %self.target, error = %e, "store unavailable; holding requests to keep the rate");
                    Duration::from_secs(1)
                }
            };
            if !waited {
                waited = true;
                self.metrics.rate_waits.inc();
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(Trouble::Cancelled),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One request and its answer judged.
    async fn call(&self, r: &Rendered<'_>) -> Judged {
        let mut request = self
            .client
            .request(r.request.method.clone(), &r.url)
            .timeout(self.timeout);
        request = match &self.auth {
            Some(Auth::Bearer(token)) => request.bearer_auth(token),
            Some(Auth::Basic { user, password }) => request.basic_auth(user, Some(password)),
            None => request,
        };
        for (name, value) in &r.headers {
            request = request.header(name, value);
        }
        if r.request.method != reqwest::Method::GET {
            let body = serde_json::to_vec(&r.body).expect("JSON values serialise");
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Judged::Unreachable(describe(&e, self.timeout)),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(retry_after);
        let text = match response.bytes().await {
            Ok(text) => text,
            Err(e) => return Judged::Unreachable(describe(&e, self.timeout)),
        };
        judge(r.request, status, retry_after, &text)
    }
}

/// The variables of a change's templates: `url`, the change's fields as delivered (after
/// the mapping), `target_ref` when known, and `data`.
fn variables(base: &str, item: &Item) -> Value {
    let out = item.outgoing();
    let data = out
        .data
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .unwrap_or(Value::Null);
    let mut vars = Map::new();
    vars.insert("url".into(), base.into());
    vars.insert("id".into(), out.id.into());
    vars.insert("type".into(), out.kind.into());
    vars.insert("ref".into(), out.reference.into());
    vars.insert("op".into(), out.op.as_str().into());
    vars.insert("source".into(), out.source.into());
    vars.insert("seq".into(), out.seq.into());
    if let Some(t) = out.target_ref {
        vars.insert("target_ref".into(), t.into());
    }
    vars.insert("data".into(), data);
    Value::Object(vars)
}

/// The request rendered for `vars`; the error names the placeholder that has no value.
fn render<'r>(request: &'r Request, vars: &Value) -> Result<Rendered<'r>, String> {
    let find = |f: &str| lookup(vars, f);
    let url = render_url(&request.url, vars)?;
    let mut headers = Vec::with_capacity(request.headers.len());
    for (name, value) in &request.headers {
        let text = value
            .render(find, plain)
            .map_err(|why| format!("header {name}: {why}"))?;
        headers.push((name.clone(), text));
    }
    let body = render_body(&request.body, vars).map_err(|why| format!("body: {why}"))?;
    Ok(Rendered {
        request,
        url,
        headers,
        body,
    })
}

/// The URL: every value percent-encoded but `{url}`, the node's own.
fn render_url(url: &Template, vars: &Value) -> Result<String, String> {
    url.render(
        |f| lookup(vars, f),
        |field, text| match field {
            "url" => Cow::Borrowed(text),
            _ => Cow::Owned(percent_encode(text)),
        },
    )
    .map_err(|why| format!("url: {why}"))
}

/// The body: a string that is one placeholder is its value (an absent one `null`), other
/// strings text.
fn render_body(body: &BodyTemplate, vars: &Value) -> Result<Value, String> {
    Ok(match body {
        BodyTemplate::Text(t) => match t.single() {
            Some(f) => lookup(vars, f).cloned().unwrap_or(Value::Null),
            None => Value::String(t.render(|f| lookup(vars, f), plain)?),
        },
        BodyTemplate::Array(items) => Value::Array(
            items
                .iter()
                .map(|b| render_body(b, vars))
                .collect::<Result<_, _>>()?,
        ),
        BodyTemplate::Object(fields) => {
            let mut map = Map::new();
            for (k, b) in fields {
                map.insert(k.clone(), render_body(b, vars)?);
            }
            Value::Object(map)
        }
        BodyTemplate::Value(v) => v.clone(),
    })
}

/// Percent-encodes all but the unreserved characters of RFC 3986.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The answer judged by the request's `ok`, `error`, `expect` and `id`.
fn judge(request: &Request, status: u16, retry_after: Option<Duration>, text: &[u8]) -> Judged {
    let snippet = || String::from_utf8_lossy(&text[..text.len().min(300)]).into_owned();
    match (status, retry_after) {
        (429, pause) => return Judged::Throttled(pause.unwrap_or(Duration::from_secs(1))),
        (503, Some(pause)) => return Judged::Throttled(pause),
        (502..=504, _) => {
            return Judged::Unreachable(format!("target answered HTTP {status}: {}", snippet()))
        }
        _ => {}
    }
    if !request.ok_status(status) {
        return Judged::Refused(format!("target answered HTTP {status}: {}", snippet()));
    }
    let answer: Value = serde_json::from_slice(text).unwrap_or(Value::Null);
    if let Some(path) = &request.error {
        if let Some(error) = lookup(&answer, path).filter(|e| !e.is_null()) {
            let error = match error {
                Value::String(s) => format!("{s:?}"),
                other => other.to_string(),
            };
            return Judged::Refused(format!("HTTP {status} with error {error}: {}", snippet()));
        }
    }
    if let Some(expect) = &request.expect {
        let got = lookup(&answer, &expect.path);
        if got != Some(&expect.eq) {
            return Judged::Refused(format!(
                "HTTP {status} without {} = {}: {}",
                expect.path,
                expect.eq,
                snippet()
            ));
        }
    }
    Judged::Delivered(
        request
            .id
            .as_ref()
            .and_then(|path| learned_id(&answer, path)),
    )
}

/// The target's id at `path` of the answer, as text.
fn learned_id(answer: &Value, path: &str) -> Option<String> {
    match lookup(answer, path)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `Retry-After`: seconds, or an HTTP date; at most [`MAX_PAUSE`], at least 1 s when
/// unreadable.
fn retry_after(value: &str) -> Duration {
    let value = value.trim();
    let pause = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822)
                .ok()
                .map(|at| (at - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO))
                .map(|d| Duration::from_millis(d.whole_milliseconds() as u64))
                .unwrap_or(Duration::from_secs(1))
        }
    };
    pause.clamp(Duration::from_millis(1), MAX_PAUSE)
}

/// A random number for this process's slot names (no dependency for it: the clock and the
/// process id, hashed).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RequestConfig;
    use serde_json::json;

    fn request(toml_text: &str) -> TypeRequests {
        let entry: RequestConfig = toml::from_str(toml_text).unwrap();
        entry.compile("t").unwrap()
    }

    fn vars() -> Value {
        json!({"url": "https://h/rest/1/k", "id": "c-1", "type": "Bitrix24.Deal", "ref": "a/b c",
               "op": "upsert", "source": "central", "seq": 5, "target_ref": "42",
               "data": {"TITLE": "Заказ", "n": 3}})
    }

    #[test]
    fn urls_encode_values_but_the_base_and_bodies_keep_values() {
        let r = request(
            "url = \"{url}/items/{ref}?t={data.TITLE}\"\nbody = { id = \"{target_ref}\", n = \"{data.n}\", fields = \"{data}\", note = \"v{seq}\", none = \"{data.x}\" }",
        );
        let got = render(&r.create, &vars()).unwrap();
        assert_eq!(
            got.url,
            "https://h/rest/1/k/items/a%2Fb%20c?t=%D0%97%D0%B0%D0%BA%D0%B0%D0%B7"
        );
        assert_eq!(
            got.body,
            json!({"id": "42", "n": 3, "fields": {"TITLE": "Заказ", "n": 3}, "note": "v5", "none": null})
        );
        let r = request("url = \"{url}/x/{data.missing}\"");
        assert!(render(&r.create, &vars())
            .unwrap_err()
            .contains("{data.missing} is absent"));
    }

    #[test]
    fn answers_are_judged_by_status_error_expect_and_id() {
        let r = request("url = \"{url}\"\nid = \"result\"\nerror = \"error\"\nexpect = { path = \"ok\", eq = true }");
        let judged = |status, after, body: &str| judge(&r.create, status, after, body.as_bytes());
        assert!(
            matches!(judged(200, None, r#"{"result": 17, "ok": true}"#), Judged::Delivered(Some(id)) if id == "17")
        );
        match judged(
            200,
            None,
            r#"{"error": "ERROR_CORE", "error_description": "no"}"#,
        ) {
            Judged::Refused(why) => assert!(
                why.starts_with("HTTP 200 with error \"ERROR_CORE\": {"),
                "{why}"
            ),
            _ => panic!("a 200 with an error is a failure"),
        }
        assert!(matches!(
            judged(200, None, r#"{"result": 1, "ok": false}"#),
            Judged::Refused(_)
        ));
        assert!(
            matches!(judged(400, None, "bad"), Judged::Refused(why) if why.contains("HTTP 400: bad"))
        );
        assert!(
            matches!(judged(429, None, ""), Judged::Throttled(d) if d == Duration::from_secs(1))
        );
        let two = Some(Duration::from_secs(2));
        assert!(
            matches!(judged(503, two, ""), Judged::Throttled(d) if d == Duration::from_secs(2))
        );
        assert!(matches!(judged(503, None, ""), Judged::Unreachable(_)));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(retry_after("3"), Duration::from_secs(3));
        assert_eq!(retry_after("99999"), MAX_PAUSE);
        assert_eq!(retry_after("soon"), Duration::from_secs(1));
        let later = time::OffsetDateTime::now_utc() + time::Duration::seconds(30);
        let date = later
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap()
            .replace("+0000", "GMT");
        let pause = retry_after(&date);
        assert!(
            pause > Duration::from_secs(25) && pause <= Duration::from_secs(30),
            "{date}: {pause:?}"
        );
        assert_eq!(percent_encode("a-b_c.d~e f/ж"), "a-b_c.d~e%20f%2F%D0%B6");
    }
}
