//! `/api/v1/nodes/{node}/commerceml`: lxbridge as the site of 1C's built-in site exchange
//! ("Обмен с сайтом", CommerceML 2; docs/commerceml.md). One endpoint, `type` and `mode` in
//! the query, GET or POST alike:
//! - `checkauth` (Basic: node name and token) starts a [`session::Session`] and answers
//!   its cookie, `sessid` and `timestamp`; later requests carry the cookie (or Basic);
//! - `init` starts an exchange in it (its files gone) and announces `zip` and `file_limit`;
//! - `file` appends the body to the named file (sub-folders kept, [`session::safe_name`]),
//!   within the session's size limit;
//! - `import` reads a file into changes ([`import`]), unpacking zips first ([`unzip`]);
//! - `type=sale`: `query` and `success` serve and confirm the node's orders, and a whole
//!   order file is imported on `file` already, for 1C's older flow ([`sale`]).
//!
//! Every answer but `init`'s and `query`'s has `success`, `progress` or `failure` as its first
//! line ([`answer`]), then Russian text for the 1C user; lxbridge logs the same in English.

mod answer;
mod import;
mod sale;
mod session;
mod unzip;

pub use answer::Status;
pub(crate) use import::Hashed;
pub use import::Imports;

use crate::config::CommerceMlConfig;
use crate::AppState;
use answer::Answer;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use session::Session;
use std::io::Write;
use std::sync::Arc;

#[derive(Debug, serde::Deserialize)]
pub struct Params {
    #[serde(rename = "type")]
    kind: Option<String>,
    mode: Option<String>,
    filename: Option<String>,
}

/// `GET|POST /api/v1/nodes/{node}/commerceml?type=…&mode=…[&filename=…]`
pub async fn commerceml(
    State(app): State<Arc<AppState>>,
    Path(node): Path<String>,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Ok(Query(params)) = params else {
        return Answer::failure("параметры запроса не читаются (type, mode, filename)")
            .into_response();
    };
    let mode = params.mode.clone().unwrap_or_default();
    let response = exchange(&app, &node, &params, &headers, body).await;
    let status = first_line(&mode, &response);
    if app.config.node(&node).is_some() {
        app.metrics
            .commerceml
            .requests
            .with_label_values(&[node.as_str(), mode_label(&mode), status])
            .inc();
    }
    response
}

fn mode_label(mode: &str) -> &'static str {
    const MODES: [&str; 9] = [
        "checkauth",
        "init",
        "file",
        "import",
        "query",
        "success",
        "deactivate",
        "complete",
        "info",
    ];
    MODES.into_iter().find(|m| *m == mode).unwrap_or("other")
}

/// The answer's kind for the metric: its status word, or what init and query answer.
fn first_line(mode: &str, response: &Response) -> &'static str {
    match (mode, response.status()) {
        ("init", StatusCode::OK) => "init",
        ("query", StatusCode::OK)
            if response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/xml")) =>
        {
            "xml"
        }
        _ => response
            .extensions()
            .get::<answer::Status>()
            .map(|s| s.word())
            .unwrap_or("failure"),
    }
}

async fn exchange(
    app: &Arc<AppState>,
    node: &str,
    params: &Params,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let Some((token, cml)) = app
        .config
        .node(node)
        .and_then(|n| Some((n.token.clone(), n.commerceml.clone()?)))
    else {
        let mut answer = Answer::failure(format!(
            "узел «{node}» не настроен для обмена CommerceML ([node.commerceml] в настройках lxbridge)"
        ));
        answer.http = StatusCode::NOT_FOUND;
        return answer.into_response();
    };
    let node_dir = app.config.commerceml_dir(&cml).join(node);
    let mode = params.mode.as_deref().unwrap_or("");
    if mode == "checkauth" {
        return checkauth(node, &token, &node_dir, headers, cml.keep_files.0).into_response();
    }
    let session = match session_of(node, &token, &node_dir, headers) {
        Ok(session) => session,
        Err(answer) => return answer.into_response(),
    };
    session.touch();
    match (params.kind.as_deref().unwrap_or("catalog"), mode) {
        (kind, "init") => init(node, &session, &cml, kind == "sale"),
        ("sale", "file") => match file(app, node, &session, &cml, params, body).await {
            Ok(name) => sale::file(app, node, &session, &name).await.into_response(),
            Err(answer) => answer.into_response(),
        },
        (_, "file") => file(app, node, &session, &cml, params, body)
            .await
            .map_or_else(|answer| answer, |_| Answer::success(""))
            .into_response(),
        (_, "import") => match params.filename.as_deref() {
            Some(name) => import::import(app, node, &session, name)
                .await
                .into_response(),
            None => Answer::failure("не указано имя файла (параметр filename)").into_response(),
        },
        ("sale", "query") => sale::query(app, node, &session).await,
        ("sale", "success") => sale::success(app, node, &session).await.into_response(),
        (_, "deactivate" | "complete") => Answer::success("").into_response(),
        (kind, mode) => Answer::failure(format!("неизвестная команда: type={kind}, mode={mode}"))
            .logged(node, format!("unknown command type={kind} mode={mode}"))
            .into_response(),
    }
}

