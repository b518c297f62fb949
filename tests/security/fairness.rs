//! One endpoint that hangs with a large backlog neither delays another
//! business's deliveries nor gets more than 10 requests in flight.

use std::time::{Duration, Instant};

use crate::helpers::{DEADLINE, TestReceiver};
use crate::receivers::{Behaviour, RawReceiver};
use crate::service::{Service, Settings};

/// The default cap on requests in flight to one endpoint.
const ENDPOINT_CONCURRENCY: usize = 10;
/// Deliveries queued for the hanging endpoint.
const BACKLOG: usize = 300;
/// How soon another business's event must arrive, with room for a busy machine.
const PROMPT: Duration = Duration::from_secs(3);

#[tokio::test]
async fn hanging_endpoint_does_not_delay_others() {
    // Attempts outlast the test, so no request to the hanging endpoint ends
    // and every request it got is still in flight.
    let service = Service::start(Settings {
        request_timeout: Duration::from_secs(60),
        ..Settings::default()
    })
    .await;
    let slow_business = service.create_business().await;
    let other_business = service.create_business().await;
    let hanging = RawReceiver::start(Behaviour::Silent).await;
    let healthy = TestReceiver::start().await;
    service
        .create_webhook(&slow_business, &hanging.url, &["client.created"])
        .await;
    service
        .create_webhook(&other_business, &healthy.url, &["client.created"])
        .await;
    for _ in 0..BACKLOG {
        service.send_client_created(&slow_business).await;
    }
    hanging.wait_for_requests(ENDPOINT_CONCURRENCY).await;

    let sent_at = Instant::now();
    service.send_client_created(&other_business).await;
    let request = healthy.wait_for_requests(1).await.remove(0);

    let waited = request.arrived_at - sent_at;
    assert!(
        waited < PROMPT,
        "the other business's event took {waited:?} to arrive"
    );
    // Give the scheduler and the poller time to send more than they may.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        hanging.request_count(),
        ENDPOINT_CONCURRENCY,
        "requests that reached the hanging endpoint"
    );
    assert_eq!(
        hanging.max_in_flight(),
        ENDPOINT_CONCURRENCY,
        "requests in flight at once to the hanging endpoint"
    );
}

#[tokio::test]
async fn endpoint_cap_holds_across_waves() {
    let service = Service::start(Settings::default()).await;
    let business = service.create_business().await;
    // Each request is held, then the connection closes without a response,
    // so the service moves on to the next queued delivery.
    let slow = RawReceiver::start(Behaviour::HoldThenClose(Duration::from_millis(300))).await;
    service
        .create_webhook(&business, &slow.url, &["client.created"])
        .await;
    for _ in 0..BACKLOG {
        service.send_client_created(&business).await;
    }

    // Four full waves or more.
    let expected_requests = 4 * ENDPOINT_CONCURRENCY;
    let started = Instant::now();
    while slow.request_count() < expected_requests {
        assert!(
            started.elapsed() < DEADLINE,
            "only {} requests arrived within {DEADLINE:?}",
            slow.request_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let max_in_flight = slow.max_in_flight();
    assert!(
        max_in_flight <= ENDPOINT_CONCURRENCY,
        "{max_in_flight} requests were in flight at once"
    );
}
