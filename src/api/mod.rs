//! The HTTP API: webhook management for businesses and event intake for the producer.

mod auth;
mod events;
mod history;
mod openapi;
mod problem;
mod webhooks;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use uuid::Uuid;

pub use openapi::{openapi_document, openapi_json};
pub use problem::{ApiError, FieldError};

use crate::config::ServiceConfig;
use crate::delivery::{DeliveryContext, Dispatcher};
use crate::store::Store;

/// Request bodies accepted by the management API at most, in bytes.
pub const MAX_MANAGEMENT_BODY: usize = 64 * 1024;
/// Request bodies accepted by `POST /v1/events` at most, in bytes.
pub const MAX_EVENT_BODY: usize = 1024 * 1024;
/// Webhooks one business may register at most.
pub const MAX_WEBHOOKS_PER_BUSINESS: usize = 100;

/// State shared by every request handler.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    store: Store,
    config: ServiceConfig,
    /// Set when this process runs delivery workers.
    dispatcher: Option<Dispatcher>,
    /// Sends the attempts that operators ask for: redeliveries and test pings.
    delivery: DeliveryContext,
    /// Hashes of API keys already looked up, with their business.
    api_keys: Mutex<HashMap<String, Uuid>>,
    /// Hashes of producer tokens already looked up.
    producer_tokens: Mutex<HashSet<String>>,
    /// Hash of the producer token given on the command line.
    configured_producer_token: Option<String>,
    /// Encrypts new webhook secrets at rest, when a key is configured.
    cipher: Option<std::sync::Arc<crate::store::cipher::SecretCipher>>,
}

impl AppState {
    pub fn new(
        store: Store,
        config: ServiceConfig,
        dispatcher: Option<Dispatcher>,
        delivery: DeliveryContext,
    ) -> AppState {
        // `app::run` builds the same cipher first and stops on invalid keys.
        let cipher = crate::config::secret_cipher(
            config.encryption_key.as_deref(),
            &config.previous_encryption_keys,
        )
        .ok()
        .flatten();
        let configured_producer_token = config
            .producer_token
            .as_deref()
            .filter(|token| !token.is_empty())
            .map(crate::domain::credentials::hash_credential);
        AppState {
            inner: Arc::new(StateInner {
                store,
                config,
                dispatcher,
                delivery,
                api_keys: Mutex::new(HashMap::new()),
                producer_tokens: Mutex::new(HashSet::new()),
                configured_producer_token,
                cipher,
            }),
        }
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    fn config(&self) -> &ServiceConfig {
        &self.inner.config
    }

    fn dispatcher(&self) -> Option<&Dispatcher> {
        self.inner.dispatcher.as_ref()
    }

    fn delivery(&self) -> &DeliveryContext {
        &self.inner.delivery
    }

    /// Returns a secret in the form it is stored in: encrypted when a key is set.
    fn seal_secret(&self, secret: &str) -> String {
        match &self.inner.cipher {
            Some(cipher) => cipher.encrypt(secret),
            None => secret.to_owned(),
        }
    }
}

/// Builds the router of the whole API.
pub fn router(state: AppState) -> Router {
    let management = Router::new()
        .route(
            "/v1/webhooks",
            get(webhooks::list_webhooks).post(webhooks::create_webhook),
        )
        .route(
            "/v1/webhooks/{id}",
            get(webhooks::get_webhook)
                .put(webhooks::update_webhook)
                .delete(webhooks::delete_webhook),
        )
        .route(
            "/v1/webhooks/{id}/deliveries",
            get(history::list_deliveries),
        )
        .route(
            "/v1/webhooks/{id}/deliveries/{delivery_id}",
            get(history::get_delivery),
        )
        .route(
            "/v1/webhooks/{id}/deliveries/{delivery_id}/redeliver",
            post(history::redeliver),
        )
        .route("/v1/webhooks/{id}/test", post(history::send_test))
        .route("/v1/webhooks/{id}/recover", post(history::recover))
        .layer(DefaultBodyLimit::max(MAX_MANAGEMENT_BODY));
    let producer = Router::new()
        .route("/v1/events", post(events::accept_event))
        .layer(DefaultBodyLimit::max(MAX_EVENT_BODY));
    let routes = operations_routes()
        .merge(management)
        .merge(producer)
        .route("/openapi.json", get(openapi::serve_openapi));
    finish_router(routes, state)
}

/// Builds the router of a `serve --role worker` process: `/healthz`,
/// `/readyz` and `/metrics`, and a `404` problem for every other path.
pub fn worker_router(state: AppState) -> Router {
    finish_router(operations_routes(), state)
}

/// Builds the routes that operators and their monitoring call, served on every role.
fn operations_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
}