/// Basic credentials (user = node name, password = its token), as 1C sends them.
fn credentials_ok(node: &str, token: &str, headers: &HeaderMap) -> bool {
    super::authorised(headers, node, token).is_ok()
}

fn unauthorised(lines: &str) -> Answer {
    let mut answer = Answer::failure(lines);
    answer.http = StatusCode::UNAUTHORIZED;
    answer
}

/// `mode=checkauth`; sessions idle for an hour (or `keep`, if longer) are swept first.
fn checkauth(
    node: &str,
    token: &str,
    node_dir: &std::path::Path,
    headers: &HeaderMap,
    keep: std::time::Duration,
) -> Answer {
    if !credentials_ok(node, token, headers) {
        return unauthorised(&format!(
            "неверный логин или пароль: пользователь — имя узла «{node}», пароль — его token"
        ))
        .logged(node, "checkauth: wrong or missing Basic credentials");
    }
    session::sweep(node_dir, session::SESSION_IDLE.max(keep));
    match Session::start(node_dir) {
        Ok(session) => Answer::success(format!(
            "{}\n{}\nsessid={}\ntimestamp={}",
            session::COOKIE,
            session.cookie(token, node),
            session.sessid(token, node),
            crate::clock::unix_ms_now() / 1000
        )),
        Err(e) => Answer::failure("не удалось начать сеанс обмена на сервере lxbridge").logged(
            node,
            format!(
                "checkauth: could not create the session folder in {}: {e}",
                node_dir.display()
            ),
        ),
    }
}

/// The session of a request: its cookie's, or with Basic and no cookie the node's latest.
fn session_of(
    node: &str,
    token: &str,
    node_dir: &std::path::Path,
    headers: &HeaderMap,
) -> Result<Session, Answer> {
    let from_cookie = cookie(headers).and_then(|v| Session::from_cookie(node_dir, token, node, &v));
    let session =
        match from_cookie {
            Some(session) => Some(session),
            None if credentials_ok(node, token, headers) => Session::current(node_dir),
            None => return Err(unauthorised(
                "нет сеанса обмена (cookie не передан или неверен): повторите обмен с авторизации",
            )
            .logged(
                node,
                "a request without a valid session cookie or Basic credentials",
            )),
        };
    match session {
        Some(session) if session.exists() => Ok(session),
        _ => Err(Answer::failure(
            "сеанс обмена истёк или не начат: повторите обмен (checkauth, init)",
        )
        .logged(node, "a request for a session that expired or never began")),
    }
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == session::COOKIE).then(|| value.trim().to_string())
        })
}

/// `mode=init`. A sale exchange is told `zip=no`: its order files are small, and with no
/// archive `mode=file` can tell when a file is whole (1C's older flow never asks `import`).
fn init(node: &str, session: &Session, cml: &CommerceMlConfig, sale: bool) -> Response {
    if let Err(e) = session.reset() {
        return Answer::failure("не удалось начать обмен на сервере lxbridge")
            .logged(
                node,
                format!("init: could not reset the session's files: {e}"),
            )
            .into_response();
    }
    let zip = if cml.zip && !sale { "yes" } else { "no" };
    let mut response = format!("zip={zip}\nfile_limit={}", cml.file_limit).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `mode=file`: the body appended to the named file, within the session's limit; the name.
async fn file(
    app: &AppState,
    node: &str,
    session: &Session,
    cml: &CommerceMlConfig,
    params: &Params,
    body: Body,
) -> Result<String, Answer> {
    let name = params.filename.as_deref().unwrap_or("");
    let relative = match session::safe_name(name) {
        Ok(relative) => relative,
        Err(bad) => return Err(Answer::failure(bad.russian(name)).logged(node, bad.english(name))),
    };
    let path = session.files().join(relative);
    let part_max = cml.file_limit.max(app.config.server.max_body_bytes) as u64;
    match append(session, &path, body, cml.session_limit, part_max).await {
        Ok(()) => Ok(name.to_string()),
        Err((english, russian)) => Err(Answer::failure(russian).logged(node, english)),
    }
}

async fn append(
    session: &Session,
    path: &std::path::Path,
    body: Body,
    limit: u64,
    part_max: u64,
) -> Result<(), (String, String)> {
    let shown = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let io = |e: std::io::Error| {
        (
            format!("{shown:?}: could not write the part: {e}"),
            format!("«{shown}»: файл не записан на сервере lxbridge ({e})"),
        )
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut out = std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    let (mut usage, mut part) = (session.usage(), 0u64);
    let mut stream = body.into_data_stream();
    while let Some(bytes) = stream.next().await {
        let bytes = bytes.map_err(|e| {
            (
                format!("{shown:?}: the upload broke off: {e}"),
                format!("«{shown}»: передача части файла прервана ({e}); повторите обмен"),
            )
        })?;
        usage += bytes.len() as u64;
        part += bytes.len() as u64;
        if usage > limit {
            let _ = session.set_usage(usage);
            return Err(unzip::too_big(&shown, limit));
        }
        if part > part_max {
            return Err((
                format!("{shown:?}: a part larger than {part_max} bytes"),
                format!(
                    "«{shown}»: часть файла больше {part_max} байт; уменьшите размер части в 1С"
                ),
            ));
        }
        out.write_all(&bytes).map_err(io)?;
    }
    session.set_usage(usage).map_err(io)
}
