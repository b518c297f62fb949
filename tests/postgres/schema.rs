//! A fresh PostgreSQL schema per test, on the server named by
//! `CITAPRO_TEST_POSTGRES_URL`, dropped with everything in it at the end.
//! The PostgreSQL suite and the PostgreSQL run of the integration suite
//! both use it.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use uuid::Uuid;

/// The server that the tests use unless `CITAPRO_TEST_POSTGRES_URL` names another.
const DEFAULT_SERVER_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// When set to `1`, an unreachable server fails the tests instead of skipping them.
pub const REQUIRE_VARIABLE: &str = "CITAPRO_REQUIRE_POSTGRES";

/// Pool connections of each store and `serve` process in the tests, so that
/// tests running side by side stay below the server's `max_connections`.
const TEST_POOL_MAX_SIZE: usize = 4;

/// Test schemas that exist at once at most, whatever `--test-threads` is.
/// By estimate, a `serve` process keeps at most about 6 connections: its
/// pool, the notification listener and one for migrations. A test starts two
/// processes at most, so 4 schemas stay near 60 connections, below the
/// default `max_connections` of 100 on a server that other test runs share.
const MAX_SCHEMAS: usize = 4;
static SCHEMA_PERMITS: Semaphore = Semaphore::const_new(MAX_SCHEMAS);

/// Why the server was not reachable, once a test found it so. Later tests
/// reuse this result instead of waiting for the connect timeout again.
static UNREACHABLE: OnceLock<Unreachable> = OnceLock::new();

/// Returns whether `CITAPRO_REQUIRE_POSTGRES=1` is set, so an unreachable
/// server must fail the tests.
pub fn postgres_required() -> bool {
    std::env::var(REQUIRE_VARIABLE).is_ok_and(|value| value == "1")
}

fn server_url() -> String {
    std::env::var("CITAPRO_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_SERVER_URL.to_owned())
}

/// Appends a query parameter to a URL that may already have a query.
fn with_parameter(url: &str, parameter: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{parameter}")
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The test server could not be reached.
#[derive(Debug, Clone)]
pub struct Unreachable {
    pub server_url: String,
    pub reason: String,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "PostgreSQL at {} is not reachable ({})",
            self.server_url, self.reason
        )
    }
}

/// A schema of its own for one test, dropped with everything in it at the end.
pub struct TestSchema {
    pub name: String,
    /// A database URL whose connections use only this schema.
    pub url: String,
    server_url: String,
    /// Released after the schema is dropped, so at most [`MAX_SCHEMAS`] exist.
    _permit: SemaphorePermit<'static>,
}

impl TestSchema {
    /// Creates a fresh schema, or returns `None` after printing why the test
    /// is skipped when the server cannot be reached. With
    /// `CITAPRO_REQUIRE_POSTGRES=1` an unreachable server panics instead.
    pub async fn create(test: &str) -> Option<TestSchema> {
        match TestSchema::try_create().await {
            Ok(schema) => Some(schema),
            Err(unreachable) => skip(test, &unreachable),
        }
    }

    /// Creates a fresh schema, waiting while [`MAX_SCHEMAS`] others exist,
    /// or returns why the server cannot be reached.
    pub async fn try_create() -> Result<TestSchema, Unreachable> {
        if let Some(unreachable) = UNREACHABLE.get() {
            return Err(unreachable.clone());
        }
        let permit = SCHEMA_PERMITS
            .acquire()
            .await
            .expect("the schema semaphore is never closed");
        let server_url = server_url();
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            connect(&with_parameter(&server_url, "connect_timeout=3")),
        )
        .await;
        let error = match connected {
            Ok(Ok(admin)) => return Ok(TestSchema::create_with(&admin, server_url, permit).await),
            Ok(Err(error)) => error,
            Err(_) => {
                let reason = "connecting timed out".to_owned();
                let unreachable = Unreachable { server_url, reason };
                return Err(UNREACHABLE.get_or_init(|| unreachable).clone());
            }
        };
        let unreachable = Unreachable {
            server_url,
            reason: error_chain(&error),
        };
        // An error that the server sent, such as too many connections, may
        // pass, so only a failure to reach the server is remembered.
        if error.as_db_error().is_none() {
            let _ = UNREACHABLE.set(unreachable.clone());
        }
        Err(unreachable)
    }

    async fn create_with(
        admin: &tokio_postgres::Client,
        server_url: String,
        permit: SemaphorePermit<'static>,
    ) -> TestSchema {
        let name = format!("t_{}", &Uuid::new_v4().simple().to_string()[..16]);
        admin
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .unwrap_or_else(|error| panic!("creating schema {name}: {error}"));
        // The application name marks the schema's connections, so the
        // clean-up can end the ones that a failed test left open.
        let url = with_parameter(
            &server_url,
            &format!(
                "options=-c%20search_path%3D{name}&application_name={name}&pool_max_size={TEST_POOL_MAX_SIZE}"
            ),
        );
        TestSchema {
            name,
            url,
            server_url,
            _permit: permit,
        }
    }

    /// Opens a plain connection to the schema, for checks the API does not show.
    pub async fn client(&self) -> tokio_postgres::Client {
        // tokio-postgres rejects the store's own pool_max_size parameter.
        let url = self
            .url
            .replace(&format!("&pool_max_size={TEST_POOL_MAX_SIZE}"), "");
        connect(&url)
            .await
            .unwrap_or_else(|error| panic!("connecting to schema {}: {error:?}", self.name))
    }
}

fn skip<T>(test: &str, unreachable: &Unreachable) -> Option<T> {
    if postgres_required() {
        panic!("{unreachable}, and {REQUIRE_VARIABLE}=1");
    }
    // Written past the test harness's output capture, which hides the
    // output of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {unreachable}. Set {REQUIRE_VARIABLE}=1 to fail instead."
    );
    None
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot block on a
        // future, so the clean-up gets a thread and a runtime of its own.
        let server_url = self.server_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building a runtime to drop the test schema");
            runtime.block_on(async {
                let client = connect(&server_url).await?;
                // A test that panicked may leave a transaction open on a
                // connection that its blocked runtime can no longer roll
                // back, and DROP SCHEMA would wait for it forever.
                client
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE application_name = $1 AND pid <> pg_backend_pid()",
                        &[&name],
                    )
                    .await?;
                client
                    .batch_execute(&format!(
                        "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {name} CASCADE"
                    ))
                    .await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("dropping test schema {} failed: {dropped:?}", self.name);
        }
    }
}
