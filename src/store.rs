//! The store: every fact about an object an operator may ask for (state per target,
//! attempts, last error, history), idempotency keys, per-node sequence counters and the
//! per-target delivery marks that make supersede-by-order work. Holds no messages.
//!
//! [`Store`] is a trait so an embedded backend can replace Redis; [`RedisStore`] is the
//! production one. Key layout (all under `<prefix>:`), documented in ARCHITECTURE.md:
//! - `d:<node>:<id>`   idempotency key, an empty string (≈ 60 bytes + the key's length)
//! - `seq:<node>`      the node's sequence counter
//! - `o:{<ref>}`       hash: `<target>\t<type>` → status JSON
//! - `h:{<ref>}`       list of history events (JSON), bounded
//! - `m:<target>:<source>:{<ref>}:<type>` last delivered seq of that object from that
//!   source at that target
//!
//! The `{<ref>}` hash tag keeps an object's keys in one Redis Cluster slot, so the one Lua
//! script that records an event, its statuses and its delivery mark stays atomic.

use deadpool_redis::redis;
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
}

impl State {
    /// For the same change, a later state never gives way to an earlier one (a late
    /// `queued` write can't hide `delivered`).
    fn rank(self) -> u8 {
        match self {
            State::Queued => 0,
            State::Retrying => 1,
            State::Delivered | State::Dead | State::Superseded => 2,
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

/// The result of reserving idempotency keys and sequence numbers for one request.
#[derive(Debug)]
pub struct Admission {
    /// Per id given: true if it was not seen within the dedupe window.
    pub fresh: Vec<bool>,
    /// The first of the `seqs_needed` sequence numbers reserved (consecutive).
    pub first_seq: i64,
}

pub trait Store: Send + Sync + 'static {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
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
-- KEYS[1] status hash, KEYS[2] history list, KEYS[3] delivery mark (or a dummy)
-- ARGV[1] event json ('' = none), ARGV[2] history max, ARGV[3] ttl seconds,
-- ARGV[4] revive ('1': a status also replaces a `dead` one, whatever its seq),
-- ARGV[5] mark seq ('' = none), then per status: field, seq, rank, source, json
local ttl = ARGV[3]
if ARGV[5] ~= '' then
  local cur = tonumber(redis.call('GET', KEYS[3]) or '-9007199254740991')
  if cur < tonumber(ARGV[5]) then redis.call('SET', KEYS[3], ARGV[5], 'EX', ttl) end
end
local wrote = false
for i = 6, #ARGV, 5 do
  local seq, rank = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local write = true
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    local c = cjson.decode(cur)
    if ARGV[4] == '1' and c.state == 'dead' then
      write = true
    elseif c.source == ARGV[i + 3] and (c.seq > seq or (c.seq == seq and c.rank > rank)) then
      write = false
    end
  end
  if write then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 4])
    wrote = true
  end
end
if wrote then redis.call('EXPIRE', KEYS[1], ttl) end
if ARGV[1] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"#;

/// How long an idempotency key stays reserved while its change is being published.
const PENDING_ID_TTL_SECS: u64 = 300;

pub struct RedisStore {
    pool: deadpool_redis::Pool,
    prefix: String,
    dedupe_window: Duration,
    retention: Duration,
    history_max: usize,
    record_script: redis::Script,
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
    pub fn new(
        redis_url: &str,
        prefix: &str,
        dedupe_window: Duration,
        retention: Duration,
        history_max: usize,
    ) -> Result<RedisStore, StoreError> {
        let mut cfg = deadpool_redis::Config::from_url(redis_url);
        cfg.pool = Some(deadpool_redis::PoolConfig {
            max_size: 32,
            timeouts: deadpool_redis::Timeouts {
                wait: Some(Duration::from_secs(2)),
                create: Some(Duration::from_secs(2)),
                recycle: Some(Duration::from_secs(2)),
            },
            ..Default::default()
        });
        let pool = cfg
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|e| {
                StoreError::Unavailable(format!("bad store.redis_url {redis_url:?}: {e}"))
            })?;
        Ok(RedisStore {
            pool,
            prefix: prefix.to_string(),
            dedupe_window,
            retention,
            history_max,
            record_script: redis::Script::new(RECORD_LUA),
        })
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, StoreError> {
        self.pool.get().await.map_err(unavailable)
    }

