//! [`RedisStore`]: the [`Store`] on Redis, the production backend. One shared multiplexed
//! connection, made afresh after an error (through the sentinels, if any: `connect`);
//! every call bounded by 5 s; the Lua scripts (`scripts`) keep each write atomic.
//!
//! Key layout (all under `<prefix>:`), documented in docs/internals.md:
//! - `d:<node>:<id>`   idempotency key: `p` while its change is being published, `1` once
//!   accepted (≈ 90–120 bytes of Redis memory for typical ids, measured with MEMORY USAGE)
//! - `seq:<node>`      the node's sequence counter, floored by Redis's clock in µs
//! - `o:{<ref>}`       hash: `<target>\t<type>` → status (tab-separated: `record`)
//! - `h:{<ref>}`       list of history events (tab-separated: `record`), bounded
//! - `m:<target>:<source>:{<ref>}:<type>` last delivered seq of that object from that
//!   source at that target
//! - `inbox:<target>`  a pull target's last message number, floored like `seq:<node>`
//! - `beat`            a counter every instance increments each second: a value not above
//!   the last one it saw means Redis forgot (restarted empty, or an older replica took over)
//! - `r:<target>`      hash: `<type>\t<source ref>` → the target's ref (GUID remapping)
//! - `g:<group>\t<type>\t<ref>` an object's state in a `[[group]]` (JSON the store does
//!   not read; replaced by compare-and-set)
//! - `cml:<source>`    hash: `<type>\u{1f}<ref>` → the hash of the content that object of a
//!   CommerceML source had when last accepted (`hashes`); no expiry
//! - `rate:<target>`, `pause:<target>` a REST target's rate slots and pause (`rate`)
//!
//! The `{<ref>}` hash tag keeps an object's keys in one Redis Cluster slot, a first step to
//! Cluster; today one script call records up to 200 objects at once, so a single Redis (or
//! Sentinel) is what this store supports.

mod connect;
mod hashes;
mod rate;
mod record;
mod scripts;

use super::{
    Admission, IdState, MarkKey, ObjectView, RateAsk, Record, Store, StoreError,
    PENDING_ID_TTL_SECS,
};
use crate::clock::rfc3339_now;
use crate::config::Config;
use futures_util::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use scripts::{COUNTER_LUA, GROUP_CAS_LUA, RECORD_LUA, RENEW_LUA};
use std::time::Duration;

/// Objects recorded per script call.
const RECORDS_PER_CALL: usize = 200;

/// The longest a store call may take before the store counts as unavailable.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// An idempotency key's value while its change is being published, and once accepted.
const ID_PENDING: &str = "p";
const ID_ACCEPTED: &str = "1";

pub struct RedisStore {
    endpoint: connect::Endpoint,
    shared: std::sync::Mutex<Option<MultiplexedConnection>>,
    /// Held while a connection is being made, so callers wait for one instead of each
    /// making their own.
    connecting: tokio::sync::Mutex<()>,
    prefix: String,
    dedupe_window: Duration,
    retention: Duration,
    history_max: usize,
    record_script: redis::Script,
    group_cas_script: redis::Script,
    counter_script: redis::Script,
    renew_script: redis::Script,
    rate_scripts: rate::RateScripts,
    /// The last value of the `beat` key this process saw (0: none yet).
    last_beat: std::sync::atomic::AtomicI64,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// The store of `config` (`[store]`, keys under `broker.prefix`); connects on first use.
    /// `endpoint_gauge` (`lx_store_endpoint`) shows the server it is on.
    pub fn new(
        config: &Config,
        endpoint_gauge: prometheus::IntGaugeVec,
    ) -> Result<RedisStore, StoreError> {
        let endpoint = connect::Endpoint::new(&config.store, &config.base_dir, endpoint_gauge)?;
        Ok(RedisStore {
            endpoint,
            shared: std::sync::Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            prefix: config.broker.prefix.clone(),
            dedupe_window: config.server.dedupe_window.0,
            retention: config.store.retention.0,
            history_max: config.store.history_max,
            record_script: redis::Script::new(RECORD_LUA),
            group_cas_script: redis::Script::new(GROUP_CAS_LUA),
            counter_script: redis::Script::new(COUNTER_LUA),
            renew_script: redis::Script::new(RENEW_LUA),
            rate_scripts: rate::RateScripts::new(),
            last_beat: std::sync::atomic::AtomicI64::new(0),
        })
    }

    /// Connects and PINGs once (through the sentinels, if any): what is wrong, if anything
    /// (`lxbridge validate --connect`).
    pub async fn probe(config: &Config) -> Option<String> {
        // Nothing scrapes it: the store wants somewhere to show where it is.
        let gauge = crate::metrics::Metrics::new().store_endpoint;
        let store = match RedisStore::new(config, gauge) {
            Ok(store) => store,
            Err(e) => return Some(e.to_string()),
        };
        store.ping().await.err().map(|e| format!("store: {e}"))
    }

