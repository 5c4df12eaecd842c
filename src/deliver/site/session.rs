//! 1C's side of a CommerceML site's protocol (docs/commerceml.md, /work notes §1): one
//! [`Client`] per site and use (deliveries, orders), with the session it keeps: checkauth
//! with Basic, then the cookie it answered on every request, and `sessid=` in every query
//! once the site gave one (1C-Bitrix refuses requests without it after it has seen one),
//! Basic too (a site without a cookie takes that).
//!
//! Answers are read as the site writes them (windows-1251 or UTF-8, with or without a BOM);
//! the first line must be `success`, `progress` or `failure` ([`Reply::status`]).

use crate::config::{Auth, DeliverConfig};
use std::time::Duration;

/// Which exchange a request belongs to (`type=`).
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Catalog,
    Sale,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Catalog => "catalog",
            Kind::Sale => "sale",
        }
    }
}

/// A first line that lets the exchange go on.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    Success,
    Progress,
}

/// Why a request didn't go on.
#[derive(Debug)]
pub enum Failure {
    /// Not answered, or 429/502/503/504: the site is away (the breaker holds the package).
    Unreachable(String),
    /// Answered, but not with what lets the exchange go on.
    Refused(String),
    /// The session is gone (401, or a `failure` that says so): checkauth again.
    Renew(String),
}

/// What `mode=init` announced.
#[derive(Debug, Clone, Copy)]
pub struct Init {
    pub zip: bool,
    pub file_limit: usize,
}

/// An answer, as text.
pub struct Reply {
    pub text: String,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
struct Session {
    cookie: Option<String>,
    sessid: Option<String>,
}

pub struct Client {
    pub target: String,
    url: String,
    auth: Option<Auth>,
    timeout: Duration,
    http: reqwest::Client,
    session: tokio::sync::Mutex<Option<Session>>,
}

/// The most of a site's answer an error quotes.
const QUOTE: usize = 300;

impl Client {
    pub fn new(target: &str, d: &DeliverConfig) -> Result<Client, super::super::DeliverError> {
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| super::super::DeliverError::Client(e.to_string()))?;
        Ok(Client {
            target: target.to_string(),
            url: d.url.clone().unwrap_or_default(),
            auth: d.auth.clone(),
            timeout: d.timeout.0,
            http,
            session: tokio::sync::Mutex::new(None),
        })
    }

    pub async fn forget_session(&self) {
        *self.session.lock().await = None;
    }

    /// The kept session, or a new one from `mode=checkauth`.
    async fn session(&self, kind: Kind) -> Result<Session, Failure> {
        let mut kept = self.session.lock().await;
        if let Some(session) = kept.as_ref() {
            return Ok(session.clone());
        }
        let session = self.checkauth(kind).await?;
        *kept = Some(session.clone());
        Ok(session)
    }

    async fn checkauth(&self, kind: Kind) -> Result<Session, Failure> {
        let reply = self.request(None, kind, "checkauth", None, None).await;
        let reply = match reply {
            Err(Failure::Renew(why)) => {
                return Err(Failure::Refused(format!(
                    "{why}: check the user and password in [node.deliver] auth"
                )))
            }
            other => other?,
        };
        let lines: Vec<&str> = reply.text.lines().map(str::trim).collect();
        match reply.status("mode=checkauth") {
            Ok(Status::Success) => {}
            Ok(Status::Progress) => {
                return Err(Failure::Refused(
                    "the site answered progress to mode=checkauth".into(),
                ))
            }
            Err(Failure::Refused(why) | Failure::Renew(why)) => {
                return Err(Failure::Refused(format!(
                    "the site refused checkauth: {why}"
                )))
            }
            Err(e) => return Err(e),
        }
        let cookie = match (lines.get(1), lines.get(2)) {
            (Some(name), Some(value))
                if !name.is_empty() && !name.contains('=') && !value.contains('=') =>
            {
                Some(format!("{name}={value}"))
            }
            _ => None,
        };
        let sessid = lines
            .iter()
            .find_map(|l| l.strip_prefix("sessid="))
            .map(str::to_string);
        if cookie.is_none() {
            tracing::info!(target = %self.target, "the site gave no session cookie at checkauth; going on with Basic on every request");
        }
        Ok(Session { cookie, sessid })
    }

