//! The store: every fact about an object an operator may ask for (state per target,
//! attempts, last error, history), idempotency keys, per-node sequence counters and the
//! per-target delivery marks that make supersede-by-order work. Holds no messages.
//!
//! [`Store`] is a trait so an embedded backend can replace Redis; [`RedisStore`] is the
//! production one. Key layout (all under `<prefix>:`), documented in ARCHITECTURE.md:
//! - `d:<node>:<id>`   idempotency key: `p` while its change is being published, `1` once
//!   accepted (≈ 90–120 bytes of Redis memory for typical ids, measured with MEMORY USAGE)
//! - `seq:<node>`      the node's sequence counter, floored by Redis's clock in µs
//! - `o:{<ref>}`       hash: `<target>\t<type>` → status JSON
//! - `h:{<ref>}`       list of history events (JSON), bounded
//! - `m:<target>:<source>:{<ref>}:<type>` last delivered seq of that object from that
//!   source at that target
//! - `inbox:<target>`  a pull target's last message number, floored like `seq:<node>`
//! - `beat`            a counter every instance increments each second: a value not above
//!   the last one it saw means Redis forgot (restarted empty, or an older replica took over)
//! - `r:<target>`      hash: `<type>\t<source ref>` → the target's ref (GUID remapping)
//! - `g:<group>\t<type>\t<ref>` an object's state in a `[[group]]` (JSON the store does
//!   not read; replaced by compare-and-set)
//!
//! The `{<ref>}` hash tag keeps an object's keys in one Redis Cluster slot, a first step to
//! Cluster; today one script call records up to 200 objects at once, so a single Redis (or
//! Sentinel) is what this store supports.

mod connect;

use crate::config::Config;
use futures_util::future::BoxFuture;
use redis::aio::MultiplexedConnection;
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

/// Identifies an object from one source for delivery marks.
#[derive(Debug, Clone, Copy)]
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

pub trait Store: Send + Sync + 'static {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Steps the store's loss marker: true when the store forgot what it held since the
    /// last call (Redis restarted empty, or an older replica took over). Also a ping.
    /// The server the store is on now (`host:port`), for `/readyz`; none in-process.
    fn endpoint(&self) -> Option<String> {
        None
    }
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
}

/// RFC 3339 UTC with exactly three fraction digits (so the strings sort by time).
pub fn rfc3339_now() -> String {
    rfc3339_ms(unix_ms_now())
}

pub fn rfc3339_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

pub fn unix_ms_now() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

const RECORD_LUA: &str = r#"
-- Records many objects in one call. Per object, KEYS holds three keys: its status hash,
-- its history list and a delivery mark (a dummy when there is none).
-- ARGV[1] history max, ARGV[2] ttl seconds, then per object:
--   event json ('' = none), revive ('1': a status also replaces a `dead` one, whatever its
--   seq), mark seq ('' = none), number of statuses, then per status: field, seq, rank,
--   source, json
local hmax, ttl = tonumber(ARGV[1]), ARGV[2]
local a = 3
for k = 1, #KEYS, 3 do
  local event, revive, markseq, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  a = a + 4
  if markseq ~= '' then
    local cur = tonumber(redis.call('GET', KEYS[k + 2]) or '-9007199254740991')
    if cur < tonumber(markseq) then redis.call('SET', KEYS[k + 2], markseq, 'EX', ttl) end
  end
  local wrote = false
  for _ = 1, n do
    local field, seq, rank, source = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
    local write = true
    local cur = redis.call('HGET', KEYS[k], field)
    if cur then
      local c = cjson.decode(cur)
      if revive == '1' and c.state == 'dead' then
        write = true
      elseif c.source == source and (c.seq > seq or (c.seq == seq and c.rank > rank)) then
        write = false
      end
    end
    if write then
      redis.call('HSET', KEYS[k], field, ARGV[a + 4])
      wrote = true
    end
    a = a + 5
  end
  if wrote then redis.call('EXPIRE', KEYS[k], ttl) end
  if event ~= '' then
    redis.call('RPUSH', KEYS[k + 1], event)
    redis.call('LTRIM', KEYS[k + 1], -hmax, -1)
    redis.call('EXPIRE', KEYS[k + 1], ttl)
  end
end
return 1
"#;

