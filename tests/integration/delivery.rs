//! Delivery attempts: headers and signatures, what counts as success, the
//! retry schedule, redirects, and endpoints changed while retries wait.

use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::helpers::{
    CreatedWebhook, ReceivedRequest, Reply, ServiceOptions, TestBusiness, TestReceiver,
    TestService, event_body, hmac_base64, hmac_hex, ms, unix_seconds,
};

/// Returns how long after the previous attempt a retry may arrive: the
/// schedule entry plus at most 10% jitter plus 0.5 s, with room for a busy machine.
fn latest_arrival(delay: Duration) -> Duration {
    delay.mul_f64(1.1) + ms(1500)
}

/// Starts a service with `options`, one business and one webhook on a new
/// receiver that responds with `reply`.
async fn endpoint_answering(
    reply: Reply,
    options: ServiceOptions,
    events: &[&str],
) -> (TestService, TestBusiness, TestReceiver, CreatedWebhook) {
    let service = TestService::start(options).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start_with(reply).await;
    let webhook = service
        .create_webhook(&business, &receiver.url, events)
        .await;
    (service, business, receiver, webhook)
}

async fn send_client_created(service: &TestService, business: &TestBusiness) -> Uuid {
    let aggregate = Uuid::new_v4();
    service
        .accept_event(&event_body(
            "client.created",
            business.id,
            aggregate,
            r#"{"firstname":"Zoë","note":"señal 📦"}"#,
            None,
        ))
        .await;
    aggregate
}

fn assert_timestamp_near(request: &ReceivedRequest, context: &str) {
    let timestamp: i64 = request
        .header("x-citapro-timestamp")
        .parse()
        .unwrap_or_else(|_| panic!("{context}: X-CitaPro-Timestamp is not an integer"));
    let arrived = unix_seconds(request.arrived_at_system);
    assert!(
        (arrived - 2..=arrived).contains(&timestamp),
        "{context}: timestamp {timestamp} is the send time in seconds, arrival was {arrived}"
    );
}

#[tokio::test]
async fn delivery_signature_matches_body() {
    let (service, business, receiver, webhook) = endpoint_answering(
        Reply::Status(200),
        ServiceOptions::default(),
        &["client.created"],
    )
    .await;
    let aggregate = send_client_created(&service, &business).await;

    let request = receiver.wait_for_requests(1).await.remove(0);

    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/hooks", "the URL path is kept");
    assert_eq!(request.json()["aggregate_id"], json!(aggregate.to_string()));
    let expected = hmac_hex(&webhook.secret, &request.body);
    assert_eq!(
        request.header("x-citapro-signature"),
        expected,
        "lowercase hex HMAC-SHA256 of the raw body"
    );
    assert_eq!(request.header("content-type"), "application/json");
    assert_eq!(request.header("x-citapro-event"), "client.created");
    let delivery_id = request.delivery_id();
    assert!(
        Uuid::parse_str(delivery_id).is_ok(),
        "delivery id {delivery_id:?} is a UUID"
    );
    assert_timestamp_near(&request, "first attempt");
}

#[tokio::test]
async fn standard_webhooks_headers_verify() {
    let (service, business, receiver, webhook) = endpoint_answering(
        Reply::Status(200),
        ServiceOptions::default(),
        &["client.created"],
    )
    .await;
    send_client_created(&service, &business).await;

    let request = receiver.wait_for_requests(1).await.remove(0);

    assert_eq!(request.header("webhook-id"), request.delivery_id());
    assert_eq!(
        request.header("webhook-timestamp"),
        request.header("x-citapro-timestamp")
    );
    let mut signed = format!(
        "{}.{}.",
        request.header("webhook-id"),
        request.header("webhook-timestamp")
    )
    .into_bytes();
    signed.extend_from_slice(&request.body);
    assert_eq!(
        request.header("webhook-signature"),
        format!("v1,{}", hmac_base64(&webhook.secret, &signed))
    );
}