    /// `mode=init`: zip and file_limit (a site that names none: no zip, 200 KB).
    pub async fn init(&self, kind: Kind) -> Result<Init, Failure> {
        let reply = self.call(kind, "init", None, None).await?;
        let mut init = Init {
            zip: false,
            file_limit: 204_800,
        };
        let first = reply.text.lines().next().unwrap_or("").trim();
        if first.starts_with("failure")
            || !(first.starts_with("zip=") || first.starts_with("file_limit="))
        {
            reply.status("mode=init")?;
        }
        for line in reply.text.lines().map(str::trim) {
            if let Some(zip) = line.strip_prefix("zip=") {
                init.zip = zip == "yes";
            } else if let Some(limit) = line.strip_prefix("file_limit=") {
                init.file_limit = limit.parse().unwrap_or(init.file_limit).max(1024);
            }
        }
        Ok(init)
    }

    /// `mode=file` of `bytes` in parts of at most `limit` bytes, each answered `success`.
    pub async fn upload(
        &self,
        kind: Kind,
        name: &str,
        bytes: &[u8],
        limit: usize,
    ) -> Result<(), Failure> {
        for part in bytes.chunks(limit.max(1)) {
            let reply = self
                .call(kind, "file", Some(name), Some(part.to_vec()))
                .await?;
            if reply.status(&format!("mode=file of {name}"))? != Status::Success {
                return Err(Failure::Refused(format!(
                    "the site answered progress to mode=file of {name}"
                )));
            }
        }
        Ok(())
    }

