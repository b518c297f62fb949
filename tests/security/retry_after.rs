//! `429` with `Retry-After`: the next attempt waits for the later of the
//! schedule and the header, capped at one hour.

use std::time::{Duration, SystemTime};

use crate::helpers::{Reply, TestReceiver, ms};
use crate::service::{Service, Settings, attempt, time_field};

/// Returns a schedule far shorter than the `Retry-After` values below.
fn short_schedule() -> Vec<Duration> {
    vec![ms(100), ms(100)]
}

/// The cap on a `Retry-After` delay.
const ONE_HOUR: time::Duration = time::Duration::hours(1);

#[tokio::test]
async fn retry_after_seconds_delays_retry() {
    let service = Service::start(Settings {
        retry_schedule: short_schedule(),
        ..Settings::default()
    })
    .await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    receiver.queue_replies([Reply::TooManyRequests {
        retry_after: "2".to_owned(),
    }]);
    let webhook = service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;

    service.send_client_created(&business).await;

    let requests = receiver.wait_for_requests(2).await;
    let waited = requests[1].arrived_at - requests[0].arrived_at;
    assert!(
        waited >= Duration::from_secs(2),
        "the retry came {waited:?} after the 429, before Retry-After: 2"
    );
    let delivery = service.wait_for_attempts(&business, &webhook.id, 2).await;
    let first = attempt(&delivery, 0);
    assert_eq!(first["statusCode"], 429, "attempt: {first}");
    assert_eq!(
        first["errorKind"], "http_status",
        "a 429 is a failed attempt: {first}"
    );
}

#[tokio::test]
async fn retry_after_date_delays_retry() {
    let service = Service::start(Settings {
        retry_schedule: short_schedule(),
        ..Settings::default()
    })
    .await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    // HTTP dates have whole seconds, so the wait is between 2 and 3 seconds.
    let retry_at = SystemTime::now() + Duration::from_secs(3);
    let retry_after = httpdate::fmt_http_date(retry_at);
    let not_before = httpdate::parse_http_date(&retry_after).expect("an HTTP date parses");
    receiver.queue_replies([Reply::TooManyRequests { retry_after }]);
    service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;

    service.send_client_created(&business).await;

    let requests = receiver.wait_for_requests(2).await;
    let early_by = not_before
        .duration_since(requests[1].arrived_at_system)
        .ok();
    assert!(
        early_by.is_none_or(|early| early.is_zero()),
        "the retry came {early_by:?} before the Retry-After date"
    );
}

/// Asserts that a delivery whose only attempt got a `429` with `retry_after`
/// is scheduled one hour after that attempt.
async fn assert_retry_after_capped(retry_after: String) {
    let service = Service::start(Settings {
        retry_schedule: short_schedule(),
        ..Settings::default()
    })
    .await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start_with(Reply::TooManyRequests {
        retry_after: retry_after.clone(),
    })
    .await;
    let webhook = service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;

    service.send_client_created(&business).await;

    let delivery = service.wait_for_attempts(&business, &webhook.id, 1).await;
    assert_eq!(delivery["status"], "pending", "delivery: {delivery}");
    let last_attempt = time_field(&delivery, "lastAttemptAt");
    let next_attempt = time_field(&delivery, "nextAttemptAt");
    let delay = next_attempt - last_attempt;
    assert!(
        delay >= ONE_HOUR - time::Duration::seconds(1),
        "Retry-After {retry_after:?} gave a delay of {delay}, shorter than the one-hour cap"
    );
    assert!(
        delay <= ONE_HOUR + time::Duration::minutes(1),
        "Retry-After {retry_after:?} gave a delay of {delay}, over the one-hour cap"
    );
    let ahead = next_attempt - time::OffsetDateTime::now_utc();
    assert!(
        ahead <= ONE_HOUR,
        "the next attempt is {ahead} ahead, over one hour"
    );
}

#[tokio::test]
async fn retry_after_seconds_capped_at_hour() {
    assert_retry_after_capped("7200".to_owned()).await;
}

#[tokio::test]
async fn retry_after_date_capped_at_hour() {
    let tomorrow = SystemTime::now() + Duration::from_secs(86_400);
    assert_retry_after_capped(httpdate::fmt_http_date(tomorrow)).await;
}