    fn cached(&self) -> Option<MultiplexedConnection> {
        self.shared.lock().expect("store connection lock").clone()
    }

    /// A multiplexed connection shared by all callers: made once and kept until a command
    /// on it fails; then the next call connects afresh (through the sentinels, if any).
    async fn conn(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let conn = self.endpoint.connect().await?;
        *self.shared.lock().expect("store connection lock") = Some(conn.clone());
        Ok(conn)
    }

    /// Bounds a store call: a connection that stopped answering is dropped after
    /// [`STORE_TIMEOUT`] instead of hanging its callers.
    fn timed<'a, T: Send + 'a>(
        &'a self,
        call: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T, StoreError>> {
        Box::pin(async move {
            match tokio::time::timeout(STORE_TIMEOUT, call).await {
                Ok(result) => result,
                Err(_) => {
                    self.shared.lock().expect("store connection lock").take();
                    Err(StoreError::Unavailable(format!(
                        "no answer within {}s",
                        STORE_TIMEOUT.as_secs()
                    )))
                }
            }
        })
    }

    /// Maps a failed command to an error and drops the shared connection, so the next call
    /// connects afresh.
    fn failed(&self, e: redis::RedisError) -> StoreError {
        self.shared.lock().expect("store connection lock").take();
        unavailable(e)
    }

    fn mark_key(&self, target: &str, k: MarkKey<'_>) -> String {
        format!(
            "{}:m:{target}:{}:{{{}}}:{}",
            self.prefix, k.source, k.reference, k.kind
        )
    }

    fn group_key(&self, key: &str) -> String {
        format!("{}:g:{key}", self.prefix)
    }

    fn id_key(&self, node: &str, id: &str) -> String {
        format!("{}:d:{node}:{id}", self.prefix)
    }

    /// Runs a pipeline of script calls; if Redis lost its script cache (a restart), loads
    /// the scripts and runs it once more.
    async fn run_scripts(&self, pipe: &redis::Pipeline) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(RECORD_LUA)
                    .query_async::<String>(&mut conn)
                    .await
                    .map_err(|e| self.failed(e))?;
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| self.failed(e))
            }
            Err(e) => Err(self.failed(e)),
        }
    }
}

impl Store for RedisStore {
    fn endpoint(&self) -> Option<String> {
        self.endpoint.endpoint()
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.timed(async move {
            let mut conn = self.conn().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(|e| self.failed(e))?;
            Ok(())
        })
    }

