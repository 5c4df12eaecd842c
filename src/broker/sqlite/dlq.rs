//! The embedded DLQ: its rows ([`DeadRow`], written by `fail` and `import`), their listing
//! for the admin API, taking them (purge, replay) and the DLQ and retry step depths.

use super::{unavailable, EmbeddedBroker};
use crate::broker::{BrokerError, DeadItem};
use rusqlite::{params, Connection};
use std::collections::HashSet;

/// A `dlq` row's facts (the body aside).
pub(super) struct DeadRow {
    pub(super) id: String,
    pub(super) seq: i64,
    pub(super) kind: String,
    pub(super) reference: String,
    pub(super) source: String,
    pub(super) attempts: u32,
    pub(super) error: String,
    pub(super) first_failed: i64,
    pub(super) dead_at: i64,
}

/// Inserts a dead change's row.
pub(super) fn insert_dead(
    c: &Connection,
    target: &str,
    d: &DeadRow,
    body: &[u8],
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO dlq (target, change_id, seq, type, ref, source, attempts,
             error, first_failed, dead_at, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        target,
        d.id,
        d.seq,
        d.kind,
        d.reference,
        d.source,
        d.attempts,
        d.error,
        d.first_failed,
        d.dead_at,
        body
    ])
    .map(|_| ())
}

/// A DLQ row as the admin API lists it.
fn dead_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadItem> {
    Ok(DeadItem {
        id: r.get("change_id")?,
        kind: r.get("type")?,
        reference: r.get("ref")?,
        source: r.get("source")?,
        attempts: r.get("attempts")?,
        error: r.get("error")?,
        dead_at: crate::clock::rfc3339_ms(r.get("dead_at")?),
        seq: r.get("seq")?,
    })
}

impl EmbeddedBroker {
    /// The DLQ's count and its first `limit` items, in order.
    pub(super) async fn list_dead(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<(u32, Vec<DeadItem>), BrokerError> {
        let t = target.to_string();
        self.db
            .call(move |c| {
                let count: u32 = c
                    .prepare_cached("SELECT count(*) FROM dlq WHERE target = ?1")?
                    .query_row([&t], |r| r.get(0))?;
                let items = c
                    .prepare_cached("SELECT * FROM dlq WHERE target = ?1 ORDER BY id LIMIT ?2")?
                    .query_map(params![t, limit as i64], dead_from_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((count, items))
            })
            .await
            .map_err(unavailable)
    }

    /// Deletes the DLQ rows with the given ids (all when `None`), each first put back at the end of the queue at attempt 1 with `replay`, in one call.
    pub(super) async fn take_dead_rows(
        &self,
        target: &str,
        ids: Option<&HashSet<String>>,
        replay: bool,
    ) -> Result<Vec<DeadItem>, BrokerError> {
        let t = target.to_string();
        let ids = ids.cloned();
        let taken = self
            .db
            .call(move |c| {
                let rows = c
                    .prepare_cached("SELECT * FROM dlq WHERE target = ?1 ORDER BY id")?
                    .query_map([&t], |r| {
                        Ok((r.get::<_, i64>("id")?, dead_from_row(r)?, r.get::<_, Vec<u8>>("body")?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                let mut taken = Vec::new();
                for (row, item, body) in rows {
                    if ids.as_ref().is_some_and(|ids| !ids.contains(&item.id)) {
                        continue;
                    }
                    if replay {
                        // A fresh start: attempt 1, no failure facts.
                        c.prepare_cached(
                            "INSERT INTO queue (target, attempt, alone, body) VALUES (?1, 1, 0, ?2)",
                        )?
                        .execute(params![t, body])?;
                    }
                    c.prepare_cached("DELETE FROM dlq WHERE id = ?1")?
                        .execute([row])?;
                    taken.push(item);
                }
                Ok(taken)
            })
            .await
            .map_err(unavailable)?;
        if replay && !taken.is_empty() {
            self.wake(target);
        }
        Ok(taken)
    }

    /// Rows in the target's DLQ and in its retry steps.
    pub(super) async fn depths(&self, target: &str) -> Result<(u32, u32), BrokerError> {
        let t = target.to_string();
        self.db
            .call(move |c| {
                let dlq: u32 = c
                    .prepare_cached("SELECT count(*) FROM dlq WHERE target = ?1")?
                    .query_row([&t], |r| r.get(0))?;
                let retry: u32 = c
                    .prepare_cached("SELECT count(*) FROM retry WHERE target = ?1")?
                    .query_row([&t], |r| r.get(0))?;
                Ok((dlq, retry))
            })
            .await
            .map_err(unavailable)
    }
}
