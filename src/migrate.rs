//! `lxbridge export` and `lxbridge import`: carrying the changes one backend holds (waiting
//! for delivery, waiting out a retry step, dead) to another, through a file of JSON lines.
//!
//! One line per message, for every target (node with `[node.deliver]`):
//!
//! ```json
//! {"target":"shop","queue":"retry","attempt":2,"first_failed_ms":1718000000000,"alone":false,
//!  "error":"warehouse busy","body":{"id":"…","seq":7,…}}
//! {"target":"shop","queue":"dlq","attempt":1,"first_failed_ms":1718000000000,"alone":false,
//!  "error":"INN is invalid","source":"central","type":"Catalog.X","ref":"…",
//!  "dead_at_ms":1718000000000,"body":{…}}
//! ```
//!
//! `body` is the message body (the lxbridge envelope) as a JSON value, byte for byte. A body
//! that can't be embedded so (not JSON, or JSON with line breaks or outer whitespace: only
//! an unreadable message in a DLQ can be that) is written as `body_base64` instead.
//!
//! Export copies: nothing is taken from the backend or changed in it. lxbridge must be
//! stopped: the embedded database's lock enforces it; on RabbitMQ a consumer on a delivery
//! queue makes export refuse (a running lxbridge holds prefetched changes unacked, which
//! export can't see). Import validates every line first and imports nothing unless all are
//! valid; then, per target, deliver and retry lines go to the end of the delivery queue (a
//! retry is due at once) keeping attempt, first failure and `alone`, and dlq lines go to the
//! DLQ with their facts (on the embedded backend each target's lines in one transaction).
//! What the store holds (statuses, history, idempotency keys, delivery marks, the remap
//! table, inbox numbers) is not carried.

use crate::broker::{Broker, Held, HeldIn, RabbitBroker};
use crate::config::{Backend, Config};
use crate::embedded::{db_path, Db, EmbeddedBroker};
use crate::route::Routes;
use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long to wait for RabbitMQ to be connected and its topology declared.
const READY_WAIT: Duration = Duration::from_secs(30);

/// Invalid lines reported at most (then how many more there are).
const MAX_PROBLEMS: usize = 20;

/// `lxbridge export`: writes every message the config's backend holds to `out` (stdout when
/// `None`) and a summary per target to stderr.
pub async fn export(config: &Config, out: Option<&Path>) -> anyhow::Result<()> {
    check(config)?;
    if config.backend == Backend::Embedded {
        let path = db_path(&config.data_dir());
        if !path.exists() {
            bail!(
                "there is no embedded database at {} (check embedded.data_dir)",
                path.display()
            );
        }
    }
    if targets(config).is_empty() {
        bail!("this config has no targets (nodes with [node.deliver]): nothing to export");
    }
    let opened = Opened::open(config).await?;
    let mut text = String::new();
    let mut summary = Vec::new();
    for target in targets(config) {
        let held = match opened.broker().export(&target).await {
            Ok(held) => held,
            Err(e) => {
                opened.close().await;
                return Err(anyhow!("exporting {target}: {e}"));
            }
        };
        let mut counts = Counts::default();
        for h in &held {
            counts.add(&h.queue);
            text.push_str(&to_line(&target, h));
            text.push('\n');
        }
        summary.push((target, counts));
    }
    opened.close().await;
    match out {
        Some(path) => std::fs::write(path, &text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .context("cannot write to stdout")?;
        }
    }
    for (target, counts) in summary {
        eprintln!("{target}: exported {}", counts.describe());
    }
    Ok(())
}

/// `lxbridge import`: reads lines from `input` (stdin when `None`), checks them all, then
/// puts them into the config's backend and writes a summary per target to stderr.
pub async fn import(config: &Config, input: Option<&Path>) -> anyhow::Result<()> {
    check(config)?;
    let text = match input {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read stdin")?;
            text
        }
    };
    let lines = parse(config, &text).map_err(|problems| {
        anyhow!(
            "nothing imported: the input has problems:\n  {}",
            problems.join("\n  ")
        )
    })?;
    // Per target, in the order of the input.
    let mut order = Vec::new();
    let mut per_target: HashMap<String, Vec<Held>> = HashMap::new();
    for (target, held) in lines {
        if !per_target.contains_key(&target) {
            order.push(target.clone());
        }
        per_target.entry(target).or_default().push(held);
    }
    if order.is_empty() {
        eprintln!("imported nothing: the input has no lines");
        return Ok(());
    }
    let opened = Opened::open(config).await?;
    let mut done: Vec<(String, Counts)> = Vec::new();
    for target in order {
        let held = per_target.remove(&target).unwrap_or_default();
        let mut counts = Counts::default();
        for h in &held {
            counts.add(&h.queue);
        }
        if let Err(e) = opened.broker().import(&target, held).await {
            opened.close().await;
            for (target, counts) in &done {
                eprintln!("{target}: imported {}", counts.describe());
            }
            let before = if done.is_empty() {
                String::new()
            } else {
                let names: Vec<&str> = done.iter().map(|(t, _)| t.as_str()).collect();
                format!(
                    " (the targets before it were imported: {})",
                    names.join(", ")
                )
            };
            if config.backend == Backend::Embedded {
                bail!("importing {target} failed, none of its lines were imported: {e}{before}");
            }
            bail!(
                "importing {target} failed part way: {e}{before}. Some of its lines may be in \
                 RabbitMQ already: export before importing again, or duplicates follow"
            );
        }
        done.push((target, counts));
    }
    opened.close().await;
    for (target, counts) in done {
        eprintln!("{target}: imported {}", counts.describe());
    }
    Ok(())
}

