//! Persistent state: webhooks, credentials, events, deliveries and attempts.
//!
//! [`Store`] is the one interface the rest of the service uses. SQLite (one
//! process per database file) and PostgreSQL (any number of processes on one
//! database) implement it with the same schema and the same rules:
//!
//! - An accepted event, its payload and its deliveries commit in one transaction.
//! - A delivery is scheduled by `due_at`. Claiming a delivery sets `leased_by`
//!   and pushes `due_at` to the end of the lease, so a crashed holder's work
//!   becomes due again by itself and is never held only in memory.
//! - Instants are microseconds since the Unix epoch; ids are UUID text.

pub mod cipher;
mod model;
mod postgres;
mod sqlite;

pub use model::*;
pub use postgres::{DEFAULT_POOL_MAX_SIZE, DUE_CHANNEL, WEBHOOK_CHANNEL};

use std::sync::Arc;

use tokio::sync::mpsc;
use uuid::Uuid;

use postgres::PostgresStore;
use sqlite::SqliteStore;

/// Errors of store operations that callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no previous state is stored for aggregate {0}")]
    NoPreviousState(Uuid),
    #[error("the business already has the maximum of {0} webhooks")]
    WebhookLimit(usize),
    #[error(transparent)]
    Backend(#[from] anyhow::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        StoreError::Backend(error.into())
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> StoreError {
        // tokio-postgres shows only "db error" until the source is added,
        // and logs print this error's own message.
        StoreError::Backend(anyhow::Error::msg(postgres::error_chain(&error)))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The database behind the service, chosen by the URL scheme.
#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

/// Runs one store operation on whichever backend is open and records its
/// duration under the operation's name.
macro_rules! dispatch {
    ($self:ident, $operation:literal, $store:ident => $call:expr) => {{
        let started = std::time::Instant::now();
        let result = match $self {
            Store::Sqlite($store) => $call,
            Store::Postgres($store) => $call,
        };
        crate::metrics::metrics().observe_store($operation, started.elapsed());
        result
    }};
}

impl Store {
    /// Opens the database named by `url` and applies pending migrations.
    ///
    /// `sqlite://PATH` (relative to the working directory, or absolute as
    /// `sqlite:///abs/path`) opens or creates a file.
    ///
    /// `postgres://` and `postgresql://` URLs take the parameters of
    /// tokio-postgres (such as `connect_timeout`, `sslmode` or `options`)
    /// plus `pool_max_size`, the connections this process keeps open at most
    /// (default [`DEFAULT_POOL_MAX_SIZE`]). Migrations run under an advisory
    /// lock, so several processes may start at once.
    pub async fn open(url: &str) -> anyhow::Result<Store> {
        if let Some(path) = sqlite_path(url) {
            return Ok(Store::Sqlite(SqliteStore::open(&path).await?));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Store::Postgres(PostgresStore::open(url).await?));
        }
        anyhow::bail!(
            "unsupported database URL {:?}: expected sqlite://PATH or postgres://USER@HOST/DATABASE",
            redact_url(url)
        )
    }

    /// Returns the file of a SQLite store.
    pub fn sqlite_path(&self) -> Option<&str> {
        match self {
            Store::Sqlite(store) => Some(store.path()),
            Store::Postgres(_) => None,
        }
    }

    /// Subscribes to changes that other processes make: deliveries that
    /// became due and webhooks that were deactivated or deleted. Returns
    /// `None` for SQLite, where only this process writes. Dropping the
    /// receiver ends the subscription.
    pub fn subscribe(&self) -> Option<mpsc::Receiver<StoreSignal>> {
        match self {
            Store::Sqlite(_) => None,
            Store::Postgres(store) => Some(store.subscribe()),
        }
    }

    /// Takes over every lease, for a store that only this process uses.
    /// Never call it on PostgreSQL while other processes may hold leases.
    pub async fn release_all_leases(&self, now: i64) -> StoreResult<u64> {
        dispatch!(self, "release_all_leases", s => s.release_all_leases(now).await)
    }

    pub async fn insert_api_key(&self, business_id: Uuid, key_hash: String) -> StoreResult<()> {
        dispatch!(self, "insert_api_key", s => s.insert_api_key(business_id, key_hash).await)
    }

    pub async fn find_api_key(&self, key_hash: String) -> StoreResult<Option<Uuid>> {
        dispatch!(self, "find_api_key", s => s.find_api_key(key_hash).await)
    }

    pub async fn insert_producer_token(&self, name: String, token_hash: String) -> StoreResult<()> {
        dispatch!(self, "insert_producer_token", s => s.insert_producer_token(name, token_hash).await)
    }

    pub async fn producer_token_exists(&self, token_hash: String) -> StoreResult<bool> {
        dispatch!(self, "producer_token_exists", s => s.producer_token_exists(token_hash).await)
    }

    /// Stores a new webhook unless its business already has `limit` of them.
    pub async fn create_webhook(&self, webhook: Webhook, limit: usize) -> StoreResult<()> {
        dispatch!(self, "create_webhook", s => s.create_webhook(webhook, limit).await)
    }

    /// Lists a business's webhooks, newest first.
    pub async fn list_webhooks(&self, business_id: Uuid) -> StoreResult<Vec<Webhook>> {
        dispatch!(self, "list_webhooks", s => s.list_webhooks(business_id).await)
    }

    pub async fn get_webhook(&self, business_id: Uuid, id: Uuid) -> StoreResult<Option<Webhook>> {
        dispatch!(self, "get_webhook", s => s.get_webhook(business_id, id).await)
    }

    /// Replaces a webhook's settings. Deactivating it cancels its pending deliveries.
    pub async fn update_webhook(&self, change: WebhookChange) -> StoreResult<Option<Webhook>> {
        dispatch!(self, "update_webhook", s => s.update_webhook(change).await)
    }

    /// Deletes a webhook with its deliveries and attempts. Returns whether it existed.
    pub async fn delete_webhook(&self, business_id: Uuid, id: Uuid) -> StoreResult<bool> {
        dispatch!(self, "delete_webhook", s => s.delete_webhook(business_id, id).await)
    }

    /// Stores an event and one delivery per subscribed active webhook, atomically.
    pub async fn accept_event(&self, event: NewEvent) -> StoreResult<AcceptedEvent> {
        dispatch!(self, "accept_event", s => s.accept_event(event).await)
    }

    /// Leases up to `limit` due deliveries to `owner` until `lease_until`,
    /// skipping the webhooks in `skip_webhooks`.
    pub async fn claim_due(&self, claim: Claim) -> StoreResult<Vec<Job>> {
        dispatch!(self, "claim_due", s => s.claim_due(claim).await)
    }

    /// Returns the earliest `due_at` of any delivery.
    pub async fn next_due_at(&self) -> StoreResult<Option<i64>> {
        dispatch!(self, "next_due_at", s => s.next_due_at().await)
    }

    /// Extends a lease that `owner` still holds. Returns false if it was taken over.
    pub async fn renew_lease(
        &self,
        delivery: DeliveryKey,
        owner: String,
        until: i64,
    ) -> StoreResult<bool> {
        dispatch!(self, "renew_lease", s => s.renew_lease(delivery, owner, until).await)
    }

    /// Gives leased deliveries back, due at once, so any worker may take them.
    pub async fn release_leases(
        &self,
        deliveries: Vec<DeliveryKey>,
        owner: String,
    ) -> StoreResult<()> {
        dispatch!(self, "release_leases", s => s.release_leases(deliveries, owner).await)
    }

    /// Records attempts in order, in one transaction.
    pub async fn record_attempts(&self, attempts: Arc<[AttemptRecord]>) -> StoreResult<()> {
        dispatch!(self, "record_attempts", s => s.record_attempts(attempts).await)
    }

    /// Returns the attempts of which no attempt with the same delivery and
    /// start time is stored, in their order. A write whose outcome was lost,
    /// such as a commit cut off with its connection, may have stored them.
    pub async fn unrecorded(
        &self,
        attempts: Vec<AttemptRecord>,
    ) -> StoreResult<Vec<AttemptRecord>> {
        dispatch!(self, "unrecorded", s => s.unrecorded(attempts).await)
    }

    /// Records one attempt and moves its delivery to its next state.
    pub async fn record_attempt(&self, attempt: AttemptRecord) -> StoreResult<()> {
        dispatch!(self, "record_attempt", s => s.record_attempt(attempt).await)
    }

    /// Lists a page of a webhook's deliveries, or `None` if the business has no such webhook.
    pub async fn list_deliveries(
        &self,
        query: DeliveryQuery,
    ) -> StoreResult<Option<Vec<Delivery>>> {
        dispatch!(self, "list_deliveries", s => s.list_deliveries(query).await)
    }

    /// Reads one delivery with its payload and attempts.
    pub async fn get_delivery(
        &self,
        business_id: Uuid,
        webhook_id: Uuid,
        delivery_id: Uuid,
    ) -> StoreResult<Option<DeliveryDetail>> {
        dispatch!(self, "get_delivery", s => s.get_delivery(business_id, webhook_id, delivery_id).await)
    }

    /// Builds a manual attempt of an existing delivery.
    pub async fn manual_job(
        &self,
        business_id: Uuid,
        webhook_id: Uuid,
        delivery_id: Uuid,
    ) -> StoreResult<Option<Job>> {
        dispatch!(self, "manual_job", s => s.manual_job(business_id, webhook_id, delivery_id).await)
    }

    /// Stores a `webhook.ping` event and delivery for a webhook, ready to send.
    pub async fn create_test_delivery(&self, test: TestDelivery) -> StoreResult<Option<Job>> {
        dispatch!(self, "create_test_delivery", s => s.create_test_delivery(test).await)
    }

    /// Requeues (or with `dry_run` counts) failed and cancelled deliveries in a window.
    pub async fn recover(&self, recovery: Recovery) -> StoreResult<RecoveryOutcome> {
        dispatch!(self, "recover", s => s.recover(recovery).await)
    }

    /// Deletes up to `batch` finished deliveries created before `cutoff`, their
    /// attempts, and events that no delivery refers to. Returns the rows removed.
    pub async fn purge_history(&self, cutoff: i64, batch: usize) -> StoreResult<u64> {
        dispatch!(self, "purge_history", s => s.purge_history(cutoff, batch).await)
    }

    /// Lists every webhook's stored secret, as stored (plain or encrypted).
    pub async fn webhook_secrets(&self) -> StoreResult<Vec<(Uuid, String)>> {
        dispatch!(self, "webhook_secrets", s => s.webhook_secrets().await)
    }

    /// Replaces a stored secret if it still has the value `old`.
    pub async fn replace_webhook_secret(
        &self,
        id: Uuid,
        old: String,
        new: String,
    ) -> StoreResult<bool> {
        dispatch!(self, "replace_webhook_secret", s => s.replace_webhook_secret(id, old, new).await)
    }

    /// Checks that the database is reachable.
    pub async fn ping(&self) -> StoreResult<()> {
        dispatch!(self, "ping", s => s.ping().await)
    }

    /// Counts pending deliveries, for metrics.
    pub async fn queue_stats(&self, now: i64) -> StoreResult<QueueStats> {
        dispatch!(self, "queue_stats", s => s.queue_stats(now).await)
    }
}

/// Extracts the file path from a `sqlite:` URL.
pub fn sqlite_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    Some(path.to_owned())
}

/// Hides the password of a database URL for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("REDACTED"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_relative_and_absolute_files() {
        assert_eq!(
            sqlite_path("sqlite://citapro-webhooks.db").unwrap(),
            "citapro-webhooks.db"
        );
        assert_eq!(sqlite_path("sqlite:///tmp/x.db").unwrap(), "/tmp/x.db");
        assert_eq!(
            sqlite_path("sqlite:data/x.db?mode=rwc").unwrap(),
            "data/x.db"
        );
        assert!(sqlite_path("postgres://localhost/test").is_none());
    }

    #[test]
    fn redaction_hides_passwords() {
        let redacted = redact_url("postgres://user:hunter2@db/test");
        assert!(!redacted.contains("hunter2"));
    }
}
