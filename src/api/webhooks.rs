//! `/v1/webhooks`: register, list, read, replace and delete endpoints.

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

use super::auth::Business;
use super::openapi::{
    BadRequest, EventName, InternalServerError, NotFound, PayloadTooLarge, Unauthorized,
    UnprocessableContent,
};
use super::{
    ApiError, AppState, FieldError, MAX_WEBHOOKS_PER_BUSINESS, PathText, json_object, path_id,
    unknown_fields,
};
use crate::domain::catalogue::find_event;
use crate::domain::clock::{format_rfc3339, now_micros};
use crate::domain::credentials::generate_secret;
use crate::domain::destination::{DestinationPolicy, parse_webhook_url};
use crate::store::{Webhook, WebhookChange};

/// A webhook as the API shows it. The secret appears only in the `201` of its creation.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Webhook)]
pub(super) struct WebhookView {
    id: Uuid,
    /// The endpoint URL, as it was sent.
    url: String,
    /// The subscribed events, without duplicates.
    #[schema(value_type = Vec<EventName>)]
    events: Vec<String>,
    /// Whether new events are delivered to this endpoint.
    is_active: bool,
    /// RFC 3339 in UTC with milliseconds.
    #[schema(format = DateTime)]
    created_at: String,
    /// RFC 3339 in UTC with milliseconds.
    #[schema(format = DateTime)]
    updated_at: String,
    /// The HMAC-SHA256 signing key, 64 lowercase hex characters used as
    /// written. Only the `201` of the creation carries it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[0-9a-f]{64}$", nullable = false)]
    secret: Option<String>,
}

/// The webhooks of a business, newest first.
#[derive(Serialize, ToSchema)]
pub(super) struct WebhookList {
    data: Vec<WebhookView>,
}

/// The body of `POST /v1/webhooks`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code, reason = "describes the body that `parse_settings` reads")]
pub(super) struct CreateWebhookRequest {
    /// An absolute `https` URL without user info, fragment or whitespace,
    /// whose host is not `localhost` nor an address in a loopback, private,
    /// link-local or other reserved range.
    #[schema(max_length = 2048, pattern = r"^https://\S+$")]
    url: String,
    #[schema(min_items = 1, value_type = Vec<EventName>)]
    events: Vec<String>,
    /// Whether new events are delivered to this endpoint. `true` when left out.
    #[serde(default)]
    is_active: bool,
}

/// The body of `PUT /v1/webhooks/{id}`, which replaces every setting.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code, reason = "describes the body that `parse_settings` reads")]
pub(super) struct UpdateWebhookRequest {
    /// An absolute `https` URL without user info, fragment or whitespace,
    /// whose host is not `localhost` nor an address in a loopback, private,
    /// link-local or other reserved range.
    #[schema(max_length = 2048, pattern = r"^https://\S+$")]
    url: String,
    #[schema(min_items = 1, value_type = Vec<EventName>)]
    events: Vec<String>,
    /// Whether new events are delivered to this endpoint. `false` cancels
    /// the pending deliveries.
    is_active: bool,
}

impl WebhookView {
    fn without_secret(webhook: Webhook) -> WebhookView {
        WebhookView {
            id: webhook.id,
            url: webhook.url,
            events: webhook.events,
            is_active: webhook.is_active,
            created_at: format_rfc3339(webhook.created_at),
            updated_at: format_rfc3339(webhook.updated_at),
            secret: None,
        }
    }
}

/// Validated settings from a `POST` or `PUT` body.
struct WebhookSettings {
    url: String,
    events: Vec<String>,
    is_active: Option<bool>,
}

fn parse_url(
    object: &Map<String, Value>,
    policy: DestinationPolicy,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match object.get("url") {
        None | Some(Value::Null) => errors.push(FieldError::new("url", "is required")),
        Some(Value::String(text)) => match parse_webhook_url(text, policy) {
            Ok(_) => return Some(text.clone()),
            Err(message) => errors.push(FieldError::new("url", format!("{text:?} {message}"))),
        },
        Some(_) => errors.push(FieldError::new("url", "must be a string")),
    }
    None
}

fn parse_events(object: &Map<String, Value>, errors: &mut Vec<FieldError>) -> Option<Vec<String>> {
    let items = match object.get("events") {
        None | Some(Value::Null) => {
            errors.push(FieldError::new("events", "is required"));
            return None;
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            errors.push(FieldError::new("events", "must be an array of event names"));
            return None;
        }
    };
    if items.is_empty() {
        errors.push(FieldError::new("events", "must name at least one event"));
        return None;
    }
    let mut events: Vec<String> = Vec::new();
    let mut valid = true;
    for (index, item) in items.iter().enumerate() {
        let field = format!("events[{index}]");
        match item.as_str().map(|name| (name, find_event(name))) {
            Some((_, Some(event))) => {
                if !events.iter().any(|known| known == event.name) {
                    events.push(event.name.to_owned());
                }
            }
            Some((name, None)) => {
                valid = false;
                errors.push(FieldError::new(
                    field,
                    format!("{name:?} is not a known event"),
                ));
            }
            None => {
                valid = false;
                errors.push(FieldError::new(field, "must be a string"));
            }
        }
    }
    valid.then_some(events)
}

fn parse_is_active(
    object: &Map<String, Value>,
    required: bool,
    errors: &mut Vec<FieldError>,
) -> Option<bool> {
    match object.get("isActive") {
        Some(Value::Bool(active)) => Some(*active),
        None if !required => None,
        None | Some(Value::Null) => {
            errors.push(FieldError::new("isActive", "is required"));
            None
        }
        Some(_) => {
            errors.push(FieldError::new("isActive", "must be a boolean"));
            None
        }
    }
}

