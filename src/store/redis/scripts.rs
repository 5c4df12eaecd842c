//! The Lua scripts [`RedisStore`](super::RedisStore) runs in Redis, each atomic: recording
//! objects (status, history and delivery mark, the rules every backend keeps), the group
//! state compare-and-set, the floored counters (`seq:<node>`, `inbox:<target>`) and the
//! renewal of pending idempotency keys. Each one's KEYS and ARGV are documented beside it.

/// Records many objects in one call (up to `RECORDS_PER_CALL`): the status rules (a status
/// never goes backwards), the history list bounded by `history_max`, the delivery mark.
pub(super) const RECORD_LUA: &str = r#"
-- Records many objects in one call. Per object, KEYS holds three keys: its status hash,
-- its history list and a delivery mark (a dummy when there is none).
-- ARGV[1] history max, ARGV[2] ttl seconds, then per object:
--   event ('' = none), revive ('1': a status also replaces a `dead` one, whatever its
--   seq), mark seq ('' = none), number of statuses, then per status: field, seq, rank,
--   source, the status's value
local hmax, ttl = tonumber(ARGV[1]), ARGV[2]
-- A status as stored: `seq\trank\tstate\tsource\t…` (record.rs), or JSON (earlier versions).
local function current(cur)
  if string.sub(cur, 1, 1) == '{' then
    local c = cjson.decode(cur)
    return c.seq, c.rank, c.state, c.source
  end
  local s, r, st, src = string.match(cur, '^(%-?%d+)\t(%d+)\t(%a+)\t([^\t]*)')
  return tonumber(s), tonumber(r), st, src
end
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
      local cseq, crank, cstate, csource = current(cur)
      if revive == '1' and cstate == 'dead' then
        write = true
      elseif cseq and csource == source and (cseq > seq or (cseq == seq and crank > rank)) then
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

/// Group state compare-and-set. KEYS: the state keys; `ARGV[1]` ttl seconds, then per key:
/// '1' if a value is expected ('0': absent expected), the expected value, the new value.
pub(super) const GROUP_CAS_LUA: &str = r#"
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
pub(super) const COUNTER_LUA: &str = r#"
local n = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local last = math.max(cur, now) + n
redis.call('SET', KEYS[1], string.format('%.0f', last))
return last
"#;

/// Extends pending idempotency keys: `PEXPIRE` only while the value is still `p`.
/// `ARGV[1]` milliseconds.
pub(super) const RENEW_LUA: &str = r#"
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == 'p' then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
return 1
"#;

/// A REST target's rate, the rule of `store::rate`. KEYS[1] the slots (a sorted set,
/// slot → the time it stops counting as in flight, or was answered), KEYS[2] the pause.
/// ARGV: max, window ms, hold ms, slot. Returns -1 when the slot is taken, else the ms to
/// wait. Times are Redis's clock, the same for every instance.
pub(super) const RATE_TAKE_LUA: &str = r#"
local max, window, hold = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return paused end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < max then
  redis.call('ZADD', KEYS[1], now + hold, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], hold + window + 1000)
  return -1
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(tonumber(first[2]) + window - now, 1)
"#;

/// A rate slot answered: scored with Redis's clock now (if it is still there). KEYS[1] the
/// slots, ARGV[1] the slot.
pub(super) const RATE_DONE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
return 1
"#;

/// A pause of every request to a target: KEYS[1] set for ARGV[1] ms, unless a longer pause
/// is already set.
pub(super) const RATE_PAUSE_LUA: &str = r#"
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
return 1
"#;