/// Adds the problem+json fallbacks and the request log to `routes`.
fn finish_router(routes: Router<AppState>, state: AppState) -> Router {
    routes
        .fallback(|| async { ApiError::not_found("no such resource") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this resource",
            )
        })
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state)
}

/// Reports that the process serves requests
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "service",
    responses((
        status = 200,
        description = "The process is up",
        body = Object,
        example = json!({"status": "ok"})
    ))
)]
async fn health() -> axum::Json<Value> {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Reports whether this process can do its work: the database is reachable (its
/// migrations were applied at start) and, where it runs them, the delivery
/// workers are running. The body names no cause; the log does.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "service",
    responses(
        (status = 200, description = "Ready", body = Object, example = json!({"status": "ok"})),
        (status = 503, response = openapi::ServiceUnavailable)
    )
)]
async fn ready(State(state): State<AppState>) -> Response {
    let store_ready = match state.store().ping().await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, "readiness check failed: the database is unreachable");
            false
        }
    };
    let workers_ready = state.dispatcher().is_none_or(Dispatcher::is_running);
    if !workers_ready {
        tracing::warn!("readiness check: the delivery workers have stopped");
    }
    if store_ready && workers_ready {
        axum::Json(serde_json::json!({"status": "ok"})).into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the service is not ready").into_response()
    }
}

/// Serves the Prometheus metrics of this process.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses((
        status = 200,
        description = "Metrics in the Prometheus text format 0.0.4",
        body = String,
        content_type = "text/plain"
    ))
)]
async fn render_metrics(State(state): State<AppState>) -> Response {
    let metrics = crate::metrics::metrics();
    let now = crate::domain::clock::now_micros();
    match state.store().queue_stats(now).await {
        Ok(stats) => {
            metrics.deliveries_due.set(stats.due as i64);
            metrics.deliveries_scheduled.set(stats.scheduled as i64);
            let oldest = stats
                .earliest_due_at
                .filter(|due| *due <= now)
                .map_or(0.0, |due| (now - due) as f64 / 1e6);
            metrics.oldest_due_age_seconds.set(oldest);
        }
        Err(error) => tracing::warn!(%error, "reading queue depth for metrics failed"),
    }
    let mut response = metrics.render().into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Logs one line per request with its route pattern, never the raw path, so
/// ids and query strings stay out of the logs.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(%method, route, status, duration_ms, "request");
    response
}

/// Parses a request body that must be a JSON object.
fn json_object(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is larger than this endpoint accepts",
            )
        } else {
            ApiError::bad_request(format!("the request body could not be read: {rejection}"))
        }
    })?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|error| {
        ApiError::bad_request(format!("the request body is not valid JSON: {error}"))
    })?;
    match value {
        Value::Object(object) => Ok(object),
        _ => Err(ApiError::validation(vec![FieldError::new(
            "body",
            "must be a JSON object",
        )])),
    }
}

/// Reports every key of `object` that is not in `known`.
fn unknown_fields(object: &Map<String, Value>, known: &[&str], errors: &mut Vec<FieldError>) {
    for key in object.keys() {
        if !known.contains(&key.as_str()) {
            errors.push(FieldError::new(key.clone(), "is not a known field"));
        }
    }
}

/// Parses a UUID path segment; anything else names no resource.
fn path_id(text: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| ApiError::not_found(format!("{what} {text} not found")))
}

/// The path parameters of a request, like [`Path`], but rejected with a
/// problem+json error: a segment that is not UTF-8 after percent-decoding
/// names no resource, so it is a `404` like any other malformed id.
struct PathText<T>(T);

impl<S, T> FromRequestParts<S> for PathText<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathText(value)),
            Err(PathRejection::FailedToDeserializePathParams(_)) => {
                Err(ApiError::not_found("no such resource"))
            }
            Err(rejection) => {
                tracing::error!(error = %rejection, "path parameters missing from a routed request");
                Err(ApiError::internal())
            }
        }
    }
}
