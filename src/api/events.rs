//! `POST /v1/events`: the producer reports a domain event.
//!
//! A `202` is sent only after the event, its payload and all its deliveries
//! are committed. Invalid input stores nothing.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Producer;
use super::openapi::{
    BadRequest, EventName, InternalServerError, PayloadTooLarge, Unauthorized, UnprocessableContent,
};
use super::{ApiError, AppState, FieldError, json_object, unknown_fields};
use crate::domain::catalogue::{EventType, find_event};
use crate::domain::changes::check_tracked_types;
use crate::domain::clock::{format_occurred_on, is_valid_occurred_on, now_micros};
use crate::domain::payload::build_payload;
use crate::metrics::{EventLabels, metrics};
use crate::store::NewEvent;

const FIELDS: &[&str] = &[
    "event",
    "business_account_id",
    "aggregate_id",
    "occurred_on",
    "data",
    "previous",
];

/// The body of `POST /v1/events`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code, reason = "describes the body that `parse_request` reads")]
pub(super) struct EventRequestBody {
    #[schema(value_type = EventName)]
    event: String,
    /// The business whose webhooks receive the event.
    business_account_id: Uuid,
    /// The id of the entity that the event describes.
    aggregate_id: Uuid,
    /// When the event happened, in UTC. The time of acceptance when left out.
    #[schema(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$")]
    occurred_on: Option<String>,
    /// The entity's new state, delivered as sent. Its tracked fields must
    /// have their documented types.
    #[schema(value_type = Object)]
    data: Map<String, Value>,
    /// The entity's state before an update, to compute `changes` from.
    /// Without it, the state stored by the aggregate's last event is used.
    /// Ignored on events other than updates.
    #[schema(value_type = Option<Object>)]
    previous: Option<Map<String, Value>>,
}

/// The response body of an accepted event.
#[derive(Serialize, ToSchema)]
pub(super) struct EventAccepted {
    /// The id of the stored event.
    id: Uuid,
    /// Deliveries created, one per active webhook of the business subscribed to the event.
    deliveries: usize,
}

/// A producer request that passed validation.
struct EventRequest {
    event: &'static EventType,
    business_id: Uuid,
    aggregate_id: Uuid,
    occurred_on: Option<String>,
    data: Map<String, Value>,
    previous: Option<Map<String, Value>>,
}

fn parse_uuid_field(
    object: &Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Uuid> {
    match object.get(field) {
        None | Some(Value::Null) => errors.push(FieldError::new(field, "is required")),
        Some(Value::String(text)) => match Uuid::try_parse(text) {
            Ok(id) => return Some(id),
            Err(_) => errors.push(FieldError::new(field, format!("{text:?} is not a UUID"))),
        },
        Some(_) => errors.push(FieldError::new(field, "must be a UUID string")),
    }
    None
}

/// Reads a snapshot field's value, taken out of the request body.
fn parse_snapshot(
    value: Option<Value>,
    field: &str,
    event: Option<&EventType>,
    errors: &mut Vec<FieldError>,
) -> Option<Map<String, Value>> {
    let snapshot = match value {
        None | Some(Value::Null) => return None,
        Some(Value::Object(snapshot)) => snapshot,
        Some(_) => {
            errors.push(FieldError::new(field, "must be a JSON object"));
            return None;
        }
    };
    if let Some(event) = event {
        for error in check_tracked_types(event.entity, &snapshot) {
            errors.push(FieldError::new(
                format!("{field}.{}", error.key),
                format!("must be {} for {}", error.expected, event.entity.name),
            ));
        }
    }
    Some(snapshot)
}

fn parse_request(mut object: Map<String, Value>) -> Result<EventRequest, ApiError> {
    let mut errors = Vec::new();
    unknown_fields(&object, FIELDS, &mut errors);

    let event = match object.get("event") {
        None | Some(Value::Null) => {
            errors.push(FieldError::new("event", "is required"));
            None
        }
        Some(Value::String(name)) => {
            let found = find_event(name);
            if found.is_none() {
                errors.push(FieldError::new(
                    "event",
                    format!("{name:?} is not a known event"),
                ));
            }
            found
        }
        Some(_) => {
            errors.push(FieldError::new("event", "must be a string"));
            None
        }
    };
    let business_id = parse_uuid_field(&object, "business_account_id", &mut errors);
    let aggregate_id = parse_uuid_field(&object, "aggregate_id", &mut errors);

    let occurred_on = match object.get("occurred_on") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) if is_valid_occurred_on(text) => Some(text.clone()),
        Some(Value::String(text)) => {
            errors.push(FieldError::new(
                "occurred_on",
                format!("{text:?} is not a UTC time in the form YYYY-MM-DD HH:MM:SS"),
            ));
            None
        }
        Some(_) => {
            errors.push(FieldError::new("occurred_on", "must be a string"));
            None
        }
    };

    if object.get("data").is_none_or(Value::is_null) {
        errors.push(FieldError::new("data", "is required"));
    }
    let data = parse_snapshot(object.remove("data"), "data", event, &mut errors);
    let previous = parse_snapshot(object.remove("previous"), "previous", event, &mut errors);

    match (event, business_id, aggregate_id, data) {
        (Some(event), Some(business_id), Some(aggregate_id), Some(data)) if errors.is_empty() => {
            Ok(EventRequest {
                event,
                business_id,
                aggregate_id,
                occurred_on,
                data,
                previous,
            })
        }
        _ => Err(ApiError::validation(errors)),
    }
}

/// Reports a domain event
///
/// The `202` is sent only after the event and all its deliveries are
/// committed. Invalid input stores nothing.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "events",
    security(("producerToken" = [])),
    request_body = EventRequestBody,
    responses(
        (status = 202, description = "The event and its deliveries are stored", body = EventAccepted),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableContent),
        (status = 500, response = InternalServerError),
    )
)]
pub async fn accept_event(
    State(state): State<AppState>,
    _producer: Producer,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let object = json_object(body)?;
    let request = parse_request(object)?;

    let accepted_at = now_micros();
    let occurred_on = request
        .occurred_on
        .unwrap_or_else(|| format_occurred_on(accepted_at));
    // Without `previous`, an update's payload needs the stored state, which
    // only the store can read consistently, so it builds the payload itself.
    let payload = (!request.event.is_update() || request.previous.is_some()).then(|| {
        build_payload(
            request.event,
            request.aggregate_id,
            &occurred_on,
            &request.data,
            request.previous.as_ref(),
        )
    });
    let dispatcher = state.dispatcher();
    let new_event = NewEvent {
        id: Uuid::now_v7(),
        business_id: request.business_id,
        event: request.event,
        aggregate_id: request.aggregate_id,
        occurred_on,
        data: request.data,
        payload,
        accepted_at,
        lease: dispatcher.map(|dispatcher| dispatcher.new_lease(accepted_at)),
    };
    let accepted = state.store().accept_event(new_event).await?;
    metrics()
        .events_accepted
        .get_or_create(&EventLabels {
            event: request.event.name,
        })
        .inc();
    let deliveries = accepted.jobs.len();
    if let Some(dispatcher) = dispatcher {
        dispatcher.submit(accepted.jobs);
    }
    let body = EventAccepted {
        id: accepted.event_id,
        deliveries,
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