fn parse_settings(
    object: &Map<String, Value>,
    policy: DestinationPolicy,
    replace: bool,
) -> Result<WebhookSettings, ApiError> {
    let mut errors = Vec::new();
    unknown_fields(object, &["url", "events", "isActive"], &mut errors);
    let url = parse_url(object, policy, &mut errors);
    let events = parse_events(object, &mut errors);
    let is_active = parse_is_active(object, replace, &mut errors);
    match (url, events) {
        (Some(url), Some(events)) if errors.is_empty() => Ok(WebhookSettings {
            url,
            events,
            is_active,
        }),
        _ => Err(ApiError::validation(errors)),
    }
}

/// Lists the business's webhooks
#[utoipa::path(
    get,
    path = "/v1/webhooks",
    tag = "webhooks",
    security(("businessApiKey" = [])),
    responses(
        (status = 200, description = "The webhooks, newest first, without secrets", body = WebhookList),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalServerError),
    )
)]
pub async fn list_webhooks(
    State(state): State<AppState>,
    Business(business): Business,
) -> Result<Response, ApiError> {
    let webhooks = state.store().list_webhooks(business).await?;
    let data: Vec<WebhookView> = webhooks
        .into_iter()
        .map(WebhookView::without_secret)
        .collect();
    Ok(Json(WebhookList { data }).into_response())
}

/// Registers a webhook
///
/// A business has at most 100 webhooks; registering one more is `422`.
#[utoipa::path(
    post,
    path = "/v1/webhooks",
    tag = "webhooks",
    security(("businessApiKey" = [])),
    request_body = CreateWebhookRequest,
    responses(
        (status = 201, description = "The new webhook, with its secret", body = WebhookView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableContent),
        (status = 500, response = InternalServerError),
    )
)]
pub async fn create_webhook(
    State(state): State<AppState>,
    Business(business): Business,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let object = json_object(body)?;
    let settings = parse_settings(&object, state.config().destinations, false)?;
    let now = now_micros();
    let webhook = Webhook {
        id: Uuid::now_v7(),
        business_id: business,
        url: settings.url,
        events: settings.events,
        is_active: settings.is_active.unwrap_or(true),
        secret: generate_secret(),
        created_at: now,
        updated_at: now,
    };
    let secret = webhook.secret.clone();
    let stored = Webhook {
        secret: state.seal_secret(&secret),
        ..webhook.clone()
    };
    state
        .store()
        .create_webhook(stored, MAX_WEBHOOKS_PER_BUSINESS)
        .await?;
    tracing::info!(webhook.id = %webhook.id, business.id = %business, "webhook created");
    let mut view = WebhookView::without_secret(webhook);
    view.secret = Some(secret);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// Reads one webhook
#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    security(("businessApiKey" = [])),
    params(("id" = Uuid, Path, description = "The webhook's id")),
    responses(
        (status = 200, description = "The webhook, without its secret", body = WebhookView),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = InternalServerError),
    )
)]
pub async fn get_webhook(
    State(state): State<AppState>,
    Business(business): Business,
    PathText(id): PathText<String>,
) -> Result<Response, ApiError> {
    let id = path_id(&id, "webhook")?;
    let webhook = state
        .store()
        .get_webhook(business, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("webhook {id} not found")))?;
    Ok(Json(WebhookView::without_secret(webhook)).into_response())
}

/// Replaces a webhook's URL, events and state
#[utoipa::path(
    put,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    security(("businessApiKey" = [])),
    params(("id" = Uuid, Path, description = "The webhook's id")),
    request_body = UpdateWebhookRequest,
    responses(
        (status = 204, description = "The webhook was replaced"),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableContent),
        (status = 500, response = InternalServerError),
    )
)]
pub async fn update_webhook(
    State(state): State<AppState>,
    Business(business): Business,
    PathText(id): PathText<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(&id, "webhook")?;
    let object = json_object(body)?;
    let settings = parse_settings(&object, state.config().destinations, true)?;
    let is_active = settings.is_active.unwrap_or(true);
    let change = WebhookChange {
        business_id: business,
        id,
        url: settings.url,
        events: settings.events,
        is_active,
        updated_at: now_micros(),
    };
    state
        .store()
        .update_webhook(change)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("webhook {id} not found")))?;
    if let Some(dispatcher) = state.dispatcher() {
        dispatcher.webhook_changed(id, is_active);
    }
    tracing::info!(webhook.id = %id, is_active, "webhook updated");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Deletes a webhook
///
/// Its pending deliveries stop, and its delivery history is removed.
#[utoipa::path(
    delete,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    security(("businessApiKey" = [])),
    params(("id" = Uuid, Path, description = "The webhook's id")),
    responses(
        (status = 204, description = "The webhook was deleted"),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = InternalServerError),
    )
)]
pub async fn delete_webhook(
    State(state): State<AppState>,
    Business(business): Business,
    PathText(id): PathText<String>,
) -> Result<Response, ApiError> {
    let id = path_id(&id, "webhook")?;
    if !state.store().delete_webhook(business, id).await? {
        return Err(ApiError::not_found(format!("webhook {id} not found")));
    }
    if let Some(dispatcher) = state.dispatcher() {
        dispatcher.webhook_changed(id, false);
    }
    tracing::info!(webhook.id = %id, "webhook deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}
