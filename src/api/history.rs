//! Delivery history and operator actions on one webhook: list, inspect,
//! redeliver, send a test ping, and recover failed deliveries.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::auth::Business;
use super::{ApiError, AppState, FieldError, json_object, path_id, unknown_fields};
use crate::delivery::attempt_record;
use crate::delivery::sender::AttemptOutcome;
use crate::domain::catalogue::find_event;
use crate::domain::clock::{format_occurred_on, format_rfc3339, now_micros, parse_rfc3339};
use crate::domain::payload::{PING_EVENT, build_ping_payload};
use crate::store::{
    Attempt, Delivery, DeliveryQuery, Recovery, RecoveryOutcome, TestDelivery, status,
};

const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 250;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeliveryView {
    id: Uuid,
    webhook_id: Uuid,
    event_id: Uuid,
    event: String,
    aggregate_id: String,
    status: String,
    attempt_count: i64,
    created_at: String,
    last_attempt_at: Option<String>,
    next_attempt_at: Option<String>,
    last_status_code: Option<i64>,
}

impl From<Delivery> for DeliveryView {
    fn from(delivery: Delivery) -> DeliveryView {
        DeliveryView {
            id: delivery.id,
            webhook_id: delivery.webhook_id,
            event_id: delivery.event_id,
            event: delivery.event,
            aggregate_id: delivery.aggregate_id,
            status: delivery.status,
            attempt_count: delivery.attempt_count,
            created_at: format_rfc3339(delivery.created_at),
            last_attempt_at: delivery.last_attempt_at.map(format_rfc3339),
            next_attempt_at: delivery.next_attempt_at.map(format_rfc3339),
            last_status_code: delivery.last_status_code,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AttemptView {
    number: i64,
    trigger: String,
    started_at: String,
    duration_ms: i64,
    status_code: Option<i64>,
    error_kind: Option<String>,
    response_body: Option<String>,
}

impl From<Attempt> for AttemptView {
    fn from(attempt: Attempt) -> AttemptView {
        AttemptView {
            number: attempt.number,
            trigger: attempt.trigger,
            started_at: format_rfc3339(attempt.started_at),
            duration_ms: attempt.duration_ms,
            status_code: attempt.status_code,
            error_kind: attempt.error_kind,
            response_body: attempt.response_body,
        }
    }
}

/// Encodes the position after a row as an opaque cursor bound to its webhook.
fn encode_cursor(webhook_id: Uuid, delivery: &Delivery) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{webhook_id}.{}.{}",
        delivery.created_at, delivery.id
    ))
}

fn decode_cursor(webhook_id: Uuid, cursor: &str) -> Result<(i64, Uuid), ApiError> {
    let invalid =
        || ApiError::bad_request(format!("cursor {cursor:?} is not a cursor of this listing"));
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.split('.');
    let (Some(owner), Some(time), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    if Uuid::parse_str(owner).ok() != Some(webhook_id) {
        return Err(invalid());
    }
    let time = time.parse::<i64>().map_err(|_| invalid())?;
    let id = Uuid::parse_str(id).map_err(|_| invalid())?;
    Ok((time, id))
}

/// Parses the query of a delivery listing into a store query that fetches
/// one row more than the page, to tell whether a next page exists.
fn parse_list_query(
    business_id: Uuid,
    webhook_id: Uuid,
    params: &HashMap<String, String>,
) -> Result<(DeliveryQuery, usize), ApiError> {
    let mut errors = Vec::new();
    let status_filter = params
        .get("status")
        .filter(|value| !value.is_empty())
        .cloned();
    if let Some(value) = &status_filter
        && ![
            status::PENDING,
            status::SUCCEEDED,
            status::FAILED,
            status::CANCELLED,
        ]
        .contains(&value.as_str())
    {
        errors.push(FieldError::new(
            "status",
            format!("{value:?} is not one of pending, succeeded, failed, cancelled"),
        ));
    }
    let event_filter = params
        .get("event")
        .filter(|value| !value.is_empty())
        .cloned();
    if let Some(value) = &event_filter
        && find_event(value).is_none()
        && value != PING_EVENT
    {
        errors.push(FieldError::new(
            "event",
            format!("{value:?} is not a known event"),
        ));
    }
    let limit = match params.get("limit").filter(|value| !value.is_empty()) {
        None => DEFAULT_PAGE,
        Some(value) => match value.parse::<usize>() {
            Ok(limit) if (1..=MAX_PAGE).contains(&limit) => limit,
            _ => {
                errors.push(FieldError::new(
                    "limit",
                    format!("{value:?} is not a whole number from 1 to {MAX_PAGE}"),
                ));
                DEFAULT_PAGE
            }
        },
    };
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let after = match params.get("cursor").filter(|value| !value.is_empty()) {
        Some(cursor) => Some(decode_cursor(webhook_id, cursor)?),
        None => None,
    };
    let query = DeliveryQuery {
        business_id,
        webhook_id,
        status: status_filter,
        event: event_filter,
        limit: limit + 1,
        after,
    };
    Ok((query, limit))
}

pub async fn list_deliveries(
    State(state): State<AppState>,
    Business(business): Business,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let webhook_id = path_id(&id, "webhook")?;
    let (query, limit) = parse_list_query(business, webhook_id, &params)?;
    let mut rows = state
        .store()
        .list_deliveries(query)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("webhook {webhook_id} not found")))?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|last| encode_cursor(webhook_id, last))
    } else {
        None
    };
    let data: Vec<DeliveryView> = rows.into_iter().map(DeliveryView::from).collect();
    Ok(Json(serde_json::json!({ "data": data, "nextCursor": next_cursor })).into_response())
}

