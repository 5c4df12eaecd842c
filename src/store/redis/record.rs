//! The record script's call ([`scripts::RECORD_LUA`](super::scripts::RECORD_LUA)): per
//! object its three keys and its arguments (event, revive, mark, then each status with
//! the JSON the `o:{<ref>}` hash holds), up to `RECORDS_PER_CALL` objects a call.

use super::RedisStore;
use crate::store::{MarkKey, Record, State, StatusUpdate};
use serde::Serialize;

/// A status as the `o:{<ref>}` hash holds it.
#[derive(Serialize)]
struct StatusJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    target: &'a str,
    source: &'a str,
    state: State,
    attempts: u32,
    last_error: Option<&'a str>,
    updated_at: &'a str,
    seq: i64,
    rank: u8,
}

impl RedisStore {
    /// One call of the record script for up to [`RECORDS_PER_CALL`](super::RECORDS_PER_CALL)
    /// objects (KEYS and ARGV as [`RECORD_LUA`](super::scripts::RECORD_LUA) reads them).
    pub(super) fn record_call(&self, chunk: &[Record], now: &str) -> redis::ScriptInvocation<'_> {
        let mut call = self.record_script.prepare_invoke();
        call.arg(self.history_max)
            .arg(self.retention.as_secs().max(1));
        for r in chunk {
            self.record_keys(&mut call, r);
            record_args(&mut call, r, now);
        }
        call
    }

    /// An object's three keys: its status hash, its history list, its delivery mark (a
    /// dummy, never written, when the record raises none).
    fn record_keys(&self, call: &mut redis::ScriptInvocation<'_>, r: &Record) {
        let p = &self.prefix;
        call.key(format!("{p}:o:{{{}}}", r.reference))
            .key(format!("{p}:h:{{{}}}", r.reference));
        match &r.mark {
            Some(m) => call.key(self.mark_key(
                &m.target,
                MarkKey {
                    source: &m.source,
                    kind: &m.kind,
                    reference: &r.reference,
                },
            )),
            None => call.key(format!("{p}:m:-:{{{}}}", r.reference)),
        };
    }
}

/// An object's arguments: its event, whether it revives, its mark's seq, then its statuses.
fn record_args(call: &mut redis::ScriptInvocation<'_>, r: &Record, now: &str) {
    let event = match &r.event {
        Some(e) => serde_json::to_string(e).expect("event serialises"),
        None => String::new(),
    };
    let revive = if r.statuses.iter().any(|s| s.revive) {
        "1"
    } else {
        "0"
    };
    let mark_seq = r
        .mark
        .as_ref()
        .map(|m| m.seq.to_string())
        .unwrap_or_default();
    call.arg(event)
        .arg(revive)
        .arg(mark_seq)
        .arg(r.statuses.len());
    for s in &r.statuses {
        call.arg(format!("{}\t{}", s.target, s.kind))
            .arg(s.seq)
            .arg(s.state.rank())
            .arg(&s.source)
            .arg(status_json(s, now));
    }
}

/// The JSON of a status, written now.
fn status_json(s: &StatusUpdate, now: &str) -> String {
    serde_json::to_string(&StatusJson {
        kind: &s.kind,
        target: &s.target,
        source: &s.source,
        state: s.state,
        attempts: s.attempts,
        last_error: s.last_error.as_deref(),
        updated_at: now,
        seq: s.seq,
        rank: s.state.rank(),
    })
    .expect("status serialises")
}
