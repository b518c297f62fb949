//! The test harness: the real service on a loopback port with a fresh
//! database, HTTP receivers that record every request, and a small client.
//!
//! Tests reach the database only through the service, its command line and
//! the library's `Store`, so the same tests run on either backend. Each test
//! crate that includes this file picks the backend with a `backend` module:
//! `sqlite_backend.rs` beside this file, or
//! `tests/integration_postgres/backend.rs`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use citapro_webhooks::app::{RunOptions, run};
use citapro_webhooks::config::{Role, ServiceConfig};
use citapro_webhooks::domain::destination::DestinationPolicy;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backend::{TestDatabase, fresh_database};

/// Maximum time that a test waits for something that the service should do promptly.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Interval between the checks of the waiting helpers.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The `citapro-webhooks` binary that Cargo built for this test run.
pub const SERVICE_BINARY: &str = env!("CARGO_BIN_EXE_citapro-webhooks");

/// `occurred_on` of the events that tests send.
pub const OCCURRED_ON: &str = "2026-03-05 14:30:00";

/// Returns the URL of a fresh SQLite file in `dir`.
///
/// Services of the integration suite get their database from
/// `crate::backend::fresh_database` instead, which follows the crate's
/// backend. Suites that run on SQLite alone call this directly.
pub async fn fresh_database_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("webhooks.db").display())
}

/// Returns a duration in milliseconds, to keep schedules readable.
pub fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// Settings of a test service that tests change.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub retry_schedule: Vec<Duration>,
    pub request_timeout: Duration,
    /// Hex key that webhook secrets are encrypted with at rest.
    pub encryption_key: Option<String>,
    pub role: Role,
    /// How long finished deliveries are kept.
    pub history_retention: Duration,
}

impl Default for ServiceOptions {
    fn default() -> ServiceOptions {
        ServiceOptions {
            retry_schedule: vec![ms(200), ms(400)],
            request_timeout: Duration::from_secs(5),
            encryption_key: None,
            role: Role::All,
            history_retention: Duration::from_secs(30 * 86_400),
        }
    }
}

impl ServiceOptions {
    pub fn with_retry_schedule(retry_schedule: Vec<Duration>) -> ServiceOptions {
        ServiceOptions {
            retry_schedule,
            ..ServiceOptions::default()
        }
    }
}

/// A business with an API key created through the command line.
#[derive(Debug, Clone)]
pub struct TestBusiness {
    pub id: Uuid,
    pub api_key: String,
}

/// A webhook as the `201` of its creation returned it.
#[derive(Debug, Clone)]
pub struct CreatedWebhook {
    pub id: String,
    pub secret: String,
    pub body: Value,
}

/// A response of the service's API, read in full.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Bytes,
}

