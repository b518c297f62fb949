//! The retry policy: when the next automatic attempt happens, if ever.

use std::time::{Duration, SystemTime};

/// The maximum wait that a `Retry-After` header can impose.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The largest share of a delay that jitter may add.
const MAX_JITTER: f64 = 0.10;

/// Returns how long to wait before the next attempt, or `None` to give up.
///
/// `attempts_made` counts every attempt so far, this one included. The wait
/// is the schedule's entry for this retry, lengthened by `jitter` (a fraction
/// in `[0, 1)`, scaled to at most 10%) so that the retries of one outage do
/// not all fire in the same instant. A `Retry-After` from a `429` can only
/// lengthen the wait, and only up to one hour.
pub fn next_delay(
    schedule: &[Duration],
    attempts_made: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Option<Duration> {
    let index = usize::try_from(attempts_made).ok()?.checked_sub(1)?;
    let base = *schedule.get(index)?;
    let jittered = base.mul_f64(1.0 + MAX_JITTER * jitter.clamp(0.0, 0.999));
    Some(match retry_after {
        Some(requested) => jittered.max(requested.min(MAX_RETRY_AFTER)),
        None => jittered,
    })
}

/// Parses a `Retry-After` value: delay seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Returns a fraction in `[0, 1)` from the operating system's random source.
pub fn random_fraction() -> f64 {
    let mut bytes = [0u8; 4];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Vec<Duration> {
        vec![
            Duration::from_secs(10),
            Duration::from_secs(60),
            Duration::from_secs(300),
        ]
    }

    #[test]
    fn follows_schedule_then_gives_up() {
        let schedule = schedule();
        assert_eq!(
            next_delay(&schedule, 1, None, 0.0),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            next_delay(&schedule, 2, None, 0.0),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            next_delay(&schedule, 3, None, 0.0),
            Some(Duration::from_secs(300))
        );
        assert_eq!(next_delay(&schedule, 4, None, 0.0), None);
    }

    #[test]
    fn jitter_lengthens_by_at_most_ten_percent() {
        let schedule = schedule();
        let longest = next_delay(&schedule, 3, None, 0.9999).unwrap();
        assert!(longest >= Duration::from_secs(300));
        assert!(longest < Duration::from_secs(330));
    }

    #[test]
    fn retry_after_only_lengthens_and_is_capped() {
        let schedule = schedule();
        let short = Some(Duration::from_secs(2));
        assert_eq!(
            next_delay(&schedule, 1, short, 0.0),
            Some(Duration::from_secs(10))
        );
        let long = Some(Duration::from_secs(120));
        assert_eq!(
            next_delay(&schedule, 1, long, 0.0),
            Some(Duration::from_secs(120))
        );
        let huge = Some(Duration::from_secs(86_400));
        assert_eq!(next_delay(&schedule, 1, huge, 0.0), Some(MAX_RETRY_AFTER));
        assert_eq!(next_delay(&schedule, 4, long, 0.0), None);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(90)));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
