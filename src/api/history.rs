//! Delivery history and operator actions on one webhook: list, inspect,
//! redeliver, send a test ping, and recover failed deliveries.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Business;
use super::openapi::{
    AttemptErrorKind, AttemptTrigger, BadRequest, Conflict, DeliveryEventName, DeliveryStatus,
    InternalServerError, NotFound, PayloadTooLarge, Unauthorized, UnprocessableContent,
    optional_query, or_empty, schema_ref,
};
use super::{ApiError, AppState, FieldError, PathText, json_object, path_id, unknown_fields};
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

/// One event for one webhook.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Delivery)]
pub(super) struct DeliveryView {
    /// The delivery id, sent as `X-CitaPro-Delivery-Id` on every attempt.
    id: Uuid,
    webhook_id: Uuid,
    event_id: Uuid,
    #[schema(value_type = DeliveryEventName)]
    event: String,
    #[schema(format = Uuid)]
    aggregate_id: String,
    #[schema(value_type = DeliveryStatus)]
    status: String,
    /// Attempts made so far, of every trigger.
    attempt_count: i64,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime, required = true)]
    last_attempt_at: Option<String>,
    /// When the next automatic attempt of a pending delivery is due.
    #[schema(format = DateTime, required = true)]
    next_attempt_at: Option<String>,
    /// The HTTP status of the last attempt, or `null` when it got no response.
    #[schema(required = true)]
    last_status_code: Option<i64>,
}

/// A page of deliveries, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeliveryPage {
    data: Vec<DeliveryView>,
    /// The `cursor` of the next page, or `null` on the last page.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

/// One delivery with the body that was sent and every attempt.
#[derive(Serialize, ToSchema)]
#[schema(as = DeliveryDetail)]
pub(super) struct DeliveryDetailView {
    #[serde(flatten)]
    delivery: DeliveryView,
    /// The exact body sent, as a string.
    payload: String,
    /// Every attempt, oldest first.
    attempts: Vec<AttemptView>,
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

/// One HTTP request of a delivery and its outcome.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Attempt)]
pub(super) struct AttemptView {
    /// The attempt's position in its delivery, from 1.
    number: i64,
    #[schema(value_type = AttemptTrigger)]
    trigger: String,
    #[schema(format = DateTime)]
    started_at: String,
    duration_ms: i64,
    /// The response status, or `null` when no response arrived.
    #[schema(required = true)]
    status_code: Option<i64>,
    /// `null` on success.
    #[schema(value_type = Option<AttemptErrorKind>, required = true)]
    error_kind: Option<String>,
    /// The first 4 KiB of the response body, decoded as UTF-8 with invalid
    /// bytes replaced, or `null` when no response arrived.
    #[schema(required = true)]
    response_body: Option<String>,
}

/// The query parameters of a delivery listing, as `parse_list_query` reads them.
pub(super) struct DeliveryListParams;

impl IntoParams for DeliveryListParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let limit = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(MAX_PAGE));
        vec![
            optional_query(
                "status",
                "Only deliveries in this state. An empty value is the same as none.",
                or_empty(schema_ref::<DeliveryStatus>()),
            ),
            optional_query(
                "event",
                "Only deliveries of this event. An empty value is the same as none.",
                or_empty(schema_ref::<DeliveryEventName>()),
            ),
            optional_query(
                "limit",
                "Deliveries on one page; 50 when left out or empty.",
                or_empty(limit),
            ),
            optional_query(
                "cursor",
                "The `nextCursor` of the previous page; the first page when left out or empty.",
                ObjectBuilder::new().schema_type(Type::String).into(),
            ),
        ]
    }
}

/// The response body of a redelivery request.
#[derive(Serialize, ToSchema)]
pub(super) struct RedeliveryAccepted {
    /// The delivery that gets one more attempt.
    id: Uuid,
}

/// The body of `POST /v1/webhooks/{id}/recover`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code, reason = "describes the body that `recover` reads")]
pub(super) struct RecoverRequest {
    /// Start of the window of creation times, inclusive (RFC 3339).
    #[schema(format = DateTime)]
    since: String,
    /// End of the window, exclusive and later than `since`. No end when left out.
    #[schema(format = DateTime)]
    until: Option<String>,
    /// Only count the deliveries, without requeuing them. `false` when left out.
    dry_run: Option<bool>,
}

