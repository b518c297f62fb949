//! `POST /v1/events`: the producer API, its validation, and `changes`
//! computed from the stored state when `previous` is absent.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    ReceivedRequest, ServiceOptions, TestReceiver, TestService, assert_invalid_field,
    assert_problem, event_body, ms,
};

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("{text} is not JSON: {error}"))
}

#[tokio::test]
async fn event_returns_202_with_id_and_count() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    for events in [
        vec!["booking.created"],
        vec!["booking.created", "booking.updated"],
        vec!["client.created"],
    ] {
        service
            .create_webhook(&business, &receiver.url, &events)
            .await;
    }

    let response = service
        .send_event(&event_body(
            "booking.created",
            business.id,
            Uuid::new_v4(),
            r#"{"status":"pending"}"#,
            None,
        ))
        .await;

    assert_eq!(response.status, 202, "{}", response.text());
    let body = response.json();
    let keys: BTreeSet<&str> = body
        .as_object()
        .expect("202 body is an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, BTreeSet::from(["id", "deliveries"]));
    assert!(
        Uuid::parse_str(body["id"].as_str().unwrap_or("")).is_ok(),
        "id is a UUID: {body}"
    );
    assert_eq!(body["deliveries"], json!(2), "two webhooks subscribe");
    receiver.wait_for_requests(2).await;
}

#[tokio::test]
async fn event_without_subscribers_counts_zero() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;

    let body = service
        .accept_event(&event_body(
            "person.deleted",
            business.id,
            Uuid::new_v4(),
            r#"{"firstName":"Luis"}"#,
            None,
        ))
        .await;

    assert_eq!(body["deliveries"], json!(0));
}

