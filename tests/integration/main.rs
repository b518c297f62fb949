//! Integration tests of the core service. Each test starts the real service
//! (in this process, or as the built binary) on a loopback port with its own
//! database, and checks deliveries with real HTTP receivers.

mod auth;
mod crash;
mod delivery;
mod encryption;
mod events_api;
mod helpers;
mod operations;
mod payloads;
mod webhooks_api;
