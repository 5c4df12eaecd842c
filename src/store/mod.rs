//! The store: every fact about an object an operator may ask for (state per target,
//! attempts, last error, history), idempotency keys, per-node sequence counters, the
//! per-target delivery marks that make supersede-by-order work, the remap table, the
//! state of objects in groups and the content hashes of CommerceML uploads (what each
//! object of a source looked like when last accepted, so an unchanged one is not sent
//! again). Holds no messages.
//!
//! This file is what the rest of lxbridge sees: the [`Store`] trait and the types it
//! speaks in. Two backends implement it, each in its own module:
//! - [`redis`]: [`RedisStore`], the production one (key layout in its module doc and
//!   docs/internals.md);
//! - [`sqlite`]: [`EmbeddedStore`], the same facts and rules in tables of the embedded
//!   database ([`crate::embedded`]).

pub mod rate;
pub mod redis;
pub mod sqlite;

pub use rate::RateAsk;

pub use self::redis::RedisStore;
pub use self::sqlite::EmbeddedStore;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store answered unexpectedly: {0}")]
    Protocol(String),
}

/// An object's state at one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Retrying,
    Delivered,
    Dead,
    Superseded,
    /// The route's mapping or script decided the target doesn't get it.
    Filtered,
}

impl State {
    /// The state's name, as the API shows it.
    pub fn name(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Retrying => "retrying",
            State::Delivered => "delivered",
            State::Dead => "dead",
            State::Superseded => "superseded",
            State::Filtered => "filtered",
        }
    }

    /// The state of a name, the inverse of [`State::name`].
    pub fn from_name(name: &str) -> Option<State> {
        [
            State::Queued,
            State::Retrying,
            State::Delivered,
            State::Dead,
            State::Superseded,
            State::Filtered,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    /// For the same change, a later state never gives way to an earlier one (a late
    /// `queued` write can't hide `delivered`).
    pub(crate) fn rank(self) -> u8 {
        match self {
            State::Queued => 0,
            State::Retrying => 1,
            State::Delivered | State::Dead | State::Superseded | State::Filtered => 2,
        }
    }
}

/// A new state of (object, target), written only if it is not older than what is there.
#[derive(Debug, Clone)]
pub struct StatusUpdate {
    pub kind: String,
    pub target: String,
    /// Seqs are only comparable from one source; a status from another source replaces.
    pub source: String,
    pub seq: i64,
    pub state: State,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Also replace a `dead` state, whatever its seq (replay revives dead changes).
    pub revive: bool,
}

/// One line of an object's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryEvent {
    pub at: String,
    pub target: String,
    pub event: String,
    pub detail: String,
}

/// A raised delivery mark: `seq` of (source, type, ref) reached `target`.
#[derive(Debug, Clone)]
pub struct Mark {
    pub target: String,
    pub source: String,
    pub kind: String,
    pub seq: i64,
}

/// What happened to one object, written atomically: status changes (one per target), a
/// history line, and for a delivery its mark.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub reference: String,
    pub statuses: Vec<StatusUpdate>,
    pub event: Option<HistoryEvent>,
    pub mark: Option<Mark>,
}

/// Identifies an object as one source sees it (source, type, ref): the key of its delivery
/// marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MarkKey<'a> {
    pub source: &'a str,
    pub kind: &'a str,
    pub reference: &'a str,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetStatus {
    #[serde(rename = "type")]
    pub kind: String,
    pub target: String,
    #[serde(default)]
    pub source: String,
    pub state: State,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub updated_at: String,
    pub seq: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ObjectView {
    #[serde(rename = "ref")]
    pub reference: String,
    pub targets: Vec<TargetStatus>,
    pub history: Vec<HistoryEvent>,
}

impl ObjectView {
    /// Targets by (target, type); history by time (stable: events are written by different
    /// tasks and processes), and within one millisecond `accepted` first.
    pub fn sort(&mut self) {
        self.targets
            .sort_by(|a, b| (&a.target, &a.kind).cmp(&(&b.target, &b.kind)));
        self.history
            .sort_by(|a, b| (&a.at, a.event != "accepted").cmp(&(&b.at, b.event != "accepted")));
    }
}

/// The result of reserving idempotency keys and sequence numbers for one request.
#[derive(Debug)]
pub struct Admission {
    /// Per id given, what the store knows of it.
    pub ids: Vec<IdState>,
    /// The first of the `seqs_needed` sequence numbers reserved (consecutive).
    pub first_seq: i64,
}

