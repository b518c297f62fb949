//! The load driver: POSTs `booking.updated` events with a fixed number in
//! flight or at a fixed rate, and records when each one was accepted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::receiver::SEQUENCE_FIELD;

/// Deadline of one driver request. A request that takes longer counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Destination of the driver's requests.
#[derive(Clone)]
pub enum Target {
    /// The service's `POST /v1/events`, which returns `202`.
    Producer { url: String, token: String },
    /// The receiver itself, for the ceiling measurement. Any 2xx status counts as success.
    Raw { url: String },
}

/// How many events to send and how fast.
#[derive(Debug, Clone, Copy)]
pub struct LoadPlan {
    pub events: u64,
    /// Requests in flight at once, or the cap on requests in flight when `rate` is set.
    pub concurrency: usize,
    /// Events per second, or `None` to send as fast as `concurrency` allows.
    pub rate: Option<f64>,
    /// No request starts later than this after the first one.
    pub send_window: Duration,
}

/// Builds producer request bodies of a fixed size.
#[derive(Clone)]
pub struct BodyFactory {
    business_id: Uuid,
    aggregate_base: u128,
    target_bytes: usize,
}

const DATA_FIELDS: &str = r#""startTime":"2026-03-10 10:00:00","endTime":"2026-03-10 11:00:00","status":"confirmed","amount":75.0,"clientId":"bench-client","locationId":"bench-location","serviceId":"bench-service""#;
const PREVIOUS: &str = r#""previous":{"startTime":"2026-03-10 10:00:00","endTime":"2026-03-10 11:00:00","status":"pending","amount":50.0,"clientId":"bench-client","locationId":"bench-location","serviceId":"bench-service"}"#;

impl BodyFactory {
    /// Bodies are padded to `target_bytes`, or kept at their minimum size
    /// (about 550 bytes) when the target is smaller.
    pub fn new(business_id: Uuid, target_bytes: usize) -> BodyFactory {
        BodyFactory {
            business_id,
            aggregate_base: Uuid::new_v4().as_u128(),
            target_bytes,
        }
    }

    /// Builds the body of event `seq`: a `booking.updated` of its own
    /// booking, with `previous` so that the service needs no stored state,
    /// the sequence number first in `data` and an untracked padding field.
    pub fn body(&self, seq: u64) -> Bytes {
        let aggregate_id = Uuid::from_u128(self.aggregate_base ^ u128::from(seq));
        let head = format!(
            r#"{{"event":"booking.updated","business_account_id":"{}","aggregate_id":"{aggregate_id}","occurred_on":"2026-03-05 14:30:00","data":{{"{SEQUENCE_FIELD}":{seq},{DATA_FIELDS},"bench_pad":""#,
            self.business_id
        );
        let tail = format!(r#""}},{PREVIOUS}}}"#);
        let padding = self.target_bytes.saturating_sub(head.len() + tail.len());
        let mut body = String::with_capacity(head.len() + padding + tail.len());
        body.push_str(&head);
        body.extend(std::iter::repeat_n('x', padding));
        body.push_str(&tail);
        Bytes::from(body)
    }
}

/// Measurements of one load phase.
pub struct LoadResult {
    pub started: Instant,
    /// When the last response arrived.
    pub finished: Instant,
    pub sent: u64,
    /// Time each event was accepted, indexed by sequence number.
    pub accepted_at: Vec<Option<Instant>>,
    pub accepted: u64,
    /// Request durations of accepted events, in microseconds.
    pub latencies_us: Vec<i64>,
    pub failures: u64,
    pub first_failure: Option<String>,
    /// Sum of the `deliveries` counts in the service's `202` responses.
    pub deliveries_reported: u64,
}

impl LoadResult {
    /// Accepted requests per second over the load phase.
    pub fn accepted_per_second(&self) -> f64 {
        let seconds = (self.finished - self.started).as_secs_f64();
        if seconds > 0.0 {
            self.accepted as f64 / seconds
        } else {
            0.0
        }
    }
}

struct Outcome {
    seq: u64,
    sent_at: Instant,
    done_at: Instant,
    result: Result<u64, String>,
}

/// Builds the driver's HTTP client: HTTP/1.1, kept-alive connections, no proxy.
pub fn client(concurrency: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .no_proxy()
        .build()?)
}

/// Sends `plan.events` events to `target` and waits for every response.
pub async fn run(
    client: &reqwest::Client,
    target: &Target,
    bodies: &BodyFactory,
    plan: LoadPlan,
) -> LoadResult {
    let started = Instant::now();
    let outcomes = match plan.rate {
        None => run_closed_loop(client, target, bodies, plan, started).await,
        Some(rate) => run_fixed_rate(client, target, bodies, plan, rate, started).await,
    };
    collect(outcomes, plan.events, started)
}

