//! Parallel copies (`[[group]]`), the flow: every step of the group feature that reads or
//! writes the store, around the pure decisions of [`crate::group`]. An object's group state
//! is loaded, decided on and written back by compare-and-set ([`update`]):
//!
//! - at ingress, a member's change is admitted, dropped (echo, lost conflict, stale, loop)
//!   or published ([`admit`]);
//! - at delivery to a member, only the object's current version goes ([`outbound`], and
//!   [`still_current`] again for a batch held while the member was down), and what the
//!   member answered for is remembered ([`answered`]);
//! - the admin API asks a member for its snapshot ([`resync`]).

use crate::broker::{BrokerError, Held, HeldIn};
use crate::group::{self, Admit, Candidate, Group, ObjectState, Outbound};
use crate::model::{Change, Envelope, Op, StoredChange};
use crate::store::{HistoryEvent, Record, Store, StoreError};
use crate::AppState;
use serde_json::{json, Value};

/// The type of the change that asks a group member for its snapshot.
pub const RESYNC_TYPE: &str = "lxbridge.Resync";

/// Compare-and-set rounds before giving up on an object whose state keeps changing.
const CAS_ROUNDS: usize = 50;

/// Loads the states of `keys`, lets `decide` change each, and writes them back by
/// compare-and-set, deciding again for any that another request or process changed in
/// between.
pub async fn update<R>(
    store: &dyn Store,
    keys: &[String],
    mut decide: impl FnMut(usize, &mut ObjectState) -> R,
) -> Result<Vec<R>, StoreError> {
    let mut results: Vec<Option<R>> = (0..keys.len()).map(|_| None).collect();
    let mut todo: Vec<usize> = (0..keys.len()).collect();
    for _ in 0..CAS_ROUNDS {
        let todo_keys: Vec<String> = todo.iter().map(|&i| keys[i].clone()).collect();
        let loaded = store.group_load(&todo_keys).await?;
        let mut items = Vec::with_capacity(todo.len());
        let mut decided = Vec::with_capacity(todo.len());
        for (&i, old) in todo.iter().zip(loaded) {
            let mut state = ObjectState::parse(old.as_deref());
            decided.push((i, decide(i, &mut state)));
            items.push((keys[i].clone(), old, state.to_json()));
        }
        let written = store.group_cas(&items).await?;
        let mut again = Vec::new();
        for ((i, r), ok) in decided.into_iter().zip(written) {
            match ok {
                true => results[i] = Some(r),
                false => again.push(i),
            }
        }
        if again.is_empty() {
            return Ok(results
                .into_iter()
                .map(|r| r.expect("every key decided"))
                .collect());
        }
        todo = again;
    }
    Err(StoreError::Protocol(format!(
        "group state kept changing under {CAS_ROUNDS} attempts"
    )))
}

/// A change from `node` about to be published, with the seq it was given.
pub struct Arrival<'a> {
    pub change: &'a Change,
    pub seq: i64,
}

/// The group verdict for each arrival that is a group member's change (by index into
/// `arrivals`); counted in `lx_group_changes_total`.
pub async fn admit(
    app: &AppState,
    node: &str,
    arrivals: &[Arrival<'_>],
    accepted_ms: i64,
) -> Result<Vec<(usize, Admit)>, StoreError> {
    let mut items = Vec::new();
    for (i, a) in arrivals.iter().enumerate() {
        if let Some(g) = app.routes.group(node, &a.change.kind) {
            let candidate = candidate(node, a, accepted_ms);
            items.push((i, g, g.key(&a.change.kind, &a.change.reference), candidate));
        }
    }
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = items.iter().map(|(_, _, k, _)| k.clone()).collect();
    let verdicts = update(app.store.as_ref(), &keys, |j, state| {
        let (_, g, _, candidate) = &items[j];
        group::admit(g, state, candidate)
    })
    .await?;
    for ((_, g, _, _), verdict) in items.iter().zip(&verdicts) {
        app.metrics
            .group_changes
            .with_label_values(&[&g.name, admit_label(verdict)])
            .inc();
    }
    Ok(items.into_iter().map(|(i, ..)| i).zip(verdicts).collect())
}

/// The member's change as the group decides on it; without a parseable `ts` it counts as
/// written when accepted.
fn candidate(node: &str, a: &Arrival<'_>, accepted_ms: i64) -> Candidate {
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    let ts_ms = a
        .change
        .ts
        .as_deref()
        .and_then(|ts| time::OffsetDateTime::parse(ts, rfc3339).ok())
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(accepted_ms);
    Candidate {
        node: node.to_string(),
        seq: a.seq,
        ts_ms,
        hash: group::content_hash(a.change.op == Op::Delete, a.change.data.as_ref()),
        initial: a.change.initial,
    }
}

/// The `result` label of `lx_group_changes_total` for a verdict.
fn admit_label(verdict: &Admit) -> &'static str {
    match verdict {
        Admit::Publish { conflict: None } => "published",
        Admit::Publish { conflict: Some(_) } => "conflict_won",
        Admit::Echo(_) => "echo",
        Admit::Lost(_) => "conflict_lost",
        Admit::Stale(_) => "superseded",
        Admit::Loop(_) => "loop",
    }
}

