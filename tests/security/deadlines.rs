//! One request deadline covers the whole attempt: a receiver that never
//! responds, trickles its headers or body, or never ends its body cannot hold
//! an attempt past it.

use std::time::Duration;

use crate::receivers::{Behaviour, RawReceiver};
use crate::service::{Service, Settings, attempt, duration_of};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How much longer than the deadline an attempt may take on a busy machine.
const SLACK: Duration = Duration::from_secs(2);

/// Sends one event to a webhook on a raw receiver and returns the recorded
/// delivery once its first attempt is stored, with the receiver.
async fn first_attempt_against(behaviour: Behaviour) -> (serde_json::Value, RawReceiver) {
    let service = Service::start(Settings {
        request_timeout: REQUEST_TIMEOUT,
        ..Settings::default()
    })
    .await;
    let business = service.create_business().await;
    let receiver = RawReceiver::start(behaviour).await;
    let webhook = service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;

    service.send_client_created(&business).await;

    let delivery = service.wait_for_attempts(&business, &webhook.id, 1).await;
    (delivery, receiver)
}

/// Asserts that the attempt and its connection both ended within the deadline plus slack.
async fn assert_ended_by_deadline(delivery: &serde_json::Value, receiver: &RawReceiver) {
    let first = attempt(delivery, 0);
    let duration = duration_of(first);
    assert!(
        duration <= REQUEST_TIMEOUT + SLACK,
        "the attempt took {duration:?}, over the {REQUEST_TIMEOUT:?} deadline: {first}"
    );
    let exchange = receiver.wait_for_first_close().await;
    let closed_at = exchange.closed_at.expect("the exchange is closed");
    let open_for = closed_at - exchange.arrived_at;
    assert!(
        open_for <= REQUEST_TIMEOUT + SLACK,
        "the service kept the connection open for {open_for:?} after the request"
    );
}

#[tokio::test]
async fn silent_receiver_times_out() {
    let (delivery, receiver) = first_attempt_against(Behaviour::Silent).await;

    let first = attempt(&delivery, 0);
    assert_eq!(first["errorKind"], "timeout", "attempt: {first}");
    assert!(first["statusCode"].is_null(), "no status: {first}");
    assert_eq!(delivery["status"], "pending", "a retry is scheduled");
    assert_ended_by_deadline(&delivery, &receiver).await;
}

#[tokio::test]
async fn trickled_headers_time_out() {
    let (delivery, receiver) = first_attempt_against(Behaviour::TrickleHead).await;

    let first = attempt(&delivery, 0);
    assert_eq!(first["errorKind"], "timeout", "attempt: {first}");
    assert!(first["statusCode"].is_null(), "no complete status: {first}");
    assert_eq!(delivery["status"], "pending", "a retry is scheduled");
    assert_ended_by_deadline(&delivery, &receiver).await;
}

// The status line alone decides the outcome: once it has arrived, the
// deadline only cuts the body short, and the trickled bytes are stored.

#[tokio::test]
async fn trickled_body_ends_by_deadline() {
    let (delivery, receiver) = first_attempt_against(Behaviour::Trickle(200)).await;

    let first = attempt(&delivery, 0);
    assert!(first["errorKind"].is_null(), "a 200 succeeds: {first}");
    assert_eq!(first["statusCode"], 200, "attempt: {first}");
    assert_eq!(delivery["status"], "succeeded", "delivery: {delivery}");
    let stored = first["responseBody"].as_str().unwrap_or_default();
    assert!(
        !stored.is_empty() && stored.bytes().all(|byte| byte == b'a'),
        "the bytes trickled before the deadline are stored: {first}"
    );
    assert_ended_by_deadline(&delivery, &receiver).await;
}

#[tokio::test]
async fn trickled_error_body_ends_by_deadline() {
    let (delivery, receiver) = first_attempt_against(Behaviour::Trickle(503)).await;

    let first = attempt(&delivery, 0);
    assert_eq!(first["errorKind"], "http_status", "a 503 fails: {first}");
    assert_eq!(first["statusCode"], 503, "attempt: {first}");
    assert_eq!(delivery["status"], "pending", "a retry is scheduled");
    assert_ended_by_deadline(&delivery, &receiver).await;
}

#[tokio::test]
async fn unfinished_body_ends_by_deadline() {
    let (delivery, receiver) = first_attempt_against(Behaviour::Stall).await;

    let first = attempt(&delivery, 0);
    assert!(first["errorKind"].is_null(), "a 200 succeeds: {first}");
    assert_eq!(first["statusCode"], 200, "attempt: {first}");
    assert_eq!(first["responseBody"], "partial body", "attempt: {first}");
    assert_eq!(delivery["status"], "succeeded", "delivery: {delivery}");
    assert_ended_by_deadline(&delivery, &receiver).await;
}