/// An idempotency key at admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdState {
    /// Not seen within the dedupe window: reserved now for this request.
    Fresh,
    /// Accepted before, within the dedupe window.
    Duplicate,
    /// Reserved by another request that is still publishing it.
    InFlight,
}

/// How long an idempotency key stays reserved while its change is being published: short,
/// so that a client's retry through another instance is accepted a few seconds after the
/// instance publishing it died; ingress renews it every [`PENDING_ID_RENEW`] meanwhile.
pub const PENDING_ID_TTL_SECS: u64 = 6;

/// How often ingress renews the reservations of the changes it is publishing.
pub const PENDING_ID_RENEW: Duration = Duration::from_secs(2);

pub trait Store: Send + Sync + 'static {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// The server the store is on now (`host:port`), for `/readyz`; none in-process.
    fn endpoint(&self) -> Option<String> {
        None
    }
    /// Steps the store's loss marker: true when the store forgot what it held since the
    /// last call (Redis restarted empty, or an older replica took over). Also a ping.
    fn check_loss(&self) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Reserves `ids` (pending until [`Store::commit_ids`]) and `seqs_needed` sequence numbers.
    fn admit<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
        seqs_needed: usize,
    ) -> BoxFuture<'a, Result<Admission, StoreError>>;
    /// Remembers ids of accepted changes for the dedupe window.
    fn commit_ids<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Extends the reservation of ids still pending (their change is still being published)
    /// by [`PENDING_ID_TTL_SECS`]; accepted or released ids are left as they are.
    fn renew_ids<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Forgets reserved ids whose changes were not accepted, so a retry is not a "duplicate".
    fn release_ids<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn record(&self, records: Vec<Record>) -> BoxFuture<'_, Result<(), StoreError>>;
    /// The last delivered seq of each object at `target`.
    fn marks<'a>(
        &'a self,
        target: &'a str,
        keys: &'a [MarkKey<'a>],
    ) -> BoxFuture<'a, Result<Vec<Option<i64>>, StoreError>>;
    fn object<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<ObjectView>, StoreError>>;
    /// The next inbox message number of a pull target: it only grows, across restarts too.
    fn next_message_no<'a>(&'a self, target: &'a str) -> BoxFuture<'a, Result<i64, StoreError>>;
    /// The target's refs for (type, source ref) pairs, from its remap table.
    fn remap_get<'a>(
        &'a self,
        target: &'a str,
        pairs: &'a [(&'a str, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, StoreError>>;
    /// Stores (type, source ref, target ref) triples in the target's remap table.
    fn remap_put<'a>(
        &'a self,
        target: &'a str,
        triples: &'a [(&'a str, &'a str, &'a str)],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The states of objects in groups (JSON the store does not read), by key; `None` when
    /// absent or expired.
    fn group_load<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, StoreError>>;
    /// Compare-and-set: each (key, expected, new) is written only if the state stored is
    /// still `expected` (`None`: absent). True per item where it was written. States
    /// expire `retention` after their last write.
    fn group_cas<'a>(
        &'a self,
        items: &'a [(String, Option<String>, String)],
    ) -> BoxFuture<'a, Result<Vec<bool>, StoreError>>;
    /// CommerceML uploads: the hash of the content each (type, ref) of `source` had when it
    /// was last accepted (`None`: never, or forgotten), in the order of `keys`.
    fn content_hashes<'a>(
        &'a self,
        source: &'a str,
        keys: &'a [(&'a str, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, StoreError>>;
    /// Remembers (type, ref, hash) of changes of `source` just accepted.
    fn keep_content_hashes<'a>(
        &'a self,
        source: &'a str,
        entries: &'a [(&'a str, &'a str, &'a str)],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Forgets every content hash of `source` (its next upload is delivered in full);
    /// how many were forgotten.
    fn forget_content_hashes<'a>(
        &'a self,
        source: &'a str,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// A REST target's rate ([`rate`]): takes `slot` when the target's window has room and
    /// no pause holds it (`None`), else the milliseconds to wait before asking again.
    fn rate_take<'a>(
        &'a self,
        target: &'a str,
        slot: &'a str,
        ask: RateAsk,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>>;
    /// `slot`'s request was answered: it counts for one window from now.
    fn rate_done<'a>(
        &'a self,
        target: &'a str,
        slot: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Holds every request to `target`, from every instance, for `ms`.
    fn rate_pause<'a>(&'a self, target: &'a str, ms: u64) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// What every store must do alike, run against each ([`sqlite`]'s tests and [`redis`]'s):
