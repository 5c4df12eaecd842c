//! lxbridge's AMQP headers, written and read back (their names are
//! [`crate::broker::header`]): what a waiting change carries (its attempt, first failure,
//! `alone`), and [`Dead`], the facts of a change in the DLQ, written by `fail` and `import`
//! and read by the DLQ listing and `export`.

use crate::broker::header;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;

pub(super) fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

pub(super) fn header_i64(props: &BasicProperties, name: &str) -> Option<i64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

fn header_str(props: &BasicProperties, name: &str) -> String {
    header_opt_str(props, name).unwrap_or_default()
}

pub(super) fn header_opt_str(props: &BasicProperties, name: &str) -> Option<String> {
    let value = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned());
    match value {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The attempt a consumed message is delivered as: 1, or what its retry step said.
pub(super) fn attempt(props: &BasicProperties) -> u32 {
    header_i64(props, header::ATTEMPT)
        .and_then(|a| u32::try_from(a).ok())
        .unwrap_or(1)
        .max(1)
}

/// When the message first failed, if it did.
pub(super) fn first_failed(props: &BasicProperties) -> Option<i64> {
    header_i64(props, header::FIRST_FAILED)
}

/// Whether its last failure took its whole batch down.
pub(super) fn alone(props: &BasicProperties) -> bool {
    props
        .headers()
        .as_ref()
        .is_some_and(|h| matches!(h.inner().get(header::ALONE), Some(AMQPValue::Boolean(true))))
}

/// The headers of a change waiting in a delivery queue or a retry step (the partition
/// header is the topology's to add).
pub(super) fn waiting(
    attempt: u32,
    first_failed_ms: Option<i64>,
    alone: bool,
    error: Option<&str>,
) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(error) = error {
        headers.insert(header::ERROR.into(), long_string(error));
    }
    headers.insert(
        header::ATTEMPT.into(),
        AMQPValue::LongLongInt(i64::from(attempt)),
    );
    if let Some(first) = first_failed_ms {
        headers.insert(header::FIRST_FAILED.into(), AMQPValue::LongLongInt(first));
    }
    if alone {
        headers.insert(header::ALONE.into(), AMQPValue::Boolean(true));
    }
    headers
}

/// What a change in the DLQ carries in its headers.
pub(super) struct Dead {
    pub source: String,
    pub kind: String,
    pub reference: String,
    /// The attempts made.
    pub attempts: u32,
    pub error: Option<String>,
    pub first_failed_ms: Option<i64>,
    /// When it died (`x-lx-last-failed`).
    pub dead_at_ms: i64,
}

impl Dead {
    /// Its headers; a missing first failure is written as the time it died.
    pub(super) fn headers(&self) -> FieldTable {
        let mut headers = FieldTable::default();
        if let Some(error) = &self.error {
            headers.insert(header::ERROR.into(), long_string(error));
        }
        let first = self.first_failed_ms.unwrap_or(self.dead_at_ms);
        headers.insert(header::FIRST_FAILED.into(), AMQPValue::LongLongInt(first));
        headers.insert(
            header::LAST_FAILED.into(),
            AMQPValue::LongLongInt(self.dead_at_ms),
        );
        headers.insert(
            header::ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(self.attempts)),
        );
        headers.insert(header::SOURCE.into(), long_string(&self.source));
        headers.insert(header::TYPE.into(), long_string(&self.kind));
        headers.insert(header::REF.into(), long_string(&self.reference));
        headers
    }

    /// Reads a DLQ message's facts (empty or 0 where a header is missing; the error is
    /// always there, empty if missing).
    pub(super) fn read(props: &BasicProperties) -> Dead {
        Dead {
            source: header_str(props, header::SOURCE),
            kind: header_str(props, header::TYPE),
            reference: header_str(props, header::REF),
            attempts: header_i64(props, header::ATTEMPTS)
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(0),
            error: Some(header_str(props, header::ERROR)),
            first_failed_ms: header_i64(props, header::FIRST_FAILED),
            dead_at_ms: header_i64(props, header::LAST_FAILED).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_facts_read_back_as_written() {
        let dead = Dead {
            source: "central".into(),
            kind: "Catalog.Items".into(),
            reference: "r-1".into(),
            attempts: 4,
            error: Some("INN is invalid".into()),
            first_failed_ms: Some(1_000),
            dead_at_ms: 2_000,
        };
        let props = BasicProperties::default().with_headers(dead.headers());
        let read = Dead::read(&props);
        assert_eq!(
            (read.source, read.kind, read.reference),
            ("central".into(), "Catalog.Items".into(), "r-1".into())
        );
        assert_eq!((read.attempts, read.dead_at_ms), (4, 2_000));
        assert_eq!(read.first_failed_ms, Some(1_000));
        assert_eq!(read.error.as_deref(), Some("INN is invalid"));
    }

    #[test]
    fn a_waiting_change_carries_its_attempt_and_failure() {
        let props = BasicProperties::default().with_headers(waiting(3, Some(5), true, None));
        assert_eq!(attempt(&props), 3);
        assert_eq!(first_failed(&props), Some(5));
        assert!(alone(&props));
        assert_eq!(attempt(&BasicProperties::default()), 1);
        assert!(!alone(&BasicProperties::default()));
    }
}