/// The targets of a config: the nodes with `[node.deliver]`, in config order.
pub fn targets(config: &Config) -> Vec<String> {
    config
        .nodes
        .iter()
        .filter(|n| n.deliver.is_some())
        .map(|n| n.name.clone())
        .collect()
}

fn check(config: &Config) -> anyhow::Result<()> {
    let problems = config.validate();
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("the config has problems:\n  {}", problems.join("\n  "))
    }
}

/// Messages per queue kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub deliver: usize,
    pub retry: usize,
    pub dlq: usize,
}

impl Counts {
    fn add(&mut self, queue: &HeldIn) {
        match queue {
            HeldIn::Deliver => self.deliver += 1,
            HeldIn::Retry => self.retry += 1,
            HeldIn::Dlq { .. } => self.dlq += 1,
        }
    }

    /// `N changes: D deliver, R retry, Q dlq`.
    pub fn describe(&self) -> String {
        format!(
            "{} changes: {} deliver, {} retry, {} dlq",
            self.deliver + self.retry + self.dlq,
            self.deliver,
            self.retry,
            self.dlq
        )
    }
}

/// The backend of a config, opened for export or import.
enum Opened {
    Rabbit {
        broker: Arc<RabbitBroker>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    },
    Embedded {
        broker: Arc<EmbeddedBroker>,
        db: Arc<Db>,
    },
}

