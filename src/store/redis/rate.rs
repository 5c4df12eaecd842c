//! A REST target's rate on Redis (`store::rate` has the rule): `<prefix>:rate:<target>`,
//! a sorted set of slots, and `<prefix>:pause:<target>`, set while a `Retry-After` holds
//! the target. Both expire on their own.

use super::scripts::{RATE_DONE_LUA, RATE_PAUSE_LUA, RATE_TAKE_LUA};
use super::RedisStore;
use crate::store::{RateAsk, StoreError};

/// The three rate scripts, loaded once.
pub(super) struct RateScripts {
    take: redis::Script,
    done: redis::Script,
    pause: redis::Script,
}

impl RateScripts {
    pub(super) fn new() -> RateScripts {
        RateScripts {
            take: redis::Script::new(RATE_TAKE_LUA),
            done: redis::Script::new(RATE_DONE_LUA),
            pause: redis::Script::new(RATE_PAUSE_LUA),
        }
    }
}

impl RedisStore {
    fn rate_key(&self, target: &str) -> String {
        format!("{}:rate:{target}", self.prefix)
    }

    fn pause_key(&self, target: &str) -> String {
        format!("{}:pause:{target}", self.prefix)
    }

    pub(super) async fn take_slot(
        &self,
        target: &str,
        slot: &str,
        ask: RateAsk,
    ) -> Result<Option<u64>, StoreError> {
        let mut conn = self.conn().await?;
        let wait: i64 = self
            .rate_scripts
            .take
            .key(self.rate_key(target))
            .key(self.pause_key(target))
            .arg(ask.max)
            .arg(ask.window_ms)
            .arg(ask.hold_ms)
            .arg(slot)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok((wait >= 0).then_some(wait as u64))
    }

    pub(super) async fn slot_done(&self, target: &str, slot: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = self
            .rate_scripts
            .done
            .key(self.rate_key(target))
            .arg(slot)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    pub(super) async fn pause_target(&self, target: &str, ms: u64) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = self
            .rate_scripts
            .pause
            .key(self.pause_key(target))
            .arg(ms.max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }
}
