//! Integration tests of the core service. Each test starts the real service
//! (in this process, or as the built binary) on a loopback port with its own
//! SQLite file, and checks deliveries with real HTTP receivers. The
//! `integration_postgres` test crate runs the same tests on PostgreSQL.

mod auth;
#[path = "sqlite_backend.rs"]
mod backend;
mod crash;
mod delivery;
mod encryption;
mod events_api;
mod helpers;
mod history;
mod operations;
mod payloads;
mod webhooks_api;
