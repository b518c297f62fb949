//! Percentiles of latency samples.

use serde_json::{Value, json};

/// Percentiles of a set of samples in microseconds, reported in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: usize,
    pub min_us: i64,
    pub p50_us: i64,
    pub p99_us: i64,
    pub max_us: i64,
}

impl Summary {
    /// Sorts `samples` and computes nearest-rank percentiles. Returns `None`
    /// for an empty set.
    pub fn of(samples: &mut [i64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        Some(Summary {
            count: samples.len(),
            min_us: samples[0],
            p50_us: nearest_rank(samples, 50.0),
            p99_us: nearest_rank(samples, 99.0),
            max_us: samples[samples.len() - 1],
        })
    }

    pub fn to_json(self) -> Value {
        json!({
            "count": self.count,
            "min_ms": millis(self.min_us),
            "p50_ms": millis(self.p50_us),
            "p99_ms": millis(self.p99_us),
            "max_ms": millis(self.max_us),
        })
    }
}

/// Returns the nearest-rank percentile `p` (0 to 100) of sorted samples.
fn nearest_rank(sorted: &[i64], p: f64) -> i64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Converts microseconds to milliseconds rounded to 0.01 ms.
pub fn millis(micros: i64) -> f64 {
    (micros as f64 / 10.0).round() / 100.0
}

/// Rounds a rate to one decimal place for the report.
pub fn round_rate(rate: f64) -> f64 {
    (rate * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<i64> = (1..=100).rev().collect();
        let summary = Summary::of(&mut samples).unwrap();
        assert_eq!(summary.min_us, 1);
        assert_eq!(summary.p50_us, 50);
        assert_eq!(summary.p99_us, 99);
        assert_eq!(summary.max_us, 100);
    }

    #[test]
    fn single_sample_is_every_percentile() {
        let summary = Summary::of(&mut [7]).unwrap();
        assert_eq!(summary.p50_us, 7);
        assert_eq!(summary.p99_us, 7);
    }

    #[test]
    fn empty_set_has_no_summary() {
        assert!(Summary::of(&mut []).is_none());
    }
}
