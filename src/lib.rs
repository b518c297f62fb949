//! citapro-webhooks: the webhook subsystem of the CitaPro booking platform.
//!
//! The producer reports domain events; the service turns each into the
//! documented signed payload, stores it with one delivery per subscribed
//! endpoint, and sends it with retries, recording every attempt.
//!
//! # Layout
//! - [`domain`]: the event catalogue, `changes`, payloads, signatures, URL rules.
//! - [`store`]: the database interface and its SQLite and PostgreSQL backends.
//! - [`delivery`]: leasing due deliveries, the per-endpoint scheduler, HTTP attempts.
//! - [`api`]: the HTTP API and its problem+json errors.
//! - [`app`]: start-up and shutdown of `serve`; [`cli`], [`admin`] and [`devtools`]:
//!   the command line.

pub mod admin;
pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod devtools;
pub mod domain;
pub mod metrics;
pub mod store;
