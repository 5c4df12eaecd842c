//! The wall clock as lxbridge writes it: milliseconds since the Unix epoch, and RFC 3339
//! UTC with exactly three fraction digits (so the strings sort by time). Every timestamp
//! lxbridge stores or answers with comes from here.

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Now, as RFC 3339 UTC with three fraction digits.
pub fn rfc3339_now() -> String {
    rfc3339_ms(unix_ms_now())
}

/// `ms` (since the Unix epoch) as RFC 3339 UTC with three fraction digits; out of range
/// gives the epoch.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_three_fraction_digits_and_sort_by_time() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_718_000_000_123), "2024-06-10T06:13:20.123Z");
        assert!(rfc3339_ms(999) < rfc3339_ms(1_000));
        assert!(unix_ms_now() > 1_700_000_000_000);
    }
}