#[tokio::test]
async fn each_endpoint_signs_with_its_secret() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let first = TestReceiver::start().await;
    let second = TestReceiver::start().await;
    let first_webhook = service
        .create_webhook(&business, &first.url, &["client.created"])
        .await;
    let second_webhook = service
        .create_webhook(&business, &second.url, &["client.created"])
        .await;
    send_client_created(&service, &business).await;

    let first_request = first.wait_for_requests(1).await.remove(0);
    let second_request = second.wait_for_requests(1).await.remove(0);

    assert_eq!(
        first_request.body, second_request.body,
        "one payload per event"
    );
    assert_ne!(
        first_request.delivery_id(),
        second_request.delivery_id(),
        "one delivery per endpoint"
    );
    assert_eq!(
        first_request.header("x-citapro-signature"),
        hmac_hex(&first_webhook.secret, &first_request.body)
    );
    assert_eq!(
        second_request.header("x-citapro-signature"),
        hmac_hex(&second_webhook.secret, &second_request.body)
    );
}

#[tokio::test]
async fn retries_after_server_error() {
    // The two waits add up to over a second, so the first and last
    // timestamps must differ if each attempt stamps its own send time.
    let schedule = vec![ms(500), ms(700)];
    let (service, business, receiver, webhook) = endpoint_answering(
        Reply::Status(500),
        ServiceOptions::with_retry_schedule(schedule.clone()),
        &["client.created"],
    )
    .await;
    send_client_created(&service, &business).await;

    let attempts = receiver.wait_for_requests(1 + schedule.len()).await;
    receiver
        .assert_count_stays(
            1 + schedule.len(),
            latest_arrival(schedule[1]),
            "no attempt after the schedule ends",
        )
        .await;

    let first = &attempts[0];
    for (number, attempt) in attempts.iter().enumerate() {
        let context = format!("attempt {}", number + 1);
        assert_eq!(
            attempt.delivery_id(),
            first.delivery_id(),
            "{context}: same delivery id"
        );
        assert_eq!(attempt.body, first.body, "{context}: same body bytes");
        assert_eq!(
            attempt.header("x-citapro-signature"),
            hmac_hex(&webhook.secret, &attempt.body),
            "{context}: signature"
        );
        assert_eq!(
            attempt.header("x-citapro-event"),
            "client.created",
            "{context}: event header"
        );
        assert_eq!(
            attempt.header("webhook-id"),
            first.delivery_id(),
            "{context}: webhook-id"
        );
        assert_timestamp_near(attempt, &context);
    }
    for (index, delay) in schedule.iter().enumerate() {
        let gap = attempts[index + 1].arrived_at - attempts[index].arrived_at;
        assert!(
            gap >= *delay,
            "retry {} came {gap:?} after the attempt before it, sooner than {delay:?}",
            index + 1
        );
    }
    let first_timestamp: i64 = first.header("x-citapro-timestamp").parse().unwrap();
    let last_timestamp: i64 = attempts[2].header("x-citapro-timestamp").parse().unwrap();
    assert!(
        last_timestamp > first_timestamp,
        "the last attempt reused an old timestamp: {first_timestamp} then {last_timestamp}"
    );
}

#[tokio::test]
async fn success_after_retry_ends_delivery() {
    let schedule = vec![ms(200), ms(200), ms(200)];
    let (service, business, receiver, _webhook) = endpoint_answering(
        Reply::Status(200),
        ServiceOptions::with_retry_schedule(schedule.clone()),
        &["client.created"],
    )
    .await;
    receiver.queue_replies([Reply::Status(503)]);
    send_client_created(&service, &business).await;

    let attempts = receiver.wait_for_requests(2).await;
    receiver
        .assert_count_stays(2, latest_arrival(schedule[1]), "no attempt after a 200")
        .await;

    assert_eq!(attempts[0].delivery_id(), attempts[1].delivery_id());
}

