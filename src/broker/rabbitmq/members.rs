//! Which lxbridge instances are running, as they announce themselves on
//! `<prefix>.instances`, and which of them delivers each partition of a push target. Pure:
//! the consuming side tells it what it heard and asks it who owns what.
//!
//! The share-out only spreads the work: that one object is delivered by one instance at a
//! time is the broker's doing (each partition has a single active consumer), so two
//! instances that briefly disagree about the members never deliver one partition together.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often an instance announces itself.
pub(super) const BEAT: Duration = Duration::from_secs(1);
/// An instance not heard for this long is taken for gone and its partitions are shared out
/// among the others (an instance that stops cleanly says so at once).
pub(super) const EXPIRY: Duration = Duration::from_secs(4);

/// The instances heard from, and when.
#[derive(Default)]
pub(super) struct Members {
    seen: HashMap<String, Instant>,
}

impl Members {
    /// Records an announcement; true when the instance is new (or was taken for gone).
    pub(super) fn saw(&mut self, id: &str, at: Instant) -> bool {
        let fresh = self
            .seen
            .get(id)
            .is_none_or(|last| at.duration_since(*last) > EXPIRY);
        self.seen.insert(id.to_string(), at);
        fresh
    }

    /// An instance said it is stopping.
    pub(super) fn left(&mut self, id: &str) {
        self.seen.remove(id);
    }

    /// The instances alive at `now`, `me` always among them, sorted (every instance sorts
    /// the same set the same way, so they agree on the share-out).
    pub(super) fn live(&mut self, me: &str, now: Instant) -> Vec<String> {
        self.seen
            .retain(|_, last| now.saturating_duration_since(*last) <= EXPIRY);
        let mut live: Vec<String> = self.seen.keys().cloned().collect();
        if !live.iter().any(|id| id == me) {
            live.push(me.to_string());
        }
        live.sort();
        live
    }
}

/// The instance that delivers partition `partition` of the push target at `target_index`
/// (its place among the push targets): the partitions go round the sorted instances, each
/// target starting one further on, so every instance gets an even share of every target.
pub(super) fn owner(live: &[String], target_index: usize, partition: u16) -> &str {
    &live[(target_index + usize::from(partition)) % live.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_instance_gets_an_even_share_of_each_target() {
        let live = ids(&["a", "b"]);
        for target in 0..3 {
            let owners: Vec<&str> = (0..4).map(|p| owner(&live, target, p)).collect();
            assert_eq!(
                owners.iter().filter(|o| **o == "a").count(),
                2,
                "{owners:?}"
            );
            assert_eq!(
                owners.iter().filter(|o| **o == "b").count(),
                2,
                "{owners:?}"
            );
        }
        let live = ids(&["a", "b", "c"]);
        let owners: Vec<&str> = (0..4).map(|p| owner(&live, 0, p)).collect();
        assert_eq!(owners, ["a", "b", "c", "a"]);
        // A lone instance owns everything.
        assert!((0..8).all(|p| owner(&ids(&["x"]), 5, p) == "x"));
    }

    #[test]
    fn an_instance_not_heard_for_the_expiry_is_gone() {
        let start = Instant::now();
        let mut m = Members::default();
        assert!(m.saw("b", start));
        assert!(!m.saw("b", start + BEAT));
        assert_eq!(m.live("a", start + BEAT), ids(&["a", "b"]));
        assert_eq!(m.live("a", start + BEAT + EXPIRY + BEAT), ids(&["a"]));
        assert!(
            m.saw("b", start + BEAT * 10),
            "back after being gone: new again"
        );
        m.left("b");
        assert_eq!(m.live("a", start + BEAT * 10), ids(&["a"]));
    }
}
