//! Records that cross the store interface.

use bytes::Bytes;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::domain::catalogue::EventType;

/// A registered endpoint of one business.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: Uuid,
    pub business_id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub is_active: bool,
    pub secret: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Webhook {
    /// Tells whether the webhook subscribes to an event.
    pub fn subscribes_to(&self, event: &str) -> bool {
        self.events.iter().any(|name| name == event)
    }
}

/// New settings for an existing webhook.
#[derive(Debug, Clone)]
pub struct WebhookChange {
    pub business_id: Uuid,
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub is_active: bool,
    pub updated_at: i64,
}

/// Joins event names for the `webhooks.events` column.
pub(crate) fn join_events(events: &[String]) -> String {
    events.join(",")
}

/// Splits the `webhooks.events` column.
pub(crate) fn split_events(column: &str) -> Vec<String> {
    column
        .split(',')
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

/// An event reported by the producer, validated and ready to store.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: Uuid,
    pub business_id: Uuid,
    pub event: &'static EventType,
    pub aggregate_id: Uuid,
    pub occurred_on: String,
    pub data: Map<String, Value>,
    /// The payload, when it could be built without the stored state. When it
    /// is `None`, the store builds it from the aggregate's last stored state.
    pub payload: Option<Vec<u8>>,
    pub accepted_at: i64,
    /// When set, the new deliveries start leased to this worker, which sends
    /// them right away instead of waiting for a poll.
    pub lease: Option<Lease>,
}

impl NewEvent {
    /// Returns when the event's new deliveries fall due and who leases them:
    /// the lease's end and owner, or the acceptance time and no one.
    pub fn delivery_schedule(&self) -> (i64, Option<&str>) {
        match &self.lease {
            Some(lease) => (lease.until, Some(lease.owner.as_str())),
            None => (self.accepted_at, None),
        }
    }

    /// Creates the job of a new delivery's first automatic attempt.
    pub fn first_job(
        &self,
        delivery_id: Uuid,
        webhook_id: Uuid,
        url: String,
        secret: String,
        payload: Bytes,
        lease_until: i64,
    ) -> Job {
        Job {
            delivery_id,
            webhook_id,
            event_id: self.id,
            event: self.event.name.to_owned(),
            url,
            secret,
            payload,
            auto_attempts: 0,
            trigger: Trigger::Automatic,
            lease_until,
        }
    }
}

/// A lease on deliveries: who holds them and until when.
#[derive(Debug, Clone)]
pub struct Lease {
    pub owner: String,
    pub until: i64,
}

/// The result of accepting an event: its id and its new deliveries.
#[derive(Debug)]
pub struct AcceptedEvent {
    pub event_id: Uuid,
    /// The new deliveries. When the event came with a lease they are ready to send.
    pub jobs: Vec<Job>,
}

/// The cause of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Automatic,
    Manual,
    Test,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Automatic => "automatic",
            Trigger::Manual => "manual",
            Trigger::Test => "test",
        }
    }

    pub fn parse(text: &str) -> Option<Trigger> {
        match text {
            "automatic" => Some(Trigger::Automatic),
            "manual" => Some(Trigger::Manual),
            "test" => Some(Trigger::Test),
            _ => None,
        }
    }
}

/// The key of a delivery: the webhook it belongs to and its own id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    pub webhook_id: Uuid,
    pub delivery_id: Uuid,
}

/// A delivery ready to be attempted, with everything the attempt needs.
#[derive(Debug, Clone)]
pub struct Job {
    pub delivery_id: Uuid,
    pub webhook_id: Uuid,
    pub event_id: Uuid,
    pub event: String,
    pub url: String,
    pub secret: String,
    pub payload: Bytes,
    /// Automatic attempts made since the delivery was created or recovered,
    /// which picks the entry of the retry schedule.
    pub auto_attempts: u32,
    pub trigger: Trigger,
    /// When the lease on this delivery ends (automatic attempts only).
    pub lease_until: i64,
}

impl Job {
    pub fn key(&self) -> DeliveryKey {
        DeliveryKey {
            webhook_id: self.webhook_id,
            delivery_id: self.delivery_id,
        }
    }
}

/// A request to lease due deliveries.
#[derive(Debug, Clone)]
pub struct Claim {
    pub owner: String,
    pub now: i64,
    pub lease_until: i64,
    pub limit: usize,
    /// Deliveries of one webhook in this claim at most. The PostgreSQL
    /// store claims in due order across webhooks and does not apply it,
    /// nor `after_webhook`.
    pub per_webhook: usize,
    /// Webhooks whose deliveries are not claimed now.
    pub skip_webhooks: Vec<Uuid>,
    /// The webhook where the previous claim stopped. This claim starts at the
    /// next one, so webhooks take turns when due work exceeds `limit`.
    pub after_webhook: Option<Uuid>,
}