#[tokio::test]
async fn no_content_204_is_success() {
    let schedule = vec![ms(200)];
    let (service, business, receiver, _webhook) = endpoint_answering(
        Reply::Status(204),
        ServiceOptions::with_retry_schedule(schedule.clone()),
        &["client.created"],
    )
    .await;
    send_client_created(&service, &business).await;

    receiver.wait_for_requests(1).await;

    receiver
        .assert_count_stays(1, latest_arrival(schedule[0]), "no retry after a 204")
        .await;
}

#[tokio::test]
async fn not_found_404_is_failure() {
    let schedule = vec![ms(200)];
    let (service, business, receiver, _webhook) = endpoint_answering(
        Reply::Status(404),
        ServiceOptions::with_retry_schedule(schedule.clone()),
        &["client.created"],
    )
    .await;
    send_client_created(&service, &business).await;

    let attempts = receiver.wait_for_requests(2).await;

    assert_eq!(attempts[0].delivery_id(), attempts[1].delivery_id());
    receiver
        .assert_count_stays(2, latest_arrival(schedule[0]), "the schedule has one retry")
        .await;
}

#[tokio::test]
async fn redirect_is_failure_and_not_followed() {
    let schedule = vec![ms(200)];
    let service = TestService::start(ServiceOptions::with_retry_schedule(schedule.clone())).await;
    let business = service.create_business().await;
    let target = TestReceiver::start().await;
    let mut redirecting = Vec::new();
    for status in [301, 302, 303, 307, 308] {
        let receiver = TestReceiver::start_with(Reply::Redirect {
            status,
            location: target.url.clone(),
        })
        .await;
        service
            .create_webhook(&business, &receiver.url, &["client.created"])
            .await;
        redirecting.push((status, receiver));
    }

    send_client_created(&service, &business).await;

    for (status, receiver) in &redirecting {
        let attempts = receiver.wait_for_requests(2).await;
        assert_eq!(
            attempts[0].delivery_id(),
            attempts[1].delivery_id(),
            "{status} is retried as a failure"
        );
    }
    target
        .assert_count_stays(0, latest_arrival(schedule[0]), "the Location target")
        .await;
    for (status, receiver) in &redirecting {
        assert_eq!(receiver.request_count(), 2, "{status}: attempts");
    }
}

#[tokio::test]
async fn deactivation_stops_pending_retries() {
    let schedule = vec![ms(700), ms(700)];
    let (service, business, receiver, webhook) = endpoint_answering(
        Reply::Status(500),
        ServiceOptions::with_retry_schedule(schedule.clone()),
        &["client.created"],
    )
    .await;
    send_client_created(&service, &business).await;
    let first = receiver.wait_for_requests(1).await.remove(0);

    service
        .update_webhook(
            &business,
            &webhook.id,
            &receiver.url,
            &["client.created"],
            false,
        )
        .await;

    receiver
        .assert_count_stays(1, latest_arrival(schedule[0]), "retries after deactivation")
        .await;

    // Reactivating does not replay the cancelled delivery: the next request
    // is the delivery of a new event.
    receiver.reply_with(Reply::Status(200));
    service
        .update_webhook(
            &business,
            &webhook.id,
            &receiver.url,
            &["client.created"],
            true,
        )
        .await;
    let aggregate = send_client_created(&service, &business).await;
    let requests = receiver.wait_for_requests(2).await;
    assert_ne!(
        requests[1].delivery_id(),
        first.delivery_id(),
        "the cancelled delivery was replayed"
    );
    assert_eq!(
        requests[1].json()["aggregate_id"],
        json!(aggregate.to_string()),
        "the new event is delivered"
    );
    receiver
        .assert_count_stays(2, latest_arrival(schedule[1]), "after reactivation")
        .await;
}

