//! The content hashes of CommerceML uploads on Redis: one hash per source,
//! `<prefix>:cml:<source>`, field `<type>\u{1f}<ref>` → the hash of the content the object
//! had when last accepted. No expiry: the set is bounded by the objects the source has, and
//! `Store::forget_content_hashes` drops it whole. A Redis that comes back empty
//! forgets them, so the next upload is delivered in full (harmless: at-least-once).

use super::RedisStore;
use crate::store::StoreError;

/// Between type and ref in a field: a character neither a 1C type name nor a ref holds.
const FIELD_SEPARATOR: char = '\u{1f}';

fn field(kind: &str, reference: &str) -> String {
    format!("{kind}{FIELD_SEPARATOR}{reference}")
}

impl RedisStore {
    fn content_key(&self, source: &str) -> String {
        format!("{}:cml:{source}", self.prefix)
    }

    /// One HMGET for all `keys` (none for an empty slice).
    pub(super) async fn read_hashes(
        &self,
        source: &str,
        keys: &[(&str, &str)],
    ) -> Result<Vec<Option<String>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.content_key(source));
        for (kind, reference) in keys {
            cmd.arg(field(kind, reference));
        }
        let hashes: Vec<Option<String>> = cmd
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        if hashes.len() != keys.len() {
            return Err(StoreError::Protocol(format!(
                "HMGET: {} values for {} fields",
                hashes.len(),
                keys.len()
            )));
        }
        Ok(hashes)
    }

    /// One HSET for all `entries` (none for an empty slice).
    pub(super) async fn write_hashes(
        &self,
        source: &str,
        entries: &[(&str, &str, &str)],
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let mut cmd = redis::cmd("HSET");
        cmd.arg(self.content_key(source));
        for (kind, reference, hash) in entries {
            cmd.arg(field(kind, reference)).arg(*hash);
        }
        cmd.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.failed(e))
    }

    /// HLEN then DEL of the source's hash, in one MULTI: how many fields went.
    pub(super) async fn forget_hashes(&self, source: &str) -> Result<u64, StoreError> {
        let key = self.content_key(source);
        let mut conn = self.conn().await?;
        let (forgotten,): (u64,) = redis::pipe()
            .atomic()
            .cmd("HLEN")
            .arg(&key)
            .cmd("DEL")
            .arg(&key)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(forgotten)
    }
}
