//! The integration suite (tests/integration) on PostgreSQL. It compiles the
//! same test modules with a backend that gives each test a fresh schema of
//! the server named by `CITAPRO_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`) and drops it at the end.
//! Without a reachable server each test prints a `SKIPPED` line and runs on
//! SQLite instead, unless `CITAPRO_REQUIRE_POSTGRES=1` makes it fail.

#[path = "../integration/auth.rs"]
mod auth;
mod backend;
#[path = "../integration/crash.rs"]
mod crash;
#[path = "../integration/delivery.rs"]
mod delivery;
#[path = "../integration/encryption.rs"]
mod encryption;
#[path = "../integration/events_api.rs"]
mod events_api;
#[path = "../integration/helpers.rs"]
mod helpers;
#[path = "../integration/history.rs"]
mod history;
#[path = "../integration/operations.rs"]
mod operations;
#[path = "../integration/payloads.rs"]
mod payloads;
// The PostgreSQL suite's schema setup; this crate uses part of it.
#[allow(dead_code)]
#[path = "../postgres/schema.rs"]
mod schema;
#[path = "../integration/webhooks_api.rs"]
mod webhooks_api;

/// Returns the names of the `mod NAME;` declarations in a crate root's text.
fn declared_modules(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|line| line.strip_prefix("mod "))
        .filter_map(|rest| rest.strip_suffix(';'))
        .collect()
}

#[test]
fn includes_every_integration_module() {
    let integration = declared_modules(include_str!("../integration/main.rs"));
    let included = declared_modules(include_str!("main.rs"));
    assert!(
        integration.contains(&"helpers"),
        "no modules found in tests/integration/main.rs: {integration:?}"
    );
    for module in integration {
        assert!(
            included.contains(&module),
            "tests/integration/main.rs declares mod {module}, which \
             tests/integration_postgres/main.rs does not include"
        );
    }
}