    /// One request in the session (started if there is none).
    pub async fn call(
        &self,
        kind: Kind,
        mode: &str,
        filename: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, Failure> {
        let session = self.session(kind).await?;
        self.request(Some(&session), kind, mode, filename, body)
            .await
    }

    async fn request(
        &self,
        session: Option<&Session>,
        kind: Kind,
        mode: &str,
        filename: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, Failure> {
        let mut query = vec![("type", kind.as_str()), ("mode", mode)];
        query.extend(filename.map(|f| ("filename", f)));
        if let Some(sessid) = session.and_then(|s| s.sessid.as_deref()) {
            query.push(("sessid", sessid));
        }
        let method = if body.is_some() {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let mut request = self
            .http
            .request(method, &self.url)
            .query(&query)
            .timeout(self.timeout);
        if let Some(cookie) = session.and_then(|s| s.cookie.as_deref()) {
            request = request.header(reqwest::header::COOKIE, cookie);
        }
        request = match &self.auth {
            Some(Auth::Basic { user, password }) => request.basic_auth(user, Some(password)),
            Some(Auth::Bearer(token)) => request.bearer_auth(token),
            None => request,
        };
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body);
        }
        let what = format!("mode={mode}");
        let away = |e: reqwest::Error| {
            Failure::Unreachable(format!(
                "{what}: {}",
                super::super::push::describe(&e, self.timeout)
            ))
        };
        let response = request.send().await.map_err(away)?;
        let status = response.status().as_u16();
        let charset = charset(response.headers());
        let body = response.bytes().await.map_err(away)?.to_vec();
        let text = decode(&body, charset.as_deref());
        match status {
            200..=299 => Ok(Reply { text, body }),
            401 | 403 => Err(Failure::Renew(format!(
                "the site answered HTTP {status} to {what}"
            ))),
            // A gateway in front of a site that is down, or a site asking for air; a 500 is
            // the site failing on what it was sent (the package is retried, its changes alone).
            429 | 502..=504 => Err(Failure::Unreachable(format!(
                "the site answered HTTP {status} to {what}"
            ))),
            _ => Err(Failure::Refused(format!(
                "the site answered HTTP {status} to {what}: {}",
                quote(&text)
            ))),
        }
    }
}

impl Reply {
    /// The first line: `success` or `progress`; `failure` (a session gone: [`Failure::Renew`])
    /// and anything else are errors quoting the site, for `what` ("mode=import of x.xml").
    pub fn status(&self, what: &str) -> Result<Status, Failure> {
        let mut lines = self.text.lines();
        let first = lines.next().unwrap_or("").trim();
        let rest: Vec<&str> = lines.map(str::trim).filter(|l| !l.is_empty()).collect();
        match first {
            "success" => Ok(Status::Success),
            "progress" => Ok(Status::Progress),
            "failure" => {
                let text = quote(&rest.join(" "));
                let why = format!("the site answered failure to {what}: {text}");
                Err(if speaks_of_session(&text) { Failure::Renew(why) } else { Failure::Refused(why) })
            }
            "" if rest.is_empty() => Err(Failure::Refused(format!("the site answered an empty body to {what}"))),
            other => Err(Failure::Refused(format!(
                "the site answered {:?} to {what}: a first line must be success, progress or failure",
                quote(other)
            ))),
        }
    }
}

/// Whether a `failure` text says the session or the authorisation is gone.
fn speaks_of_session(text: &str) -> bool {
    let text = text.to_lowercase();
    [
        "сесси",
        "сеанс",
        "авториз",
        "источника запроса",
        "session",
        "sessid",
        "authoriz",
        "unauthor",
    ]
    .iter()
    .any(|word| text.contains(word))
}

fn charset(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let value = headers.get(reqwest::header::CONTENT_TYPE)?.to_str().ok()?;
    let at = value.to_ascii_lowercase().find("charset=")?;
    Some(
        value[at + 8..]
            .trim_matches(['"', ' ', ';'])
            .to_ascii_lowercase(),
    )
}

/// The body as text: a BOM, else the declared charset, else UTF-8 if it is, else windows-1251.
fn decode(body: &[u8], charset: Option<&str>) -> String {
    if let Some((encoding, bom)) = encoding_rs::Encoding::for_bom(body) {
        return encoding
            .decode_without_bom_handling(&body[bom..])
            .0
            .into_owned();
    }
    let declared = charset.and_then(|c| encoding_rs::Encoding::for_label(c.as_bytes()));
    match (declared, std::str::from_utf8(body)) {
        (Some(encoding), _) if encoding != encoding_rs::UTF_8 => {
            encoding.decode_without_bom_handling(body).0.into_owned()
        }
        (_, Ok(text)) => text.to_string(),
        (_, Err(_)) => encoding_rs::WINDOWS_1251
            .decode_without_bom_handling(body)
            .0
            .into_owned(),
    }
}

fn quote(text: &str) -> String {
    let mut quoted: String = text.chars().take(QUOTE).collect();
    if text.chars().count() > QUOTE {
        quoted.push('…');
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(text: &str) -> Reply {
        Reply {
            text: text.into(),
            body: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn first_lines_are_read_and_others_named() {
        assert_eq!(reply("success\n").status("x").unwrap(), Status::Success);
        assert_eq!(
            reply("progress\r\nшаг 1").status("x").unwrap(),
            Status::Progress
        );
        let refused = |text: &str| match reply(text).status("mode=import of import.xml") {
            Err(Failure::Refused(why)) => why,
            other => panic!("{text:?}: {other:?}"),
        };
        assert!(refused("rollback").contains("\"rollback\" to mode=import of import.xml"));
        assert!(refused("").contains("empty body"));
        assert!(refused("failure\nТовар x: ошибка").contains("Товар x: ошибка"));
        assert!(matches!(
            reply("failure\nОшибка проверки источника запроса").status("x"),
            Err(Failure::Renew(_))
        ));
    }

    #[test]
    fn answers_decode_by_bom_charset_or_content() {
        let (cp1251, _, _) = encoding_rs::WINDOWS_1251.encode("успех");
        assert_eq!(decode(&cp1251, Some("windows-1251")), "успех");
        assert_eq!(decode(&cp1251, None), "успех");
        assert_eq!(decode("\u{feff}success".as_bytes(), None), "success");
    }
}