/// For each change about to go to member `target`: `None` when it is its object's current
/// group version (its content is then remembered as sent, awaiting the echo), else why it
/// is behind. Changes of types outside the group are `None`.
pub async fn outbound(
    store: &dyn Store,
    group: &Group,
    target: &str,
    changes: &[&StoredChange],
    now_ms: i64,
) -> Result<Vec<Option<String>>, StoreError> {
    let taken: Vec<usize> = taken_by(group, changes);
    if taken.is_empty() {
        return Ok(vec![None; changes.len()]);
    }
    let hashes: Vec<String> = taken.iter().map(|&i| hash_of(changes[i])).collect();
    let keys: Vec<String> = taken.iter().map(|&i| key_of(group, changes[i])).collect();
    let verdicts = update(store, &keys, |j, state| {
        let c = changes[taken[j]];
        let o = Outbound {
            target,
            source: &c.source,
            seq: c.seq,
            hash: &hashes[j],
            initial: c.initial,
            at_ms: now_ms,
        };
        group::outbound(state, &o).err()
    })
    .await?;
    Ok(spread(changes.len(), &taken, verdicts))
}

/// For each change of a batch held for member `target`: `None` when it is still its
/// object's current version (or of a type outside the group), else why not.
pub async fn still_current(
    store: &dyn Store,
    group: &Group,
    changes: &[&StoredChange],
) -> Result<Vec<Option<String>>, StoreError> {
    let taken: Vec<usize> = taken_by(group, changes);
    if taken.is_empty() {
        return Ok(vec![None; changes.len()]);
    }
    let keys: Vec<String> = taken.iter().map(|&i| key_of(group, changes[i])).collect();
    let states = store.group_load(&keys).await?;
    let verdicts = taken
        .iter()
        .zip(states)
        .map(|(&i, state)| {
            let state = ObjectState::parse(state.as_deref());
            let c = changes[i];
            group::still_current(&state, &c.source, c.seq, c.initial).err()
        })
        .collect();
    Ok(spread(changes.len(), &taken, verdicts))
}

/// Remembers which changes member `target` answered for and the versions it confirmed
/// (`true`), and when: a change it writes later follows them instead of conflicting.
pub async fn answered(
    store: &dyn Store,
    group: &Group,
    target: &str,
    answered: &[(&StoredChange, bool)],
    now_ms: i64,
) -> Result<(), StoreError> {
    let taken: Vec<&(&StoredChange, bool)> = answered
        .iter()
        .filter(|(c, _)| group.takes(&c.source, &c.kind))
        .collect();
    if taken.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = taken.iter().map(|(c, _)| key_of(group, c)).collect();
    update(store, &keys, |j, state| {
        let (c, ok) = taken[j];
        group::delivered(state, target, &c.source, c.seq, now_ms, *ok)
    })
    .await?;
    Ok(())
}

/// Indexes of the changes whose type and source make them group versions.
fn taken_by(group: &Group, changes: &[&StoredChange]) -> Vec<usize> {
    (0..changes.len())
        .filter(|&i| group.takes(&changes[i].source, &changes[i].kind))
        .collect()
}

fn key_of(group: &Group, c: &StoredChange) -> String {
    group.key(&c.kind, &c.reference)
}

fn hash_of(c: &StoredChange) -> String {
    let data: Option<Value> = c
        .data
        .as_deref()
        .and_then(|raw| serde_json::from_str(raw.get()).ok());
    group::content_hash(c.op == Op::Delete, data.as_ref())
}

/// Verdicts for the `taken` indexes, spread over `len` changes (`None` elsewhere).
fn spread(len: usize, taken: &[usize], verdicts: Vec<Option<String>>) -> Vec<Option<String>> {
    let mut out = vec![None; len];
    for (&i, verdict) in taken.iter().zip(verdicts) {
        out[i] = verdict;
    }
    out
}

/// Asks member `from` for its snapshot of `group` so that `node` is fed again: a change of
/// type [`RESYNC_TYPE`] enqueued to `from`'s delivery, and a `resync` history record.
/// Returns the change's id and ref.
pub async fn resync(
    app: &AppState,
    group: &str,
    node: &str,
    from: &str,
) -> Result<(String, String), BrokerError> {
    let now = crate::clock::unix_ms_now();
    let requested_at = crate::clock::rfc3339_ms(now);
    let id = format!("resync-{group}-{node}-{now}");
    let reference = format!("{group}/{node}");
    let data = json!({"group": group, "node": node, "requested_at": requested_at});
    let envelope = Envelope {
        id: &id,
        kind: RESYNC_TYPE,
        reference: &reference,
        op: Op::Upsert,
        data: Some(&data),
        source: node,
        seq: now,
        ts: Some(&requested_at),
        accepted_ms: now,
        initial: false,
    };
    let held = Held {
        queue: HeldIn::Deliver,
        attempt: 1,
        first_failed_ms: None,
        alone: false,
        error: None,
        body: serde_json::to_vec(&envelope).expect("envelope serialises"),
    };
    app.broker.enqueue(from, vec![held]).await?;
    let record = Record {
        reference: reference.clone(),
        statuses: Vec::new(),
        event: Some(HistoryEvent {
            at: requested_at,
            target: from.to_string(),
            event: "resync".into(),
            detail: format!("{from} asked for its snapshot of group {group} for {node}"),
        }),
        mark: None,
    };
    if let Err(e) = app.store.record(vec![record]).await {
        tracing::warn!(error = %e, "could not record the resync request");
    }
    Ok((id, reference))
}
