//! `/v1/webhooks`: register, list, read, replace and delete endpoints.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::auth::Business;
use super::{
    ApiError, AppState, FieldError, MAX_WEBHOOKS_PER_BUSINESS, json_object, path_id, unknown_fields,
};
use crate::domain::catalogue::find_event;
use crate::domain::clock::{format_rfc3339, now_micros};
use crate::domain::credentials::generate_secret;
use crate::domain::destination::{DestinationPolicy, parse_webhook_url};
use crate::store::{Webhook, WebhookChange};

/// A webhook as the API shows it. The secret appears only in the `201` of its creation.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookView {
    id: Uuid,
    url: String,
    events: Vec<String>,
    is_active: bool,
    created_at: String,
    updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
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

pub async fn list_webhooks(
    State(state): State<AppState>,
    Business(business): Business,
) -> Result<Response, ApiError> {
    let webhooks = state.store().list_webhooks(business).await?;
    let data: Vec<WebhookView> = webhooks
        .into_iter()
        .map(WebhookView::without_secret)
        .collect();
    Ok(Json(serde_json::json!({ "data": data })).into_response())
}

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
    state
        .store()
        .create_webhook(webhook.clone(), MAX_WEBHOOKS_PER_BUSINESS)
        .await?;
    tracing::info!(webhook.id = %webhook.id, business.id = %business, "webhook created");
    let mut view = WebhookView::without_secret(webhook);
    view.secret = Some(secret);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

pub async fn get_webhook(
    State(state): State<AppState>,
    Business(business): Business,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = path_id(&id, "webhook")?;
    let webhook = state
        .store()
        .get_webhook(business, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("webhook {id} not found")))?;
    Ok(Json(WebhookView::without_secret(webhook)).into_response())
}

pub async fn update_webhook(
    State(state): State<AppState>,
    Business(business): Business,
    Path(id): Path<String>,
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

pub async fn delete_webhook(
    State(state): State<AppState>,
    Business(business): Business,
    Path(id): Path<String>,
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