impl Opened {
    async fn open(config: &Config) -> anyhow::Result<Opened> {
        match config.backend {
            Backend::Embedded => {
                // Fails at once while an lxbridge runs on this data_dir (exclusive lock).
                let db = Db::open(&config.data_dir())?;
                let broker = EmbeddedBroker::offline(db.clone(), config);
                Ok(Opened::Embedded { broker, db })
            }
            Backend::Rabbit => {
                let cancel = CancellationToken::new();
                let tracker = TaskTracker::new();
                // Nothing scrapes these: the broker wants somewhere to count.
                let metrics = crate::metrics::Metrics::new();
                let broker = RabbitBroker::start(
                    config,
                    &Routes::from_config(config),
                    cancel.clone(),
                    &tracker,
                    &metrics,
                )?;
                tracker.close();
                let opened = Opened::Rabbit {
                    broker,
                    cancel,
                    tracker,
                };
                let started = tokio::time::Instant::now();
                while !opened.broker().ready() {
                    if started.elapsed() > READY_WAIT {
                        opened.close().await;
                        bail!(
                            "RabbitMQ (broker.url) was not reachable, or its topology could \
                             not be declared, within {} s",
                            READY_WAIT.as_secs()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(opened)
            }
        }
    }

    fn broker(&self) -> &dyn Broker {
        match self {
            Opened::Rabbit { broker, .. } => broker.as_ref(),
            Opened::Embedded { broker, .. } => broker.as_ref(),
        }
    }

    /// Closes the connections (RabbitMQ) or the database (embedded, releasing its lock).
    async fn close(&self) {
        match self {
            Opened::Rabbit {
                cancel, tracker, ..
            } => {
                cancel.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
            }
            Opened::Embedded { db, .. } => db.close().await,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum QueueKind {
    Deliver,
    Retry,
    Dlq,
}

/// One line of the file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    target: String,
    queue: QueueKind,
    attempt: u32,
    #[serde(default)]
    first_failed_ms: Option<i64>,
    #[serde(default)]
    alone: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead_at_ms: Option<i64>,
    /// Present (even as `null`) or absent: a raw value keeps `null` apart from missing.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    body: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// The body as a JSON value when that keeps it byte for byte on one line.
fn embeddable(body: &[u8]) -> Option<Box<RawValue>> {
    let text = std::str::from_utf8(body).ok()?;
    if text.contains(['\n', '\r']) {
        return None;
    }
    let raw = RawValue::from_string(text.to_string()).ok()?;
    (raw.get().len() == text.len()).then_some(raw)
}

/// One held message as a line of the file (without the line break).
pub fn to_line(target: &str, held: &Held) -> String {
    let (queue, source, kind, reference, dead_at_ms) = match &held.queue {
        HeldIn::Deliver => (QueueKind::Deliver, None, None, None, None),
        HeldIn::Retry => (QueueKind::Retry, None, None, None, None),
        HeldIn::Dlq {
            source,
            kind,
            reference,
            dead_at_ms,
        } => (
            QueueKind::Dlq,
            Some(source.clone()),
            Some(kind.clone()),
            Some(reference.clone()),
            Some(*dead_at_ms),
        ),
    };
    let body = embeddable(&held.body);
    let body_base64 = body
        .is_none()
        .then(|| base64::engine::general_purpose::STANDARD.encode(&held.body));
    let line = Line {
        target: target.to_string(),
        queue,
        attempt: held.attempt,
        first_failed_ms: held.first_failed_ms,
        alone: held.alone,
        error: held.error.clone(),
        source,
        kind,
        reference,
        dead_at_ms,
        body,
        body_base64,
    };
    serde_json::to_string(&line).expect("an export line serialises")
}

/// Every line of `text` (blank lines skipped) as (target, message), or every problem found,
/// each naming its line number.
pub fn parse(config: &Config, text: &str) -> Result<Vec<(String, Held)>, Vec<String>> {
    let known = targets(config);
    let mut held = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line, &known) {
            Ok(h) => held.push(h),
            Err(problem) => problems.push(format!("line {}: {problem}", i + 1)),
        }
    }
    if problems.is_empty() {
        return Ok(held);
    }
    if problems.len() > MAX_PROBLEMS {
        let more = problems.len() - MAX_PROBLEMS;
        problems.truncate(MAX_PROBLEMS);
        problems.push(format!("… and {more} more lines with problems"));
    }
    Err(problems)
}

fn parse_line(text: &str, known: &[String]) -> Result<(String, Held), String> {
    let line: Line = serde_json::from_str(text).map_err(|e| {
        let message = e.to_string();
        let message = match message.rfind(" at line ") {
            Some(at) => message[..at].to_string(),
            None => message,
        };
        format!("not an export line ({message}, at column {})", e.column())
    })?;
    if !known.contains(&line.target) {
        return Err(if known.is_empty() {
            format!(
                "unknown target {:?}: this config has no node with [node.deliver]",
                line.target
            )
        } else {
            format!(
                "unknown target {:?} (this config's targets: {})",
                line.target,
                known.join(", ")
            )
        });
    }
    let body = match (line.body, line.body_base64) {
        (Some(raw), None) => raw.get().as_bytes().to_vec(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| format!("body_base64 is not base64: {e}"))?,
        (Some(_), Some(_)) => return Err("has both body and body_base64: give one".into()),
        (None, None) => return Err("has no body".into()),
    };
    let dead_facts = [
        ("source", line.source.is_some()),
        ("type", line.kind.is_some()),
        ("ref", line.reference.is_some()),
        ("dead_at_ms", line.dead_at_ms.is_some()),
    ];
    let queue = match line.queue {
        QueueKind::Deliver | QueueKind::Retry => {
            if let Some((field, _)) = dead_facts.iter().find(|(_, given)| *given) {
                return Err(format!(
                    "{field} belongs to dlq lines only (this one is for the {} queue)",
                    if line.queue == QueueKind::Deliver {
                        "deliver"
                    } else {
                        "retry"
                    }
                ));
            }
            if line.attempt == 0 {
                return Err("attempt must be 1 or more".into());
            }
            if line.queue == QueueKind::Deliver {
                HeldIn::Deliver
            } else {
                HeldIn::Retry
            }
        }
        QueueKind::Dlq => {
            let missing: Vec<&str> = dead_facts
                .iter()
                .filter(|(_, given)| !given)
                .map(|(field, _)| *field)
                .collect();
            if !missing.is_empty() {
                return Err(format!("a dlq line needs {}", missing.join(", ")));
            }
            HeldIn::Dlq {
                source: line.source.unwrap_or_default(),
                kind: line.kind.unwrap_or_default(),
                reference: line.reference.unwrap_or_default(),
                dead_at_ms: line.dead_at_ms.unwrap_or_default(),
            }
        }
    };
    Ok((
        line.target,
        Held {
            queue,
            attempt: line.attempt,
            first_failed_ms: line.first_failed_ms,
            alone: line.alone,
            error: line.error,
            body,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"
[admin]
token = "admin-secret"
[[node]]
name = "central"
token = "c"
[[node]]
name = "shop"
token = "s"
deliver = { mode = "push", url = "http://127.0.0.1:1/receive" }
[[route]]
from = "central"
to = ["shop"]
"#,
            "test",
        )
        .unwrap()
    }

    fn held(queue: HeldIn, body: &[u8]) -> Held {
        Held {
            queue,
            attempt: 2,
            first_failed_ms: Some(1_700_000_000_000),
            alone: true,
            error: Some("busy \"now\"\nreally".into()),
            body: body.to_vec(),
        }
    }

    #[test]
    fn every_kind_of_line_comes_back_byte_for_byte() {
        let dead = HeldIn::Dlq {
            source: "central".into(),
            kind: "Catalog.X".into(),
            reference: "x-1".into(),
            dead_at_ms: 1_700_000_000_500,
        };
        let all = vec![
            held(
                HeldIn::Deliver,
                br#"{"id":"a","seq":1,"data":{"k":[1, 2.50]}}"#,
            ),
            held(HeldIn::Retry, br#"{"id":"b","seq":2}"#),
            held(dead.clone(), br#"{"id":"c","seq":3}"#),
            // Unreadable bodies only a DLQ holds: not JSON, JSON on two lines, padded.
            held(dead.clone(), b"\xff\x00 not json"),
            held(dead.clone(), b"{\"a\":\n1}"),
            held(dead, b" {} "),
            held(HeldIn::Deliver, b"null"),
        ];
        let text: String = all.iter().map(|h| to_line("shop", h) + "\n").collect();
        assert_eq!(text.lines().count(), all.len(), "{text}");
        assert!(text
            .lines()
            .next()
            .unwrap()
            .contains(r#""body":{"id":"a","seq":1,"data":{"k":[1, 2.50]}}"#));
        assert!(text.lines().nth(3).unwrap().contains("body_base64"));
        let back = parse(&config(), &text).unwrap();
        let back: Vec<Held> = back
            .into_iter()
            .map(|(t, h)| {
                assert_eq!(t, "shop");
                h
            })
            .collect();
        assert_eq!(back, all);
    }

    #[test]
    fn a_dlq_line_has_the_named_fields() {
        let line = to_line(
            "shop",
            &held(
                HeldIn::Dlq {
                    source: "central".into(),
                    kind: "Catalog.X".into(),
                    reference: "x-1".into(),
                    dead_at_ms: 5,
                },
                br#"{"id":"c"}"#,
            ),
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"target": "shop", "queue": "dlq", "attempt": 2,
                "first_failed_ms": 1_700_000_000_000_i64, "alone": true,
                "error": "busy \"now\"\nreally", "source": "central", "type": "Catalog.X",
                "ref": "x-1", "dead_at_ms": 5, "body": {"id": "c"}})
        );
        let plain = to_line(
            "shop",
            &Held {
                error: None,
                first_failed_ms: None,
                ..held(HeldIn::Deliver, b"{}")
            },
        );
        assert_eq!(
            plain,
            r#"{"target":"shop","queue":"deliver","attempt":2,"first_failed_ms":null,"alone":true,"error":null,"body":{}}"#
        );
    }

    #[test]
    fn problems_name_their_line_and_all_are_reported() {
        let good = r#"{"target":"shop","queue":"deliver","attempt":1,"body":{}}"#;
        let text = [
            good,
            "{not json",
            "",
            r#"{"target":"office","queue":"deliver","attempt":1,"body":{}}"#,
            r#"{"target":"shop","queue":"dlq","attempt":1,"body":{}}"#,
            r#"{"target":"shop","queue":"retry","attempt":0,"body":{}}"#,
            r#"{"target":"shop","queue":"deliver","attempt":1,"ref":"x","body":{}}"#,
            r#"{"target":"shop","queue":"deliver","attempt":1}"#,
            r#"{"target":"shop","queue":"later","attempt":1,"body":{}}"#,
            r#"{"target":"shop","queue":"deliver","attempt":1,"body":{},"extra":1}"#,
            good,
        ]
        .join("\n");
        let problems = parse(&config(), &text).unwrap_err();
        let lines: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            lines,
            ["line 2", "line 4", "line 5", "line 6", "line 7", "line 8", "line 9", "line 10"],
            "{problems:#?}"
        );
        assert!(problems[1].contains("unknown target \"office\" (this config's targets: shop)"));
        assert!(
            problems[2].contains("needs source, type, ref, dead_at_ms"),
            "{}",
            problems[2]
        );
        assert!(
            problems[4].contains("ref belongs to dlq lines only"),
            "{}",
            problems[4]
        );
        assert!(problems[5].contains("has no body"));
    }
}
