//! Security and robustness of delivery against real receivers on loopback:
//! request deadlines, bounded response bodies, redirects, `Retry-After`,
//! certificate checks, the destination policy, per-endpoint fairness and
//! secrets kept out of logs.
//!
//! Each test starts the real service in this process (or, for the logs, the
//! built binary) on `127.0.0.1` with a fresh SQLite file. Every request goes
//! to a loopback address.

// The SQLite backend that the integration harness needs; the security
// tests run on SQLite only.
#[allow(dead_code)]
#[path = "../integration/sqlite_backend.rs"]
mod backend;
mod bodies;
mod connections;
mod deadlines;
mod destinations;
mod fairness;
// The integration suite's harness; this binary uses part of it.
#[allow(dead_code)]
#[path = "../integration/helpers.rs"]
mod helpers;
mod receivers;
mod redirects;
mod retry_after;
mod secrecy;
mod service;
mod tls;
