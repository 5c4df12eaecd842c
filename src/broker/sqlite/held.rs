//! A target's embedded messages copied out and put back ([`Held`]): `export` reads its
//! `queue`, `retry` and `dlq` rows, `import` inserts them (waiting changes at the end of the
//! queue, dead ones into the DLQ), each in one call.

use super::dlq::{insert_dead, DeadRow};
use super::{unavailable, EmbeddedBroker};
use crate::broker::{body_ids, BrokerError, Held, HeldIn};
use rusqlite::params;

impl EmbeddedBroker {
    /// The target's queue rows, then its retry rows (by due time), then its DLQ rows.
    pub(super) async fn export_rows(&self, target: &str) -> Result<Vec<Held>, BrokerError> {
        let t = target.to_string();
        self.db
            .call(move |c| {
                let mut held = c
                    .prepare_cached(
                        "SELECT attempt, first_failed, alone, body FROM queue
                         WHERE target = ?1 ORDER BY id",
                    )?
                    .query_map([&t], |r| {
                        Ok(Held {
                            queue: HeldIn::Deliver,
                            attempt: r.get(0)?,
                            first_failed_ms: r.get(1)?,
                            alone: r.get(2)?,
                            error: None,
                            body: r.get(3)?,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                let retry = c
                    .prepare_cached(
                        "SELECT attempt, first_failed, alone, error, body FROM retry
                         WHERE target = ?1 ORDER BY due, id",
                    )?
                    .query_map([&t], |r| {
                        Ok(Held {
                            queue: HeldIn::Retry,
                            attempt: r.get(0)?,
                            first_failed_ms: r.get(1)?,
                            alone: r.get(2)?,
                            error: Some(r.get(3)?),
                            body: r.get(4)?,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                held.extend(retry);
                let dead = c
                    .prepare_cached(
                        "SELECT source, type, ref, dead_at, attempts, first_failed, error, body
                         FROM dlq WHERE target = ?1 ORDER BY id",
                    )?
                    .query_map([&t], |r| {
                        Ok(Held {
                            queue: HeldIn::Dlq {
                                source: r.get(0)?,
                                kind: r.get(1)?,
                                reference: r.get(2)?,
                                dead_at_ms: r.get(3)?,
                            },
                            attempt: r.get(4)?,
                            first_failed_ms: r.get(5)?,
                            alone: false,
                            error: Some(r.get(6)?),
                            body: r.get(7)?,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                held.extend(dead);
                Ok(held)
            })
            .await
            .map_err(unavailable)
    }

    /// Adds the messages in one call: all of the target's messages are imported, or none.
    pub(super) async fn import_rows(
        &self,
        target: &str,
        held: Vec<Held>,
    ) -> Result<(), BrokerError> {
        let t = target.to_string();
        // One call: all of the target's messages are imported, or none.
        self.db
            .call(move |c| {
                for h in held {
                    match h.queue {
                        HeldIn::Deliver | HeldIn::Retry => {
                            c.prepare_cached(
                                "INSERT INTO queue (target, attempt, first_failed, alone, body)
                                 VALUES (?1, ?2, ?3, ?4, ?5)",
                            )?
                            .execute(params![
                                t,
                                h.attempt,
                                h.first_failed_ms,
                                h.alone,
                                h.body
                            ])?;
                        }
                        HeldIn::Dlq {
                            source,
                            kind,
                            reference,
                            dead_at_ms,
                        } => {
                            let (id, seq) = body_ids(&h.body);
                            let dead = DeadRow {
                                id,
                                seq,
                                kind,
                                reference,
                                source,
                                attempts: h.attempt,
                                error: h.error.unwrap_or_default(),
                                first_failed: h.first_failed_ms.unwrap_or(dead_at_ms),
                                dead_at: dead_at_ms,
                            };
                            insert_dead(c, &t, &dead, &h.body)?;
                        }
                    }
                }
                Ok(())
            })
            .await
            .map_err(unavailable)?;
        self.wake(target);
        Ok(())
    }
}
