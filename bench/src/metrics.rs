//! Figures computed from the driver's accept times and the receiver's arrivals.

use std::collections::HashMap;
use std::time::{Instant, SystemTime};

use serde_json::{Value, json};

use crate::driver::LoadResult;
use crate::receiver::{DeliveryRecord, Recording};
use crate::stats::{Summary, millis};

/// Converts KiB to MiB, rounded to 0.1 MiB.
pub fn mebibytes(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

/// Returns the signed microseconds from `from` to `to`.
pub fn signed_micros(from: Instant, to: Instant) -> i64 {
    if to >= from {
        (to - from).as_micros() as i64
    } else {
        -((from - to).as_micros() as i64)
    }
}

/// End-to-end figures of a full-speed or fixed-rate run.
pub struct FlowMetrics {
    pub delivered: u64,
    pub deliveries_per_s: f64,
    /// Accept to first arrival of each delivery, in microseconds.
    pub latencies_us: Vec<i64>,
    /// First attempts that arrived before the driver had the event's 202.
    pub before_accept: u64,
    /// The endpoint that held every request, if any.
    pub hanging_endpoint: Option<u16>,
    pub hanging_deliveries: u64,
    pub hanging_arrivals: u64,
}

impl FlowMetrics {
    /// Computes the figures of a run. Requests to the `hanging` endpoint
    /// count only if they arrived before `released_at`, when the receiver
    /// stopped holding them and later ones got an immediate response.
    pub fn compute(
        recording: &Recording,
        load: &LoadResult,
        hanging: Option<u16>,
        released_at: Instant,
    ) -> FlowMetrics {
        let mut metrics = FlowMetrics {
            delivered: 0,
            deliveries_per_s: 0.0,
            latencies_us: Vec::with_capacity(recording.deliveries.len()),
            before_accept: 0,
            hanging_endpoint: hanging,
            hanging_deliveries: 0,
            hanging_arrivals: 0,
        };
        let mut last_delivered = load.started;
        for record in recording.deliveries.values() {
            if hanging.is_some() && record.first.endpoint == hanging {
                if record.first.at < released_at {
                    metrics.hanging_deliveries += 1;
                    metrics.hanging_arrivals += u64::from(record.arrivals);
                }
                continue;
            }
            if let Some(delivered_at) = record.delivered_at {
                metrics.delivered += 1;
                last_delivered = last_delivered.max(delivered_at);
            }
            if let Some(latency) = accept_to_first(record, load) {
                metrics.before_accept += u64::from(latency < 0);
                metrics.latencies_us.push(latency);
            }
        }
        let seconds = (last_delivered - load.started).as_secs_f64();
        if seconds > 0.0 {
            metrics.deliveries_per_s = metrics.delivered as f64 / seconds;
        }
        metrics
    }

    pub fn latency_json(&self) -> Value {
        let mut latencies = self.latencies_us.clone();
        json!(Summary::of(&mut latencies).map(Summary::to_json))
    }

    pub fn hanging_json(&self) -> Value {
        json!({
            "endpoint": self.hanging_endpoint.map(|index| format!("/k{index}")),
            "deliveries_seen": self.hanging_deliveries,
            "requests_held": self.hanging_arrivals,
        })
    }
}

/// Returns microseconds from the event's 202 to the delivery's first
/// arrival, negative when the delivery arrived before the driver read the 202.
fn accept_to_first(record: &DeliveryRecord, load: &LoadResult) -> Option<i64> {
    let seq = record.first.seq? as usize;
    let accepted_at = (*load.accepted_at.get(seq)?)?;
    Some(signed_micros(accepted_at, record.first.at))
}

/// Drain rate and timing of a queue.
pub struct DrainMetrics {
    pub delivered: u64,
    /// Deliveries per second from the first to the last arrival.
    pub per_second: f64,
    pub start_to_first_ms: f64,
    pub start_to_last_s: f64,
}

impl DrainMetrics {
    /// Computes the drain figures relative to `start`, the moment the
    /// deliveries became due: the first `recover` call, or the first retry's
    /// due time.
    pub fn compute(recording: &Recording, start: Instant) -> DrainMetrics {
        let delivered: Vec<Instant> = recording
            .deliveries
            .values()
            .filter_map(|record| record.delivered_at)
            .collect();
        let first = delivered.iter().min().copied().unwrap_or(start);
        let last = delivered.iter().max().copied().unwrap_or(start);
        let span = (last - first).as_secs_f64();
        DrainMetrics {
            delivered: delivered.len() as u64,
            per_second: if span > 0.0 {
                delivered.len() as f64 / span
            } else {
                0.0
            },
            start_to_first_ms: millis(signed_micros(start, first)),
            start_to_last_s: (signed_micros(start, last) as f64 / 1e5).round() / 10.0,
        }
    }
}

/// Punctuality of the retries in backlog mode `retried`.
pub struct RetryMetrics {
    /// Arrival minus the delivery's `nextAttemptAt` as the service listed
    /// it, in microseconds. The listing has millisecond precision.
    pub lateness_us: Vec<i64>,
    /// Delivered deliveries that had no listed `nextAttemptAt`.
    pub without_due_time: u64,
    /// Seconds from the last retry falling due to the last delivery.
    pub catch_up_s: f64,
}

impl RetryMetrics {
    /// Compares each delivery's arrival with the due time the service
    /// listed for its retry.
    pub fn compute(recording: &Recording, due: &HashMap<u128, Instant>) -> RetryMetrics {
        let mut metrics = RetryMetrics {
            lateness_us: Vec::with_capacity(recording.deliveries.len()),
            without_due_time: 0,
            catch_up_s: 0.0,
        };
        let mut last_due = None;
        let mut last_delivered = None;
        for (delivery_id, record) in &recording.deliveries {
            let Some(delivered_at) = record.delivered_at else {
                continue;
            };
            last_delivered = last_delivered.max(Some(delivered_at));
            let Some(&due_at) = due.get(delivery_id) else {
                metrics.without_due_time += 1;
                continue;
            };
            last_due = last_due.max(Some(due_at));
            metrics
                .lateness_us
                .push(signed_micros(due_at, delivered_at));
        }
        if let (Some(last_due), Some(last_delivered)) = (last_due, last_delivered) {
            metrics.catch_up_s =
                (signed_micros(last_due, last_delivered) as f64 / 1e5).round() / 10.0;
        }
        metrics
    }

    pub fn p99_lateness_ms(&self) -> String {
        let mut lateness = self.lateness_us.clone();
        Summary::of(&mut lateness)
            .map(|summary| millis(summary.p99_us).to_string())
            .unwrap_or_else(|| "–".to_owned())
    }
}

/// Converts a wall-clock time to the monotonic clock of `anchor`, a pair of
/// readings taken at the same moment.
pub fn to_instant(time: SystemTime, anchor: (Instant, SystemTime)) -> Instant {
    let (instant, system) = anchor;
    match time.duration_since(system) {
        Ok(ahead) => instant + ahead,
        Err(behind) => instant - behind.duration(),
    }
}