/// Group state compare-and-set. KEYS: the state keys; ARGV[1] ttl seconds, then per key:
/// '1' if a value is expected ('0': absent expected), the expected value, the new value.
const GROUP_CAS_LUA: &str = r#"
local ttl = ARGV[1]
local out = {}
for i = 1, #KEYS do
  local a = 2 + (i - 1) * 3
  local cur = redis.call('GET', KEYS[i])
  local ok
  if ARGV[a] == '0' then ok = (cur == false) else ok = (cur == ARGV[a + 1]) end
  if ok then
    redis.call('SET', KEYS[i], ARGV[a + 2], 'EX', ttl)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"#;

/// Allocates `ARGV[1]` numbers from the counter `KEYS[1]` and returns the last one. The
/// counter never goes below Redis's clock in microseconds, so its numbers keep growing when
/// Redis comes back empty or from a replica that missed the last writes (≈ 1.8e15 today:
/// below 2^53, exact in Lua's doubles and in JSON). `%.0f`: Lua 5.1 prints other numbers
/// this large in exponent form.
const COUNTER_LUA: &str = r#"
local n = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local last = math.max(cur, now) + n
redis.call('SET', KEYS[1], string.format('%.0f', last))
return last
"#;

/// Extends pending idempotency keys: `PEXPIRE` only while the value is still `p`.
/// ARGV[1] milliseconds.
const RENEW_LUA: &str = r#"
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == 'p' then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
return 1
"#;

/// Objects recorded per script call.
const RECORDS_PER_CALL: usize = 200;

/// The longest a store call may take before the store counts as unavailable.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// An idempotency key's value while its change is being published, and once accepted.
const ID_PENDING: &str = "p";
const ID_ACCEPTED: &str = "1";

/// How long an idempotency key stays reserved while its change is being published: short,
/// so that a client's retry through another instance is accepted a few seconds after the
/// instance publishing it died; ingress renews it every [`PENDING_ID_RENEW`] meanwhile.
pub const PENDING_ID_TTL_SECS: u64 = 6;

/// How often ingress renews the reservations of the changes it is publishing.
pub const PENDING_ID_RENEW: Duration = Duration::from_secs(2);

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
    /// The last value of the `beat` key this process saw (0: none yet).
    last_beat: std::sync::atomic::AtomicI64,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

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
            last_beat: std::sync::atomic::AtomicI64::new(0),
        })
    }

    /// Connects and PINGs once (through the sentinels, if any): what is wrong, if anything
    /// (`lxbridge validate --connect`).
    pub async fn probe(config: &Config) -> Option<String> {
        let gauge = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("lx_store_endpoint", "probe"),
            &["endpoint", "via"],
        )
        .expect("a valid gauge");
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
            let ttl = self.retention.as_secs().max(1);
            let p = &self.prefix;
            let mut pipe = redis::pipe();
            // One script call per chunk: the call's fixed cost is paid once per chunk, and a
            // chunk is small enough not to hold Redis up.
            for chunk in records.chunks(RECORDS_PER_CALL) {
                let mut call = self.record_script.prepare_invoke();
                call.arg(self.history_max).arg(ttl);
                for r in chunk {
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
                    let event = match &r.event {
                        Some(e) => serde_json::to_string(e).expect("event serialises"),
                        None => String::new(),
                    };
                    call.arg(event)
                        .arg(if r.statuses.iter().any(|s| s.revive) {
                            "1"
                        } else {
                            "0"
                        })
                        .arg(
                            r.mark
                                .as_ref()
                                .map(|m| m.seq.to_string())
                                .unwrap_or_default(),
                        )
                        .arg(r.statuses.len());
                    for s in &r.statuses {
                        let json = serde_json::to_string(&StatusJson {
                            kind: &s.kind,
                            target: &s.target,
                            source: &s.source,
                            state: s.state,
                            attempts: s.attempts,
                            last_error: s.last_error.as_deref(),
                            updated_at: &now,
                            seq: s.seq,
                            rank: s.state.rank(),
                        })
                        .expect("status serialises");
                        call.arg(format!("{}\t{}", s.target, s.kind))
                            .arg(s.seq)
                            .arg(s.state.rank())
                            .arg(&s.source)
                            .arg(json);
                    }
                }
                pipe.invoke_script(&call).ignore();
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
                    .map(|(_, json)| serde_json::from_str(json).map_err(|_| parse("status", json)))
                    .collect::<Result<_, _>>()?,
                history: history
                    .iter()
                    .map(|json| serde_json::from_str(json).map_err(|_| parse("history", json)))
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
}