#[tokio::test]
async fn invalid_events_store_nothing() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    service
        .create_webhook(
            &business,
            &receiver.url,
            &[
                "booking.created",
                "booking.updated",
                "service.updated",
                "time_block.created",
                "custom_field.updated",
                "client.created",
            ],
        )
        .await;
    let business_id = business.id.to_string();
    // Every invalid booking event uses this aggregate, so a stored state
    // would later let an update without `previous` through.
    let aggregate = Uuid::new_v4();
    let aggregate_id = aggregate.to_string();
    let booking = |data: &str| event_body("booking.created", business.id, aggregate, data, None);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown event",
            event_body("booking.exploded", business.id, aggregate, "{}", None),
            "event",
        ),
        (
            "missing event",
            format!(
                r#"{{"business_account_id":"{business_id}","aggregate_id":"{aggregate_id}","data":{{}}}}"#
            ),
            "event",
        ),
        (
            "malformed business id",
            format!(
                r#"{{"event":"booking.created","business_account_id":"business-1","aggregate_id":"{aggregate_id}","data":{{}}}}"#
            ),
            "business_account_id",
        ),
        (
            "missing business id",
            format!(r#"{{"event":"booking.created","aggregate_id":"{aggregate_id}","data":{{}}}}"#),
            "business_account_id",
        ),
        (
            "malformed aggregate id",
            format!(
                r#"{{"event":"booking.created","business_account_id":"{business_id}","aggregate_id":"12345","data":{{}}}}"#
            ),
            "aggregate_id",
        ),
        (
            "numeric aggregate id",
            format!(
                r#"{{"event":"booking.created","business_account_id":"{business_id}","aggregate_id":12345,"data":{{}}}}"#
            ),
            "aggregate_id",
        ),
        (
            "missing data",
            format!(
                r#"{{"event":"booking.created","business_account_id":"{business_id}","aggregate_id":"{aggregate_id}"}}"#
            ),
            "data",
        ),
        (
            "data not an object",
            format!(
                r#"{{"event":"booking.created","business_account_id":"{business_id}","aggregate_id":"{aggregate_id}","data":[1]}}"#
            ),
            "data",
        ),
        (
            "amount as a string",
            booking(r#"{"status":"pending","amount":"75.0"}"#),
            "data.amount",
        ),
        (
            "status as a number",
            booking(r#"{"status":1}"#),
            "data.status",
        ),
        (
            "payment status as a boolean",
            booking(r#"{"payment_status":true}"#),
            "data.payment_status",
        ),
        (
            "previous amount as a string",
            event_body(
                "booking.updated",
                business.id,
                aggregate,
                r#"{"amount":75.0}"#,
                Some(r#"{"amount":"50.0"}"#),
            ),
            "previous.amount",
        ),
        (
            "duration written as 60.0",
            event_body(
                "service.updated",
                business.id,
                Uuid::new_v4(),
                r#"{"duration":60.0}"#,
                Some(r#"{"duration":30}"#),
            ),
            "data.duration",
        ),
        (
            "providers with a number",
            event_body(
                "time_block.created",
                business.id,
                Uuid::new_v4(),
                r#"{"providers":["p1",7]}"#,
                None,
            ),
            "data.providers",
        ),
        (
            "options as an object",
            event_body(
                "custom_field.updated",
                business.id,
                Uuid::new_v4(),
                r#"{"options":{"a":1}}"#,
                Some("{}"),
            ),
            "data.options",
        ),
        (
            "occurred_on in another format",
            format!(
                r#"{{"event":"client.created","business_account_id":"{business_id}","aggregate_id":"{aggregate_id}","occurred_on":"2026-03-05T14:30:00Z","data":{{}}}}"#
            ),
            "occurred_on",
        ),
        (
            "unknown top-level field",
            format!(
                r#"{{"event":"client.created","business_account_id":"{business_id}","aggregate_id":"{aggregate_id}","data":{{}},"priority":1}}"#
            ),
            "priority",
        ),
    ];

    for (case, body, field) in &cases {
        let response = service.send_event(body).await;
        assert_invalid_field(&response, field, case);
    }

    // No rejected event stored an aggregate state: an update without
    // `previous` still finds nothing to compute changes from.
    let update = service
        .send_event(&event_body(
            "booking.updated",
            business.id,
            aggregate,
            r#"{"status":"confirmed"}"#,
            None,
        ))
        .await;
    assert_invalid_field(&update, "previous", "update after rejected events");

    // No rejected event stored a delivery: the next valid event is the
    // first and only request that the receiver gets.
    let valid_aggregate = Uuid::new_v4();
    service
        .accept_event(&event_body(
            "client.created",
            business.id,
            valid_aggregate,
            r#"{"firstname":"Ana"}"#,
            None,
        ))
        .await;
    let received = receiver.wait_for_requests(1).await;
    assert_eq!(received.len(), 1, "requests after the rejected events");
    assert_eq!(
        received[0].json()["aggregate_id"],
        json!(valid_aggregate.to_string()),
        "the only delivery is the valid event"
    );
}

#[tokio::test]
async fn nullable_and_integer_fields_accept_valid_forms() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let cases = [
        (
            "service.updated",
            r#"{"duration":60,"sessions":null,"simultaneous":2,"price":19.99}"#,
        ),
        (
            "booking.created",
            r#"{"amount":75,"internalNote":null,"payment_status":null,"personId":null}"#,
        ),
        (
            "custom_field.updated",
            r#"{"options":null,"sortOrder":0,"showInMinisite":1,"required":false}"#,
        ),
        (
            "time_block.created",
            r#"{"providers":[],"repetition":null}"#,
        ),
    ];

    for (event, data) in cases {
        let previous = event.ends_with(".updated").then_some("{}");
        let response = service
            .send_event(&event_body(
                event,
                business.id,
                Uuid::new_v4(),
                data,
                previous,
            ))
            .await;
        assert_eq!(response.status, 202, "{event} {data}: {}", response.text());
    }
}

#[tokio::test]
async fn malformed_event_json_is_400() {
    let service = TestService::start(ServiceOptions::default()).await;

    let response = service.send_event(r#"{"event": "booking.created", "#).await;

    assert_problem(&response, 400, "truncated JSON");
}

#[tokio::test]
async fn oversized_event_is_413() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let note = "x".repeat(1024 * 1024 + 1);
    let body = event_body(
        "client.created",
        business.id,
        Uuid::new_v4(),
        &format!(r#"{{"firstname":"Ana","notes":"{note}"}}"#),
        None,
    );

    let response = service.send_event(&body).await;

    assert_problem(&response, 413, "event body over 1 MiB");
}

#[tokio::test]
async fn update_without_previous_or_state_is_422() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    service
        .create_webhook(
            &business,
            &receiver.url,
            &["client.updated", "client.created"],
        )
        .await;

    let response = service
        .send_event(&event_body(
            "client.updated",
            business.id,
            Uuid::new_v4(),
            r#"{"firstname":"Ana"}"#,
            None,
        ))
        .await;

    assert_invalid_field(&response, "previous", "update of an unknown aggregate");
    // The same aggregate id in another business has no state either.
    let other = service.create_business().await;
    let shared_aggregate = Uuid::new_v4();
    service
        .accept_event(&event_body(
            "client.created",
            other.id,
            shared_aggregate,
            r#"{"firstname":"Ana"}"#,
            None,
        ))
        .await;
    let cross_business = service
        .send_event(&event_body(
            "client.updated",
            business.id,
            shared_aggregate,
            r#"{"firstname":"Eva"}"#,
            None,
        ))
        .await;
    assert_invalid_field(
        &cross_business,
        "previous",
        "update whose state belongs to another business",
    );
    assert_eq!(
        receiver.request_count(),
        0,
        "no delivery of a rejected update"
    );
}

#[tokio::test]
async fn update_without_previous_uses_stored_state() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    service
        .create_webhook(&business, &receiver.url, &["booking.updated"])
        .await;
    let aggregate = Uuid::new_v4();

    // booking.created is not subscribed: it only gives the service a state.
    service
        .accept_event(&event_body(
            "booking.created",
            business.id,
            aggregate,
            r#"{"status":"pending","amount":50.0,"payment_status":null,"notifyClient":true}"#,
            None,
        ))
        .await;
    service
        .accept_event(&event_body(
            "booking.updated",
            business.id,
            aggregate,
            r#"{"status":"confirmed","amount":75.0,"payment_status":null,"notifyClient":false}"#,
            None,
        ))
        .await;
    let first = receiver.wait_for_requests(1).await;
    assert_eq!(
        first[0].json()["data"]["changes"],
        parse(r#"{"status":{"old":"pending","new":"confirmed"},"amount":{"old":50.0,"new":75.0}}"#),
        "changes against the created state"
    );

    service
        .accept_event(&event_body(
            "booking.updated",
            business.id,
            aggregate,
            r#"{"status":"cancelled","amount":75,"payment_status":"refunded","notifyClient":false}"#,
            None,
        ))
        .await;
    let second = receiver.wait_for_requests(2).await;
    assert_eq!(
        second[1].json()["data"]["changes"],
        parse(
            r#"{"status":{"old":"confirmed","new":"cancelled"},"paymentStatus":{"old":null,"new":"refunded"}}"#
        ),
        "changes against the state of the first update"
    );
}

#[tokio::test]
async fn given_previous_overrides_stored_state() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    service
        .create_webhook(&business, &receiver.url, &["client.updated"])
        .await;
    let aggregate = Uuid::new_v4();
    service
        .accept_event(&event_body(
            "client.created",
            business.id,
            aggregate,
            r#"{"firstname":"Ana","city":"Cali"}"#,
            None,
        ))
        .await;

    service
        .accept_event(&event_body(
            "client.updated",
            business.id,
            aggregate,
            r#"{"firstname":"Ana","city":"Pasto"}"#,
            Some(r#"{"firstname":"Eva","city":"Pasto"}"#),
        ))
        .await;

    let received = receiver.wait_for_requests(1).await;
    assert_eq!(
        received[0].json()["data"]["changes"],
        parse(r#"{"firstname":{"old":"Eva","new":"Ana"}}"#)
    );
}

/// Rejected updates sent at the same moment as valid events, so that the
/// store handles them in the same transactions, leave no trace, and every
/// valid event is stored and delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_updates_leave_concurrent_events_stored() {
    let service = std::sync::Arc::new(TestService::start(ServiceOptions::default()).await);
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    let webhook = service
        .create_webhook(
            &business,
            &receiver.url,
            &["client.created", "client.updated"],
        )
        .await;

    let mut sends = tokio::task::JoinSet::new();
    for index in 0..60 {
        let service = service.clone();
        let business_id = business.id;
        sends.spawn(async move {
            // Every third event updates an aggregate with no stored state.
            let rejected = index % 3 == 0;
            let event = if rejected {
                "client.updated"
            } else {
                "client.created"
            };
            let aggregate = Uuid::new_v4();
            let body = event_body(
                event,
                business_id,
                aggregate,
                &format!(r#"{{"firstname":"Ana {index}"}}"#),
                None,
            );
            (rejected, aggregate, service.send_event(&body).await)
        });
    }
    let mut accepted = std::collections::HashSet::new();
    let mut rejected = std::collections::HashSet::new();
    while let Some(sent) = sends.join_next().await {
        let (expected_rejection, aggregate, response) = sent.expect("sending an event");
        if expected_rejection {
            assert_invalid_field(&response, "previous", "update of an unknown aggregate");
            rejected.insert(aggregate.to_string());
        } else {
            assert_eq!(response.status, 202, "valid event: {}", response.text());
            accepted.insert(aggregate.to_string());
        }
    }
    assert_eq!((accepted.len(), rejected.len()), (40, 20));

    let requests = receiver.wait_for_requests(accepted.len()).await;
    receiver
        .assert_count_stays(accepted.len(), ms(500), "deliveries of rejected events")
        .await;
    let delivered: std::collections::HashSet<String> =
        requests.iter().map(ReceivedRequest::aggregate_id).collect();
    assert_eq!(delivered, accepted, "each valid event delivered once");

    let listed = service
        .get(
            &format!("/v1/webhooks/{}/deliveries?limit=100", webhook.id),
            &business,
        )
        .await;
    assert_eq!(listed.status, 200, "listing: {}", listed.text());
    let listed = listed.json();
    let listed = listed["data"].as_array().expect("a data array");
    assert_eq!(
        listed.len(),
        accepted.len(),
        "no delivery stored for a rejected event"
    );
    assert!(
        listed
            .iter()
            .all(|delivery| delivery["event"] == "client.created"),
        "only the valid events have deliveries: {listed:?}"
    );
}
