//! The modes that ask a running lxbridge through its admin API (docs/api.md): `status`,
//! `dlq list|replay|purge` and `resync`. Each builds a [`Request`] (method, encoded path,
//! body), then [`call`] sends it to `server.listen` of the config with `admin.token` and
//! prints the JSON answer.

use super::{runtime, ConfigArg};
use crate::config::Config;
use clap::Subcommand;
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum DlqAction {
    /// Print the DLQ's count and items; needs a running lxbridge.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send dead changes (all, or those given with --id) back for delivery at attempt 1;
    /// needs a running lxbridge.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        target: String,
        #[arg(long = "id")]
        ids: Vec<String>,
    },
    /// Delete dead changes (all, or those given with --id); needs a running lxbridge.
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        target: String,
        #[arg(long = "id")]
        ids: Vec<String>,
    },
}

// `lxbridge resync` (its help is the `Command::Resync` doc).
#[derive(clap::Args)]
pub struct ResyncArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The group's name.
    #[arg(long)]
    pub group: String,
    /// The member to feed again.
    #[arg(long)]
    pub node: String,
    /// The member that sends its snapshot [default: the first other member].
    #[arg(long)]
    pub from: Option<String>,
}

// `lxbridge status` (its help is the `Command::Status` doc).
#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The object's ref.
    pub reference: String,
}

/// `lxbridge status REF`.
pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    call(&args.config, Request::status(&args.reference))
}

/// `lxbridge dlq …`.
pub fn dlq(action: &DlqAction) -> anyhow::Result<()> {
    let config = match action {
        DlqAction::List { config, .. }
        | DlqAction::Replay { config, .. }
        | DlqAction::Purge { config, .. } => config,
    };
    call(config, Request::dlq(action))
}

/// `lxbridge resync`.
pub fn resync(args: &ResyncArgs) -> anyhow::Result<()> {
    call(
        &args.config,
        Request::resync(&args.group, &args.node, args.from.as_deref()),
    )
}

/// One admin API call.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: reqwest::Method,
    /// Path and query, each segment encoded.
    pub path: String,
    /// Sent as `application/json`.
    pub body: Option<Value>,
}

impl Request {
    /// `GET /api/v1/objects/{ref}`.
    pub fn status(reference: &str) -> Request {
        Request {
            method: reqwest::Method::GET,
            path: format!("/api/v1/objects/{}", encode_segment(reference)),
            body: None,
        }
    }

    /// `GET /api/v1/dlq/{target}?limit=N`, `POST …/replay`, `DELETE …`.
    pub fn dlq(action: &DlqAction) -> Request {
        let (method, target, suffix, body) = match action {
            DlqAction::List { target, limit, .. } => (
                reqwest::Method::GET,
                target,
                format!("?limit={limit}"),
                None,
            ),
            DlqAction::Replay { target, ids, .. } => (
                reqwest::Method::POST,
                target,
                "/replay".to_string(),
                Some(selection(ids)),
            ),
            DlqAction::Purge { target, ids, .. } => (
                reqwest::Method::DELETE,
                target,
                String::new(),
                Some(selection(ids)),
            ),
        };
        Request {
            method,
            path: format!("/api/v1/dlq/{}{suffix}", encode_segment(target)),
            body,
        }
    }

    /// `POST /api/v1/groups/{group}/resync`.
    pub fn resync(group: &str, node: &str, from: Option<&str>) -> Request {
        let body = match from {
            Some(from) => json!({"node": node, "from": from}),
            None => json!({"node": node}),
        };
        Request {
            method: reqwest::Method::POST,
            path: format!("/api/v1/groups/{}/resync", encode_segment(group)),
            body: Some(body),
        }
    }
}

/// The DLQ items chosen: all (`{}`), or those of `ids`.
fn selection(ids: &[String]) -> Value {
    if ids.is_empty() {
        json!({})
    } else {
        json!({ "ids": ids })
    }
}

/// Loads the config, sends `request` and prints the answer.
pub fn call(args: &ConfigArg, request: Request) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let out = runtime()?.block_on(send(&config, request))?;
    println!("{out}");
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the config has no [admin] token, so the admin API can't be called")]
    NoToken,
    #[error(
        "cannot reach lxbridge at {url}: {error} (is `lxbridge run` running with this config?)"
    )]
    Unreachable { url: String, error: String },
    #[error("lxbridge answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
}

/// Where the lxbridge of `config` answers (a wildcard listen address is asked on loopback).
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
pub async fn send(config: &Config, request: Request) -> Result<String, CallError> {
    let token = config.admin.token.as_deref().ok_or(CallError::NoToken)?;
    let url = format!("{}{}", base_url(config), request.path);
    let mut builder = reqwest::Client::new()
        .request(request.method, &url)
        .bearer_auth(token);
    if let Some(body) = request.body {
        builder = builder
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
    }
    let response = builder.send().await.map_err(|e| CallError::Unreachable {
        url: url.clone(),
        error: e.to_string(),
    })?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(CallError::Status {
            status: status.as_u16(),
            body: text,
        });
    }
    Ok(match serde_json::from_str::<Value>(&text) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or(text),
        Err(_) => text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn request(line: &[&str]) -> Request {
        let cli = Cli::try_parse_from(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        match cli.command {
            Command::Status(args) => Request::status(&args.reference),
            Command::Dlq { action } => Request::dlq(&action),
            Command::Resync(args) => Request::resync(&args.group, &args.node, args.from.as_deref()),
            _ => panic!("{line:?} is not an admin call"),
        }
    }

    #[test]
    fn each_admin_mode_asks_its_endpoint() {
        let get = reqwest::Method::GET;
        let post = reqwest::Method::POST;
        let delete = reqwest::Method::DELETE;
        let cases = [
            (
                &["lxbridge", "status", "Номенклатура=5f;a/b"][..],
                (&get, "/api/v1/objects/%D0%9D%D0%BE%D0%BC%D0%B5%D0%BD%D0%BA%D0%BB%D0%B0%D1%82%D1%83%D1%80%D0%B0%3D5f%3Ba%2Fb", None),
            ),
            (
                &["lxbridge", "dlq", "list", "--target", "shop"][..],
                (&get, "/api/v1/dlq/shop?limit=100", None),
            ),
            (
                &["lxbridge", "dlq", "replay", "--target", "shop", "--id", "a", "--id", "b"][..],
                (&post, "/api/v1/dlq/shop/replay", Some(json!({"ids": ["a", "b"]}))),
            ),
            (
                &["lxbridge", "dlq", "purge", "--target", "my shop"][..],
                (&delete, "/api/v1/dlq/my%20shop", Some(json!({}))),
            ),
            (
                &["lxbridge", "resync", "--group", "g", "--node", "b"][..],
                (&post, "/api/v1/groups/g/resync", Some(json!({"node": "b"}))),
            ),
            (
                &["lxbridge", "resync", "--group", "g", "--node", "b", "--from", "a"][..],
                (&post, "/api/v1/groups/g/resync", Some(json!({"node": "b", "from": "a"}))),
            ),
        ];
        for (line, (method, path, body)) in cases {
            let got = request(line);
            assert_eq!(
                (&got.method, got.path.as_str(), got.body),
                (method, path, body),
                "{line:?}"
            );
        }
    }
}