/// The kind of failure of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Timeout,
    Connect,
    Tls,
    DestinationNotAllowed,
    HttpStatus,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::DestinationNotAllowed => "destination_not_allowed",
            ErrorKind::HttpStatus => "http_status",
        }
    }
}

/// Delivery states.
pub mod status {
    pub const PENDING: &str = "pending";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
}

/// The outcome of one attempt, to record.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery_id: Uuid,
    pub webhook_id: Uuid,
    pub trigger: Trigger,
    /// The worker that held the lease, for automatic attempts.
    pub owner: Option<String>,
    pub started_at: i64,
    pub duration_ms: i64,
    pub status_code: Option<u16>,
    pub error_kind: Option<ErrorKind>,
    /// The first 4 KiB of the response body, as text.
    pub response_body: Option<String>,
    pub succeeded: bool,
    /// For a failed automatic attempt: when to retry, or `None` to give up.
    pub retry_at: Option<i64>,
}

/// The state a delivery moves to after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextState {
    pub status: &'static str,
    pub due_at: Option<i64>,
}

/// Decides a delivery's state after an attempt, from its state before.
///
/// A success always ends the delivery. A failed automatic attempt of a
/// pending delivery schedules the retry or gives up; a cancelled delivery
/// stays cancelled. A failed test ping ends its delivery as failed. A failed
/// manual attempt changes nothing.
pub fn next_state(
    current_status: &str,
    current_due: Option<i64>,
    attempt: &AttemptRecord,
) -> NextState {
    if attempt.succeeded {
        return NextState {
            status: status::SUCCEEDED,
            due_at: None,
        };
    }
    match (attempt.trigger, current_status) {
        (Trigger::Automatic, status::PENDING) => match attempt.retry_at {
            Some(at) => NextState {
                status: status::PENDING,
                due_at: Some(at),
            },
            None => NextState {
                status: status::FAILED,
                due_at: None,
            },
        },
        (Trigger::Test, status::PENDING) => NextState {
            status: status::FAILED,
            due_at: None,
        },
        _ => NextState {
            status: static_status(current_status),
            due_at: current_due,
        },
    }
}

fn static_status(text: &str) -> &'static str {
    match text {
        status::PENDING => status::PENDING,
        status::SUCCEEDED => status::SUCCEEDED,
        status::FAILED => status::FAILED,
        _ => status::CANCELLED,
    }
}

/// The scheduling columns of a delivery.
#[derive(Debug, Clone)]
pub struct DeliveryState {
    pub status: String,
    pub due_at: Option<i64>,
    pub attempt_count: i64,
    pub auto_attempts: i64,
    pub leased_by: Option<String>,
    pub next_attempt_at: Option<i64>,
}

/// Applies an attempt's outcome to a delivery's scheduling columns.
///
/// When another worker holds the lease (it took over an expired lease, or a
/// manual attempt ran beside an automatic one), a failure leaves that
/// worker's schedule alone.
pub fn apply_attempt(current: &DeliveryState, attempt: &AttemptRecord) -> DeliveryState {
    let held_by_other = current.leased_by.is_some() && current.leased_by != attempt.owner;
    let next = if held_by_other && !attempt.succeeded {
        NextState {
            status: static_status(&current.status),
            due_at: current.due_at,
        }
    } else {
        next_state(&current.status, current.due_at, attempt)
    };
    let leased_by = if next.due_at.is_some() && held_by_other {
        current.leased_by.clone()
    } else {
        None
    };
    let next_attempt_at = match (next.status, &leased_by) {
        (status::PENDING, Some(_)) => current.next_attempt_at,
        (status::PENDING, None) => next.due_at,
        _ => None,
    };
    DeliveryState {
        status: next.status.to_owned(),
        due_at: next.due_at,
        attempt_count: current.attempt_count + 1,
        auto_attempts: current.auto_attempts + i64::from(attempt.trigger == Trigger::Automatic),
        leased_by,
        next_attempt_at,
    }
}

/// A delivery as its history shows it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub event_id: Uuid,
    pub event: String,
    pub aggregate_id: String,
    pub status: String,
    pub attempt_count: i64,
    pub created_at: i64,
    pub last_attempt_at: Option<i64>,
    pub next_attempt_at: Option<i64>,
    pub last_status_code: Option<i64>,
}

/// One recorded attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub number: i64,
    pub trigger: String,
    pub started_at: i64,
    pub duration_ms: i64,
    pub status_code: Option<i64>,
    pub error_kind: Option<String>,
    pub response_body: Option<String>,
}