async fn run_closed_loop(
    client: &reqwest::Client,
    target: &Target,
    bodies: &BodyFactory,
    plan: LoadPlan,
    started: Instant,
) -> Vec<Outcome> {
    let next = Arc::new(AtomicU64::new(0));
    let stop_at = started + plan.send_window;
    let mut workers = JoinSet::new();
    for _ in 0..plan.concurrency.max(1) {
        let (client, target, bodies, next) =
            (client.clone(), target.clone(), bodies.clone(), next.clone());
        workers.spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                if Instant::now() >= stop_at {
                    break;
                }
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= plan.events {
                    break;
                }
                outcomes.push(send(&client, &target, bodies.body(seq), seq).await);
            }
            outcomes
        });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = workers.join_next().await {
        outcomes.extend(joined.expect("a driver task panicked"));
    }
    outcomes
}

async fn run_fixed_rate(
    client: &reqwest::Client,
    target: &Target,
    bodies: &BodyFactory,
    plan: LoadPlan,
    rate: f64,
    started: Instant,
) -> Vec<Outcome> {
    let in_flight = Arc::new(Semaphore::new(plan.concurrency.max(1)));
    let mut requests = JoinSet::new();
    let mut outcomes = Vec::new();
    for seq in 0..plan.events {
        let due = started + Duration::from_secs_f64(seq as f64 / rate);
        if due - started >= plan.send_window {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        // When `concurrency` requests are still open, the next one waits,
        // and the achieved rate falls below `rate`.
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (client, target, body) = (client.clone(), target.clone(), bodies.body(seq));
        requests.spawn(async move {
            let outcome = send(&client, &target, body, seq).await;
            drop(permit);
            outcome
        });
        while let Some(joined) = requests.try_join_next() {
            outcomes.push(joined.expect("a driver task panicked"));
        }
    }
    while let Some(joined) = requests.join_next().await {
        outcomes.push(joined.expect("a driver task panicked"));
    }
    outcomes
}

async fn send(client: &reqwest::Client, target: &Target, body: Bytes, seq: u64) -> Outcome {
    let sent_at = Instant::now();
    let result = match target {
        Target::Producer { url, token } => {
            let request = client
                .post(url)
                .header(AUTHORIZATION, format!("Bearer {token}"))
                .header(CONTENT_TYPE, "application/json")
                .body(body);
            producer_request(request).await
        }
        Target::Raw { url } => {
            let request = client
                .post(url)
                .header(CONTENT_TYPE, "application/json")
                .body(body);
            raw_request(request).await
        }
    };
    Outcome {
        seq,
        sent_at,
        done_at: Instant::now(),
        result,
    }
}

/// Sends one event; returns the number of deliveries the service created.
async fn producer_request(request: reqwest::RequestBuilder) -> Result<u64, String> {
    let response = request.send().await.map_err(|error| error.to_string())?;
    let status = response.status();
    let body = response.bytes().await.map_err(|error| error.to_string())?;
    if status != reqwest::StatusCode::ACCEPTED {
        return Err(format!(
            "POST /v1/events returned {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let parsed: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|error| format!("the 202 body is not JSON ({error})"))?;
    parsed["deliveries"]
        .as_u64()
        .ok_or_else(|| format!("the 202 body has no deliveries count: {parsed}"))
}

async fn raw_request(request: reqwest::RequestBuilder) -> Result<u64, String> {
    let response = request.send().await.map_err(|error| error.to_string())?;
    let status = response.status();
    // Reading the body to its end returns the connection to the pool.
    response.bytes().await.map_err(|error| error.to_string())?;
    if status.is_success() {
        Ok(1)
    } else {
        Err(format!("the receiver returned {status}"))
    }
}

fn collect(outcomes: Vec<Outcome>, events: u64, started: Instant) -> LoadResult {
    let mut result = LoadResult {
        started,
        finished: started,
        sent: outcomes.len() as u64,
        accepted_at: vec![None; events as usize],
        accepted: 0,
        latencies_us: Vec::with_capacity(outcomes.len()),
        failures: 0,
        first_failure: None,
        deliveries_reported: 0,
    };
    for outcome in outcomes {
        result.finished = result.finished.max(outcome.done_at);
        match outcome.result {
            Ok(deliveries) => {
                result.accepted += 1;
                result.deliveries_reported += deliveries;
                result.accepted_at[outcome.seq as usize] = Some(outcome.done_at);
                let latency = outcome.done_at - outcome.sent_at;
                result.latencies_us.push(latency.as_micros() as i64);
            }
            Err(message) => {
                result.failures += 1;
                result.first_failure.get_or_insert(message);
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receiver::find_sequence;

    #[test]
    fn body_has_requested_size_and_sequence() {
        let factory = BodyFactory::new(Uuid::new_v4(), 2048);
        let body = factory.body(123_456);
        assert_eq!(body.len(), 2048);
        assert_eq!(find_sequence(&body), Some(123_456));
    }

    #[test]
    fn small_target_keeps_minimum_body() {
        let factory = BodyFactory::new(Uuid::new_v4(), 10);
        let body = factory.body(1);
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["data"]["bench_pad"], "");
        assert_eq!(parsed["previous"]["status"], "pending");
    }

    #[test]
    fn events_have_distinct_aggregates() {
        let factory = BodyFactory::new(Uuid::new_v4(), 0);
        let first: serde_json::Value = serde_json::from_slice(&factory.body(1)).unwrap();
        let second: serde_json::Value = serde_json::from_slice(&factory.body(2)).unwrap();
        assert_ne!(first["aggregate_id"], second["aggregate_id"]);
    }
}
