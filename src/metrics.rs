//! Prometheus metrics of the whole process, served at `/metrics`.
//!
//! One registry per process: counters are process-wide whatever the number
//! of services a test starts in it.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `2xx` to `5xx`, or `none` when no response arrived.
    pub status_class: &'static str,
    /// The error kind, or `none` on success.
    pub error_kind: &'static str,
    pub trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    pub events_accepted: Family<EventLabels, Counter>,
    pub deliveries_finished: Family<OutcomeLabels, Counter>,
    pub attempts: Family<AttemptLabels, Counter>,
    pub attempt_duration: Histogram,
    pub requests_in_flight: Gauge,
    pub store_duration: Family<OperationLabels, Histogram>,
    pub deliveries_due: Gauge,
    pub deliveries_scheduled: Gauge,
    pub oldest_due_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("citapro");
        let events_accepted = Family::<EventLabels, Counter>::default();
        registry.register(
            "events_accepted",
            "Events accepted from the producer, by event name",
            events_accepted.clone(),
        );
        let deliveries_finished = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "deliveries_finished",
            "Deliveries that reached a final state after an automatic attempt",
            deliveries_finished.clone(),
        );
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "attempts",
            "Delivery attempts, by response status class, error kind and trigger",
            attempts.clone(),
        );
        let attempt_duration = latency_histogram();
        registry.register(
            "attempt_duration_seconds",
            "Duration of delivery attempts",
            attempt_duration.clone(),
        );
        let requests_in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Delivery requests in flight in this process",
            requests_in_flight.clone(),
        );
        let store_duration =
            Family::<OperationLabels, Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "store_operation_duration_seconds",
            "Duration of store operations, by operation",
            store_duration.clone(),
        );
        let deliveries_due = Gauge::default();
        registry.register(
            "deliveries_due",
            "Pending deliveries whose next attempt is due, read at scrape time",
            deliveries_due.clone(),
        );
        let deliveries_scheduled = Gauge::default();
        registry.register(
            "deliveries_scheduled",
            "Pending deliveries waiting for a later retry or held by a worker, read at scrape time",
            deliveries_scheduled.clone(),
        );
        let oldest_due_age_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "oldest_due_age_seconds",
            "How long the oldest due delivery has been waiting, read at scrape time",
            oldest_due_age_seconds.clone(),
        );
        Metrics {
            registry,
            events_accepted,
            deliveries_finished,
            attempts,
            attempt_duration,
            requests_in_flight,
            store_duration,
            deliveries_due,
            deliveries_scheduled,
            oldest_due_age_seconds,
        }
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// Records the duration of a store operation.
    pub fn observe_store(&self, operation: &'static str, elapsed: Duration) {
        self.store_duration
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
    }
}

/// Returns the process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Names the class of an HTTP status for the attempts metric.
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "none",
    }
}
