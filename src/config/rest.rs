//! `mode = "http"`: a REST service as a target, one request per change from a template per
//! type, at the rate the service allows (docs/integrations.md "REST target"). Here are the
//! keys as written and their compiled form, [`Request`], which `validate` checks and the
//! delivery ([`crate::deliver::rest`]) sends.

use crate::template::Template;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use std::collections::BTreeMap;

/// `rate = "N/s"` (or `/m`, `/h`): at most `max` requests start in any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub max: u32,
    pub window: std::time::Duration,
}

impl Rate {
    pub fn parse(text: &str) -> Result<Rate, String> {
        let wrong = || format!("rate {text:?} is not N/s, N/m or N/h (e.g. \"2/s\")");
        let (n, unit) = text.trim().split_once('/').ok_or_else(wrong)?;
        let max: u32 = n.trim().parse().map_err(|_| wrong())?;
        let secs = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(wrong()),
        };
        if max == 0 {
            return Err(format!("rate {text:?} must allow at least 1 request"));
        }
        Ok(Rate {
            max,
            window: std::time::Duration::from_secs(secs),
        })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let text = String::deserialize(d)?;
        Rate::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `[node.deliver.requests."<type>"]` as written; `update` and `delete` take every key they
/// don't set from the entry.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RequestConfig {
    pub method: Option<String>,
    pub url: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    /// Any TOML value, sent as JSON; strings are templates.
    pub body: Option<Value>,
    /// The answer's path of the target's id for the object.
    pub id: Option<String>,
    /// A path that must be absent from the answer.
    pub error: Option<String>,
    /// The statuses that are success (default: any 2xx).
    pub ok: Option<Vec<u16>>,
    pub expect: Option<Expect>,
    pub update: Option<Box<RequestConfig>>,
    pub delete: Option<Box<RequestConfig>>,
}

/// `expect = { path, eq }`: the answer must hold this value there.
#[derive(Debug, Clone, Deserialize)]
pub struct Expect {
    pub path: String,
    pub eq: Value,
}

/// A JSON body whose strings are templates.
#[derive(Debug, Clone)]
pub enum BodyTemplate {
    Text(Template),
    Array(Vec<BodyTemplate>),
    Object(Vec<(String, BodyTemplate)>),
    Value(Value),
}

/// One request, compiled: what the delivery renders per change.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: reqwest::Method,
    pub url: Template,
    pub headers: Vec<(reqwest::header::HeaderName, Template)>,
    pub body: BodyTemplate,
    pub id: Option<String>,
    pub error: Option<String>,
    pub ok: Option<Vec<u16>>,
    pub expect: Option<Expect>,
}

impl Request {
    /// Every placeholder of the request (url, headers, body).
    pub fn fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.url.fields().collect();
        for (_, h) in &self.headers {
            out.extend(h.fields());
        }
        self.body.fields(&mut out);
        out
    }

    /// Whether a status is success.
    pub fn ok_status(&self, status: u16) -> bool {
        match &self.ok {
            Some(ok) => ok.contains(&status),
            None => (200..300).contains(&status),
        }
    }
}

impl BodyTemplate {
    fn compile(at: &str, value: &Value, problems: &mut Vec<String>) -> BodyTemplate {
        match value {
            Value::String(s) => match Template::parse(s) {
                Ok(t) => BodyTemplate::Text(t),
                Err(why) => {
                    problems.push(format!("{at}: {why}"));
                    BodyTemplate::Value(Value::Null)
                }
            },
            Value::Array(a) => BodyTemplate::Array(
                a.iter()
                    .enumerate()
                    .map(|(i, v)| BodyTemplate::compile(&format!("{at}[{i}]"), v, problems))
                    .collect(),
            ),
            Value::Object(o) => BodyTemplate::Object(
                o.iter()
                    .map(|(k, v)| {
                        let at = format!("{at}.{k}");
                        (k.clone(), BodyTemplate::compile(&at, v, problems))
                    })
                    .collect(),
            ),
            other => BodyTemplate::Value(other.clone()),
        }
    }

    fn fields<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            BodyTemplate::Text(t) => out.extend(t.fields()),
            BodyTemplate::Array(a) => a.iter().for_each(|b| b.fields(out)),
            BodyTemplate::Object(o) => o.iter().for_each(|(_, b)| b.fields(out)),
            BodyTemplate::Value(_) => {}
        }
    }
}

/// The requests of one type: the entry, and its `update` and `delete` (already merged).
#[derive(Debug, Clone)]
pub struct TypeRequests {
    pub create: Request,
    pub update: Option<Request>,
    pub delete: Option<Request>,
}

/// The placeholders a request may use besides `data.<path>`.
const VARIABLES: &[&str] = &[
    "url",
    "id",
    "type",
    "ref",
    "op",
    "source",
    "seq",
    "target_ref",
    "data",
];

impl RequestConfig {
    /// The entry's requests compiled; every problem a sentence starting with `at`.
    pub fn compile(&self, at: &str) -> Result<TypeRequests, Vec<String>> {
        let mut problems = Vec::new();
        for (key, sub) in [("update", &self.update), ("delete", &self.delete)] {
            if sub
                .as_ref()
                .is_some_and(|s| s.update.is_some() || s.delete.is_some())
            {
                problems.push(format!("{at}.{key}: update and delete belong to the entry"));
            }
        }
        let create = self.request(at, &mut problems);
        let update = self.update.as_ref().map(|u| {
            self.inherited_by(u)
                .request(&format!("{at}.update"), &mut problems)
        });
        let delete = self.delete.as_ref().map(|d| {
            self.inherited_by(d)
                .request(&format!("{at}.delete"), &mut problems)
        });
        match create {
            Some(create) if problems.is_empty() => Ok(TypeRequests {
                create,
                update: update.flatten(),
                delete: delete.flatten(),
            }),
            _ => Err(problems),
        }
    }