impl ApiResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Parses the body as JSON, or panics with the body text.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "response body is not JSON ({error}), status {}: {}",
                self.status,
                self.text()
            )
        })
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    }

    /// Returns the `field` names of a problem's `errors` array.
    pub fn error_fields(&self) -> Vec<String> {
        self.json()["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .filter_map(|error| error["field"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Asserts that a response is an RFC 9457 problem with the given status.
pub fn assert_problem(response: &ApiResponse, status: u16, context: &str) {
    assert_eq!(
        response.status,
        status,
        "{context}: status, body {}",
        response.text()
    );
    assert_eq!(
        response.content_type(),
        "application/problem+json",
        "{context}: content type"
    );
    let problem = response.json();
    assert!(problem["type"].is_string(), "{context}: type in {problem}");
    assert!(
        problem["title"].is_string(),
        "{context}: title in {problem}"
    );
    assert_eq!(problem["status"], json!(status), "{context}: status field");
    assert!(
        problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{context}: detail in {problem}"
    );
}

/// Asserts a `422` problem whose `errors` array names `field`.
pub fn assert_invalid_field(response: &ApiResponse, field: &str, context: &str) {
    assert_problem(response, 422, context);
    let fields = response.error_fields();
    assert!(
        fields.iter().any(|name| name == field),
        "{context}: expected an error for field {field:?}, got {fields:?}"
    );
}

/// The real service, started in this process on `127.0.0.1` with a fresh
/// database, plain `http` and loopback destinations allowed. It dereferences
/// to the [`ApiClient`] that calls it.
pub struct TestService {
    api: ApiClient,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    _database: TestDatabase,
    _dir: TempDir,
}

impl TestService {
    pub async fn start(options: ServiceOptions) -> TestService {
        let dir = tempfile::tempdir().expect("creating a temporary folder for the database");
        let database = fresh_database(dir.path()).await;
        let database_url = database.url.clone();
        let producer_token = format!("test-producer-{}", Uuid::new_v4());

        let mut config = ServiceConfig::new(database_url.clone());
        config.producer_token = Some(producer_token.clone());
        config.retry_schedule = options.retry_schedule;
        config.request_timeout = options.request_timeout;
        config.encryption_key = options.encryption_key;
        config.history_retention = options.history_retention;
        config.role = options.role;
        config.destinations = DestinationPolicy {
            allow_http: true,
            allow_private_targets: true,
        };

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port for the service");
        let address = listener.local_addr().expect("reading the service address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            config,
            listener,
            shutdown.clone(),
            RunOptions::default(),
        ));
        let mut service = TestService {
            api: ApiClient::new(format!("http://{address}"), database_url, producer_token),
            shutdown,
            task,
            _database: database,
            _dir: dir,
        };
        service.wait_until_ready().await;
        service
    }

    async fn wait_until_ready(&mut self) {
        let started = Instant::now();
        loop {
            if self.task.is_finished() {
                let outcome = (&mut self.task).await;
                panic!("the service stopped during start-up: {outcome:?}");
            }
            if self.api.is_healthy().await {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "the service did not become ready within {DEADLINE:?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl std::ops::Deref for TestService {
    type Target = ApiClient;

    fn deref(&self) -> &ApiClient {
        &self.api
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A client of one running service's API, with its producer token and the
/// database URL that the command line needs to create API keys.
#[derive(Clone)]
pub struct ApiClient {
    pub base_url: String,
    pub database_url: String,
    pub producer_token: String,
    client: reqwest::Client,
}

impl ApiClient {
    pub fn new(base_url: String, database_url: String, producer_token: String) -> ApiClient {
        ApiClient {
            base_url,
            database_url,
            producer_token,
            client: test_client(),
        }
    }

    /// Returns whether `GET /healthz` responds with a 2xx status.
    pub async fn is_healthy(&self) -> bool {
        self.client
            .get(format!("{}/healthz", self.base_url))
            .send()
            .await
            .is_ok_and(|response| response.status().is_success())
    }

    /// Creates a business API key with `citapro-webhooks api-key create`
    /// while the service runs.
    pub async fn create_business(&self) -> TestBusiness {
        let id = Uuid::new_v4();
        let api_key = create_api_key_with_binary(&self.database_url, id).await;
        TestBusiness { id, api_key }
    }

    /// Sends a request with an optional bearer token and JSON body text.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> ApiResponse {
        let authorization = bearer.map(|token| format!("Bearer {token}"));
        self.call_with_authorization(method, path, authorization.as_deref(), body)
            .await
    }

    /// Sends a request with an optional `Authorization` header value and JSON body text.
    pub async fn call_with_authorization(
        &self,
        method: reqwest::Method,
        path: &str,
        authorization: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> ApiResponse {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base_url));
        if let Some(value) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|error| panic!("{method} {path} failed: {error}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .unwrap_or_else(|error| panic!("reading the response of {method} {path}: {error}"));
        ApiResponse {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, business: &TestBusiness) -> ApiResponse {
        self.call(reqwest::Method::GET, path, Some(&business.api_key), None)
            .await
    }

    pub async fn delete(&self, path: &str, business: &TestBusiness) -> ApiResponse {
        self.call(reqwest::Method::DELETE, path, Some(&business.api_key), None)
            .await
    }

    pub async fn post_json(
        &self,
        path: &str,
        business: &TestBusiness,
        body: &Value,
    ) -> ApiResponse {
        self.call(
            reqwest::Method::POST,
            path,
            Some(&business.api_key),
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    pub async fn put_json(&self, path: &str, business: &TestBusiness, body: &Value) -> ApiResponse {
        self.call(
            reqwest::Method::PUT,
            path,
            Some(&business.api_key),
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    /// Registers a webhook and asserts the `201`.
    pub async fn create_webhook(
        &self,
        business: &TestBusiness,
        url: &str,
        events: &[&str],
    ) -> CreatedWebhook {
        let response = self
            .post_json(
                "/v1/webhooks",
                business,
                &json!({ "url": url, "events": events }),
            )
            .await;
        assert_eq!(
            response.status,
            201,
            "creating a webhook for {url}: {}",
            response.text()
        );
        let body = response.json();
        CreatedWebhook {
            id: body["id"]
                .as_str()
                .expect("the 201 body has an id")
                .to_owned(),
            secret: body["secret"]
                .as_str()
                .expect("the 201 body has a secret")
                .to_owned(),
            body,
        }
    }

    /// Replaces a webhook's settings and asserts the `204`.
    pub async fn update_webhook(
        &self,
        business: &TestBusiness,
        webhook_id: &str,
        url: &str,
        events: &[&str],
        is_active: bool,
    ) {
        let response = self
            .put_json(
                &format!("/v1/webhooks/{webhook_id}"),
                business,
                &json!({ "url": url, "events": events, "isActive": is_active }),
            )
            .await;
        assert_eq!(
            response.status,
            204,
            "updating webhook {webhook_id}: {}",
            response.text()
        );
    }

    /// Sends event body text to the producer API with the producer token.
    pub async fn send_event(&self, body: &str) -> ApiResponse {
        self.call(
            reqwest::Method::POST,
            "/v1/events",
            Some(&self.producer_token),
            Some(body.as_bytes().to_vec()),
        )
        .await
    }

    /// Sends an event and returns the response status, or `None` when the
    /// request got no response (the server is gone or going).
    pub async fn try_send_event(&self, body: &str) -> Option<u16> {
        let response = self
            .client
            .post(format!("{}/v1/events", self.base_url))
            .bearer_auth(&self.producer_token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_owned())
            .send()
            .await
            .ok()?;
        Some(response.status().as_u16())
    }

    /// Sends an event, asserts the `202` and returns the response body.
    pub async fn accept_event(&self, body: &str) -> Value {
        let response = self.send_event(body).await;
        assert_eq!(
            response.status,
            202,
            "sending event {body}: {}",
            response.text()
        );
        response.json()
    }
}

/// Builds an HTTP client that never uses a proxy, so requests stay on loopback.
pub fn test_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(DEADLINE)
        .build()
        .expect("building the test HTTP client")
}

/// Runs `citapro-webhooks api-key create` and returns the first line of its output.
pub async fn create_api_key_with_binary(database_url: &str, business: Uuid) -> String {
    let database_url = database_url.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(SERVICE_BINARY)
            .args(["api-key", "create", "--business"])
            .arg(business.to_string())
            .arg("--database-url")
            .arg(&database_url)
            .env_remove("DATABASE_URL")
            .output()
    })
    .await
    .expect("joining the api-key command")
    .expect("running citapro-webhooks api-key create");
    assert!(
        output.status.success(),
        "api-key create failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("the API key is UTF-8");
    let key = stdout.lines().next().unwrap_or("").to_owned();
    assert!(
        !key.is_empty() && !key.contains(char::is_whitespace),
        "api-key create printed no key on its first line: {stdout:?}"
    );
    key
}

/// Builds the body text of a producer event. `data` and `previous` are JSON
/// object text, inserted as written so that number forms are kept.
pub fn event_body(
    event: &str,
    business: Uuid,
    aggregate: Uuid,
    data: &str,
    previous: Option<&str>,
) -> String {
    let previous = previous
        .map(|text| format!(r#","previous":{text}"#))
        .unwrap_or_default();
    format!(
        r#"{{"event":"{event}","business_account_id":"{business}","aggregate_id":"{aggregate}","occurred_on":"{OCCURRED_ON}","data":{data}{previous}}}"#
    )
}

/// Returns the lowercase hex HMAC-SHA256 of `message` keyed with `secret`.
pub fn hmac_hex(secret: &str, message: &[u8]) -> String {
    hex::encode(hmac_bytes(secret, message))
}

/// Returns the base64 HMAC-SHA256 of `message` keyed with `secret`.
pub fn hmac_base64(secret: &str, message: &[u8]) -> String {
    BASE64.encode(hmac_bytes(secret, message))
}

fn hmac_bytes(secret: &str, message: &[u8]) -> Vec<u8> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// Returns the current Unix time in whole seconds.
pub fn unix_seconds(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64
}

/// The response that a [`TestReceiver`] sends to a request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    Redirect {
        status: u16,
        location: String,
    },
    /// `429 Too Many Requests` with a `Retry-After` header value.
    TooManyRequests {
        retry_after: String,
    },
    /// No response at all, so the sender's attempt stays in flight.
    Hang,
    /// A status after a pause, so attempts are in flight for a while.
    Delayed {
        status: u16,
        delay: Duration,
    },
    /// A status with a body of raw bytes.
    Body {
        status: u16,
        body: &'static [u8],
    },
}

/// A request as a [`TestReceiver`] received it.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub arrived_at: Instant,
    pub arrived_at_system: SystemTime,
}

impl ReceivedRequest {
    /// Returns a header as text, or panics naming the missing header.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("header {name} is missing from {:?}", self.headers))
            .to_str()
            .unwrap_or_else(|_| panic!("header {name} is not visible ASCII"))
    }

    pub fn delivery_id(&self) -> &str {
        self.header("x-citapro-delivery-id")
    }

    /// Returns the `aggregate_id` of the delivered payload.
    pub fn aggregate_id(&self) -> String {
        self.json()["aggregate_id"]
            .as_str()
            .expect("aggregate_id is text")
            .to_owned()
    }

    /// Parses the body as JSON, or panics with the body text.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "delivery body is not JSON ({error}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

#[derive(Default)]
struct ReceiverInner {
    requests: Vec<ReceivedRequest>,
    /// TCP connections accepted.
    connections: usize,
    queued_replies: VecDeque<Reply>,
    default_reply: Option<Reply>,
}

/// An HTTP server on `127.0.0.1` that records every request and responds with
/// the configured replies.
pub struct TestReceiver {
    /// The URL to register as a webhook.
    pub url: String,
    inner: Arc<Mutex<ReceiverInner>>,
    task: JoinHandle<()>,
}

impl TestReceiver {
    /// Starts a receiver that responds with `200` to every request.
    pub async fn start() -> TestReceiver {
        TestReceiver::start_with(Reply::Status(200)).await
    }

    /// Starts a receiver that responds with `reply` unless replies are queued.
    pub async fn start_with(reply: Reply) -> TestReceiver {
        let inner = Arc::new(Mutex::new(ReceiverInner {
            default_reply: Some(reply),
            ..ReceiverInner::default()
        }));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port for a receiver");
        let address: SocketAddr = listener.local_addr().expect("reading the receiver address");
        let counted = inner.clone();
        let listener = listener.tap_io(move |_| {
            counted.lock().expect("receiver state lock").connections += 1;
        });
        let app = Router::new()
            .fallback(record_request)
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestReceiver {
            url: format!("http://{address}/hooks"),
            inner,
            task,
        }
    }

    /// Sets the reply to every request that finds no queued reply.
    pub fn reply_with(&self, reply: Reply) {
        self.lock().default_reply = Some(reply);
    }

    /// Queues replies for the next requests, in order, before the default one.
    pub fn queue_replies(&self, replies: impl IntoIterator<Item = Reply>) {
        self.lock().queued_replies.extend(replies);
    }

    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.lock().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.lock().requests.len()
    }

    /// Returns how many TCP connections the receiver accepted.
    pub fn connection_count(&self) -> usize {
        self.lock().connections
    }

    /// Waits until at least `count` requests arrived and returns all of them.
    pub async fn wait_for_requests(&self, count: usize) -> Vec<ReceivedRequest> {
        let started = Instant::now();
        loop {
            let received = self.request_count();
            if received >= count {
                return self.requests();
            }
            assert!(
                started.elapsed() < DEADLINE,
                "receiver {} got {received} of {count} expected requests within {DEADLINE:?}",
                self.url
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Watches the receiver for `window` and fails as soon as it has recorded
    /// more than `count` requests.
    pub async fn assert_count_stays(&self, count: usize, window: Duration, context: &str) {
        let started = Instant::now();
        loop {
            let received = self.request_count();
            assert!(
                received <= count,
                "{context}: receiver {} got {received} requests, expected {count}",
                self.url
            );
            if started.elapsed() >= window {
                assert_eq!(
                    received, count,
                    "{context}: requests at the end of the window"
                );
                return;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReceiverInner> {
        self.inner.lock().expect("receiver state lock")
    }
}

impl Drop for TestReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record_request(
    State(inner): State<Arc<Mutex<ReceiverInner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = {
        let mut inner = inner.lock().expect("receiver state lock");
        inner.requests.push(ReceivedRequest {
            method,
            path: uri.path().to_owned(),
            headers,
            body,
            arrived_at: Instant::now(),
            arrived_at_system: SystemTime::now(),
        });
        match inner.queued_replies.pop_front() {
            Some(reply) => reply,
            None => inner.default_reply.clone().unwrap_or(Reply::Status(200)),
        }
    };
    match reply {
        Reply::Status(code) => status_code(code).into_response(),
        Reply::Redirect { status, location } => {
            (status_code(status), [(header::LOCATION, location)]).into_response()
        }
        Reply::TooManyRequests { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after)],
        )
            .into_response(),
        Reply::Hang => std::future::pending::<Response>().await,
        Reply::Delayed { status, delay } => {
            tokio::time::sleep(delay).await;
            status_code(status).into_response()
        }
        Reply::Body { status, body } => (status_code(status), body).into_response(),
    }
}

fn status_code(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or_else(|_| panic!("{code} is not an HTTP status code"))
}
