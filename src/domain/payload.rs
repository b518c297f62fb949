//! The webhook body, serialized once when an event is accepted.
//!
//! The bytes built here are stored with the event and are the bytes that get
//! signed and sent on every attempt, so nothing downstream re-serializes them.

use serde_json::{Map, Value};
use uuid::Uuid;

use super::catalogue::EventType;
use super::changes::compute_changes;

/// The key that carries the computed changes inside `data`.
pub const CHANGES_KEY: &str = "changes";

/// Builds the payload bytes for one event.
///
/// `data` keeps the producer's key order and number text. For `*.updated`
/// events `changes` is computed from `previous` and appended last; other
/// events carry no `changes` key, even if the producer's snapshot had one.
pub fn build_payload(
    event: &EventType,
    aggregate_id: Uuid,
    occurred_on: &str,
    data: &Map<String, Value>,
    previous: Option<&Map<String, Value>>,
) -> Vec<u8> {
    let mut snapshot: Map<String, Value> = data
        .iter()
        .filter(|(key, _)| key.as_str() != CHANGES_KEY)
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    if event.is_update() {
        let empty = Map::new();
        let changes = compute_changes(event.entity, previous.unwrap_or(&empty), data);
        snapshot.insert(CHANGES_KEY.to_owned(), Value::Object(changes));
    }

    let mut body = Map::new();
    body.insert("event".to_owned(), Value::from(event.name));
    body.insert(
        "aggregate_id".to_owned(),
        Value::from(aggregate_id.to_string()),
    );
    body.insert("occurred_on".to_owned(), Value::from(occurred_on));
    body.insert("data".to_owned(), Value::Object(snapshot));
    serde_json::to_vec(&Value::Object(body)).expect("a JSON value always serializes")
}

/// Builds the body of a `webhook.ping` test delivery.
pub fn build_ping_payload(webhook_id: Uuid, occurred_on: &str) -> Vec<u8> {
    let mut data = Map::new();
    data.insert("webhookId".to_owned(), Value::from(webhook_id.to_string()));
    let mut body = Map::new();
    body.insert("event".to_owned(), Value::from(PING_EVENT));
    body.insert(
        "aggregate_id".to_owned(),
        Value::from(webhook_id.to_string()),
    );
    body.insert("occurred_on".to_owned(), Value::from(occurred_on));
    body.insert("data".to_owned(), Value::Object(data));
    serde_json::to_vec(&Value::Object(body)).expect("a JSON value always serializes")
}

/// The event name of test deliveries sent by hand.
pub const PING_EVENT: &str = "webhook.ping";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::catalogue::find_event;

    fn parse_object(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).expect("test snapshot is a JSON object")
    }

    #[test]
    fn update_keeps_number_text_and_puts_changes_last() {
        let event = find_event("booking.updated").unwrap();
        let previous = parse_object(r#"{"status":"pending","amount":50.0}"#);
        let data =
            parse_object(r#"{"status":"confirmed","amount":75.0,"changes":{"x":1},"note":"é/😀"}"#);
        let id = Uuid::nil();
        let body = build_payload(event, id, "2026-03-05 14:30:00", &data, Some(&previous));
        let text = String::from_utf8(body).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"event":"booking.updated","aggregate_id":"00000000-0000-0000-0000-000000000000","#,
                r#""occurred_on":"2026-03-05 14:30:00","data":{"status":"confirmed","amount":75.0,"#,
                r#""note":"é/😀","changes":{"status":{"old":"pending","new":"confirmed"},"#,
                r#""amount":{"old":50.0,"new":75.0}}}}"#
            )
        );
    }

    #[test]
    fn created_event_has_no_changes_key() {
        let event = find_event("client.created").unwrap();
        let data = parse_object(r#"{"firstname":"Ana","changes":{}}"#);
        let body = build_payload(event, Uuid::nil(), "2026-03-05 14:30:00", &data, None);
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert!(value["data"].get("changes").is_none());
    }
}