/// the idempotency keys, the record rules (a status never goes backwards, `revive`, the
/// bounded history, delivery marks), counters, the remap table, group compare-and-set and
/// the content hashes.
#[cfg(test)]
pub(crate) mod contract {
    use super::*;

    /// The config of the contract (history kept to 3 events), with the backend's lines.
    pub(crate) fn config(backend: &str) -> crate::config::Config {
        let text = format!(
            "{backend}\nhistory_max = 3\n[[node]]\nname = \"central\"\ntoken = \"central-secret\"\n"
        );
        crate::config::Config::parse(&text, "contract").expect("the contract's config parses")
    }

    pub(crate) fn record(seq: i64, state: State, revive: bool, event: &str) -> Record {
        Record {
            reference: "r-1".into(),
            statuses: vec![StatusUpdate {
                kind: "Catalog.X".into(),
                target: "shop".into(),
                source: "central".into(),
                seq,
                state,
                attempts: 1,
                last_error: None,
                revive,
            }],
            event: Some(HistoryEvent {
                at: crate::clock::rfc3339_now(),
                target: "shop".into(),
                event: event.into(),
                detail: String::new(),
            }),
            mark: None,
        }
    }

    async fn state_of(store: &dyn Store) -> (State, i64) {
        let view = store
            .object("r-1")
            .await
            .unwrap()
            .expect("the object is known");
        assert_eq!(view.targets.len(), 1);
        (view.targets[0].state, view.targets[0].seq)
    }

    pub(crate) async fn run(store: &dyn Store) {
        store.ping().await.unwrap();
        assert!(!store.check_loss().await.unwrap());
        assert!(!store.check_loss().await.unwrap());

        let first = store.admit("central", &["i-1", "i-2"], 2).await.unwrap();
        assert_eq!(first.ids, [IdState::Fresh, IdState::Fresh]);
        let again = store.admit("central", &["i-1"], 1).await.unwrap();
        assert_eq!(again.ids, [IdState::InFlight]);
        assert!(again.first_seq >= first.first_seq + 2);
        store.renew_ids("central", &["i-1"]).await.unwrap();
        store.commit_ids("central", &["i-1"]).await.unwrap();
        store.release_ids("central", &["i-2"]).await.unwrap();
        let later = store.admit("central", &["i-1", "i-2"], 1).await.unwrap();
        assert_eq!(later.ids, [IdState::Duplicate, IdState::Fresh]);

        store
            .record(vec![record(5, State::Queued, false, "accepted")])
            .await
            .unwrap();
        assert_eq!(state_of(store).await, (State::Queued, 5));
        let mut delivered = record(5, State::Delivered, false, "delivered");
        delivered.mark = Some(Mark {
            target: "shop".into(),
            source: "central".into(),
            kind: "Catalog.X".into(),
            seq: 5,
        });
        store.record(vec![delivered]).await.unwrap();
        // A lower rank for the same seq, and an older seq, give way.
        let stale = vec![
            record(5, State::Retrying, false, "late"),
            record(4, State::Dead, false, "older"),
        ];
        store.record(stale).await.unwrap();
        assert_eq!(state_of(store).await, (State::Delivered, 5));
        store
            .record(vec![record(6, State::Dead, false, "dead")])
            .await
            .unwrap();
        // An older seq replaces a dead state only with `revive`.
        store
            .record(vec![record(5, State::Queued, false, "no")])
            .await
            .unwrap();
        assert_eq!(state_of(store).await, (State::Dead, 6));
        store
            .record(vec![record(5, State::Queued, true, "replayed")])
            .await
            .unwrap();
        assert_eq!(state_of(store).await, (State::Queued, 5));
        let view = store.object("r-1").await.unwrap().unwrap();
        let events: Vec<&str> = view.history.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(
            events,
            ["dead", "no", "replayed"],
            "the last history_max events"
        );
        assert!(store.object("r-unknown").await.unwrap().is_none());

        let key = MarkKey {
            source: "central",
            kind: "Catalog.X",
            reference: "r-1",
        };
        let other = MarkKey {
            reference: "r-2",
            ..key
        };
        let marks = store.marks("shop", &[key, other]).await.unwrap();
        assert_eq!(marks, [Some(5), None]);

        let one = store.next_message_no("shop").await.unwrap();
        assert!(store.next_message_no("shop").await.unwrap() > one);

        store
            .remap_put("shop", &[("Catalog.X", "r-1", "t-1")])
            .await
            .unwrap();
        let refs = store
            .remap_get("shop", &[("Catalog.X", "r-1"), ("Catalog.X", "r-2")])
            .await
            .unwrap();
        assert_eq!(refs, [Some("t-1".to_string()), None]);

        let k = "g\tCatalog.X\tr-1".to_string();
        let put = |expected: Option<&str>, new: &str| {
            vec![(k.clone(), expected.map(str::to_string), new.to_string())]
        };
        assert_eq!(store.group_cas(&put(None, "a")).await.unwrap(), [true]);
        assert_eq!(store.group_cas(&put(None, "b")).await.unwrap(), [false]);
        assert_eq!(store.group_cas(&put(Some("a"), "b")).await.unwrap(), [true]);
        let loaded = store
            .group_load(&[k.clone(), "g\tnone".into()])
            .await
            .unwrap();
        assert_eq!(loaded, [Some("b".to_string()), None]);

        content_hashes(store).await;
        rate(store).await;
    }

