//! Shared test machinery: `serve` processes of the real binary and a
//! receiver that records deliveries. The fresh schema of each test comes
//! from [`crate::schema`].

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use crate::schema::TestSchema;

/// Maximum wait for something that should happen promptly.
pub const DEADLINE: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The `citapro-webhooks` binary that Cargo built for this test run.
pub const SERVICE_BINARY: &str = env!("CARGO_BIN_EXE_citapro-webhooks");

/// Polls `check` until it returns `Some`, or panics with `description` after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(description: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {description}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A `citapro-webhooks serve` process with its standard error captured.
pub struct ServeProcess {
    pub label: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// `http://127.0.0.1:PORT` of its HTTP server. With `--role worker` it
    /// serves only `/healthz`, `/readyz` and `/metrics`.
    pub base_url: String,
    /// Its name in the `leased_by` column of deliveries.
    pub worker: Option<String>,
}

/// Options of a [`ServeProcess`] beside the database and the role.
#[derive(Clone)]
pub struct ServeOptions {
    pub producer_token: String,
    pub retry_schedule: String,
    pub request_timeout: String,
    pub lease_margin: String,
}

impl ServeOptions {
    pub fn new(producer_token: &str) -> ServeOptions {
        ServeOptions {
            producer_token: producer_token.to_owned(),
            retry_schedule: "200ms,400ms".to_owned(),
            request_timeout: "5s".to_owned(),
            lease_margin: "30s".to_owned(),
        }
    }
}

impl ServeProcess {
    /// Starts `serve --role ROLE` on the schema and waits until it is ready.
    pub async fn start(
        label: &str,
        role: &str,
        schema: &TestSchema,
        options: &ServeOptions,
    ) -> ServeProcess {
        let mut child = Command::new(SERVICE_BINARY)
            .args(["serve", "--role", role, "--listen", "127.0.0.1:0"])
            .args(["--allow-http", "--allow-private-targets"])
            .args(["--retry-schedule", &options.retry_schedule])
            .args(["--request-timeout", &options.request_timeout])
            .args(["--lease-margin", &options.lease_margin])
            .env("DATABASE_URL", &schema.url)
            .env("CITAPRO_PRODUCER_TOKEN", &options.producer_token)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("starting {SERVICE_BINARY}: {error}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped standard error");
        let collected = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                collected.lock().expect("log lines lock").push(line);
            }
        });
        let mut process = ServeProcess {
            label: label.to_owned(),
            child,
            lines,
            base_url: String::new(),
            worker: None,
        };
        let line = process.wait_for_line("listening address=").await;
        process.base_url = format!("http://{}", field(&line, "address"));
        if role != "api" {
            process.worker = Some(field(&line, "worker").trim_matches('"').to_owned());
        }
        process
    }

    /// Waits for a log line containing `text`, or panics if the process exits.
    pub async fn wait_for_line(&mut self, text: &str) -> String {
        let started = Instant::now();
        loop {
            if let Some(line) = self.lines().into_iter().find(|line| line.contains(text)) {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before logging {text:?}:\n{}",
                    self.label,
                    self.lines().join("\n")
                );
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{} logged no line with {text:?} within {DEADLINE:?}:\n{}",
                self.label,
                self.lines().join("\n")
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("log lines lock").clone()
    }

    pub fn api(&self) -> &str {
        &self.base_url
    }

    /// Ends the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.label, self.lines().join("\n"));
        }
    }
}