    fn check_loss(&self) -> BoxFuture<'_, Result<bool, StoreError>> {
        self.timed(async move {
            let mut conn = self.conn().await?;
            let beat: i64 = redis::cmd("INCR")
                .arg(format!("{}:beat", self.prefix))
                .query_async(&mut conn)
                .await
                .map_err(|e| self.failed(e))?;
            let before = self
                .last_beat
                .swap(beat, std::sync::atomic::Ordering::SeqCst);
            Ok(beat <= before)
        })
    }

    fn admit<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
        seqs_needed: usize,
    ) -> BoxFuture<'a, Result<Admission, StoreError>> {
        self.timed(async move {
            let mut conn = self.conn().await?;
            let mut pipe = redis::pipe();
            // Reserved as "p" (pending); the old value tells a duplicate ("1") from a
            // change another request is still publishing ("p"). SET … NX GET: Redis 7.0+.
            for id in ids {
                pipe.cmd("SET")
                    .arg(self.id_key(node, id))
                    .arg(ID_PENDING)
                    .arg("NX")
                    .arg("GET")
                    .arg("EX")
                    .arg(PENDING_ID_TTL_SECS);
            }
            // EVAL, not EVALSHA: a Redis that lost its script cache must not fail the
            // pipeline after the SETs above took effect.
            pipe.cmd("EVAL")
                .arg(COUNTER_LUA)
                .arg(1)
                .arg(format!("{}:seq:{node}", self.prefix))
                .arg(seqs_needed);
            let replies: Vec<redis::Value> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| self.failed(e))?;
            if replies.len() != ids.len() + 1 {
                return Err(StoreError::Protocol(format!(
                    "admit: {} replies for {} commands",
                    replies.len(),
                    ids.len() + 1
                )));
            }
            let states = replies[..ids.len()]
                .iter()
                .map(|v| match v {
                    redis::Value::Nil => IdState::Fresh,
                    redis::Value::BulkString(b) if b == ID_PENDING.as_bytes() => IdState::InFlight,
                    _ => IdState::Duplicate,
                })
                .collect();
            let last: i64 = redis::from_redis_value(&replies[ids.len()])
                .map_err(|e| StoreError::Protocol(e.to_string()))?;
            Ok(Admission {
                ids: states,
                first_seq: last - seqs_needed as i64 + 1,
            })
        })
    }

    fn commit_ids<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.timed(async move {
            if ids.is_empty() {
                return Ok(());
            }
            let mut conn = self.conn().await?;
            let mut pipe = redis::pipe();
            let secs = self.dedupe_window.as_secs().max(1);
            for id in ids {
                pipe.cmd("SET")
                    .arg(self.id_key(node, id))
                    .arg(ID_ACCEPTED)
                    .arg("EX")
                    .arg(secs)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| self.failed(e))
        })
    }

    fn renew_ids<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.timed(async move {
            if ids.is_empty() {
                return Ok(());
            }
            let mut conn = self.conn().await?;
            let mut call = self.renew_script.prepare_invoke();
            call.arg(PENDING_ID_TTL_SECS * 1000);
            for id in ids {
                call.key(self.id_key(node, id));
            }
            call.invoke_async::<()>(&mut conn)
                .await
                .map_err(|e| self.failed(e))
        })
    }

    fn release_ids<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.timed(async move {
            if ids.is_empty() {
                return Ok(());
            }
            let mut conn = self.conn().await?;
            let mut cmd = redis::cmd("DEL");
            for id in ids {
                cmd.arg(self.id_key(node, id));
            }
            cmd.query_async::<()>(&mut conn)
                .await
                .map_err(|e| self.failed(e))
        })
    }

    fn record(&self, records: Vec<Record>) -> BoxFuture<'_, Result<(), StoreError>> {
        self.timed(async move {
            if records.is_empty() {
                return Ok(());
            }
            let now = rfc3339_now();
            let mut pipe = redis::pipe();
            // One script call per chunk: the call's fixed cost is paid once per chunk, and a
            // chunk is small enough not to hold Redis up.
            for chunk in records.chunks(RECORDS_PER_CALL) {
                pipe.invoke_script(&self.record_call(chunk, &now)).ignore();
            }
            self.run_scripts(&pipe).await
        })
    }

    fn marks<'a>(
        &'a self,
        target: &'a str,
        keys: &'a [MarkKey<'a>],
    ) -> BoxFuture<'a, Result<Vec<Option<i64>>, StoreError>> {
        self.timed(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let mut conn = self.conn().await?;
            let mut cmd = redis::cmd("MGET");
            for k in keys {
                cmd.arg(self.mark_key(target, *k));
            }
            cmd.query_async(&mut conn).await.map_err(|e| self.failed(e))
        })
    }

    fn object<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<ObjectView>, StoreError>> {
        self.timed(async move {
            let mut conn = self.conn().await?;
            let (targets, history): (Vec<(String, String)>, Vec<String>) = redis::pipe()
                .cmd("HGETALL")
                .arg(format!("{}:o:{{{reference}}}", self.prefix))
                .cmd("LRANGE")
                .arg(format!("{}:h:{{{reference}}}", self.prefix))
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.failed(e))?;
            if targets.is_empty() && history.is_empty() {
                return Ok(None);
            }
            let parse = |what: &str, json: &str| {
                StoreError::Protocol(format!("{what} of {reference:?} is not valid: {json}"))
            };
            let mut view = ObjectView {
                reference: reference.to_string(),
                targets: targets
                    .iter()
                    .map(|(f, v)| record::read_status(f, v).ok_or_else(|| parse("status", v)))
                    .collect::<Result<_, _>>()?,
                history: history
                    .iter()
                    .map(|v| record::read_event(v).ok_or_else(|| parse("history", v)))
                    .collect::<Result<_, _>>()?,
            };
            view.sort();
            Ok(Some(view))
        })
    }

    fn remap_get<'a>(
        &'a self,
        target: &'a str,
        pairs: &'a [(&'a str, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, StoreError>> {
        self.timed(async move {
            if pairs.is_empty() {
                return Ok(Vec::new());
            }
            let mut conn = self.conn().await?;
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(format!("{}:r:{target}", self.prefix));
            for (kind, source_ref) in pairs {
                cmd.arg(format!("{kind}\t{source_ref}"));
            }
            cmd.query_async(&mut conn).await.map_err(|e| self.failed(e))
        })
    }

    fn remap_put<'a>(
        &'a self,
        target: &'a str,
        triples: &'a [(&'a str, &'a str, &'a str)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.timed(async move {
            if triples.is_empty() {
                return Ok(());
            }
            let mut conn = self.conn().await?;
            let mut cmd = redis::cmd("HSET");
            cmd.arg(format!("{}:r:{target}", self.prefix));
            for (kind, source_ref, target_ref) in triples {
                cmd.arg(format!("{kind}\t{source_ref}")).arg(*target_ref);
            }
            cmd.query_async::<()>(&mut conn)
                .await
                .map_err(|e| self.failed(e))
        })
    }

    fn next_message_no<'a>(&'a self, target: &'a str) -> BoxFuture<'a, Result<i64, StoreError>> {
        self.timed(async move {
            let mut conn = self.conn().await?;
            self.counter_script
                .key(format!("{}:inbox:{target}", self.prefix))
                .arg(1)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.failed(e))
        })
    }

    fn group_load<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, StoreError>> {
        self.timed(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let mut conn = self.conn().await?;
            let mut cmd = redis::cmd("MGET");
            for k in keys {
                cmd.arg(self.group_key(k));
            }
            cmd.query_async(&mut conn).await.map_err(|e| self.failed(e))
        })
    }

    fn group_cas<'a>(
        &'a self,
        items: &'a [(String, Option<String>, String)],
    ) -> BoxFuture<'a, Result<Vec<bool>, StoreError>> {
        self.timed(async move {
            if items.is_empty() {
                return Ok(Vec::new());
            }
            let mut conn = self.conn().await?;
            let mut call = self.group_cas_script.prepare_invoke();
            call.arg(self.retention.as_secs().max(1));
            for (key, expected, new) in items {
                call.key(self.group_key(key))
                    .arg(if expected.is_some() { "1" } else { "0" })
                    .arg(expected.as_deref().unwrap_or(""))
                    .arg(new);
            }
            let written: Vec<i64> = call
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.failed(e))?;
            Ok(written.into_iter().map(|w| w == 1).collect())
        })
    }

    fn content_hashes<'a>(
        &'a self,
        source: &'a str,
        keys: &'a [(&'a str, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<Option<String>>, StoreError>> {
        self.timed(self.read_hashes(source, keys))
    }

    fn keep_content_hashes<'a>(
        &'a self,
        source: &'a str,
        entries: &'a [(&'a str, &'a str, &'a str)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.timed(self.write_hashes(source, entries))
    }

    fn forget_content_hashes<'a>(
        &'a self,
        source: &'a str,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.timed(self.forget_hashes(source))
    }

    fn rate_take<'a>(
        &'a self,
        target: &'a str,
        slot: &'a str,
        ask: RateAsk,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        self.timed(self.take_slot(target, slot, ask))
    }

    fn rate_done<'a>(
        &'a self,
        target: &'a str,
        slot: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.timed(self.slot_done(target, slot))
    }

    fn rate_pause<'a>(&'a self, target: &'a str, ms: u64) -> BoxFuture<'a, Result<(), StoreError>> {
        self.timed(self.pause_target(target, ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs the local Redis (127.0.0.1:6379); writes under a prefix of its own and deletes
    /// it after.
    #[tokio::test]
    async fn keeps_the_store_contract() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let prefix = format!("lxunit-store-{}-{nanos:x}", std::process::id());
        let section = format!(
            "[broker]\nprefix = \"{prefix}\"\n[store]\nredis_url = \"redis://127.0.0.1:6379/0\""
        );
        let config = crate::store::contract::config(&section);
        let gauge = crate::metrics::Metrics::new().store_endpoint;
        let store = RedisStore::new(&config, gauge).unwrap();
        crate::store::contract::run(&store).await;
        let mut conn = store.conn().await.unwrap();
        json_written_by_earlier_versions_keeps_its_rules(&store, &mut conn, &prefix).await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!keys.is_empty());
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    /// A status and an event stored as JSON (before issue 18) are read, and the record
    /// script still keeps the rules over them: an older seq does not replace a `dead` one.
    async fn json_written_by_earlier_versions_keeps_its_rules(
        store: &RedisStore,
        conn: &mut MultiplexedConnection,
        prefix: &str,
    ) {
        let status = r#"{"type":"Catalog.X","target":"shop","source":"central","state":"dead","attempts":2,"last_error":"e","updated_at":"t","seq":9,"rank":2}"#;
        let event =
            r#"{"at":"2000-01-01T00:00:00.000Z","target":"shop","event":"dead","detail":"e"}"#;
        let _: () = redis::pipe()
            .cmd("HSET")
            .arg(format!("{prefix}:o:{{old-1}}"))
            .arg("shop\tCatalog.X")
            .arg(status)
            .cmd("RPUSH")
            .arg(format!("{prefix}:h:{{old-1}}"))
            .arg(event)
            .query_async(conn)
            .await
            .unwrap();
        let mut older =
            crate::store::contract::record(8, super::super::State::Queued, false, "late");
        older.reference = "old-1".into();
        store.record(vec![older]).await.unwrap();
        let view = store.object("old-1").await.unwrap().unwrap();
        assert_eq!(view.targets[0].state, super::super::State::Dead);
        assert_eq!(view.targets[0].seq, 9);
        let events: Vec<&str> = view.history.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(events, ["dead", "late"]);
    }
}