    fn mark_key(&self, target: &str, k: MarkKey<'_>) -> String {
        format!(
            "{}:m:{target}:{}:{{{}}}:{}",
            self.prefix, k.source, k.reference, k.kind
        )
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
                    .map_err(unavailable)?;
                pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
            }
            Err(e) => Err(unavailable(e)),
        }
    }
}

impl Store for RedisStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn admit<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
        seqs_needed: usize,
    ) -> BoxFuture<'a, Result<Admission, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let mut pipe = redis::pipe();
            for id in ids {
                pipe.cmd("SET")
                    .arg(self.id_key(node, id))
                    .arg("")
                    .arg("NX")
                    .arg("EX")
                    .arg(PENDING_ID_TTL_SECS);
            }
            pipe.cmd("INCRBY")
                .arg(format!("{}:seq:{node}", self.prefix))
                .arg(seqs_needed);
            let replies: Vec<redis::Value> =
                pipe.query_async(&mut conn).await.map_err(unavailable)?;
            if replies.len() != ids.len() + 1 {
                return Err(StoreError::Protocol(format!(
                    "admit: {} replies for {} commands",
                    replies.len(),
                    ids.len() + 1
                )));
            }
            let fresh = replies[..ids.len()]
                .iter()
                .map(|v| !matches!(v, redis::Value::Nil))
                .collect();
            let last: i64 = redis::from_redis_value(&replies[ids.len()])
                .map_err(|e| StoreError::Protocol(e.to_string()))?;
            Ok(Admission {
                fresh,
                first_seq: last - seqs_needed as i64 + 1,
            })
        })
    }

    fn commit_ids<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(());
            }
            let mut conn = self.conn().await?;
            let mut pipe = redis::pipe();
            let secs = self.dedupe_window.as_secs().max(1);
            for id in ids {
                pipe.cmd("EXPIRE")
                    .arg(self.id_key(node, id))
                    .arg(secs)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
        })
    }

    fn release_ids<'a>(
        &'a self,
        node: &'a str,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(());
            }
            let mut conn = self.conn().await?;
            let mut cmd = redis::cmd("DEL");
            for id in ids {
                cmd.arg(self.id_key(node, id));
            }
            cmd.query_async::<()>(&mut conn).await.map_err(unavailable)
        })
    }

    fn record(&self, records: Vec<Record>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if records.is_empty() {
                return Ok(());
            }
            let now = rfc3339_now();
            let ttl = self.retention.as_secs().max(1);
            let p = &self.prefix;
            let mut pipe = redis::pipe();
            for r in &records {
                let event = match &r.event {
                    Some(e) => serde_json::to_string(e).expect("event serialises"),
                    None => String::new(),
                };
                let mut invocation = self.record_script.key(format!("{p}:o:{{{}}}", r.reference));
                invocation.key(format!("{p}:h:{{{}}}", r.reference));
                match &r.mark {
                    Some(m) => invocation.key(self.mark_key(
                        &m.target,
                        MarkKey {
                            source: &m.source,
                            kind: &m.kind,
                            reference: &r.reference,
                        },
                    )),
                    None => invocation.key(format!("{p}:m:-:{{{}}}", r.reference)),
                };
                invocation
                    .arg(event)
                    .arg(self.history_max)
                    .arg(ttl)
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
                    );
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
                    invocation
                        .arg(format!("{}\t{}", s.target, s.kind))
                        .arg(s.seq)
                        .arg(s.state.rank())
                        .arg(&s.source)
                        .arg(json);
                }
                pipe.invoke_script(&invocation).ignore();
            }
            self.run_scripts(&pipe).await
        })
    }

    fn marks<'a>(
        &'a self,
        target: &'a str,
        keys: &'a [MarkKey<'a>],
    ) -> BoxFuture<'a, Result<Vec<Option<i64>>, StoreError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let mut conn = self.conn().await?;
            let mut cmd = redis::cmd("MGET");
            for k in keys {
                cmd.arg(self.mark_key(target, *k));
            }
            cmd.query_async(&mut conn).await.map_err(unavailable)
        })
    }

    fn object<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<ObjectView>, StoreError>> {
        Box::pin(async move {
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
                .map_err(unavailable)?;
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
            view.targets
                .sort_by(|a, b| (&a.target, &a.kind).cmp(&(&b.target, &b.kind)));
            // Events are written by different processes; order them by time (stable).
            // Within one millisecond, `accepted` comes first.
            view.history.sort_by(|a, b| {
                (&a.at, a.event != "accepted").cmp(&(&b.at, b.event != "accepted"))
            });
            Ok(Some(view))
        })
    }
}
