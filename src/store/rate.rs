//! The rate of a REST target (docs/integrations.md "Rate"), as every store keeps it: a
//! sliding window of slots. A slot is taken when a request starts, scored with the time it
//! stops counting as in flight (`now + hold`, the request's longest); when its answer comes
//! back it is scored with that time instead. A slot counts while its score is within the
//! last window, so a new request starts only once fewer than `max` requests were answered
//! in the last window or are still out. A pause (from a `429`/`503` with `Retry-After`)
//! holds every request until it ends.
//!
//! [`Slots`] is that rule in memory (the embedded backend, one process); the Redis store
//! runs the same rule in Lua (`redis/scripts.rs`, `RATE_TAKE_LUA`) so every instance shares
//! it.

use std::collections::HashMap;

/// What a rate call asks: the target's `max` per `window_ms`, a request's longest `hold_ms`.
#[derive(Debug, Clone, Copy)]
pub struct RateAsk {
    pub max: u32,
    pub window_ms: u64,
    pub hold_ms: u64,
}

/// One target's slots and pause, in memory.
#[derive(Debug, Default)]
pub struct Slots {
    /// Slot → the time (Unix ms) it stops being in flight, or was answered.
    scores: HashMap<String, i64>,
    paused_until: i64,
}

impl Slots {
    /// Takes `slot` at `now` if the window has room: `None`; else the ms to wait.
    pub fn take(&mut self, slot: &str, ask: RateAsk, now: i64) -> Option<u64> {
        if self.paused_until > now {
            return Some((self.paused_until - now) as u64);
        }
        let window = ask.window_ms as i64;
        self.scores.retain(|_, score| *score > now - window);
        if self.scores.len() < ask.max as usize {
            self.scores
                .insert(slot.to_string(), now + ask.hold_ms as i64);
            return None;
        }
        let first = self.scores.values().copied().min().unwrap_or(now);
        Some(wait_for(first, window, now))
    }

    /// The slot's request was answered at `now`.
    pub fn done(&mut self, slot: &str, now: i64) {
        if let Some(score) = self.scores.get_mut(slot) {
            *score = now;
        }
    }

    /// Holds every request until `now + ms` (a longer pause set before stays).
    pub fn pause(&mut self, ms: u64, now: i64) {
        self.paused_until = self.paused_until.max(now + ms as i64);
    }
}

/// How long until the earliest slot (score `first`) leaves the window, at least 1 ms.
fn wait_for(first: i64, window: i64, now: i64) -> u64 {
    (first + window - now).max(1) as u64
}

/// The slots of every target of a process.
#[derive(Debug, Default)]
pub struct LocalRates {
    targets: std::sync::Mutex<HashMap<String, Slots>>,
}

impl LocalRates {
    pub fn with<T>(&self, target: &str, f: impl FnOnce(&mut Slots) -> T) -> T {
        let mut targets = self.targets.lock().expect("rate lock");
        f(targets.entry(target.to_string()).or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_PER_SECOND: RateAsk = RateAsk {
        max: 2,
        window_ms: 1000,
        hold_ms: 10_000,
    };

    #[test]
    fn a_slot_counts_from_its_answer_for_one_window() {
        let mut s = Slots::default();
        assert_eq!(s.take("a", TWO_PER_SECOND, 0), None);
        assert_eq!(s.take("b", TWO_PER_SECOND, 10), None);
        // Both in flight: the wait is until the first's hold would end, then a window.
        assert!(s.take("c", TWO_PER_SECOND, 20).is_some());
        s.done("a", 300);
        assert_eq!(s.take("c", TWO_PER_SECOND, 1200), Some(100));
        assert_eq!(s.take("c", TWO_PER_SECOND, 1300), None);
        s.pause(2000, 1300);
        s.done("b", 1300);
        assert_eq!(s.take("d", TWO_PER_SECOND, 2400), Some(900));
        assert_eq!(s.take("d", TWO_PER_SECOND, 3300), None);
    }
}