pub async fn get_delivery(
    State(state): State<AppState>,
    Business(business): Business,
    Path((id, delivery_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let webhook_id = path_id(&id, "webhook")?;
    let delivery_id = path_id(&delivery_id, "delivery")?;
    let detail = state
        .store()
        .get_delivery(business, webhook_id, delivery_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("delivery {delivery_id} not found")))?;
    let mut view = serde_json::to_value(DeliveryView::from(detail.delivery))
        .map_err(|_| ApiError::internal())?;
    let attempts: Vec<AttemptView> = detail.attempts.into_iter().map(AttemptView::from).collect();
    if let Value::Object(object) = &mut view {
        object.insert(
            "payload".to_owned(),
            Value::from(String::from_utf8_lossy(&detail.payload).into_owned()),
        );
        object.insert(
            "attempts".to_owned(),
            serde_json::to_value(attempts).map_err(|_| ApiError::internal())?,
        );
    }
    Ok(Json(view).into_response())
}

pub async fn redeliver(
    State(state): State<AppState>,
    Business(business): Business,
    Path((id, delivery_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let webhook_id = path_id(&id, "webhook")?;
    let delivery_id = path_id(&delivery_id, "delivery")?;
    let job = state
        .store()
        .manual_job(business, webhook_id, delivery_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("delivery {delivery_id} not found")))?;
    let context = state.delivery().clone();
    // NOTE: the manual attempt runs in this process only; if the process
    // stops before it is made, the request is lost and can be repeated.
    tokio::spawn(async move {
        let outcome = context.sender.attempt(&job).await;
        let record = attempt_record(&context, &job, &outcome);
        if let Err(error) = context.store.record_attempt(record).await {
            tracing::error!(%error, delivery.id = %job.delivery_id, "recording a manual attempt failed");
        }
    });
    tracing::info!(webhook.id = %webhook_id, delivery.id = %delivery_id, "redelivery requested");
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "id": delivery_id })),
    )
        .into_response())
}

pub async fn send_test(
    State(state): State<AppState>,
    Business(business): Business,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let webhook_id = path_id(&id, "webhook")?;
    let now = now_micros();
    let test = TestDelivery {
        business_id: business,
        webhook_id,
        payload: build_ping_payload(webhook_id, &format_occurred_on(now)),
        now,
    };
    let job = state
        .store()
        .create_test_delivery(test)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("webhook {webhook_id} not found")))?;
    let context = state.delivery();
    let outcome: AttemptOutcome = context.sender.attempt(&job).await;
    let record = attempt_record(context, &job, &outcome);
    state.store().record_attempt(record).await?;
    let view = AttemptView {
        number: 1,
        trigger: job.trigger.as_str().to_owned(),
        started_at: format_rfc3339(outcome.started_at_micros),
        duration_ms: outcome.duration_ms,
        status_code: outcome.status_code.map(i64::from),
        error_kind: outcome.error_kind.map(|kind| kind.as_str().to_owned()),
        response_body: outcome.response_body,
    };
    Ok(Json(view).into_response())
}

pub async fn recover(
    State(state): State<AppState>,
    Business(business): Business,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let webhook_id = path_id(&id, "webhook")?;
    let object = json_object(body)?;
    let mut errors = Vec::new();
    unknown_fields(&object, &["since", "until", "dryRun"], &mut errors);
    let mut time_field = |field: &str, required: bool| -> Option<i64> {
        match object.get(field) {
            None | Some(Value::Null) if !required => None,
            None | Some(Value::Null) => {
                errors.push(FieldError::new(field, "is required"));
                None
            }
            Some(Value::String(text)) => {
                let parsed = parse_rfc3339(text);
                if parsed.is_none() {
                    errors.push(FieldError::new(
                        field,
                        format!("{text:?} is not an RFC 3339 time"),
                    ));
                }
                parsed
            }
            Some(_) => {
                errors.push(FieldError::new(field, "must be an RFC 3339 time string"));
                None
            }
        }
    };
    let since = time_field("since", true);
    let until = time_field("until", false);
    let dry_run = match object.get("dryRun") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(flag)) => *flag,
        Some(_) => {
            errors.push(FieldError::new("dryRun", "must be a boolean"));
            false
        }
    };
    let now = now_micros();
    if let (Some(since), Some(until)) = (since, until)
        && until <= since
    {
        errors.push(FieldError::new("until", "must be later than since"));
    }
    let Some(since) = since.filter(|_| errors.is_empty()) else {
        return Err(ApiError::validation(errors));
    };
    let recovery = Recovery {
        business_id: business,
        webhook_id,
        since,
        until: until.unwrap_or(i64::MAX),
        dry_run,
        now,
    };
    match state.store().recover(recovery).await? {
        RecoveryOutcome::WebhookNotFound => Err(ApiError::not_found(format!(
            "webhook {webhook_id} not found"
        ))),
        RecoveryOutcome::WebhookInactive => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "webhook {webhook_id} is inactive; activate it before recovering its deliveries"
            ),
        )),
        RecoveryOutcome::Requeued(count) => {
            if !dry_run
                && count > 0
                && let Some(dispatcher) = state.dispatcher()
            {
                dispatcher.wake();
            }
            tracing::info!(webhook.id = %webhook_id, count, dry_run, "deliveries recovered");
            Ok(Json(serde_json::json!({ "deliveries": count })).into_response())
        }
    }
}
