//! Settling a batch by the target's answer: delivered changes get their marks, status and
//! learned target refs before their acks; failed ones (and those failed on the way) move to
//! their retry step or the DLQ, recorded once the broker confirmed the move.

use super::{record, Batch, Core, FailedChange, Item};
use crate::broker::Failure;
use crate::clock::unix_ms_now;
use crate::model::StoredChange;
use crate::store::{Mark, Record, State};
use serde::Deserialize;
use std::collections::HashMap;
use tracing::warn;

/// The target's optional per-change results.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    /// Ids the target reported in error → (error, retry).
    errors: HashMap<String, (String, bool)>,
    /// Ids delivered with the target's own ref for the object (for remapping).
    target_refs: HashMap<String, String>,
}

impl Answer {
    /// Records change `id` as refused by the target with `error` (retried or not).
    pub(crate) fn refuse(&mut self, id: &str, error: String, retry: bool) {
        self.errors.insert(id.to_string(), (error, retry));
    }

    /// Records change `id` as delivered with the target's own ref for the object.
    pub(crate) fn learned(&mut self, id: &str, target_ref: String) {
        self.target_refs.insert(id.to_string(), target_ref);
    }
}

/// Reads a target's answer body (docs/api.md "Delivering to a push node": optional `results`);
/// anything else counts as "all delivered".
pub(crate) fn parse_answer(body: &[u8]) -> Answer {
    #[derive(Deserialize)]
    struct Wire {
        #[serde(default)]
        results: Vec<ChangeResult>,
    }
    #[derive(Deserialize)]
    struct ChangeResult {
        id: String,
        #[serde(default)]
        status: String,
        #[serde(default)]
        error: Option<String>,
        #[serde(default = "yes")]
        retry: bool,
        #[serde(default)]
        target_ref: Option<String>,
    }
    fn yes() -> bool {
        true
    }
    let Ok(wire) = serde_json::from_slice::<Wire>(body) else {
        return Answer::default();
    };
    let mut answer = Answer::default();
    for r in wire.results {
        if r.status == "error" {
            let error = r
                .error
                .unwrap_or_else(|| "target reported an error without a message".into());
            answer.errors.insert(r.id, (error, r.retry));
        } else if let Some(target_ref) = r.target_ref.filter(|t| !t.is_empty()) {
            answer.target_refs.insert(r.id, target_ref);
        }
    }
    answer
}

/// A target ref learned from an answer: (type, our ref or key pair, the target's ref).
type Learned = (String, String, String);

impl Core {
    /// Settles a batch by the target's answer (`Err`: the whole batch failed with that
    /// error), with what was failed or recorded on the way.
    pub(crate) async fn settle(&self, batch: Batch, answer: Result<Answer, String>) {
        let now_ms = unix_ms_now();
        let Batch {
            items,
            mut failed,
            mut records,
        } = batch;
        let (delivered, learned) = self.sort_out(items, &answer, &mut failed);
        self.learn(&learned).await;
        // Marks go with the delivered status and are written before the acks, so a
        // redelivery of what the target already has is recognised.
        records.extend(
            delivered
                .iter()
                .map(|item| self.delivered_record(&item.change, item.message.attempt)),
        );
        self.write_records(records).await;
        if self.group.is_some() {
            let answered: Vec<(&StoredChange, bool)> = delivered
                .iter()
                .map(|i| (&i.change, true))
                .chain(failed.iter().map(|f| (&f.change, false)))
                .collect();
            self.group_answered(&answered).await;
        }
        let acks = delivered.into_iter().map(|item| {
            self.metrics.ok.inc();
            let waited_ms = (now_ms - item.change.accepted_ms).max(0);
            self.metrics.end_to_end.observe(waited_ms as f64 / 1000.0);
            self.settle_ack(item.message)
        });
        futures_util::future::join_all(acks).await;
        let records = self.move_failed(failed, now_ms).await;
        self.write_records(records).await;
    }

