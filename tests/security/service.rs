//! The real service in this process with the settings that the security
//! tests change: the destination policy, an extra CA file and a replaced
//! resolver. API calls go through the integration harness's [`ApiClient`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use citapro_webhooks::app::{RunOptions, run};
use citapro_webhooks::config::ServiceConfig;
use citapro_webhooks::delivery::sender::Lookup;
use citapro_webhooks::domain::destination::DestinationPolicy;
use serde_json::Value;
use tempfile::TempDir;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{ApiClient, DEADLINE, TestBusiness, event_body, fresh_database_url};

/// Interval between the checks of the waiting helpers.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Settings of one security test service.
pub struct Settings {
    pub request_timeout: Duration,
    /// Waits before each retry. The default has one retry after a minute, so
    /// a test gets exactly one attempt unless it sets a shorter schedule.
    pub retry_schedule: Vec<Duration>,
    pub allow_private_targets: bool,
    /// PEM text written to a file in the service's folder and passed as
    /// `extra_ca_file`.
    pub extra_ca_pem: Option<String>,
    /// Replaces the system resolver. The service uses it only when private
    /// targets are not allowed.
    pub lookup: Option<Arc<dyn Lookup>>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            request_timeout: Duration::from_secs(5),
            retry_schedule: vec![Duration::from_secs(60)],
            allow_private_targets: true,
            extra_ca_pem: None,
            lookup: None,
        }
    }
}

/// The real service on `127.0.0.1` with a fresh SQLite file and plain `http`
/// allowed. It dereferences to the [`ApiClient`] that calls it.
pub struct Service {
    api: ApiClient,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    _dir: TempDir,
}

impl Service {
    pub async fn start(settings: Settings) -> Service {
        let dir = tempfile::tempdir().expect("creating a temporary folder for the database");
        let database_url = fresh_database_url(dir.path()).await;
        let producer_token = format!("test-producer-{}", Uuid::new_v4());

        let mut config = ServiceConfig::new(database_url.clone());
        config.producer_token = Some(producer_token.clone());
        config.retry_schedule = settings.retry_schedule;
        config.request_timeout = settings.request_timeout;
        config.destinations = DestinationPolicy {
            allow_http: true,
            allow_private_targets: settings.allow_private_targets,
        };
        if let Some(pem) = settings.extra_ca_pem {
            let path = dir.path().join("extra-ca.pem");
            std::fs::write(&path, pem).expect("writing the extra CA file");
            config.extra_ca_file = Some(path);
        }

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port for the service");
        let address = listener.local_addr().expect("reading the service address");
        let shutdown = CancellationToken::new();
        let options = RunOptions {
            lookup: settings.lookup,
        };
        let task = tokio::spawn(run(config, listener, shutdown.clone(), options));
        let mut service = Service {
            api: ApiClient::new(format!("http://{address}"), database_url, producer_token),
            shutdown,
            task,
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

    /// Sends one `client.created` event for `business` and asserts the `202`.
    pub async fn send_client_created(&self, business: &TestBusiness) {
        let body = event_body(
            "client.created",
            business.id,
            Uuid::new_v4(),
            r#"{"firstname":"Ana"}"#,
            None,
        );
        self.accept_event(&body).await;
    }

    /// Returns the webhook's deliveries, newest first, from the listing call.
    pub async fn deliveries(&self, business: &TestBusiness, webhook_id: &str) -> Vec<Value> {
        let response = self
            .get(&format!("/v1/webhooks/{webhook_id}/deliveries"), business)
            .await;
        assert_eq!(
            response.status,
            200,
            "listing deliveries of {webhook_id}: {}",
            response.text()
        );
        response.json()["data"]
            .as_array()
            .expect("the listing has a data array")
            .clone()
    }

    /// Returns one delivery with its attempts.
    pub async fn delivery(
        &self,
        business: &TestBusiness,
        webhook_id: &str,
        delivery_id: &str,
    ) -> Value {
        let response = self
            .get(
                &format!("/v1/webhooks/{webhook_id}/deliveries/{delivery_id}"),
                business,
            )
            .await;
        assert_eq!(
            response.status,
            200,
            "reading delivery {delivery_id}: {}",
            response.text()
        );
        response.json()
    }

    /// Waits until the webhook's only delivery has at least `count` attempts
    /// and returns it with its attempts.
    pub async fn wait_for_attempts(
        &self,
        business: &TestBusiness,
        webhook_id: &str,
        count: usize,
    ) -> Value {
        self.wait_for_attempts_within(business, webhook_id, count, DEADLINE)
            .await
    }

    /// Waits at most `limit` until the webhook's only delivery has at least
    /// `count` attempts and returns it with its attempts.
    pub async fn wait_for_attempts_within(
        &self,
        business: &TestBusiness,
        webhook_id: &str,
        count: usize,
        limit: Duration,
    ) -> Value {
        let started = Instant::now();
        loop {
            let deliveries = self.deliveries(business, webhook_id).await;
            assert!(
                deliveries.len() <= 1,
                "webhook {webhook_id} has {} deliveries, expected one",
                deliveries.len()
            );
            if let Some(listed) = deliveries.first() {
                let delivery_id = listed["id"].as_str().expect("a delivery has an id");
                let delivery = self.delivery(business, webhook_id, delivery_id).await;
                let recorded = delivery["attempts"].as_array().map_or(0, Vec::len);
                if recorded >= count {
                    return delivery;
                }
            }
            assert!(
                started.elapsed() < limit,
                "webhook {webhook_id} did not get {count} recorded attempts within {limit:?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl std::ops::Deref for Service {
    type Target = ApiClient;

    fn deref(&self) -> &ApiClient {
        &self.api
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Returns the attempt at `index` of a delivery read with its attempts.
pub fn attempt(delivery: &Value, index: usize) -> &Value {
    let attempts = delivery["attempts"]
        .as_array()
        .unwrap_or_else(|| panic!("delivery without attempts: {delivery}"));
    attempts
        .get(index)
        .unwrap_or_else(|| panic!("delivery has no attempt {index}: {delivery}"))
}

/// Returns an attempt's `durationMs`.
pub fn duration_of(attempt: &Value) -> Duration {
    let millis = attempt["durationMs"]
        .as_u64()
        .unwrap_or_else(|| panic!("attempt without durationMs: {attempt}"));
    Duration::from_millis(millis)
}

/// Parses an RFC 3339 time field of an API object.
pub fn time_field(object: &Value, field: &str) -> OffsetDateTime {
    let text = object[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {object}"));
    OffsetDateTime::parse(text, &Rfc3339)
        .unwrap_or_else(|error| panic!("{field} {text:?} is not RFC 3339: {error}"))
}