#[tokio::test]
async fn deletion_stops_pending_retries() {
    let schedule = vec![ms(700), ms(700)];
    let (service, business, receiver, webhook) = endpoint_answering(
        Reply::Status(500),
        ServiceOptions::with_retry_schedule(schedule.clone()),
        &["client.created"],
    )
    .await;
    send_client_created(&service, &business).await;
    receiver.wait_for_requests(1).await;

    let deleted = service
        .delete(&format!("/v1/webhooks/{}", webhook.id), &business)
        .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text());

    receiver
        .assert_count_stays(1, latest_arrival(schedule[0]), "retries after deletion")
        .await;
}

#[tokio::test]
async fn deactivated_during_attempt_is_not_retried() {
    let options = ServiceOptions {
        retry_schedule: vec![ms(300)],
        request_timeout: ms(1500),
        ..ServiceOptions::default()
    };
    let (service, business, receiver, webhook) =
        endpoint_answering(Reply::Status(500), options.clone(), &["client.created"]).await;
    receiver.queue_replies([Reply::Hang]);
    let started = Instant::now();
    send_client_created(&service, &business).await;
    receiver.wait_for_requests(1).await;

    // The first attempt hangs until the request timeout, so the endpoint is
    // deactivated while that attempt is still in flight.
    service
        .update_webhook(
            &business,
            &webhook.id,
            &receiver.url,
            &["client.created"],
            false,
        )
        .await;

    let elapsed = started.elapsed();
    receiver
        .assert_count_stays(
            1,
            options.request_timeout.saturating_sub(elapsed)
                + latest_arrival(options.retry_schedule[0]),
            "a retry after the in-flight attempt ended",
        )
        .await;
}

