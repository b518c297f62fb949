//! The body that receivers get: `changes` for every entity, key order,
//! number text, non-ASCII text, and delivery only to subscribers.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    OCCURRED_ON, ReceivedRequest, ServiceOptions, TestReceiver, TestService, event_body,
};

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("{text} is not JSON: {error}"))
}

/// Sends one event to a fresh service with one subscribed webhook and
/// returns the request its receiver got.
async fn deliver_one(event: &str, data: &str, previous: Option<&str>) -> ReceivedRequest {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    service
        .create_webhook(&business, &receiver.url, &[event])
        .await;
    service
        .accept_event(&event_body(
            event,
            business.id,
            Uuid::new_v4(),
            data,
            previous,
        ))
        .await;
    let mut received = receiver.wait_for_requests(1).await;
    received.remove(0)
}

/// Returns the `changes` of a delivered `*.updated` event.
async fn delivered_changes(event: &str, previous: &str, data: &str) -> Value {
    let request = deliver_one(event, data, Some(previous)).await;
    let body = request.json();
    assert_eq!(body["event"], json!(event), "delivered event name");
    body["data"]
        .get("changes")
        .cloned()
        .unwrap_or_else(|| panic!("{event} delivery has no data.changes: {body}"))
}

fn data_keys(body: &Value) -> Vec<String> {
    body["data"]
        .as_object()
        .expect("data is an object")
        .keys()
        .cloned()
        .collect()
}

#[tokio::test]
async fn booking_update_changes() {
    let previous = r#"{"startTime":"2026-04-01 14:00:00","endTime":"2026-04-01 15:00:00","status":"pending","internalNote":null,"clientNote":"ventana","payment_status":null,"isFromWeb":false,"amount":75,"clientId":"c1","personId":"p1","notifyClient":true,"lastUpdatedBy":"u1"}"#;
    let data = r#"{"startTime":"2026-04-01 14:00:00","endTime":"2026-04-01 15:00:00","status":"confirmed","internalNote":null,"clientNote":"ventana","payment_status":"paid","isFromWeb":true,"amount":75.0,"clientId":"c1","personId":null,"notifyClient":false,"lastUpdatedBy":"u2"}"#;

    let changes = delivered_changes("booking.updated", previous, data).await;

    assert_eq!(
        changes,
        parse(
            r#"{"status":{"old":"pending","new":"confirmed"},"paymentStatus":{"old":null,"new":"paid"},"personId":{"old":"p1","new":null}}"#
        )
    );
    assert!(
        changes.get("payment_status").is_none(),
        "changes uses the key paymentStatus"
    );
    assert!(changes.get("amount").is_none(), "75 and 75.0 are equal");
    assert!(
        changes.get("isFromWeb").is_none(),
        "isFromWeb is not tracked"
    );
}