    /// `sub` with every key it doesn't set taken from this entry.
    fn inherited_by(&self, sub: &RequestConfig) -> RequestConfig {
        let sub = sub.clone();
        RequestConfig {
            method: sub.method.or_else(|| self.method.clone()),
            url: sub.url.or_else(|| self.url.clone()),
            headers: sub.headers.or_else(|| self.headers.clone()),
            body: sub.body.or_else(|| self.body.clone()),
            id: sub.id.or_else(|| self.id.clone()),
            error: sub.error.or_else(|| self.error.clone()),
            ok: sub.ok.or_else(|| self.ok.clone()),
            expect: sub.expect.or_else(|| self.expect.clone()),
            update: None,
            delete: None,
        }
    }

    /// This request compiled; `None` when it has problems (pushed).
    fn request(&self, at: &str, problems: &mut Vec<String>) -> Option<Request> {
        let before = problems.len();
        let method = self.method.as_deref().unwrap_or("POST");
        let method = reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|_| problems.push(format!("{at}: method {method:?} is not an HTTP method")))
            .ok();
        let url = match &self.url {
            None => {
                problems.push(format!("{at}: url is missing (e.g. \"{{url}}/items\")"));
                None
            }
            Some(u) => Template::parse(u)
                .map_err(|why| problems.push(format!("{at}: url: {why}")))
                .ok(),
        };
        let headers = self.headers(at, problems);
        let body = BodyTemplate::compile(
            &format!("{at}: body"),
            self.body
                .as_ref()
                .unwrap_or(&Value::String("{data}".into())),
            problems,
        );
        if self.ok.as_ref().is_some_and(|ok| ok.is_empty()) {
            problems.push(format!("{at}: ok lists no status"));
        }
        let mut fields = Vec::new();
        body.fields(&mut fields);
        fields.extend(url.iter().flat_map(Template::fields));
        fields.extend(headers.iter().flat_map(|(_, h)| h.fields()));
        for field in fields {
            if !VARIABLES.contains(&field) && !field.starts_with("data.") {
                problems.push(format!(
                    "{at}: {{{field}}} is not a placeholder of a request (url, id, type, ref, op, source, seq, target_ref, data, data.<path>)"
                ));
            }
        }
        let request = Request {
            method: method?,
            url: url?,
            headers,
            body,
            id: self.id.clone(),
            error: self.error.clone(),
            ok: self.ok.clone(),
            expect: self.expect.clone(),
        };
        (problems.len() == before).then_some(request)
    }

    fn headers(
        &self,
        at: &str,
        problems: &mut Vec<String>,
    ) -> Vec<(reqwest::header::HeaderName, Template)> {
        let mut out = Vec::new();
        for (name, value) in self.headers.iter().flatten() {
            let header = reqwest::header::HeaderName::from_bytes(name.as_bytes());
            match (header, Template::parse(value)) {
                (Ok(h), Ok(t)) => out.push((h, t)),
                (Err(_), _) => {
                    problems.push(format!("{at}: headers: {name:?} is not a header name"))
                }
                (_, Err(why)) => problems.push(format!("{at}: headers.{name}: {why}")),
            }
        }
        out
    }
}

/// Compiles every entry of `requests`; the problems start with `at`.
pub fn compile_requests(
    at: &str,
    requests: &BTreeMap<String, RequestConfig>,
) -> Result<BTreeMap<String, TypeRequests>, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    if requests.is_empty() {
        problems.push(format!(
            "{at}: mode \"http\" needs [node.deliver.requests.\"<type>\"] (or \"*\") entries"
        ));
    }
    for (kind, entry) in requests {
        match entry.compile(&format!("{at} requests.{kind:?}")) {
            Ok(r) => {
                out.insert(kind.clone(), r);
            }
            Err(p) => problems.extend(p),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_written() {
        let two = Rate::parse("2/s").unwrap();
        assert_eq!((two.max, two.window.as_secs()), (2, 1));
        assert_eq!(Rate::parse(" 100 / m").unwrap().window.as_secs(), 60);
        assert_eq!(Rate::parse("5/h").unwrap().window.as_secs(), 3600);
        for bad in ["2", "x/s", "2/d", "0/s", "-1/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn update_and_delete_inherit_and_problems_are_named() {
        let text = r#"
            url = "{url}/add"
            body = { fields = "{data}" }
            id = "result"
            error = "error"
            [update]
            url = "{url}/update"
            [delete]
            method = "DELETE"
            url = "{url}/items/{target_ref}"
            body = { id = "{target_ref}", n = 1 }
        "#;
        let entry: RequestConfig = toml::from_str(text).unwrap();
        let r = entry.compile("x").unwrap();
        let update = r.update.unwrap();
        assert_eq!(update.error.as_deref(), Some("error"));
        assert_eq!(update.method, reqwest::Method::POST);
        assert!(update.fields().contains(&"data"));
        let delete = r.delete.unwrap();
        assert_eq!(delete.method, reqwest::Method::DELETE);
        assert_eq!(delete.fields(), ["url", "target_ref", "target_ref"]);
        assert!(r.create.ok_status(201) && !r.create.ok_status(302));

        let bad: RequestConfig =
            toml::from_str("method = \"NO PE\"\nbody = \"{nope}\"\nheaders = { \"a b\" = \"x\" }")
                .unwrap();
        let problems = bad.compile("e").unwrap_err().join("\n");
        for word in ["method", "url is missing", "a b", "{nope}"] {
            assert!(problems.contains(word), "{word}: {problems}");
        }
    }
}