/// Reads `name=value` from a log line.
fn field(line: &str, name: &str) -> String {
    let start = line
        .find(&format!("{name}="))
        .unwrap_or_else(|| panic!("no {name}= in log line {line:?}"))
        + name.len()
        + 1;
    line[start..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Creates a business API key in the schema, as `api-key create` would.
pub async fn create_api_key(schema: &TestSchema, business: Uuid) -> String {
    let store = citapro_webhooks::store::Store::open(&schema.url)
        .await
        .expect("opening the store to add an API key");
    let key = citapro_webhooks::domain::credentials::generate_api_key();
    store
        .insert_api_key(
            business,
            citapro_webhooks::domain::credentials::hash_credential(&key),
        )
        .await
        .expect("storing the API key");
    key
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(DEADLINE)
        .build()
        .expect("building the test HTTP client")
}

async fn read_json(response: reqwest::Response) -> Value {
    let bytes = response.bytes().await.expect("reading a response body");
    serde_json::from_slice(&bytes).unwrap_or_else(|error| {
        panic!(
            "response body is not JSON ({error}): {}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// Registers a webhook through the API and returns its id.
pub async fn create_webhook(base_url: &str, api_key: &str, url: &str, events: &[&str]) -> String {
    let response = http_client()
        .post(format!("{base_url}/v1/webhooks"))
        .bearer_auth(api_key)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(json!({ "url": url, "events": events }).to_string())
        .send()
        .await
        .expect("POST /v1/webhooks");
    let status = response.status();
    let body = read_json(response).await;
    assert_eq!(status, 201, "creating a webhook: {body}");
    body["id"].as_str().expect("webhook id").to_owned()
}

/// Sends a `booking.created` event to the producer API and returns its `202` body.
pub async fn send_event(base_url: &str, producer_token: &str, business: Uuid) -> Value {
    let body = json!({
        "event": "booking.created",
        "business_account_id": business,
        "aggregate_id": Uuid::new_v4(),
        "occurred_on": "2026-03-05 14:30:00",
        "data": { "status": "confirmed", "amount": 75.0 },
    });
    let response = http_client()
        .post(format!("{base_url}/v1/events"))
        .bearer_auth(producer_token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("POST /v1/events");
    let status = response.status();
    let body = read_json(response).await;
    assert_eq!(status, 202, "sending an event: {body}");
    body
}

/// The receiver's response to one request.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16),
    /// Waits this long, then responds with the status.
    DelayedStatus(Duration, u16),
    /// Never responds, so the request stays in flight until the sender drops it.
    Hang,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub delivery_id: String,
    pub body: Bytes,
    pub arrived_at: Instant,
}

type ReplyPolicy = dyn Fn(&str, usize) -> Reply + Send + Sync;

struct ReceiverState {
    requests: Vec<Received>,
    per_delivery: HashMap<String, usize>,
    in_flight: HashSet<String>,
    /// Delivery ids that arrived while a request of the same id was in flight.
    overlaps: Vec<String>,
}

/// An HTTP server on 127.0.0.1 that records deliveries and responds by policy.
pub struct Receiver {
    pub url: String,
    state: Arc<Mutex<ReceiverState>>,
    task: JoinHandle<()>,
}

#[derive(Clone)]
struct ReceiverContext {
    state: Arc<Mutex<ReceiverState>>,
    policy: Arc<ReplyPolicy>,
}

impl Receiver {
    /// Starts a receiver whose `policy` picks the reply from the delivery id
    /// and how many requests of that id came before (0 for the first).
    pub async fn start(policy: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) -> Receiver {
        let state = Arc::new(Mutex::new(ReceiverState {
            requests: Vec::new(),
            per_delivery: HashMap::new(),
            in_flight: HashSet::new(),
            overlaps: Vec::new(),
        }));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port for the receiver");
        let address: SocketAddr = listener.local_addr().expect("receiver address");
        let context = ReceiverContext {
            state: state.clone(),
            policy: Arc::new(policy),
        };
        let app = Router::new().fallback(receive).with_state(context);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{address}/hooks"),
            state,
            task,
        }
    }

    pub fn requests(&self) -> Vec<Received> {
        self.state.lock().expect("receiver lock").requests.clone()
    }

    pub fn overlaps(&self) -> Vec<String> {
        self.state.lock().expect("receiver lock").overlaps.clone()
    }

    /// Waits until at least `count` requests arrived and returns all of them.
    pub async fn wait_for_requests(&self, count: usize) -> Vec<Received> {
        wait_for(&format!("{count} requests at the receiver"), || async {
            let requests = self.requests();
            (requests.len() >= count).then_some(requests)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes a delivery id off the in-flight set when its request ends, also
/// when the sender disconnects and the handler is dropped.
struct InFlight {
    state: Arc<Mutex<ReceiverState>>,
    delivery_id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut state) = self.state.lock() {
            state.in_flight.remove(&self.delivery_id);
        }
    }
}

async fn receive(
    State(context): State<ReceiverContext>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let delivery_id = headers
        .get("x-citapro-delivery-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let reply = {
        let mut state = context.state.lock().expect("receiver lock");
        let earlier = state.per_delivery.get(&delivery_id).copied().unwrap_or(0);
        state.per_delivery.insert(delivery_id.clone(), earlier + 1);
        if !state.in_flight.insert(delivery_id.clone()) {
            state.overlaps.push(delivery_id.clone());
        }
        let reply = (context.policy)(&delivery_id, earlier);
        state.requests.push(Received {
            delivery_id: delivery_id.clone(),
            body,
            arrived_at: Instant::now(),
        });
        reply
    };
    let _in_flight = InFlight {
        state: context.state.clone(),
        delivery_id,
    };
    match reply {
        Reply::Status(code) => status(code).into_response(),
        Reply::DelayedStatus(delay, code) => {
            tokio::time::sleep(delay).await;
            status(code).into_response()
        }
        Reply::Hang => std::future::pending::<Response>().await,
    }
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).expect("a valid HTTP status code")
}
