//! Tests of the PostgreSQL store and of several `serve` processes on one
//! database. Each test works in a fresh schema of the server named by
//! `CITAPRO_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`)
//! and drops it at the end. Without a reachable server each test prints a
//! `SKIPPED` line and passes, unless `CITAPRO_REQUIRE_POSTGRES=1` is set.

mod schema;
mod serve;
mod store;
mod support;
