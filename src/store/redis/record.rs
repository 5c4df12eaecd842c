//! The record script's call ([`scripts::RECORD_LUA`](super::scripts::RECORD_LUA)): per
//! object its three keys and its arguments (event, revive, mark, then each status with the
//! value the `o:{<ref>}` hash holds), up to `RECORDS_PER_CALL` objects a call; and the
//! reading of those values back.
//!
//! The values are tab-separated text, not JSON, so the script reads a status's seq, rank,
//! state and source with one `string.match` instead of a cJSON decode, and Redis keeps fewer
//! bytes per object (issue 18: 1,331 → see docs/benchmarks.md). The free text goes last, so
//! it may hold tabs:
//! - a status, in the field `<target>\t<type>`:
//!   `<seq>\t<rank>\t<state>\t<source>\t<attempts>\t<updated_at>\t<last_error>`;
//! - a history event: `<at>\t<target>\t<event>\t<detail>`.
//!
//! Values written as JSON by earlier versions (they start with `{`) are still read, by the
//! script and here.

use super::RedisStore;
use crate::store::{HistoryEvent, MarkKey, Record, State, StatusUpdate, TargetStatus};

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
        Some(e) => format!("{}\t{}\t{}\t{}", e.at, e.target, e.event, e.detail),
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
            .arg(status_value(s, now));
    }
}

/// The value of a status, written now.
fn status_value(s: &StatusUpdate, now: &str) -> String {
    format!(
        "{}\t{}\t{}\t{}\t{}\t{now}\t{}",
        s.seq,
        s.state.rank(),
        s.state.name(),
        s.source,
        s.attempts,
        s.last_error.as_deref().unwrap_or("")
    )
}

/// A status read back from its hash field and value; `None` when it is neither form.
pub(super) fn read_status(field: &str, value: &str) -> Option<TargetStatus> {
    if value.starts_with('{') {
        return serde_json::from_str(value).ok();
    }
    let (target, kind) = field.split_once('\t')?;
    let mut parts = value.splitn(7, '\t');
    let mut next = || parts.next();
    let seq = next()?.parse().ok()?;
    let _rank = next()?;
    let state = State::from_name(next()?)?;
    let source = next()?.to_string();
    let attempts = next()?.parse().ok()?;
    let updated_at = next()?.to_string();
    let last_error = next()?;
    Some(TargetStatus {
        kind: kind.to_string(),
        target: target.to_string(),
        source,
        state,
        attempts,
        last_error: (!last_error.is_empty()).then(|| last_error.to_string()),
        updated_at,
        seq,
    })
}

/// A history event read back; `None` when it is neither form.
pub(super) fn read_event(value: &str) -> Option<HistoryEvent> {
    if value.starts_with('{') {
        return serde_json::from_str(value).ok();
    }
    let mut parts = value.splitn(4, '\t');
    let mut next = || parts.next().map(str::to_string);
    Some(HistoryEvent {
        at: next()?,
        target: next()?,
        event: next()?,
        detail: next()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_in_both_forms() {
        let update = StatusUpdate {
            kind: "Catalog.X".into(),
            target: "shop".into(),
            source: "central".into(),
            seq: -7,
            state: State::Dead,
            attempts: 3,
            last_error: Some("HTTP 500:\tbody".into()),
            revive: false,
        };
        let value = status_value(&update, "2026-12-03T19:00:00.000Z");
        let status = read_status("shop\tCatalog.X", &value).unwrap();
        assert_eq!(
            (
                status.seq,
                status.state,
                status.attempts,
                status.source.as_str()
            ),
            (-7, State::Dead, 3, "central")
        );
        assert_eq!(status.last_error.as_deref(), Some("HTTP 500:\tbody"));
        assert_eq!(
            (status.kind.as_str(), status.target.as_str()),
            ("Catalog.X", "shop")
        );
        let legacy = r#"{"type":"Catalog.X","target":"shop","source":"central","state":"queued","attempts":0,"last_error":null,"updated_at":"t","seq":5,"rank":0}"#;
        assert_eq!(read_status("shop\tCatalog.X", legacy).unwrap().seq, 5);
        let event = read_event("t0\tshop\tfailed\ta\tb").unwrap();
        assert_eq!(
            (event.event.as_str(), event.detail.as_str()),
            ("failed", "a\tb")
        );
        let legacy = r#"{"at":"t0","target":"shop","event":"accepted","detail":""}"#;
        assert_eq!(read_event(legacy).unwrap().event, "accepted");
        assert!(read_status("shop\tX", "garbage").is_none());
    }
}
