//! [`EmbeddedStore`]: the [`Store`] on the embedded database ([`crate::embedded::Db`]): the
//! same facts, rules and expiry as [`RedisStore`](super::RedisStore) (whose Lua script this
//! mirrors), in tables instead of keys. Expired rows are ignored when read and deleted by
//! [`EmbeddedStore::expire`]; `remap`, `counters` and `content_hashes` don't expire.

use super::{
    Admission, HistoryEvent, IdState, Mark, MarkKey, ObjectView, Record, State, StatusUpdate,
    Store, StoreError, TargetStatus, PENDING_ID_TTL_SECS,
};
use crate::clock::{rfc3339_now, unix_ms_now};
use crate::embedded::{Db, DbError};
use futures_util::future::BoxFuture;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

pub struct EmbeddedStore {
    db: Arc<Db>,
    dedupe_window: Duration,
    retention: Duration,
    history_max: usize,
    /// REST targets' rates: one process, so in memory.
    rates: super::rate::LocalRates,
}

/// A status as kept in `objects.statuses`, with the rank of its state.
#[derive(Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    status: TargetStatus,
    rank: u8,
}

fn unavailable(e: DbError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

impl EmbeddedStore {
    pub fn new(
        db: Arc<Db>,
        dedupe_window: Duration,
        retention: Duration,
        history_max: usize,
    ) -> EmbeddedStore {
        EmbeddedStore {
            db,
            dedupe_window,
            retention,
            history_max,
            rates: super::rate::LocalRates::default(),
        }
    }

    /// Deletes expired idempotency keys, objects and marks; returns how many rows went.
    pub async fn expire(&self) -> Result<usize, StoreError> {
        self.db
            .call(|c| {
                let now = unix_ms_now();
                let mut n = 0;
                for table in ["ids", "objects", "marks", "groups"] {
                    n += c
                        .prepare_cached(&format!("DELETE FROM {table} WHERE expires <= ?1"))?
                        .execute([now])?;
                }
                Ok(n)
            })
            .await
            .map_err(unavailable)
    }
}

/// Adds `by` to a counter and returns its new value.
fn bump(c: &Connection, name: &str, by: i64) -> rusqlite::Result<i64> {
    c.prepare_cached(
        "INSERT INTO counters (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = value + excluded.value
         RETURNING value",
    )?
    .query_row(params![name, by], |r| r.get(0))
}

fn bad_json(what: &str, reference: &str, e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(
        format!("{what} of {reference:?} is not valid: {e}").into(),
    )
}

/// An object's statuses (by `<target>\t<type>`) and history.
type Object = (BTreeMap<String, Stored>, VecDeque<HistoryEvent>);

/// An object as stored (none when absent or expired).
fn load_object(c: &Connection, reference: &str, now: i64) -> rusqlite::Result<Option<Object>> {
    let row: Option<(String, String)> = c
        .prepare_cached("SELECT statuses, history FROM objects WHERE ref = ?1 AND expires > ?2")?
        .query_row(params![reference, now], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((statuses, history)) = row else {
        return Ok(None);
    };
    let statuses = serde_json::from_str(&statuses).map_err(|e| bad_json("status", reference, e))?;
    let history = serde_json::from_str(&history).map_err(|e| bad_json("history", reference, e))?;
    Ok(Some((statuses, history)))
}

/// Raises a delivery mark to `m.seq` (an expired mark counts as none).
fn raise_mark(
    c: &Connection,
    reference: &str,
    m: &Mark,
    expires: i64,
    now: i64,
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO marks (target, source, ref, type, seq, expires)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (target, source, ref, type) DO UPDATE
         SET seq = excluded.seq, expires = excluded.expires
         WHERE marks.seq < excluded.seq OR marks.expires <= ?7",
    )?
    .execute(params![
        m.target, m.source, reference, m.kind, m.seq, expires, now
    ])
    .map(|_| ())
}

/// Writes each status unless it is older than the one held (the record script's rules: a
/// status from the same source with a lower seq, or the same seq and a lower rank, gives
/// way; `revive` replaces a `dead` one whatever its seq).
fn apply_statuses(statuses: &mut BTreeMap<String, Stored>, updates: &[StatusUpdate], at: &str) {
    let revive = updates.iter().any(|s| s.revive);
    for s in updates {
        let field = format!("{}\t{}", s.target, s.kind);
        let rank = s.state.rank();
        let write = match statuses.get(&field) {
            Some(cur) if revive && cur.status.state == State::Dead => true,
            Some(cur) => {
                !(cur.status.source == s.source
                    && (cur.status.seq > s.seq || (cur.status.seq == s.seq && cur.rank > rank)))
            }
            None => true,
        };
        if write {
            let status = TargetStatus {
                kind: s.kind.clone(),
                target: s.target.clone(),
                source: s.source.clone(),
                state: s.state,
                attempts: s.attempts,
                last_error: s.last_error.clone(),
                updated_at: at.to_string(),
                seq: s.seq,
            };
            statuses.insert(field, Stored { status, rank });
        }
    }
}

/// Stores an object's statuses and history, to expire at `expires`.
fn save_object(
    c: &Connection,
    reference: &str,
    (statuses, history): &Object,
    expires: i64,
) -> rusqlite::Result<()> {
    let statuses = serde_json::to_string(statuses).map_err(|e| bad_json("status", reference, e))?;
    let history = serde_json::to_string(history).map_err(|e| bad_json("history", reference, e))?;
    c.prepare_cached(
        "INSERT OR REPLACE INTO objects (ref, statuses, history, expires)
         VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![reference, statuses, history, expires])
    .map(|_| ())
}

impl Store for EmbeddedStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.db
                .call(|c| c.query_row("SELECT 1", [], |_| Ok(())))
                .await
                .map_err(unavailable)
        })
    }

    /// The database doesn't forget what it committed: never a loss.
    fn check_loss(&self) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move { self.ping().await.map(|()| false) })
    }

    fn admit<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
        seqs_needed: usize,
    ) -> BoxFuture<'a, Result<Admission, StoreError>> {
        let node = node.to_string();
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        Box::pin(async move {
            self.db
                .call(move |c| {
                    let now = unix_ms_now();
                    let mut states = Vec::with_capacity(ids.len());
                    for id in &ids {
                        let known: Option<bool> = c
                            .prepare_cached(
                                "SELECT accepted FROM ids WHERE node = ?1 AND id = ?2 AND expires > ?3",
                            )?
                            .query_row(params![node, id, now], |r| r.get(0))
                            .optional()?;
                        states.push(match known {
                            Some(true) => IdState::Duplicate,
                            Some(false) => IdState::InFlight,
                            None => {
                                c.prepare_cached(
                                    "INSERT OR REPLACE INTO ids (node, id, accepted, expires)
                                     VALUES (?1, ?2, 0, ?3)",
                                )?
                                .execute(params![
                                    node,
                                    id,
                                    now + PENDING_ID_TTL_SECS as i64 * 1000
                                ])?;
                                IdState::Fresh
                            }
                        });
                    }
                    let last = bump(c, &format!("seq:{node}"), seqs_needed as i64)?;
                    Ok(Admission {
                        ids: states,
                        first_seq: last - seqs_needed as i64 + 1,
                    })
                })
                .await
                .map_err(unavailable)
        })
    }

    fn commit_ids<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let node = node.to_string();
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let window = ms(self.dedupe_window).max(1000);
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(());
            }
            self.db
                .call(move |c| {
                    let expires = unix_ms_now() + window;
                    let mut put = c.prepare_cached(
                        "INSERT OR REPLACE INTO ids (node, id, accepted, expires) VALUES (?1, ?2, 1, ?3)",
                    )?;
                    for id in &ids {
                        put.execute(params![node, id, expires])?;
                    }
                    Ok(())
                })
                .await
                .map_err(unavailable)
        })
    }

    fn renew_ids<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let node = node.to_string();
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(());
            }
            self.db
                .call(move |c| {
                    let expires = unix_ms_now() + PENDING_ID_TTL_SECS as i64 * 1000;
                    let mut renew = c.prepare_cached(
                        "UPDATE ids SET expires = ?3 WHERE node = ?1 AND id = ?2 AND accepted = 0",
                    )?;
                    for id in &ids {
                        renew.execute(params![node, id, expires])?;
                    }
                    Ok(())
                })
                .await
                .map_err(unavailable)
        })
    }

    fn release_ids<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let node = node.to_string();
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(());
            }
            self.db
                .call(move |c| {
                    let mut del =
                        c.prepare_cached("DELETE FROM ids WHERE node = ?1 AND id = ?2")?;
                    for id in &ids {
                        del.execute(params![node, id])?;
                    }
                    Ok(())
                })
                .await
                .map_err(unavailable)
        })
    }

    fn record(&self, records: Vec<Record>) -> BoxFuture<'_, Result<(), StoreError>> {
        let ttl = ms(self.retention).max(1000);
        let history_max = self.history_max;
        Box::pin(async move {
            if records.is_empty() {
                return Ok(());
            }
            self.db
                .call(move |c| {
                    let now = unix_ms_now();
                    let at = rfc3339_now();
                    let expires = now + ttl;
                    for r in &records {
                        if let Some(m) = &r.mark {
                            raise_mark(c, &r.reference, m, expires, now)?;
                        }
                        if r.statuses.is_empty() && r.event.is_none() {
                            continue;
                        }
                        let (mut statuses, mut history) =
                            load_object(c, &r.reference, now)?.unwrap_or_default();
                        apply_statuses(&mut statuses, &r.statuses, &at);
                        if let Some(e) = &r.event {
                            history.push_back(e.clone());
                            while history.len() > history_max {
                                history.pop_front();
                            }
                        }
                        save_object(c, &r.reference, &(statuses, history), expires)?;
                    }
                    Ok(())
                })
                .await
                .map_err(unavailable)
        })
    }

    fn marks<'a>(
        &'a self,
        target: &'a str,
        keys: &'a [MarkKey<'a>],
    ) -> BoxFuture<'a, Result<Vec<Option<i64>>, StoreError>> {
        let target = target.to_string();
        let keys: Vec<(String, String, String)> = keys
            .iter()
            .map(|k| {
                (
                    k.source.to_string(),
                    k.reference.to_string(),
                    k.kind.to_string(),
                )
            })
            .collect();
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            self.db
                .call(move |c| {
                    let now = unix_ms_now();
                    let mut get = c.prepare_cached(
                        "SELECT seq FROM marks
                         WHERE target = ?1 AND source = ?2 AND ref = ?3 AND type = ?4 AND expires > ?5",
                    )?;
                    keys.iter()
                        .map(|(source, reference, kind)| {
                            get.query_row(params![target, source, reference, kind, now], |r| {
                                r.get(0)
                            })
                            .optional()
                        })
                        .collect()
                })
                .await
                .map_err(unavailable)
        })
    }

    fn object<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<ObjectView>, StoreError>> {
        let reference = reference.to_string();
        Box::pin(async move {
            let found = self
                .db
                .call({
                    let reference = reference.clone();
                    move |c| load_object(c, &reference, unix_ms_now())
                })
                .await
                .map_err(|e| StoreError::Protocol(e.to_string()))?;
            let Some((statuses, history)) = found else {
                return Ok(None);
            };
            if statuses.is_empty() && history.is_empty() {
                return Ok(None);
            }
            let mut view = ObjectView {
                reference,
                targets: statuses.into_values().map(|s| s.status).collect(),
                history: history.into(),
            };
            view.sort();
            Ok(Some(view))
        })
    }

    fn next_message_no<'a>(&'a self, target: &'a str) -> BoxFuture<'a, Result<i64, StoreError>> {
        let name = format!("inbox:{target}");
        Box::pin(async move {
            self.db
                .call(move |c| bump(c, &name, 1))
                .await
                .map_err(unavailable)
        })
    }

    fn remap_get<'a>(
        &'a self,
        target: &'a str,
        pairs: &'a [(&'a str, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, StoreError>> {
        let target = target.to_string();
        let keys: Vec<String> = pairs
            .iter()
            .map(|(kind, source_ref)| format!("{kind}\t{source_ref}"))
            .collect();
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            self.db
                .call(move |c| {
                    let mut get =
                        c.prepare_cached("SELECT value FROM remap WHERE target = ?1 AND key = ?2")?;
                    keys.iter()
                        .map(|k| get.query_row(params![target, k], |r| r.get(0)).optional())
                        .collect()
                })
                .await
                .map_err(unavailable)
        })
    }

    fn remap_put<'a>(
        &'a self,
        target: &'a str,
        triples: &'a [(&'a str, &'a str, &'a str)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let target = target.to_string();
        let rows: Vec<(String, String)> = triples
            .iter()
            .map(|(kind, source_ref, target_ref)| {
                (format!("{kind}\t{source_ref}"), target_ref.to_string())
            })
            .collect();
        Box::pin(async move {
            if rows.is_empty() {
                return Ok(());
            }
            self.db
                .call(move |c| {
                    let mut put = c.prepare_cached(
                        "INSERT OR REPLACE INTO remap (target, key, value) VALUES (?1, ?2, ?3)",
                    )?;
                    for (k, v) in &rows {
                        put.execute(params![target, k, v])?;
                    }
                    Ok(())
                })
                .await
                .map_err(unavailable)
        })
    }

    fn group_load<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, StoreError>> {
        let keys = keys.to_vec();
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            self.db
                .call(move |c| {
                    let now = unix_ms_now();
                    let mut get = c.prepare_cached(
                        "SELECT state FROM groups WHERE key = ?1 AND expires > ?2",
                    )?;
                    keys.iter()
                        .map(|k| get.query_row(params![k, now], |r| r.get(0)).optional())
                        .collect()
                })
                .await
                .map_err(unavailable)
        })
    }

    fn group_cas<'a>(
        &'a self,
        items: &'a [(String, Option<String>, String)],
    ) -> BoxFuture<'a, Result<Vec<bool>, StoreError>> {
        let items = items.to_vec();
        let ttl = ms(self.retention).max(1000);
        Box::pin(async move {
            if items.is_empty() {
                return Ok(Vec::new());
            }
            self.db
                .call(move |c| {
                    let now = unix_ms_now();
                    let mut written = Vec::with_capacity(items.len());
                    for (key, expected, new) in &items {
                        let current: Option<String> = c
                            .prepare_cached(
                                "SELECT state FROM groups WHERE key = ?1 AND expires > ?2",
                            )?
                            .query_row(params![key, now], |r| r.get(0))
                            .optional()?;
                        if current != *expected {
                            written.push(false);
                            continue;
                        }
                        c.prepare_cached(
                            "INSERT OR REPLACE INTO groups (key, state, expires) VALUES (?1, ?2, ?3)",
                        )?
                        .execute(params![key, new, now + ttl])?;
                        written.push(true);
                    }
                    Ok(written)
                })
                .await
                .map_err(unavailable)
        })
    }

    fn content_hashes<'a>(
        &'a self,
        source: &'a str,
        keys: &'a [(&'a str, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, StoreError>> {
        let source = source.to_string();
        let keys: Vec<(String, String)> = keys
            .iter()
            .map(|(kind, reference)| (kind.to_string(), reference.to_string()))
            .collect();
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            self.db
                .call(move |c| {
                    let mut get = c.prepare_cached(
                        "SELECT hash FROM content_hashes WHERE source = ?1 AND kind = ?2 AND ref = ?3",
                    )?;
                    keys.iter()
                        .map(|(kind, reference)| {
                            get.query_row(params![source, kind, reference], |r| r.get(0))
                                .optional()
                        })
                        .collect()
                })
                .await
                .map_err(unavailable)
        })
    }

    fn keep_content_hashes<'a>(
        &'a self,
        source: &'a str,
        entries: &'a [(&'a str, &'a str, &'a str)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let source = source.to_string();
        let rows: Vec<(String, String, String)> = entries
            .iter()
            .map(|(kind, reference, hash)| {
                (kind.to_string(), reference.to_string(), hash.to_string())
            })
            .collect();
        Box::pin(async move {
            if rows.is_empty() {
                return Ok(());
            }
            // One call: all the upserts in one transaction (the database thread's).
            self.db
                .call(move |c| {
                    let mut put = c.prepare_cached(
                        "INSERT INTO content_hashes (source, kind, ref, hash) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (source, kind, ref) DO UPDATE SET hash = excluded.hash",
                    )?;
                    for (kind, reference, hash) in &rows {
                        put.execute(params![source, kind, reference, hash])?;
                    }
                    Ok(())
                })
                .await
                .map_err(unavailable)
        })
    }

    fn forget_content_hashes<'a>(
        &'a self,
        source: &'a str,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let source = source.to_string();
        Box::pin(async move {
            self.db
                .call(move |c| {
                    c.prepare_cached("DELETE FROM content_hashes WHERE source = ?1")?
                        .execute([source])
                        .map(|n| n as u64)
                })
                .await
                .map_err(unavailable)
        })
    }

    fn rate_take<'a>(
        &'a self,
        target: &'a str,
        slot: &'a str,
        ask: super::RateAsk,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        let wait = self
            .rates
            .with(target, |s| s.take(slot, ask, unix_ms_now()));
        Box::pin(async move { Ok(wait) })
    }

    fn rate_done<'a>(
        &'a self,
        target: &'a str,
        slot: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.rates.with(target, |s| s.done(slot, unix_ms_now()));
        Box::pin(async { Ok(()) })
    }

    fn rate_pause<'a>(&'a self, target: &'a str, ms: u64) -> BoxFuture<'a, Result<(), StoreError>> {
        self.rates.with(target, |s| s.pause(ms, unix_ms_now()));
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_store_contract() {
        let dir = std::env::temp_dir().join(format!("lxbridge-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let section = format!(
            "[embedded]\ndata_dir = {:?}\n[store]",
            dir.display().to_string()
        );
        let config = crate::store::contract::config(&section);
        let db = Db::open(&dir).unwrap();
        let store = EmbeddedStore::new(
            db.clone(),
            config.server.dedupe_window.0,
            config.store.retention.0,
            config.store.history_max,
        );
        crate::store::contract::run(&store).await;
        assert_eq!(store.expire().await.unwrap(), 0);
        db.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
