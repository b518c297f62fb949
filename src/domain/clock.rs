//! Time formats of the wire contract. Every time is UTC.
//!
//! The store keeps instants as microseconds since the Unix epoch.

use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::FormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

/// `occurred_on` in payloads: `YYYY-MM-DD HH:MM:SS`.
const OCCURRED_ON: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");

/// Times in API responses: RFC 3339 with milliseconds, in UTC.
const RFC3339_MILLIS: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Returns the current time in microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the system clock is after 1970");
    elapsed.as_micros() as i64
}

fn to_datetime(micros: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Formats an instant as an `occurred_on` value.
pub fn format_occurred_on(micros: i64) -> String {
    to_datetime(micros)
        .format(OCCURRED_ON)
        .expect("the occurred_on format has only numeric parts")
}

/// Tells whether `text` is a valid `occurred_on` value (a real calendar time).
pub fn is_valid_occurred_on(text: &str) -> bool {
    text.len() == 19 && PrimitiveDateTime::parse(text, OCCURRED_ON).is_ok()
}

/// Formats an instant as RFC 3339 UTC with milliseconds.
pub fn format_rfc3339(micros: i64) -> String {
    to_datetime(micros)
        .format(RFC3339_MILLIS)
        .expect("the RFC 3339 format has only numeric parts")
}

/// Parses an RFC 3339 time with any offset into microseconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let parsed =
        OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(parsed.unix_timestamp_nanos() / 1000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occurred_on_is_utc_seconds() {
        assert_eq!(
            format_occurred_on(1_772_721_000_123_456),
            "2026-03-05 14:30:00"
        );
    }

    #[test]
    fn occurred_on_validation_rejects_impossible_dates() {
        assert!(is_valid_occurred_on("2026-03-05 14:30:00"));
        assert!(!is_valid_occurred_on("2026-02-30 14:30:00"));
        assert!(!is_valid_occurred_on("2026-03-05T14:30:00"));
        assert!(!is_valid_occurred_on("2026-03-05 14:30"));
    }

    #[test]
    fn rfc3339_round_trips_to_milliseconds() {
        let micros = 1_772_721_000_123_456;
        let text = format_rfc3339(micros);
        assert_eq!(text, "2026-03-05T14:30:00.123Z");
        assert_eq!(parse_rfc3339(&text), Some(1_772_721_000_123_000));
    }
}
