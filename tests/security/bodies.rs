//! Large and endless response bodies: the service reads a bounded prefix,
//! stores at most 4 KiB of it and does not grow in memory.

use std::time::{Duration, Instant};

use crate::helpers::DEADLINE;
use crate::receivers::{Behaviour, RawReceiver};
use crate::service::{Service, Settings, attempt, duration_of};

/// Maximum response body that an attempt stores, in bytes.
const MAX_STORED: usize = 4096;
/// A body far larger than anything the service should read.
const LARGE_BODY: u64 = 100 * 1024 * 1024;
/// Allowed growth of this process's resident memory while one attempt reads
/// a huge body. The service runs in this process beside other tests, so the
/// bound is loose, but reading the whole body would exceed it.
const MAX_RSS_GROWTH_BYTES: u64 = 200 * 1024 * 1024;
/// An attempt that stops reading early ends well within this.
const QUICK: Duration = Duration::from_secs(5);

/// Returns this process's resident set size in bytes, from `/proc/self/status`.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("/proc/self/status has a VmRSS line");
    let kilobytes: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("unreadable VmRSS line {line:?}"));
    kilobytes * 1024
}

/// Sends one event to a receiver with a huge body and checks the bounds of
/// the attempt, the stored body, the bytes taken from the receiver and memory.
async fn assert_body_read_is_bounded(behaviour: Behaviour) {
    let service = Service::start(Settings {
        request_timeout: Duration::from_secs(10),
        ..Settings::default()
    })
    .await;
    let business = service.create_business().await;
    let receiver = RawReceiver::start(behaviour).await;
    let webhook = service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;
    let resident_before = resident_bytes();

    service.send_client_created(&business).await;

    // Sample memory while the attempt runs, to catch a peak that is freed again.
    let started = Instant::now();
    let mut resident_peak = resident_before;
    let delivery = loop {
        resident_peak = resident_peak.max(resident_bytes());
        let deliveries = service.deliveries(&business, &webhook.id).await;
        if deliveries
            .first()
            .is_some_and(|listed| listed["attemptCount"].as_u64() >= Some(1))
        {
            let delivery_id = deliveries[0]["id"].as_str().expect("a delivery id");
            break service.delivery(&business, &webhook.id, delivery_id).await;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no attempt was recorded within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    resident_peak = resident_peak.max(resident_bytes());

    let first = attempt(&delivery, 0);
    assert_eq!(first["statusCode"], 200, "the status line is read: {first}");
    assert!(
        first["errorKind"].is_null(),
        "a 200 is a success whatever its body: {first}"
    );
    let duration = duration_of(first);
    assert!(duration < QUICK, "the attempt took {duration:?}");
    let stored = first["responseBody"]
        .as_str()
        .unwrap_or_else(|| panic!("no responseBody: {first}"));
    assert!(
        stored.len() <= MAX_STORED,
        "stored {} bytes of the response body",
        stored.len()
    );
    assert!(
        !stored.is_empty() && stored.bytes().all(|byte| byte == b'a'),
        "the stored text is the start of the body"
    );
    assert!(
        receiver.body_bytes_sent() < LARGE_BODY,
        "the service read {} bytes, the whole body",
        receiver.body_bytes_sent()
    );
    let growth = resident_peak.saturating_sub(resident_before);
    assert!(
        growth < MAX_RSS_GROWTH_BYTES,
        "resident memory grew by {growth} bytes during the attempt"
    );
}

#[tokio::test]
async fn large_body_read_is_bounded() {
    assert_body_read_is_bounded(Behaviour::Sized(LARGE_BODY)).await;
}

#[tokio::test]
async fn endless_body_read_is_bounded() {
    assert_body_read_is_bounded(Behaviour::Endless).await;
}