/// The outcome of a recovery.
#[derive(Serialize, ToSchema)]
pub(super) struct RecoveryResult {
    /// Deliveries requeued, or that would be with `dryRun`.
    deliveries: u64,
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

/// Lists a webhook's deliveries
///
/// Newest first, ordered by creation time and then by id, so pages never
/// skip or repeat a delivery.
#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}/deliveries",
    tag = "deliveries",
    security(("businessApiKey" = [])),
    params(("id" = Uuid, Path, description = "The webhook's id"), DeliveryListParams),
    responses(
        (status = 200, description = "One page of deliveries", body = DeliveryPage),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 422, response = UnprocessableContent),
        (status = 500, response = InternalServerError),
    )
)]
pub async fn list_deliveries(
    State(state): State<AppState>,
    Business(business): Business,
    PathText(id): PathText<String>,
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
    Ok(Json(DeliveryPage { data, next_cursor }).into_response())
}

/// Reads one delivery with its body and attempts
#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}/deliveries/{delivery_id}",
    tag = "deliveries",
    security(("businessApiKey" = [])),
    params(
        ("id" = Uuid, Path, description = "The webhook's id"),
        ("delivery_id" = Uuid, Path, description = "The delivery's id"),
    ),
    responses(
        (status = 200, description = "The delivery", body = DeliveryDetailView),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = InternalServerError),
    )
)]
pub async fn get_delivery(
    State(state): State<AppState>,
    Business(business): Business,
    PathText((id, delivery_id)): PathText<(String, String)>,
) -> Result<Response, ApiError> {
    let webhook_id = path_id(&id, "webhook")?;
    let delivery_id = path_id(&delivery_id, "delivery")?;
    let detail = state
        .store()
        .get_delivery(business, webhook_id, delivery_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("delivery {delivery_id} not found")))?;
    let view = DeliveryDetailView {
        delivery: DeliveryView::from(detail.delivery),
        payload: String::from_utf8_lossy(&detail.payload).into_owned(),
        attempts: detail.attempts.into_iter().map(AttemptView::from).collect(),
    };
    Ok(Json(view).into_response())
}

/// Makes one more attempt of a delivery
///
/// The attempt runs after the `202`, whatever the delivery's state, with the
/// same id and body and a new timestamp and signature.
#[utoipa::path(
    post,
    path = "/v1/webhooks/{id}/deliveries/{delivery_id}/redeliver",
    tag = "deliveries",
    security(("businessApiKey" = [])),
    params(
        ("id" = Uuid, Path, description = "The webhook's id"),
        ("delivery_id" = Uuid, Path, description = "The delivery's id"),
    ),
    responses(
        (status = 202, description = "The attempt is under way", body = RedeliveryAccepted),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = InternalServerError),
    )
)]
pub async fn redeliver(
    State(state): State<AppState>,
    Business(business): Business,
    PathText((id, delivery_id)): PathText<(String, String)>,
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
        Json(RedeliveryAccepted { id: delivery_id }),
    )
        .into_response())
}

/// Sends a signed `webhook.ping` to the webhook at once
///
/// Waits for the outcome, at most the request timeout, and returns the
/// attempt. A failed attempt is still a `200`, with its `errorKind`.
#[utoipa::path(
    post,
    path = "/v1/webhooks/{id}/test",
    tag = "deliveries",
    security(("businessApiKey" = [])),
    params(("id" = Uuid, Path, description = "The webhook's id")),
    responses(
        (status = 200, description = "The attempt of the test ping", body = AttemptView),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = InternalServerError),
    )
)]
pub async fn send_test(
    State(state): State<AppState>,
    Business(business): Business,
    PathText(id): PathText<String>,
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

/// Requeues a webhook's failed and cancelled deliveries
///
/// Requeues those created in `[since, until)`, test pings excluded. Each
/// starts a new retry cycle. The webhook must be active.
#[utoipa::path(
    post,
    path = "/v1/webhooks/{id}/recover",
    tag = "deliveries",
    security(("businessApiKey" = [])),
    params(("id" = Uuid, Path, description = "The webhook's id")),
    request_body = RecoverRequest,
    responses(
        (status = 200, description = "How many deliveries were requeued", body = RecoveryResult),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableContent),
        (status = 500, response = InternalServerError),
    )
)]
pub async fn recover(
    State(state): State<AppState>,
    Business(business): Business,
    PathText(id): PathText<String>,
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
            Ok(Json(RecoveryResult { deliveries: count }).into_response())
        }
    }
}