    /// Splits the sent items into delivered ones (with the target refs the answer taught)
    /// and failed ones (appended to `failed`).
    fn sort_out(
        &self,
        items: Vec<Item>,
        answer: &Result<Answer, String>,
        failed: &mut Vec<FailedChange>,
    ) -> (Vec<Item>, Vec<Learned>) {
        let mut delivered = Vec::with_capacity(items.len());
        let mut learned = Vec::new();
        for item in items {
            let outcome = match answer {
                Ok(a) => a
                    .errors
                    .get(item.change.id.as_str())
                    .map(|(e, retry)| (e.clone(), !retry)),
                Err(error) => Some((error.clone(), false)),
            };
            if let Some((error, dead)) = outcome {
                failed.push(FailedChange {
                    message: item.message,
                    change: item.change,
                    error,
                    dead,
                    alone: answer.is_err(),
                    event: "failed",
                });
                continue;
            }
            let taught = answer
                .as_ref()
                .ok()
                .and_then(|a| a.target_refs.get(&item.change.id));
            if let Some(target_ref) = taught {
                let change = &item.change;
                learned.push((
                    change.kind.clone(),
                    change.reference.clone(),
                    target_ref.clone(),
                ));
                if let Some(key) = self.key_pair(change) {
                    learned.push((change.kind.clone(), key, target_ref.clone()));
                }
            }
            delivered.push(item);
        }
        (delivered, learned)
    }

    /// Stores the target refs an answer taught (when this target remaps).
    async fn learn(&self, learned: &[Learned]) {
        if !self.shaping.remap || learned.is_empty() {
            return;
        }
        let triples: Vec<(&str, &str, &str)> = learned
            .iter()
            .map(|(k, s, t)| (k.as_str(), s.as_str(), t.as_str()))
            .collect();
        if let Err(e) = self.store.remap_put(&self.name, &triples).await {
            warn!(target = %self.name, error = %e, "could not store target refs from the answer");
        }
    }

    /// The `delivered` record of a change, with its raised mark (also remembered here).
    fn delivered_record(&self, change: &StoredChange, attempt: u32) -> Record {
        let detail = format!("attempt {attempt}");
        let mut r = record(
            change,
            &self.name,
            State::Delivered,
            attempt,
            None,
            "delivered",
            &detail,
        );
        r.mark = Some(Mark {
            target: self.name.clone(),
            source: change.source.clone(),
            kind: change.kind.clone(),
            seq: change.seq,
        });
        self.seen
            .raise(&change.source, &change.kind, &change.reference, change.seq);
        r
    }

    /// Moves failed changes to their retry step or the DLQ, side by side so their confirms
    /// are waited for together; the records of what happened to each.
    async fn move_failed(&self, failed: Vec<FailedChange>, now_ms: i64) -> Vec<Record> {
        let (messages, failed): (Vec<_>, Vec<_>) =
            failed.into_iter().map(FailedChange::split).unzip();
        let moves = messages.into_iter().zip(&failed).map(|(message, f)| {
            let failure = Failure {
                target: &self.name,
                error: &f.error,
                dead: f.dead,
                alone: f.alone,
                source: &f.change.source,
                kind: &f.change.kind,
                reference: &f.change.reference,
                now_ms,
            };
            self.broker.fail(message, failure)
        });
        let results = futures_util::future::join_all(moves).await;
        let mut records = Vec::with_capacity(failed.len());
        for (f, result) in failed.iter().zip(results) {
            let (change, error, attempt) = (&f.change, Some(f.error.as_str()), f.attempt);
            records.push(record(
                change,
                &self.name,
                State::Retrying,
                attempt,
                error,
                f.event,
                &f.error,
            ));
            match result {
                Ok(true) => {
                    self.metrics.dead.inc();
                    records.push(record(
                        change,
                        &self.name,
                        State::Dead,
                        attempt,
                        error,
                        "dead",
                        &f.error,
                    ));
                }
                Ok(false) => self.metrics.retry.inc(),
                Err(e) => {
                    warn!(target = %self.name, error = %e, change_id = %change.id, "could not move a failed change to retry; it will be redelivered")
                }
            }
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_change_results() {
        let body = br#"{"results": [{"id": "a", "status": "ok", "target_ref": "t-1"}, {"id": "b", "status": "error", "error": "bad", "retry": false}, {"id": "c", "status": "error", "error": "later"}]}"#;
        let r = parse_answer(body);
        assert_eq!(r.errors.len(), 2);
        assert_eq!(r.errors["b"], ("bad".to_string(), false));
        assert_eq!(r.errors["c"], ("later".to_string(), true));
        assert_eq!(r.target_refs["a"], "t-1");
        assert!(parse_answer(b"").errors.is_empty());
        assert!(parse_answer(b"OK").errors.is_empty());
    }
}
