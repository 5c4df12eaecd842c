//! [`Duration`]: how the config writes a length of time (`250ms`, `10s`, `5m`, `24h`, `7d`).

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::time::Duration as StdDuration;

/// A duration written as a number with a unit: `250ms`, `10s`, `5m`, `24h`, `7d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Duration(StdDuration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Duration(StdDuration::from_millis(ms))
    }
}

impl std::str::FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration {s:?} has no unit (use ms, s, m, h or d)"))?;
        let (number, unit) = s.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("duration {s:?} does not start with a whole number"))?;
        let ms = match unit {
            "ms" => n,
            "s" => n * 1_000,
            "m" => n * 60_000,
            "h" => n * 3_600_000,
            "d" => n * 86_400_000,
            _ => {
                return Err(format!(
                    "duration {s:?} has unknown unit {unit:?} (use ms, s, m, h or d)"
                ))
            }
        };
        Ok(Duration::from_millis(ms))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        for (text, ms) in [
            ("250ms", 250),
            ("10s", 10_000),
            ("5m", 300_000),
            ("24h", 86_400_000),
            ("7d", 604_800_000),
        ] {
            assert_eq!(
                text.parse::<Duration>().unwrap(),
                Duration::from_millis(ms),
                "{text}"
            );
        }
        for bad in ["10", "s", "10x", "-1s", ""] {
            assert!(bad.parse::<Duration>().is_err(), "{bad} should not parse");
        }
    }
}
