//! `[node.webhook]`: the node is a service (a CRM, a shop, a payment service) that sends its
//! own webhooks, turned into changes by paths (docs/integrations.md "Webhook ingress").

use super::Duration;
use crate::template::Template;
use crate::transform::{Condition, Filter};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct WebhookConfig {
    pub auth: WebhookAuth,
    /// What changes a body makes, one entry per kind of element.
    #[serde(default)]
    pub changes: Vec<WebhookChange>,
}

/// How a webhook proves it comes from the service.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WebhookAuth {
    /// A header equals the secret.
    Header { header: String, secret: String },
    /// `header` is `sha256=<hex HMAC-SHA256(secret, signed)>`.
    Hmac {
        secret: String,
        #[serde(default = "default_signature_header")]
        header: String,
        /// When set, the signed text is `<timestamp>.<body>` and the timestamp must be
        /// within `window` of now.
        timestamp_header: Option<String>,
        #[serde(default = "default_window")]
        window: Duration,
    },
    /// A field of the decoded body equals the secret (Bitrix24's `auth[application_token]`).
    Field { path: String, secret: String },
    /// A query parameter of the webhook's URL equals the secret, for services that can't
    /// sign (amoCRM's standard webhooks: the URL given to them carries `?<param>=<secret>`).
    Query { param: String, secret: String },
}

/// One `[[node.webhook.changes]]` entry.
#[derive(Debug, Clone, Deserialize)]
pub struct WebhookChange {
    /// The elements (a dot path from the body's root; empty: the root).
    #[serde(default)]
    pub each: String,
    /// Conditions on the body's root for the entry to apply.
    #[serde(default)]
    pub filter: Vec<Condition>,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(rename = "ref")]
    pub reference: String,
    pub id: Option<String>,
    #[serde(default = "default_op")]
    pub op: String,
    /// The data: a dot path in the element (empty: the element).
    #[serde(default)]
    pub data: String,
}

fn default_signature_header() -> String {
    "X-Signature".into()
}
fn default_window() -> Duration {
    Duration::from_secs(300)
}
fn default_op() -> String {
    "upsert".into()
}

/// A webhook entry checked and ready: its templates parsed, its filter compiled.
#[derive(Debug)]
pub struct WebhookEntry {
    pub each: String,
    pub filter: Filter,
    pub kind: Template,
    pub reference: Template,
    pub id: Option<Template>,
    pub op: Template,
    pub data: String,
}

impl WebhookChange {
    /// The entry compiled; every problem a sentence starting with `at`.
    pub fn compile(&self, at: &str) -> Result<WebhookEntry, Vec<String>> {
        let mut problems = Vec::new();
        let mut template = |key: &str, text: &str| match Template::parse(text) {
            Ok(t) => Some(t),
            Err(why) => {
                problems.push(format!("{at}: {key}: {why}"));
                None
            }
        };
        let kind = template("type", &self.kind);
        let reference = template("ref", &self.reference);
        let op = template("op", &self.op);
        let id = self.id.as_ref().map(|id| template("id", id));
        let filter = Filter::compile(&format!("{at}: filter"), &self.filter)
            .map_err(|p| problems.extend(p))
            .ok();
        if let Some(op) = op.as_ref().filter(|op| op.fields().next().is_none()) {
            let text = op
                .render(|_| None, crate::template::plain)
                .unwrap_or_default();
            if text != "upsert" && text != "delete" {
                problems.push(format!(
                    "{at}: op: {text:?} is neither \"upsert\" nor \"delete\""
                ));
            }
        }
        match (kind, reference, op, id, filter) {
            (Some(kind), Some(reference), Some(op), id, Some(filter)) if problems.is_empty() => {
                Ok(WebhookEntry {
                    each: self.each.clone(),
                    filter,
                    kind,
                    reference,
                    id: id.flatten(),
                    op,
                    data: self.data.clone(),
                })
            }
            _ => Err(problems),
        }
    }
}

impl WebhookConfig {
    /// The problems of the section (`at` names it).
    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let secret = match &self.auth {
            WebhookAuth::Header { header, secret } => {
                header_problem(at, header, &mut problems);
                secret
            }
            WebhookAuth::Hmac {
                secret,
                header,
                timestamp_header,
                window,
            } => {
                header_problem(at, header, &mut problems);
                if let Some(h) = timestamp_header {
                    header_problem(at, h, &mut problems);
                }
                if window.0.is_zero() {
                    problems.push(format!("{at}: auth.window must be greater than 0"));
                }
                secret
            }
            WebhookAuth::Field { path, secret } => {
                if path.is_empty() {
                    problems.push(format!("{at}: auth.path must not be empty"));
                }
                secret
            }
            WebhookAuth::Query { param, secret } => {
                if param.is_empty() {
                    problems.push(format!("{at}: auth.param must not be empty"));
                }
                secret
            }
        };
        if secret.len() < 8 {
            problems.push(format!("{at}: auth.secret must be at least 8 characters"));
        }
        if self.changes.is_empty() {
            problems.push(format!(
                "{at}: no [[node.webhook.changes]] entry: a body would make no change"
            ));
        }
        for (i, entry) in self.changes.iter().enumerate() {
            if let Err(p) = entry.compile(&format!("{at} changes[{i}]")) {
                problems.extend(p);
            }
        }
        problems
    }
}

fn header_problem(at: &str, name: &str, problems: &mut Vec<String>) {
    if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        problems.push(format!("{at}: auth: {name:?} is not a header name"));
    }
}