#[tokio::test]
async fn retry_after_delays_next_attempt() {
    let schedule = vec![ms(100), ms(100)];
    let (service, business, receiver, _webhook) = endpoint_answering(
        Reply::Status(200),
        ServiceOptions::with_retry_schedule(schedule),
        &["client.created"],
    )
    .await;
    receiver.queue_replies([Reply::TooManyRequests {
        retry_after: "1".to_owned(),
    }]);
    send_client_created(&service, &business).await;

    let attempts = receiver.wait_for_requests(2).await;

    let gap = attempts[1].arrived_at - attempts[0].arrived_at;
    assert!(
        gap >= Duration::from_secs(1),
        "the retry came {gap:?} after a 429 with Retry-After: 1"
    );
    assert_eq!(attempts[0].delivery_id(), attempts[1].delivery_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_is_delivered_once_each() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;
    let count = 40;

    let mut sends = tokio::task::JoinSet::new();
    let service = std::sync::Arc::new(service);
    for _ in 0..count {
        let service = service.clone();
        let business = business.clone();
        sends.spawn(async move { send_client_created(&service, &business).await });
    }
    let mut aggregates = std::collections::HashSet::new();
    while let Some(aggregate) = sends.join_next().await {
        aggregates.insert(aggregate.expect("sending an event").to_string());
    }

    let requests = receiver.wait_for_requests(count).await;
    receiver
        .assert_count_stays(count, ms(1000), "duplicate deliveries")
        .await;
    let delivery_ids: std::collections::HashSet<&str> =
        requests.iter().map(ReceivedRequest::delivery_id).collect();
    assert_eq!(delivery_ids.len(), count, "distinct delivery ids");
    let delivered: std::collections::HashSet<String> =
        requests.iter().map(ReceivedRequest::aggregate_id).collect();
    assert_eq!(delivered, aggregates, "every event delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_endpoint_does_not_delay_others() {
    let options = ServiceOptions {
        retry_schedule: vec![ms(200)],
        request_timeout: std::time::Duration::from_secs(10),
        ..ServiceOptions::default()
    };
    let service = TestService::start(options.clone()).await;
    let business = service.create_business().await;
    let hanging = TestReceiver::start_with(Reply::Hang).await;
    let healthy = TestReceiver::start().await;
    service
        .create_webhook(&business, &hanging.url, &["client.created"])
        .await;
    service
        .create_webhook(&business, &healthy.url, &["client.created"])
        .await;
    let count = 25;
    let started = Instant::now();

    for _ in 0..count {
        send_client_created(&service, &business).await;
    }
    healthy.wait_for_requests(count).await;

    // Every attempt to the hanging endpoint is still waiting for its
    // response, so none of them can have freed a slot for the other endpoint.
    assert!(
        started.elapsed() < options.request_timeout,
        "the healthy endpoint got its deliveries only after {:?}",
        started.elapsed()
    );
    assert!(
        hanging.request_count() <= 10,
        "at most 10 requests in flight to one endpoint, got {}",
        hanging.request_count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_change_redirects_queued_deliveries() {
    let options = ServiceOptions {
        retry_schedule: vec![ms(200)],
        request_timeout: std::time::Duration::from_secs(3),
        ..ServiceOptions::default()
    };
    let (service, business, old_receiver, webhook) =
        endpoint_answering(Reply::Hang, options, &["client.created"]).await;
    for _ in 0..15 {
        send_client_created(&service, &business).await;
    }
    // Ten attempts hang at the old URL; five deliveries wait behind them.
    old_receiver.wait_for_requests(10).await;

    let new_receiver = TestReceiver::start_with(Reply::Status(204)).await;
    service
        .update_webhook(
            &business,
            &webhook.id,
            &new_receiver.url,
            &["client.created"],
            true,
        )
        .await;
    let moved = new_receiver.wait_for_requests(5).await;
    for request in &moved {
        assert_eq!(
            request.header("x-citapro-signature"),
            hmac_hex(&webhook.secret, &request.body),
            "signed with the same secret"
        );
    }
    assert_eq!(
        old_receiver.request_count(),
        10,
        "nothing more went to the old URL"
    );
}

/// Waits until `count` of the webhook's deliveries have succeeded.
async fn wait_for_succeeded(
    service: &TestService,
    business: &TestBusiness,
    webhook: &CreatedWebhook,
    count: usize,
) {
    let path = format!("/v1/webhooks/{}/deliveries?status=succeeded", webhook.id);
    let started = Instant::now();
    loop {
        let page = service.get(&path, business).await.json();
        let succeeded = page["data"].as_array().map_or(0, Vec::len);
        if succeeded >= count {
            return;
        }
        assert!(
            started.elapsed() < crate::helpers::DEADLINE,
            "{succeeded} of {count} deliveries succeeded in time"
        );
        tokio::time::sleep(ms(20)).await;
    }
}

#[tokio::test]
async fn deliveries_reuse_one_connection() {
    let (service, business, receiver, webhook) = endpoint_answering(
        Reply::Status(200),
        ServiceOptions::default(),
        &["client.created"],
    )
    .await;
    for sent in 1..=4 {
        send_client_created(&service, &business).await;
        wait_for_succeeded(&service, &business, &webhook, sent).await;
    }

    assert_eq!(receiver.request_count(), 4);
    assert_eq!(
        receiver.connection_count(),
        1,
        "deliveries one after another share a keep-alive connection"
    );
}

#[tokio::test]
async fn delivery_url_read_as_registered() {
    let receiver = TestReceiver::start().await;
    let url = format!("{}/{{x}}|y/./z/p\u{e4}th`<b>?q=<1>", receiver.url);
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    service
        .create_webhook(&business, &url, &["client.created"])
        .await;
    send_client_created(&service, &business).await;

    let request = receiver.wait_for_requests(1).await.remove(0);
    assert_eq!(
        request.path, "/hooks/%7Bx%7D|y/z/p%C3%A4th%60%3Cb%3E",
        "the path is sent percent-encoded, as the URL standard reads it"
    );
    let authority = receiver
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/hooks");
    assert_eq!(
        request.header("host"),
        authority,
        "the Host header names the receiver's address and port"
    );
}