#[tokio::test]
async fn booking_status_update_has_changes() {
    let changes = delivered_changes(
        "booking.status.updated",
        r#"{"status":"confirmed","amount":10}"#,
        r#"{"status":"cancelled","amount":10}"#,
    )
    .await;

    assert_eq!(
        changes,
        parse(r#"{"status":{"old":"confirmed","new":"cancelled"}}"#)
    );
}

#[tokio::test]
async fn client_update_changes() {
    let previous = r#"{"firstname":"Ana","lastname":"Gómez","email":"ana@example.com","phone":"+57 300 000","docType":null,"docNumber":null,"birthdate":"1990-01-01","address":null,"city":"Bogotá","state":null,"country":"CO","notes":"antes"}"#;
    let data = r#"{"firstname":"Ana María","lastname":"Gómez","email":"ana@example.com","phone":"+57 300 000","docType":"CC","docNumber":null,"birthdate":"1990-01-01","address":null,"city":"Medellín","state":null,"country":"CO","notes":"después"}"#;

    let changes = delivered_changes("client.updated", previous, data).await;

    assert_eq!(
        changes,
        parse(
            r#"{"firstname":{"old":"Ana","new":"Ana María"},"docType":{"old":null,"new":"CC"},"city":{"old":"Bogotá","new":"Medellín"}}"#
        )
    );
}

#[tokio::test]
async fn service_update_changes() {
    let previous = r#"{"name":"Corte","duration":60,"domiciliary":false,"virtual":false,"status":"active","showInMinisite":true,"price":20,"categoryId":"k1","description":null,"sessions":null,"simultaneous":1,"color":"red"}"#;
    let data = r#"{"name":"Corte","duration":90,"domiciliary":true,"virtual":false,"status":"active","showInMinisite":true,"price":20.00,"categoryId":"k1","description":"Largo","sessions":null,"simultaneous":1,"color":"blue"}"#;

    let changes = delivered_changes("service.updated", previous, data).await;

    assert_eq!(
        changes,
        parse(
            r#"{"duration":{"old":60,"new":90},"domiciliary":{"old":false,"new":true},"description":{"old":null,"new":"Largo"}}"#
        )
    );
}

#[tokio::test]
async fn person_update_changes() {
    let previous = r#"{"locationId":"l1","firstName":"Luis","lastName":"Pérez","specialty":null,"email":"luis@example.com","status":"active","showInMinisite":true,"phone":null,"address":null,"idType":null,"idNumber":null,"birthdate":null,"userId":null,"avatar":"a.png"}"#;
    let data = r#"{"locationId":"l1","firstName":"Luisa","lastName":"Pérez","specialty":null,"email":"luis@example.com","status":"active","showInMinisite":false,"phone":null,"address":null,"idType":null,"idNumber":null,"birthdate":null,"userId":"u1","avatar":"b.png"}"#;

    let changes = delivered_changes("person.updated", previous, data).await;

    assert_eq!(
        changes,
        parse(
            r#"{"firstName":{"old":"Luis","new":"Luisa"},"showInMinisite":{"old":true,"new":false},"userId":{"old":null,"new":"u1"}}"#
        )
    );
}

#[tokio::test]
async fn custom_field_update_changes() {
    let previous = r#"{"name":"Talla","fieldType":"select","required":false,"options":["S","M"],"sortOrder":1,"showInMinisite":1,"requiredInMinisite":0,"showInIaAgent":0,"requiredInIaAgent":0,"placeholder":"x"}"#;
    let data = r#"{"name":"Talla","fieldType":"select","required":true,"options":["S","M","L"],"sortOrder":1,"showInMinisite":1,"requiredInMinisite":0,"showInIaAgent":1,"requiredInIaAgent":0,"placeholder":"y"}"#;

    let changes = delivered_changes("custom_field.updated", previous, data).await;

    assert_eq!(
        changes,
        parse(
            r#"{"required":{"old":false,"new":true},"options":{"old":["S","M"],"new":["S","M","L"]},"showInIaAgent":{"old":0,"new":1}}"#
        )
    );
}

#[tokio::test]
async fn time_block_update_changes() {
    let previous = r#"{"name":"Almuerzo","startTime":"12:00","endTime":"13:00","locationId":"l1","repetition":{"freq":"weekly","count":3},"providers":["p1"],"color":"x"}"#;
    let data = r#"{"name":"Almuerzo largo","startTime":"12:00","endTime":"13:30","locationId":"l1","repetition":{"count":3.0,"freq":"weekly"},"providers":["p1","p2"],"color":"y"}"#;

    let changes = delivered_changes("time_block.updated", previous, data).await;

    assert_eq!(
        changes,
        parse(
            r#"{"name":{"old":"Almuerzo","new":"Almuerzo largo"},"endTime":{"old":"13:00","new":"13:30"},"providers":{"old":["p1"],"new":["p1","p2"]}}"#
        )
    );
    assert!(
        changes.get("repetition").is_none(),
        "objects compare without key order and numbers by value"
    );
}

#[tokio::test]
async fn untracked_changes_give_empty_changes() {
    let changes = delivered_changes(
        "booking.updated",
        r#"{"status":"confirmed","amount":75.0,"notifyClient":true,"isFromApi":false}"#,
        r#"{"status":"confirmed","amount":75,"notifyClient":false,"isFromApi":true}"#,
    )
    .await;

    assert_eq!(changes, json!({}));
}

#[tokio::test]
async fn payload_bytes_keep_producer_form() {
    let aggregate = Uuid::new_v4();
    let data = concat!(
        r#"{"startTime":"2026-04-01 14:00:00","endTime":"2026-04-01 15:00:00","status":"confirmed","#,
        r#""internalNote":null,"clientNote":"Café ñandú 😀 a/b & <c> \"q\"","payment_status":null,"#,
        r#""isFromWeb":false,"isFromAgent":false,"isFromApi":false,"amount":75.0,"price":19.99,"#,
        r#""clientId":"550e8400-e29b-41d4-a716-446655440001","notifyClient":true,"repeatGroupId":null}"#
    );
    let previous = data
        .replace(r#""status":"confirmed""#, r#""status":"pending""#)
        .replace(r#""amount":75.0"#, r#""amount":50.0"#);
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    service
        .create_webhook(&business, &receiver.url, &["booking.updated"])
        .await;

    service
        .accept_event(&event_body(
            "booking.updated",
            business.id,
            aggregate,
            data,
            Some(&previous),
        ))
        .await;

    let request = receiver.wait_for_requests(1).await.remove(0);
    let text = std::str::from_utf8(&request.body).expect("the body is UTF-8");
    let body = request.json();
    assert_eq!(
        data_keys(&body),
        [
            "startTime",
            "endTime",
            "status",
            "internalNote",
            "clientNote",
            "payment_status",
            "isFromWeb",
            "isFromAgent",
            "isFromApi",
            "amount",
            "price",
            "clientId",
            "notifyClient",
            "repeatGroupId",
            "changes"
        ],
        "data keeps the producer's key order with changes last"
    );
    assert!(
        text.contains(r#""amount":75.0,"#),
        "75.0 stays 75.0: {text}"
    );
    assert!(
        text.contains(r#""price":19.99,"#),
        "19.99 stays 19.99: {text}"
    );
    assert!(
        text.contains(r#""amount":{"old":50.0,"new":75.0}"#),
        "changes keep the number text: {text}"
    );
    assert!(
        text.contains("Café ñandú 😀 a/b & <c>"),
        "non-ASCII text, slash, ampersand and angle brackets are not escaped: {text}"
    );
    let expected_data = &data[..data.len() - 1];
    let expected = format!(
        r#"{{"event":"booking.updated","aggregate_id":"{aggregate}","occurred_on":"{OCCURRED_ON}","data":{expected_data},"changes":{{"status":{{"old":"pending","new":"confirmed"}},"amount":{{"old":50.0,"new":75.0}}}}}}}}"#
    );
    assert_eq!(text, expected, "the body, byte for byte");
    assert_eq!(
        request.header("content-length"),
        request.body.len().to_string(),
        "Content-Length counts bytes"
    );
    assert!(
        request.body.len() > text.chars().count(),
        "the body has multi-byte characters"
    );
    assert!(
        request.headers.get("transfer-encoding").is_none(),
        "the body is not chunked"
    );
}

#[tokio::test]
async fn created_event_has_no_changes() {
    let data = r#"{"firstname":"Ana","lastname":"Gómez","email":"ana@example.com"}"#;

    let request = deliver_one("client.created", data, None).await;

    let body = request.json();
    assert!(
        body["data"].get("changes").is_none(),
        "client.created has no changes: {body}"
    );
    assert_eq!(body["data"], parse(data));
    assert_eq!(body["event"], json!("client.created"));
    assert_eq!(body["occurred_on"], json!(OCCURRED_ON));
}

#[tokio::test]
async fn created_event_drops_producer_changes() {
    let request = deliver_one(
        "time_block.created",
        r#"{"name":"Almuerzo","changes":{"name":{"old":"x","new":"y"}},"providers":["p1"]}"#,
        None,
    )
    .await;

    let body = request.json();
    assert!(
        body["data"].get("changes").is_none(),
        "a created event carries no changes: {body}"
    );
    assert_eq!(data_keys(&body), ["name", "providers"]);
}

#[tokio::test]
async fn deleted_event_has_no_changes() {
    let request = deliver_one("person.deleted", r#"{"firstName":"Luis"}"#, None).await;

    let body = request.json();
    assert!(
        body["data"].get("changes").is_none(),
        "person.deleted has no changes: {body}"
    );
}

#[tokio::test]
async fn occurred_on_defaults_to_utc_now() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;
    let body = format!(
        r#"{{"event":"client.created","business_account_id":"{}","aggregate_id":"{}","data":{{"firstname":"Ana"}}}}"#,
        business.id,
        Uuid::new_v4()
    );
    let before = time::OffsetDateTime::now_utc();

    service.accept_event(&body).await;

    let received = receiver.wait_for_requests(1).await.remove(0).json();
    let text = received["occurred_on"]
        .as_str()
        .expect("occurred_on is text");
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let occurred = time::PrimitiveDateTime::parse(text, format)
        .unwrap_or_else(|error| panic!("occurred_on {text:?}: {error}"))
        .assume_utc();
    let after = time::OffsetDateTime::now_utc();
    assert!(
        occurred >= before.replace_nanosecond(0).unwrap() && occurred <= after,
        "occurred_on {text} is the UTC accept time, between {before} and {after}"
    );
}

#[tokio::test]
async fn only_subscribed_endpoints_receive_event() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let bookings = TestReceiver::start().await;
    let clients = TestReceiver::start().await;
    let inactive = TestReceiver::start().await;
    service
        .create_webhook(
            &business,
            &bookings.url,
            &["booking.created", "booking.updated"],
        )
        .await;
    service
        .create_webhook(&business, &clients.url, &["client.created"])
        .await;
    let disabled = service
        .create_webhook(
            &business,
            &inactive.url,
            &["booking.created", "client.created"],
        )
        .await;
    service
        .update_webhook(
            &business,
            &disabled.id,
            &inactive.url,
            &["booking.created", "client.created"],
            false,
        )
        .await;

    let booking = service
        .accept_event(&event_body(
            "booking.created",
            business.id,
            Uuid::new_v4(),
            r#"{"status":"pending"}"#,
            None,
        ))
        .await;
    assert_eq!(booking["deliveries"], json!(1), "one active subscriber");
    let booking_requests = bookings.wait_for_requests(1).await;
    assert_eq!(
        booking_requests[0].header("x-citapro-event"),
        "booking.created"
    );

    // booking.status.updated shares a prefix with booking.updated but is another event.
    let status = service
        .accept_event(&event_body(
            "booking.status.updated",
            business.id,
            Uuid::new_v4(),
            r#"{"status":"confirmed"}"#,
            Some(r#"{"status":"pending"}"#),
        ))
        .await;
    assert_eq!(status["deliveries"], json!(0), "no subscriber");

    let client = service
        .accept_event(&event_body(
            "client.created",
            business.id,
            Uuid::new_v4(),
            r#"{"firstname":"Ana"}"#,
            None,
        ))
        .await;
    assert_eq!(client["deliveries"], json!(1));
    let client_requests = clients.wait_for_requests(1).await;
    assert_eq!(
        client_requests[0].header("x-citapro-event"),
        "client.created"
    );

    assert_eq!(
        bookings.request_count(),
        1,
        "the booking endpoint got only its event"
    );
    assert_eq!(
        clients.request_count(),
        1,
        "the client endpoint got only its event"
    );
    assert_eq!(
        inactive.request_count(),
        0,
        "the inactive endpoint got nothing"
    );
}
