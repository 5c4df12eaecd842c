//! The delivery marks a process raised, kept in memory beside the store's ([`SeenMarks`]).

use crate::store::MarkKey;
use std::collections::HashMap;

/// The delivery marks a process raised for one target, kept in memory: after the store lost
/// its marks (Redis restarted empty, or an older replica took over), an older change coming
/// back from a retry step is still recognised as superseded by the newer one this process
/// delivered. The marks check uses the higher of the store's mark and this one. Bounded: at
/// most [`SeenMarks::MAX`] objects, forgotten all at once when full. It protects only what
/// this process delivered, so only while the same instance keeps serving the object.
#[derive(Default)]
pub struct SeenMarks {
    /// A hash of (source, type, ref) → the last seq the target confirmed. Hashed (SipHash,
    /// keyed per process) so a remembered object costs 16 bytes and no allocation; with
    /// 100,000 remembered, a new object shares a 64-bit hash with one of them with a chance
    /// of about 5 × 10^-15.
    marks: std::sync::Mutex<HashMap<u64, i64>>,
    keys: std::collections::hash_map::RandomState,
}

impl SeenMarks {
    /// Objects remembered at most.
    pub const MAX: usize = 100_000;

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, i64>> {
        // A panic while holding the lock can't leave the map inconsistent: use it as it is.
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, source: &str, kind: &str, reference: &str) -> u64 {
        use std::hash::BuildHasher;
        self.keys.hash_one((source, kind, reference))
    }

    /// Raises the mark of (source, type, ref) to `seq` (never lowers it).
    pub fn raise(&self, source: &str, kind: &str, reference: &str, seq: i64) {
        let key = self.key(source, kind, reference);
        let mut marks = self.lock();
        if let Some(m) = marks.get_mut(&key) {
            *m = (*m).max(seq);
            return;
        }
        if marks.len() >= Self::MAX {
            marks.clear();
        }
        marks.insert(key, seq);
    }

    /// The higher of `stored` (the store's mark) and the one remembered, per key.
    pub fn merge(&self, keys: &[MarkKey<'_>], stored: Vec<Option<i64>>) -> Vec<Option<i64>> {
        let hashed: Vec<u64> = keys
            .iter()
            .map(|k| self.key(k.source, k.kind, k.reference))
            .collect();
        let marks = self.lock();
        if marks.is_empty() {
            return stored;
        }
        hashed
            .iter()
            .zip(stored)
            .map(|(k, s)| match (s, marks.get(k).copied()) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            })
            .collect()
    }

    /// Objects remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_marks_raise_only_merge_the_higher_and_stay_bounded() {
        let seen = SeenMarks::default();
        let key = |reference| MarkKey {
            source: "central",
            kind: "Catalog.X",
            reference,
        };
        let keys = [key("a"), key("b"), key("c")];
        // Nothing remembered: the store's marks as they are.
        assert_eq!(
            seen.merge(&keys, vec![Some(5), None, None]),
            [Some(5), None, None]
        );
        seen.raise("central", "Catalog.X", "a", 7);
        seen.raise("central", "Catalog.X", "a", 3); // never lowered
        seen.raise("central", "Catalog.X", "b", 9);
        seen.raise("shop", "Catalog.X", "c", 9); // another source: another object
        assert_eq!(
            seen.merge(&keys, vec![Some(5), Some(12), None]),
            [Some(7), Some(12), None],
            "the higher of store and memory; the store lost a's mark, not c's"
        );
        assert_eq!(
            seen.merge(&keys, vec![None, None, None]),
            [Some(7), Some(9), None]
        );
        // Bounded: full, it forgets everything before remembering more.
        for i in 0..SeenMarks::MAX {
            seen.raise("central", "Catalog.Y", &i.to_string(), 1);
        }
        assert!(seen.len() <= SeenMarks::MAX);
        assert_eq!(seen.merge(&keys[..1], vec![None]), [None]);
    }
}