    /// The rate: two slots per window, a third waits until one was answered a window ago;
    /// a pause holds every slot; targets are apart.
    async fn rate(store: &dyn Store) {
        let ask = RateAsk {
            max: 2,
            window_ms: 400,
            hold_ms: 60_000,
        };
        assert_eq!(store.rate_take("crm", "s1", ask).await.unwrap(), None);
        assert_eq!(store.rate_take("crm", "s2", ask).await.unwrap(), None);
        let wait = store.rate_take("crm", "s3", ask).await.unwrap();
        assert!(wait.is_some_and(|w| w > 400), "both in flight: {wait:?}");
        assert_eq!(store.rate_take("other", "o1", ask).await.unwrap(), None);
        store.rate_done("crm", "s1").await.unwrap();
        let wait = store.rate_take("crm", "s3", ask).await.unwrap();
        assert!(wait.is_some_and(|w| w <= 400), "s1 answered: {wait:?}");
        tokio::time::sleep(std::time::Duration::from_millis(wait.unwrap() + 20)).await;
        assert_eq!(store.rate_take("crm", "s3", ask).await.unwrap(), None);
        store.rate_pause("other", 300).await.unwrap();
        let wait = store.rate_take("other", "o2", ask).await.unwrap();
        assert!(
            wait.is_some_and(|w| w > 200 && w <= 300),
            "paused: {wait:?}"
        );
    }

    /// The content hashes: kept and read per source in the order asked, overwritten,
    /// forgotten all at once; empty slices do nothing.
    async fn content_hashes(store: &dyn Store) {
        let x = "Catalog.Номенклатура";
        assert_eq!(
            store.content_hashes("cml-a", &[(x, "n-1")]).await.unwrap(),
            [None]
        );
        store
            .keep_content_hashes("cml-a", &[(x, "n-1", "h1"), (x, "n-2", "h2")])
            .await
            .unwrap();
        let asked = [(x, "n-2"), (x, "n-3"), (x, "n-1")];
        let some = |h: &str| Some(h.to_string());
        assert_eq!(
            store.content_hashes("cml-a", &asked).await.unwrap(),
            [some("h2"), None, some("h1")]
        );
        // The same ref under another type is another object.
        assert_eq!(
            store
                .content_hashes("cml-a", &[("Catalog.Y", "n-1")])
                .await
                .unwrap(),
            [None]
        );
        store
            .keep_content_hashes("cml-a", &[(x, "n-1", "h1b")])
            .await
            .unwrap();
        assert_eq!(
            store.content_hashes("cml-a", &asked).await.unwrap(),
            [some("h2"), None, some("h1b")]
        );

        store
            .keep_content_hashes("cml-b", &[(x, "n-1", "other")])
            .await
            .unwrap();
        assert_eq!(
            store.content_hashes("cml-b", &asked).await.unwrap(),
            [None, None, some("other")]
        );

        assert_eq!(store.forget_content_hashes("cml-a").await.unwrap(), 2);
        assert_eq!(
            store.content_hashes("cml-a", &asked).await.unwrap(),
            [None, None, None]
        );
        assert_eq!(store.forget_content_hashes("cml-a").await.unwrap(), 0);
        assert_eq!(
            store.content_hashes("cml-b", &[(x, "n-1")]).await.unwrap(),
            [some("other")],
            "forgetting one source leaves the others"
        );

        assert!(store.content_hashes("cml-a", &[]).await.unwrap().is_empty());
        store.keep_content_hashes("cml-a", &[]).await.unwrap();
        assert_eq!(store.forget_content_hashes("cml-b").await.unwrap(), 1);
    }
}
