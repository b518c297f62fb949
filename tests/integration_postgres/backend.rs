//! The PostgreSQL backend of the integration harness: each test database is
//! a fresh schema on the server of the PostgreSQL suite, dropped with the
//! [`TestDatabase`].

use std::io::Write;
use std::path::Path;

use crate::helpers::fresh_database_url;
use crate::schema::{REQUIRE_VARIABLE, TestSchema, postgres_required};

/// A fresh, empty database for one test.
pub struct TestDatabase {
    pub url: String,
    /// Drops the schema when the database is dropped. `None` when the test
    /// runs on SQLite because the server is not reachable.
    _schema: Option<TestSchema>,
}

/// Creates a schema for one test. When the server is not reachable, the
/// test runs on a SQLite file in `dir` instead and prints a `SKIPPED` line
/// on standard error, unless `CITAPRO_REQUIRE_POSTGRES=1` makes it panic.
pub async fn fresh_database(dir: &Path) -> TestDatabase {
    let unreachable = match TestSchema::try_create().await {
        Ok(schema) => {
            return TestDatabase {
                url: schema.url.clone(),
                _schema: Some(schema),
            };
        }
        Err(unreachable) => unreachable,
    };
    if postgres_required() {
        panic!("{unreachable}, and {REQUIRE_VARIABLE}=1");
    }
    // libtest runs each test on a thread named after the test, unless it
    // runs one test at a time on the main thread.
    let thread = std::thread::current();
    let test = thread
        .name()
        .filter(|name| *name != "main")
        .unwrap_or("a test");
    // Written past the test harness's output capture, which hides the
    // output of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test} on PostgreSQL: {unreachable}. It runs on SQLite instead. \
         Set {REQUIRE_VARIABLE}=1 to make this a failure."
    );
    TestDatabase {
        url: fresh_database_url(dir).await,
        _schema: None,
    }
}