/// A delivery with the exact body sent and every attempt, oldest first.
#[derive(Debug, Clone)]
pub struct DeliveryDetail {
    pub delivery: Delivery,
    pub payload: Vec<u8>,
    pub attempts: Vec<Attempt>,
}

/// A page request of a webhook's deliveries, newest first.
#[derive(Debug, Clone)]
pub struct DeliveryQuery {
    pub business_id: Uuid,
    pub webhook_id: Uuid,
    pub status: Option<String>,
    pub event: Option<String>,
    /// Rows to return; the store fetches one more to tell whether a next page exists.
    pub limit: usize,
    /// The `(created_at, id)` of the last row of the previous page.
    pub after: Option<(i64, Uuid)>,
}

/// A request to requeue failed and cancelled deliveries created in a window.
#[derive(Debug, Clone)]
pub struct Recovery {
    pub business_id: Uuid,
    pub webhook_id: Uuid,
    pub since: i64,
    pub until: i64,
    pub dry_run: bool,
    pub now: i64,
}

/// The outcome of a recovery request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryOutcome {
    WebhookNotFound,
    WebhookInactive,
    Requeued(u64),
}

/// A `webhook.ping` delivery to create and send at once.
#[derive(Debug, Clone)]
pub struct TestDelivery {
    pub business_id: Uuid,
    pub webhook_id: Uuid,
    pub payload: Vec<u8>,
    pub now: i64,
}

/// News from the database that other processes caused, for the delivery workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSignal {
    /// Unleased deliveries may be due now.
    Due,
    /// A webhook was changed or deleted; `active` is false when its queued
    /// jobs must be dropped.
    WebhookChanged { webhook_id: Uuid, active: bool },
}

/// How many deliveries wait, for metrics.
#[derive(Debug, Clone, Default)]
pub struct QueueStats {
    /// Pending deliveries due now and not leased.
    pub due: u64,
    /// Pending deliveries due later: waiting for a retry, or leased.
    pub scheduled: u64,
    pub earliest_due_at: Option<i64>,
}

/// The largest time a UUID v7 can represent, in milliseconds (48 bits).
const V7_MAX_MILLIS: i64 = 0xffff_ffff_ffff;

/// Returns the time of a UUID v7 in microseconds: the milliseconds in its first
/// 48 bits, times 1000. A delivery's `created_at` is this time of its id, so
/// ordering deliveries by `(created_at, id)` orders them by id.
pub(crate) fn v7_micros(id: Uuid) -> i64 {
    ((id.as_u128() >> 80) as i64) * 1000
}

/// Returns the text of the smallest UUID v7 of the millisecond of `micros`.
/// Every v7 id generated earlier sorts below it, because the id's text
/// starts with the timestamp in fixed-width hexadecimal.
pub(crate) fn v7_floor(micros: i64) -> String {
    let millis = (micros.max(0) / 1000).min(V7_MAX_MILLIS) as u64;
    format!(
        "{:08x}-{:04x}-0000-0000-000000000000",
        millis >> 16,
        millis & 0xffff
    )
}

/// Returns the id range of the deliveries created in `[since, until)`. A
/// delivery's `created_at` is the millisecond of its v7 id in both stores,
/// so the range starts at the millisecond of `since` and ends before the
/// first millisecond at or after `until`. Queries still check `created_at`
/// for the exact window.
pub(crate) fn id_window(since: i64, until: i64) -> (String, String) {
    (v7_floor(since), v7_floor(until.saturating_add(999)))
}

/// Makes a UUID v7 of the given millisecond, with random bits after it.
#[cfg(test)]
pub(crate) fn v7_at(millis: u64) -> Uuid {
    Uuid::new_v7(uuid::Timestamp::from_unix_time(
        millis / 1000,
        (millis % 1000) as u32 * 1_000_000,
        0,
        0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_floor_orders_ids_by_time() {
        let micros = 1_780_000_000_123_456;
        let floor = v7_floor(micros);
        let millis = (micros / 1000) as u64;
        let at = |ms: u64| v7_at(ms).to_string();
        assert!(at(millis - 1) < floor);
        assert!(at(millis) >= floor);
        assert!(at(millis + 1) > floor);
        assert_eq!(v7_floor(-5), "00000000-0000-0000-0000-000000000000");
        assert_eq!(v7_floor(i64::MAX), "ffffffff-ffff-0000-0000-000000000000");
    }

    #[test]
    fn v7_micros_reads_id_millisecond() {
        let millis = 1_780_000_000_123u64;
        let id = v7_at(millis);
        assert_eq!(v7_micros(id), millis as i64 * 1000);
        let text = id.to_string();
        assert!(text >= v7_floor(v7_micros(id)));
        assert!(text < v7_floor(v7_micros(id) + 1000));
    }
}
