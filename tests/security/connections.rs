//! Keep-alive connections that the receiver closes while they are idle are
//! not used again: each delivery still succeeds at its first attempt.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{DEADLINE, TestBusiness};
use crate::receivers::{Behaviour, RawReceiver};
use crate::service::{Service, Settings};

/// Waits until the webhook has `count` deliveries that are no longer
/// pending, and returns each with its attempts.
async fn wait_for_finished(
    service: &Service,
    business: &TestBusiness,
    webhook_id: &str,
    count: usize,
) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let listed = service.deliveries(business, webhook_id).await;
        let finished = listed
            .iter()
            .filter(|delivery| delivery["status"] != "pending")
            .count();
        if listed.len() == count && finished == count {
            let mut deliveries = Vec::new();
            for delivery in &listed {
                let id = delivery["id"].as_str().expect("a delivery has an id");
                deliveries.push(service.delivery(business, webhook_id, id).await);
            }
            return deliveries;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "webhook {webhook_id} has {finished} of {count} deliveries finished: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends events one at a time to a receiver that closes every connection
/// `close_after` its response, waiting `gap` after each delivery.
async fn deliveries_after_receiver_closes(close_after: Duration, gap: Duration) {
    let service = Service::start(Settings::default()).await;
    let business = service.create_business().await;
    let receiver = RawReceiver::start(Behaviour::AnswerThenClose(close_after)).await;
    let webhook = service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;

    let events = 4;
    let mut deliveries = Vec::new();
    for sent in 1..=events {
        service.send_client_created(&business).await;
        deliveries = wait_for_finished(&service, &business, &webhook.id, sent).await;
        tokio::time::sleep(gap).await;
    }

    for delivery in &deliveries {
        assert_eq!(delivery["status"], "succeeded", "delivery: {delivery}");
        let attempts = delivery["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 1, "one attempt: {delivery}");
        assert_eq!(attempts[0]["statusCode"], 204, "attempt: {}", attempts[0]);
    }
    assert_eq!(
        receiver.request_count(),
        events,
        "each event reached the receiver once, each on its own connection"
    );
}

#[tokio::test]
async fn idle_closed_connection_not_reused() {
    deliveries_after_receiver_closes(Duration::from_millis(50), Duration::from_millis(200)).await;
}

#[tokio::test]
async fn connection_closed_on_response_not_reused() {
    deliveries_after_receiver_closes(Duration::ZERO, Duration::from_millis(50)).await;
}
