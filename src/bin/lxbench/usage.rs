//! What a scenario cost, beside what it achieved: lxbridge's CPU per change (its process's
//! user + system seconds over the run), Redis's CPU per change (`INFO cpu`, before and
//! after) and the Redis memory each object kept after the run (`INFO memory`'s
//! `used_memory`, before and after, over the objects written). Redis is shared by nothing
//! else during a run here; on the embedded backend there is no Redis to ask.

use crate::bridge::process_usage;
use crate::{round3, Args};
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};

/// Readings at one moment: lxbridge's CPU seconds, Redis's CPU seconds and used bytes.
pub(crate) struct Reading {
    bridge_cpu: f64,
    redis: Option<(f64, i64)>,
}

/// Asks lxbridge (`pid`) and, on the RabbitMQ backend, Redis.
pub(crate) struct Usage {
    pid: u32,
    redis: Option<MultiplexedConnection>,
}

impl Usage {
    pub(crate) async fn new(args: &Args, pid: u32) -> Usage {
        let redis = match args.backend.as_str() {
            "embedded" => None,
            _ => match redis::Client::open(args.redis.as_str()) {
                Ok(client) => client.get_multiplexed_async_connection().await.ok(),
                Err(_) => None,
            },
        };
        Usage { pid, redis }
    }

    pub(crate) async fn read(&mut self) -> Reading {
        let bridge_cpu = process_usage(self.pid).1;
        let redis = match &mut self.redis {
            Some(conn) => redis_reading(conn).await,
            None => None,
        };
        Reading { bridge_cpu, redis }
    }

    /// The figures between `before` and `after` for `changes` changes that left `objects`
    /// objects in the store.
    pub(crate) fn figures(
        before: &Reading,
        after: &Reading,
        changes: usize,
        objects: usize,
    ) -> Value {
        let per = |secs: f64| round3(secs * 1e6 / changes.max(1) as f64);
        let mut out = json!({
            "cpu_us_per_change": per(after.bridge_cpu - before.bridge_cpu),
        });
        if let (Some((cpu0, mem0)), Some((cpu1, mem1))) = (before.redis, after.redis) {
            out["redis_cpu_us_per_change"] = json!(per(cpu1 - cpu0));
            out["redis_bytes_per_object"] = json!((mem1 - mem0) / objects.max(1) as i64);
        }
        out
    }
}

/// Redis's CPU seconds (user + system, main thread and children) and `used_memory`.
async fn redis_reading(conn: &mut MultiplexedConnection) -> Option<(f64, i64)> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .arg("memory")
        .query_async(conn)
        .await
        .ok()?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let cpu: f64 = ["used_cpu_sys", "used_cpu_user"]
        .iter()
        .filter_map(|f| field(f)?.parse::<f64>().ok())
        .sum();
    let memory = field("used_memory")?.parse().ok()?;
    Some((cpu, memory))
}
