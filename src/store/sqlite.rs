//! The SQLite store: one writer thread with group commit, and a pool of readers.
//!
//! Every write is a closure run by the writer thread. The thread takes all
//! writes that are waiting, runs them in a single transaction and commits
//! once, so concurrent requests share one fsync. A write that fails is
//! undone alone: the batch then runs again with a savepoint per write (see
//! [`run_batch`]). A caller hears back only after the commit. Readers use their own connections
//! and, in WAL mode, see every committed write without blocking the writer.

use std::collections::HashSet;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::model::*;
use super::{StoreError, StoreResult};
use crate::domain::clock::now_micros;
use crate::domain::payload::{PING_EVENT, build_payload};

/// Writes taken into one transaction at most.
const MAX_BATCH: usize = 512;
/// Bytes of event payloads taken into one transaction at most, besides the
/// first write. A transaction's pages stay in the WAL until it commits, so
/// this bounds the WAL when many large events arrive at once.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Deliveries requeued in one transaction by a recovery.
const RECOVER_CHUNK: usize = 1000;
/// Requeues a chunk of a recovery. `?6` is the chunk's only lower bound on
/// `id`: inclusive for the first chunk, exclusive after it. With the window
/// start as a second lower bound, the bundled SQLite began the range there,
/// so each chunk read again every row requeued before it.
macro_rules! requeue_chunk {
    ($lower:literal) => {
        concat!(
            "UPDATE deliveries
             SET status = 'pending', auto_attempts = 0, due_at = ?4,
                next_attempt_at = ?4, leased_by = NULL
             WHERE webhook_id = ?1 AND id IN (
                SELECT id FROM deliveries
                WHERE webhook_id = ?1 AND id ",
            $lower,
            " ?6 AND id < ?7
                  AND created_at >= ?2 AND created_at < ?3
                  AND status IN ('failed', 'cancelled') AND is_test = 0
                ORDER BY id
                LIMIT ?5)
             RETURNING id"
        )
    };
}
const REQUEUE_FIRST_CHUNK: &str = requeue_chunk!(">=");
const REQUEUE_NEXT_CHUNK: &str = requeue_chunk!(">");
/// Page cache of the writer and of each reader, in KiB (SQLite's negative `cache_size`).
const WRITER_CACHE_KIB: i64 = 8 * 1024;
const READER_CACHE_KIB: i64 = 2 * 1024;

/// The wait between two WAL checkpoints.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// The wait between two checkpoints run by the writer itself (see [`run_writer`]).
const WRITER_CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// WAL frames (16 MiB of 4 KiB pages) after which the WAL is copied back
/// and started over sooner, so that it stays inside the part of the file
/// already written (see [`run_writer`]).
const WAL_RESTART_FRAMES: i32 = 4096;
/// WAL frames (64 MiB, as [`WAL_SIZE_LIMIT`]) after which the writer copies
/// the WAL back itself before its next transaction, without waiting for
/// the checkpoint thread. This slows down writes that arrive faster than
/// the checkpoint thread copies, such as many events near the size limit.
const WAL_MAX_FRAMES: i32 = 16 * 1024;
/// The size SQLite cuts the WAL file back to when it starts the WAL over.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;
/// The busy time after which the writer starts its next transaction while
/// the WAL syncs. After a shorter transaction it waits for the sync.
const OVERLAP_MIN_BUSY: std::time::Duration = std::time::Duration::from_millis(1);
/// Reader connections kept open.
const READERS: usize = 4;

const MIGRATIONS: &[&str] = &[
    include_str!("sql/sqlite_v1.sql"),
    include_str!("sql/sqlite_v2.sql"),
    include_str!("sql/sqlite_v3.sql"),
    include_str!("sql/sqlite_v4.sql"),
    include_str!("sql/sqlite_v5.sql"),
];

type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;
type WriteOp = Box<dyn PendingWrite>;

/// The writer's requests to the checkpoint thread, and the thread's report
/// that it has checkpointed since the writer's last request.
#[derive(Default)]
struct CheckpointSignal {
    requested: Mutex<bool>,
    changed: std::sync::Condvar,
    done: std::sync::atomic::AtomicBool,
}

/// A write waiting for the writer thread. It may run twice: when one write
/// of a transaction fails, the transaction is rolled back and every write
/// of it runs again, each in its own savepoint (see [`run_batch`]).
trait PendingWrite: Send {
    /// Runs the write, or records that it could not run when `connection`
    /// is `None`. Returns whether it succeeded.
    fn run(&mut self, connection: Option<&Connection>) -> bool;
    /// Hands over the completion, to call with the commit's outcome.
    fn into_completion(self: Box<Self>) -> Completion;
    /// Payload bytes that the write stores, for [`MAX_BATCH_BYTES`].
    fn bytes(&self) -> usize;
}

struct Write<T, F> {
    f: F,
    bytes: usize,
    result: Option<StoreResult<T>>,
    sender: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> PendingWrite for Write<T, F>
where
    T: Send + 'static,
    F: Fn(&Connection) -> StoreResult<T> + Send + 'static,
{
    fn run(&mut self, connection: Option<&Connection>) -> bool {
        let result = match connection {
            Some(connection) => (self.f)(connection),
            None => Err(StoreError::Backend(anyhow::anyhow!(
                "the SQLite transaction could not start"
            ))),
        };
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn into_completion(self: Box<Self>) -> Completion {
        let Write { result, sender, .. } = *self;
        Box::new(move |commit| {
            let outcome = match (result, commit) {
                // A failed write was undone, so its own error is reported
                // whatever the outcome of the transaction.
                (Some(Err(error)), _) => Err(error),
                (Some(Ok(value)), Ok(())) => Ok(value),
                (None, Ok(())) => Err(StoreError::Backend(anyhow::anyhow!(
                    "the SQLite write did not run"
                ))),
                (_, Err(message)) => Err(StoreError::Backend(anyhow::anyhow!(
                    "SQLite commit failed: {message}"
                ))),
            };
            let _ = sender.send(outcome);
        })
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}

#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: mpsc::Sender<WriteOp>,
    readers: Mutex<Vec<Connection>>,
    path: String,
}

fn open_connection(path: &str) -> rusqlite::Result<Connection> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL lets readers run beside the writer; FULL makes every commit
    // durable across power loss, not only across a process crash. The
    // writer's connection keeps it for migrations only. Its later commits
    // are synced by the syncer thread instead (see `run_syncer`).
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    // Savepoints keep their undo pages in memory instead of a temporary file.
    connection.pragma_update(None, "temp_store", "MEMORY")?;
    connection.set_prepared_statement_cache_capacity(64);
    Ok(connection)
}

/// Applies the migrations the file lacks. A `serve` process holds
/// `<path>.lock` while it runs, and a running server may not know the new
/// schema, so migrations are applied only while that lock is free. It is
/// held until they are done.
fn migrate(connection: &mut Connection, path: &str) -> anyhow::Result<()> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        anyhow::bail!(
            "the SQLite file {path} has schema version {version}, but this binary supports \
             versions up to {known}; run a newer citapro-webhooks"
        );
    }
    if version == known {
        return Ok(());
    }
    let _lock = lock_for_migrations(path, version + 1)?;
    // A migration that rewrites a whole table keeps temporary copies of its
    // pages as large as the table, so they go to a temporary file, not to
    // memory.
    connection.pragma_update(None, "temp_store", "FILE")?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let version = index as i64 + 1;
        tracing::info!(version, path, "applying SQLite migration");
        let transaction = connection.transaction()?;
        transaction
            .execute_batch(sql)
            .with_context(|| format!("applying SQLite migration {version}"))?;
        transaction.pragma_update(None, "user_version", version)?;
        transaction.commit()?;
        tracing::info!(version, path, "applied SQLite migration");
    }
    connection.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

/// Takes the lock that a `serve` process holds on `<path>.lock`, so that no
/// server writes to the file while its schema changes under it.
fn lock_for_migrations(path: &str, first: i64) -> anyhow::Result<std::fs::File> {
    let lock_path = format!("{path}.lock");
    let file =
        std::fs::File::create(&lock_path).with_context(|| format!("creating {lock_path}"))?;
    file.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "the SQLite file {path} needs migration {first} and later, but a serve process \
             is using it; stop that process, then run citapro-webhooks migrate"
        )
    })?;
    Ok(file)
}

impl SqliteStore {
    pub async fn open(path: &str) -> anyhow::Result<SqliteStore> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(path)).await?
    }

    fn open_blocking(path: String) -> anyhow::Result<SqliteStore> {
        if let Some(parent) = Path::new(&path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating the folder of {path}"))?;
        }
        let mut writer =
            open_connection(&path).with_context(|| format!("opening SQLite database {path}"))?;
        migrate(&mut writer, &path)?;
        writer.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        // From here on the writer commits without waiting for the disk, and
        // the syncer thread syncs the WAL before any write is reported done
        // (see `run_syncer`). Migrations above were synced at each commit.
        writer.pragma_update(None, "synchronous", "NORMAL")?;
        let wal_path = format!("{path}-wal");
        let wal = std::fs::File::open(&wal_path)
            .with_context(|| format!("opening the SQLite WAL {wal_path}"))?;
        let readers = (0..READERS)
            .map(|_| {
                let reader = open_connection(&path)?;
                reader.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
                Ok(reader)
            })
            .collect::<rusqlite::Result<Vec<_>>>()?;

        // Checkpoints run on a thread of their own, so commits rarely wait
        // for the WAL to be copied back into the database file. The writer
        // adds a short one now and then (see `run_writer`).
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        writer.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        // After the pragma above, which would replace it.
        writer.wal_hook(Some(note_wal_frames));
        let checkpointer = open_connection(&path)?;

        let (sender, receiver) = mpsc::channel::<WriteOp>();
        let (committed, to_sync) = mpsc::channel::<Committed>();
        let signal = Arc::new(CheckpointSignal::default());
        let checkpoint_signal = signal.clone();
        let progress = Arc::new(SyncProgress::default());
        let synced = progress.clone();
        std::thread::Builder::new()
            .name("sqlite-syncer".to_owned())
            .spawn(move || run_syncer(wal, to_sync, &synced))?;
        std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || run_writer(writer, receiver, committed, &progress, &signal))?;
        let inner = Arc::new(Inner {
            writer: sender,
            readers: Mutex::new(readers),
            path,
        });
        let watched = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".to_owned())
            .spawn(move || run_checkpoints(checkpointer, watched, &checkpoint_signal))?;
        Ok(SqliteStore { inner })
    }

    /// Runs `f` inside the writer's next transaction and returns after commit.
    /// `f` may run twice (see [`PendingWrite`]), so it must not consume what
    /// it captures. Only the result of its last run counts.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.write_sized(0, f).await
    }

    /// Runs `f` like [`SqliteStore::write`], for a write that stores about
    /// `bytes` bytes of payload.
    async fn write_sized<T, F>(&self, bytes: usize, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (sender, receiver) = oneshot::channel::<StoreResult<T>>();
        let op: WriteOp = Box::new(Write {
            f,
            bytes,
            result: None,
            sender,
        });
        self.inner
            .writer
            .send(op)
            .map_err(|_| anyhow::anyhow!("the SQLite writer has stopped"))?;
        receiver
            .await
            .map_err(|_| anyhow::anyhow!("the SQLite writer dropped a write"))?
    }

    /// Runs `f` on a reader connection.
    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = inner.readers.lock().expect("reader pool lock").pop();
            let connection = match pooled {
                Some(connection) => connection,
                None => open_connection(&inner.path)?,
            };
            let result = f(&connection);
            let mut readers = inner.readers.lock().expect("reader pool lock");
            if readers.len() < READERS {
                readers.push(connection);
            }
            result
        })
        .await
        .map_err(|error| StoreError::Backend(error.into()))?
    }

    pub fn path(&self) -> &str {
        &self.inner.path
    }

    pub async fn release_all_leases(&self, now: i64) -> StoreResult<u64> {
        self.write(move |c| {
            let count = c.execute(
                "UPDATE deliveries SET leased_by = NULL, due_at = MIN(due_at, ?1)
                 WHERE leased_by IS NOT NULL AND due_at IS NOT NULL",
                params![now],
            )?;
            Ok(count as u64)
        })
        .await
    }

    pub async fn insert_api_key(&self, business_id: Uuid, key_hash: String) -> StoreResult<()> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO api_keys (key_hash, business_id, created_at) VALUES (?1, ?2, ?3)",
                params![key_hash, business_id.to_string(), now_micros()],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn find_api_key(&self, key_hash: String) -> StoreResult<Option<Uuid>> {
        self.read(move |c| {
            let business: Option<String> = c
                .prepare_cached("SELECT business_id FROM api_keys WHERE key_hash = ?1")?
                .query_row(params![key_hash], |row| row.get(0))
                .optional()?;
            Ok(business.and_then(|text| Uuid::parse_str(&text).ok()))
        })
        .await
    }

    pub async fn insert_producer_token(&self, name: String, token_hash: String) -> StoreResult<()> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO producer_tokens (token_hash, name, created_at) VALUES (?1, ?2, ?3)",
                params![token_hash, name, now_micros()],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn producer_token_exists(&self, token_hash: String) -> StoreResult<bool> {
        self.read(move |c| {
            let found = c
                .prepare_cached("SELECT 1 FROM producer_tokens WHERE token_hash = ?1")?
                .exists(params![token_hash])?;
            Ok(found)
        })
        .await
    }

    pub async fn create_webhook(&self, webhook: Webhook, limit: usize) -> StoreResult<()> {
        self.write(move |c| {
            let count: i64 = c.query_row(
                "SELECT COUNT(*) FROM webhooks WHERE business_id = ?1",
                params![webhook.business_id.to_string()],
                |row| row.get(0),
            )?;
            if count as usize >= limit {
                return Err(StoreError::WebhookLimit(limit));
            }
            c.execute(
                "INSERT INTO webhooks
                   (id, business_id, url, events, is_active, secret, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    webhook.id.to_string(),
                    webhook.business_id.to_string(),
                    webhook.url,
                    join_events(&webhook.events),
                    webhook.is_active,
                    webhook.secret,
                    webhook.created_at,
                    webhook.updated_at,
                ],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn list_webhooks(&self, business_id: Uuid) -> StoreResult<Vec<Webhook>> {
        self.read(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE business_id = ?1
                 ORDER BY created_at DESC, id DESC"
            ))?;
            let rows = statement.query_map(params![business_id.to_string()], webhook_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn get_webhook(&self, business_id: Uuid, id: Uuid) -> StoreResult<Option<Webhook>> {
        self.read(move |c| select_webhook(c, business_id, id)).await
    }

    pub async fn update_webhook(&self, change: WebhookChange) -> StoreResult<Option<Webhook>> {
        self.write(move |c| {
            let updated = c.execute(
                "UPDATE webhooks SET url = ?1, events = ?2, is_active = ?3, updated_at = ?4
                 WHERE id = ?5 AND business_id = ?6",
                params![
                    change.url,
                    join_events(&change.events),
                    change.is_active,
                    change.updated_at,
                    change.id.to_string(),
                    change.business_id.to_string(),
                ],
            )?;
            if updated == 0 {
                return Ok(None);
            }
            if !change.is_active {
                c.execute(
                    "UPDATE deliveries SET status = 'cancelled', due_at = NULL,
                        next_attempt_at = NULL, leased_by = NULL
                     WHERE webhook_id = ?1 AND status = 'pending'",
                    params![change.id.to_string()],
                )?;
            }
            select_webhook(c, change.business_id, change.id)
        })
        .await
    }

    pub async fn delete_webhook(&self, business_id: Uuid, id: Uuid) -> StoreResult<bool> {
        self.write(move |c| {
            let id_text = id.to_string();
            let deleted = c.execute(
                "DELETE FROM webhooks WHERE id = ?1 AND business_id = ?2",
                params![id_text, business_id.to_string()],
            )?;
            if deleted == 0 {
                return Ok(false);
            }
            c.execute(
                "DELETE FROM attempts WHERE delivery_id IN
                   (SELECT id FROM deliveries WHERE webhook_id = ?1)",
                params![id_text],
            )?;
            c.execute(
                "DELETE FROM deliveries WHERE webhook_id = ?1",
                params![id_text],
            )?;
            Ok(true)
        })
        .await
    }

    pub async fn accept_event(&self, event: NewEvent) -> StoreResult<AcceptedEvent> {
        let bytes = event.payload.as_ref().map_or(0, Vec::len);
        self.write_sized(bytes, move |c| accept_event(c, &event))
            .await
    }

    /// Finds due work on a reader, so the scan never holds up the writer,
    /// then leases what is still due in one write.
    pub async fn claim_due(&self, claim: Claim) -> StoreResult<Vec<Job>> {
        let lookup = claim.clone();
        let found = self.read(move |c| find_due(c, &lookup)).await?;
        if found.is_empty() {
            return Ok(found);
        }
        self.write(move |c| lease_found(c, &claim, &found)).await
    }

    /// Finds the earliest due time of all deliveries, with one seek per
    /// webhook that has due or leased deliveries (see [`next_due_webhook`]).
    pub async fn next_due_at(&self) -> StoreResult<Option<i64>> {
        self.read(|c| {
            let mut earliest: Option<i64> = None;
            let mut cursor = String::new();
            while let Some((webhook_id, due_at)) = next_due_webhook(c, &cursor)? {
                earliest = Some(earliest.map_or(due_at, |e| e.min(due_at)));
                cursor = webhook_id;
            }
            Ok(earliest)
        })
        .await
    }

    pub async fn renew_lease(
        &self,
        delivery: DeliveryKey,
        owner: String,
        until: i64,
    ) -> StoreResult<bool> {
        self.write(move |c| {
            let renewed = c.execute(
                "UPDATE deliveries SET due_at = ?1
                 WHERE webhook_id = ?4 AND id = ?2 AND leased_by = ?3 AND status = 'pending'",
                params![
                    until,
                    delivery.delivery_id.to_string(),
                    owner,
                    delivery.webhook_id.to_string()
                ],
            )?;
            Ok(renewed == 1)
        })
        .await
    }

    pub async fn release_leases(
        &self,
        deliveries: Vec<DeliveryKey>,
        owner: String,
    ) -> StoreResult<()> {
        self.write(move |c| {
            let now = now_micros();
            let mut statement = c.prepare_cached(
                "UPDATE deliveries SET leased_by = NULL, due_at = ?1
                 WHERE webhook_id = ?4 AND id = ?2 AND leased_by = ?3 AND due_at IS NOT NULL",
            )?;
            for key in &deliveries {
                statement.execute(params![
                    now,
                    key.delivery_id.to_string(),
                    owner,
                    key.webhook_id.to_string()
                ])?;
            }
            Ok(())
        })
        .await
    }

    pub async fn record_attempt(&self, attempt: AttemptRecord) -> StoreResult<()> {
        self.write(move |c| record_attempt(c, &attempt)).await
    }

    pub async fn record_attempts(&self, attempts: Arc<[AttemptRecord]>) -> StoreResult<()> {
        self.write(move |c| {
            for attempt in attempts.iter() {
                record_attempt(c, attempt)?;
            }
            Ok(())
        })
        .await
    }

    pub async fn unrecorded(
        &self,
        attempts: Vec<AttemptRecord>,
    ) -> StoreResult<Vec<AttemptRecord>> {
        self.read(move |c| {
            let mut statement = c.prepare_cached(
                "SELECT 1 FROM attempts WHERE delivery_id = ?1 AND started_at = ?2",
            )?;
            let mut unrecorded = Vec::with_capacity(attempts.len());
            for attempt in attempts {
                let stored = statement
                    .exists(params![attempt.delivery_id.to_string(), attempt.started_at])?;
                if !stored {
                    unrecorded.push(attempt);
                }
            }
            Ok(unrecorded)
        })
        .await
    }

    pub async fn list_deliveries(
        &self,
        query: DeliveryQuery,
    ) -> StoreResult<Option<Vec<Delivery>>> {
        self.read(move |c| {
            if !webhook_exists(c, query.business_id, query.webhook_id)? {
                return Ok(None);
            }
            // A delivery's `created_at` is the time in its v7 id (see
            // migration 5), so the order by `(created_at, id)` is the id
            // order, and a cursor's id alone marks its place. No id reaches
            // "g", so that bound lets the first page use the key too.
            let before = match query.after {
                Some((_, id)) => id.to_string(),
                None => "g".to_owned(),
            };
            let mut statement = c.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries d
                 WHERE d.webhook_id = ?1 AND d.id < ?4
                   AND (?2 IS NULL OR d.status = ?2)
                   AND (?3 IS NULL OR d.event = ?3)
                 ORDER BY d.id DESC
                 LIMIT ?5"
            ))?;
            let rows = statement.query_map(
                params![
                    query.webhook_id.to_string(),
                    query.status,
                    query.event,
                    before,
                    query.limit as i64,
                ],
                delivery_from_row,
            )?;
            Ok(Some(rows.collect::<Result<Vec<_>, _>>()?))
        })
        .await
    }

    pub async fn get_delivery(
        &self,
        business_id: Uuid,
        webhook_id: Uuid,
        delivery_id: Uuid,
    ) -> StoreResult<Option<DeliveryDetail>> {
        self.read(move |c| {
            // One read transaction, so the delivery's counters and its
            // attempts come from the same snapshot.
            let snapshot = c.unchecked_transaction()?;
            let c: &Connection = &snapshot;
            if !webhook_exists(c, business_id, webhook_id)? {
                return Ok(None);
            }
            let found = c
                .prepare_cached(&format!(
                    "SELECT {DELIVERY_COLUMNS}, e.payload FROM deliveries d
                     JOIN events e ON e.id = d.event_id
                     WHERE d.id = ?1 AND d.webhook_id = ?2"
                ))?
                .query_row(
                    params![delivery_id.to_string(), webhook_id.to_string()],
                    |row| Ok((delivery_from_row(row)?, row.get::<_, Vec<u8>>(11)?)),
                )
                .optional()?;
            let Some((delivery, payload)) = found else {
                return Ok(None);
            };
            let attempts = c
                .prepare_cached(
                    "SELECT number, trigger, started_at, duration_ms, status_code, error_kind,
                        response_body
                     FROM attempts WHERE delivery_id = ?1 ORDER BY number",
                )?
                .query_map(params![delivery_id.to_string()], |row| {
                    Ok(Attempt {
                        number: row.get(0)?,
                        trigger: row.get(1)?,
                        started_at: row.get(2)?,
                        duration_ms: row.get(3)?,
                        status_code: row.get(4)?,
                        error_kind: row.get(5)?,
                        response_body: row.get(6)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(DeliveryDetail {
                delivery,
                payload,
                attempts,
            }))
        })
        .await
    }

    pub async fn manual_job(
        &self,
        business_id: Uuid,
        webhook_id: Uuid,
        delivery_id: Uuid,
    ) -> StoreResult<Option<Job>> {
        self.read(move |c| {
            let job = c
                .prepare_cached(
                    "SELECT d.event, d.auto_attempts, w.url, w.secret, e.payload, d.event_id
                     FROM deliveries d
                     JOIN webhooks w ON w.id = d.webhook_id
                     JOIN events e ON e.id = d.event_id
                     WHERE d.id = ?1 AND d.webhook_id = ?2 AND w.business_id = ?3",
                )?
                .query_row(
                    params![
                        delivery_id.to_string(),
                        webhook_id.to_string(),
                        business_id.to_string()
                    ],
                    |row| {
                        Ok(Job {
                            delivery_id,
                            webhook_id,
                            event_id: parse_uuid(row.get(5)?)?,
                            event: row.get(0)?,
                            auto_attempts: row.get(1)?,
                            url: row.get(2)?,
                            secret: row.get(3)?,
                            payload: Bytes::from(row.get::<_, Vec<u8>>(4)?),
                            trigger: Trigger::Manual,
                            lease_until: 0,
                        })
                    },
                )
                .optional()?;
            Ok(job)
        })
        .await
    }

    pub async fn create_test_delivery(&self, test: TestDelivery) -> StoreResult<Option<Job>> {
        self.write(move |c| {
            let Some(webhook) = select_webhook(c, test.business_id, test.webhook_id)? else {
                return Ok(None);
            };
            let event_id = Uuid::now_v7();
            let delivery_id = Uuid::now_v7();
            c.execute(
                "INSERT INTO events (id, business_id, event, aggregate_id, payload, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    event_id.to_string(),
                    test.business_id.to_string(),
                    PING_EVENT,
                    test.webhook_id.to_string(),
                    test.payload,
                    test.now,
                ],
            )?;
            c.execute(
                "INSERT INTO deliveries (id, webhook_id, event_id, event, aggregate_id, status,
                    created_at, is_test)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, 1)",
                params![
                    delivery_id.to_string(),
                    test.webhook_id.to_string(),
                    event_id.to_string(),
                    PING_EVENT,
                    test.webhook_id.to_string(),
                    v7_micros(delivery_id),
                ],
            )?;
            Ok(Some(Job {
                delivery_id,
                webhook_id: test.webhook_id,
                event_id,
                event: PING_EVENT.to_owned(),
                url: webhook.url,
                secret: webhook.secret,
                payload: Bytes::from(test.payload.clone()),
                auto_attempts: 0,
                trigger: Trigger::Test,
                lease_until: 0,
            }))
        })
        .await
    }

    /// Requeues in chunks of [`RECOVER_CHUNK`] rows, one transaction each,
    /// so a large window never holds up other writes for long, nor builds a
    /// large rollback journal in memory when a chunk runs again in a savepoint.
    pub async fn recover(&self, recovery: Recovery) -> StoreResult<RecoveryOutcome> {
        let check = recovery.clone();
        let (low, high) = id_window(recovery.since, recovery.until);
        let window = (low.clone(), high.clone());
        let found = self
            .read(move |c| {
                let Some(webhook) = select_webhook(c, check.business_id, check.webhook_id)? else {
                    return Ok(RecoveryOutcome::WebhookNotFound);
                };
                if !webhook.is_active {
                    return Ok(RecoveryOutcome::WebhookInactive);
                }
                let (low, high) = window;
                let count: i64 = c.query_row(
                    "SELECT COUNT(*) FROM deliveries
                     WHERE webhook_id = ?1 AND id >= ?4 AND id < ?5
                       AND created_at >= ?2 AND created_at < ?3
                       AND status IN ('failed', 'cancelled') AND is_test = 0",
                    params![
                        check.webhook_id.to_string(),
                        check.since,
                        check.until,
                        low,
                        high
                    ],
                    |row| row.get(0),
                )?;
                Ok(RecoveryOutcome::Requeued(count as u64))
            })
            .await?;
        match found {
            RecoveryOutcome::Requeued(_) if !recovery.dry_run => {}
            other => return Ok(other),
        }
        // Each chunk resumes after the last row of the one before, in id
        // order, so no chunk reads the rows already requeued.
        let mut requeued = 0u64;
        let mut after: Option<String> = None;
        loop {
            let chunk = recovery.clone();
            let high = high.clone();
            let (sql, lower) = match &after {
                Some(last) => (REQUEUE_NEXT_CHUNK, last.clone()),
                None => (REQUEUE_FIRST_CHUNK, low.clone()),
            };
            let (changed, last) = self
                .write(move |c| {
                    let rows = c
                        .prepare_cached(sql)?
                        .query_map(
                            params![
                                chunk.webhook_id.to_string(),
                                chunk.since,
                                chunk.until,
                                chunk.now,
                                RECOVER_CHUNK as i64,
                                lower,
                                high,
                            ],
                            |row| row.get::<_, String>(0),
                        )?
                        .collect::<Result<Vec<_>, _>>()?;
                    let changed = rows.len() as u64;
                    Ok((changed, rows.into_iter().max()))
                })
                .await?;
            requeued += changed;
            match last {
                Some(last) if changed == RECOVER_CHUNK as u64 => after = Some(last),
                _ => return Ok(RecoveryOutcome::Requeued(requeued)),
            }
        }
    }

    /// Deletes up to `batch` finished deliveries and `batch` unreferenced
    /// events created before `cutoff`. Rows are found by their id: a UUID
    /// v7 created before `cutoff` sorts below [`v7_floor`] of it. Deliveries
    /// are found webhook by webhook, through the primary key
    /// `(webhook_id, id)`; every delivery belongs to a stored webhook.
    pub async fn purge_history(&self, cutoff: i64, batch: usize) -> StoreResult<u64> {
        let floor = v7_floor(cutoff);
        self.write(move |c| {
            let webhooks: Vec<String> = c
                .prepare_cached("SELECT id FROM webhooks ORDER BY id")?
                .query_map([], |row| row.get(0))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut old = c.prepare_cached(
                "SELECT id FROM deliveries
                 WHERE webhook_id = ?1 AND id < ?2 AND created_at < ?3 AND status <> 'pending'
                 ORDER BY id LIMIT ?4",
            )?;
            let mut attempts = c.prepare_cached("DELETE FROM attempts WHERE delivery_id = ?1")?;
            let mut deliveries =
                c.prepare_cached("DELETE FROM deliveries WHERE webhook_id = ?1 AND id = ?2")?;
            let mut purged = 0usize;
            for webhook_id in &webhooks {
                if purged == batch {
                    break;
                }
                let ids: Vec<String> = old
                    .query_map(
                        params![webhook_id, floor, cutoff, (batch - purged) as i64],
                        |row| row.get(0),
                    )?
                    .collect::<Result<Vec<_>, _>>()?;
                for id in &ids {
                    attempts.execute(params![id])?;
                    deliveries.execute(params![webhook_id, id])?;
                }
                purged += ids.len();
            }
            let events = c
                .prepare_cached(
                    "DELETE FROM events WHERE id IN (
                        SELECT e.id FROM events e
                        WHERE e.id < ?3 AND e.created_at < ?1
                          AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)
                        ORDER BY e.id LIMIT ?2)",
                )?
                .execute(params![cutoff, batch as i64, floor])?;
            Ok((purged + events) as u64)
        })
        .await
    }
}

const DELIVERY_COLUMNS: &str = "d.id, d.webhook_id, d.event_id, d.event, d.aggregate_id, \
     d.status, d.attempt_count, d.created_at, d.last_attempt_at, d.next_attempt_at, \
     d.last_status_code";

fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        id: parse_uuid(row.get(0)?)?,
        webhook_id: parse_uuid(row.get(1)?)?,
        event_id: parse_uuid(row.get(2)?)?,
        event: row.get(3)?,
        aggregate_id: row.get(4)?,
        status: row.get(5)?,
        attempt_count: row.get(6)?,
        created_at: row.get(7)?,
        last_attempt_at: row.get(8)?,
        next_attempt_at: row.get(9)?,
        last_status_code: row.get(10)?,
    })
}

fn webhook_exists(c: &Connection, business_id: Uuid, webhook_id: Uuid) -> StoreResult<bool> {
    let found = c
        .prepare_cached("SELECT 1 FROM webhooks WHERE id = ?1 AND business_id = ?2")?
        .exists(params![webhook_id.to_string(), business_id.to_string()])?;
    Ok(found)
}

/// Copies the WAL back into the database file every interval, and at once
/// when the writer requests it, without blocking the writer, until the
/// store is dropped.
fn run_checkpoints(
    connection: Connection,
    store: std::sync::Weak<Inner>,
    signal: &CheckpointSignal,
) {
    while store.strong_count() > 0 {
        let requested = signal.requested.lock().expect("checkpoint signal lock");
        let (mut requested, _) = signal
            .changed
            .wait_timeout_while(requested, CHECKPOINT_INTERVAL, |requested| !*requested)
            .expect("checkpoint signal lock");
        *requested = false;
        drop(requested);
        checkpoint(&connection);
        signal
            .done
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Runs the writer loop until every sender is gone.
///
/// The checkpoint thread copies most of the WAL back, but while commits
/// keep coming it never catches up with the last frame, and SQLite starts
/// the WAL over only once every frame is copied. The WAL would then grow
/// for as long as the load lasts, and every commit would write to newly
/// allocated file blocks. So now and then the writer itself checkpoints
/// between two transactions, when no new frame can arrive. Little is left
/// to copy by then, and the next commit starts the WAL from its beginning.
/// It does so every [`WRITER_CHECKPOINT_INTERVAL`], and sooner once the WAL
/// contains [`WAL_RESTART_FRAMES`]. Then the writer first asks the checkpoint
/// thread to copy what it can, and checkpoints itself after that thread's
/// next pass. Under load the WAL so stays within blocks the file already
/// has, which cost less to write than new ones.
fn run_writer(
    connection: Connection,
    receiver: mpsc::Receiver<WriteOp>,
    syncer: mpsc::Sender<Committed>,
    progress: &SyncProgress,
    signal: &CheckpointSignal,
) {
    let mut last_checkpoint = std::time::Instant::now();
    let mut sent = 0u64;
    while let Ok(first) = receiver.recv() {
        let mut bytes = first.bytes();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match receiver.try_recv() {
                Ok(op) => {
                    bytes += op.bytes();
                    batch.push(op);
                }
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let committed = run_batch(&connection, batch);
        let busy = started.elapsed();
        sent += 1;
        if let Err(mpsc::SendError(committed)) = syncer.send(committed) {
            // The syncer has stopped, so no sync will cover these writes.
            let error = "the SQLite WAL syncer has stopped".to_owned();
            for completion in committed.completions {
                completion(Err(error.clone()));
            }
            return;
        }
        // A short transaction leaves little to overlap with the sync. The
        // writer then waits for it, so the writes arriving meanwhile make
        // one larger transaction rather than many small ones, each writing
        // its pages to the WAL again.
        if busy < OVERLAP_MIN_BUSY {
            progress.wait_for(sent);
        }
        let mut restart = last_checkpoint.elapsed() >= WRITER_CHECKPOINT_INTERVAL;
        let frames = WAL_FRAMES.get();
        if frames >= WAL_RESTART_FRAMES {
            // The checkpoint thread copies the bulk. Once it has, the
            // writer copies the rest, which starts the WAL over.
            if signal.done.swap(false, std::sync::atomic::Ordering::AcqRel)
                || frames >= WAL_MAX_FRAMES
            {
                restart = true;
            } else {
                *signal.requested.lock().expect("checkpoint signal lock") = true;
                signal.changed.notify_one();
            }
        }
        if restart {
            checkpoint(&connection);
            last_checkpoint = std::time::Instant::now();
        }
    }
}

thread_local! {
    /// Frames in the WAL after the writer thread's last commit.
    static WAL_FRAMES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// Runs on the writer thread after each commit, with the WAL's frame count.
fn note_wal_frames(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(frames);
    Ok(())
}

/// Copies the WAL back into the database file as far as readers allow.
fn checkpoint(connection: &Connection) {
    let result: rusqlite::Result<(i64, i64, i64)> =
        connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        });
    if let Err(error) = result {
        tracing::warn!(%error, "SQLite checkpoint failed");
    }
}

/// Runs a prepared, cached statement that takes no parameters.
fn run_cached(connection: &Connection, sql: &str) -> Result<(), String> {
    connection
        .prepare_cached(sql)
        .and_then(|mut statement| statement.execute([]))
        .map(|_| ())
        .map_err(|error| error.to_string())
}

/// A transaction that has committed (or failed), with the completions of its
/// writes, waiting for its WAL frames to reach the disk.
struct Committed {
    completions: Vec<Completion>,
    result: Result<(), String>,
}

/// How many transactions the syncer has finished with.
#[derive(Default)]
struct SyncProgress {
    synced: Mutex<u64>,
    changed: std::sync::Condvar,
}

impl SyncProgress {
    fn advance(&self, by: u64) {
        *self.synced.lock().expect("sync progress lock") += by;
        self.changed.notify_all();
    }

    fn wait_for(&self, transactions: u64) {
        let synced = self.synced.lock().expect("sync progress lock");
        let _synced = self
            .changed
            .wait_while(synced, |synced| *synced < transactions)
            .expect("sync progress lock");
    }
}

/// Syncs the WAL for the transactions the writer has committed, then
/// reports their writes done.
///
/// The writer commits with `synchronous=NORMAL`, which writes the WAL frames
/// without syncing them. This thread takes every committed transaction
/// waiting, syncs the WAL file once (`fdatasync`), and only then completes
/// their writes. So no write is reported done, and no `202` is sent, before
/// its commit is on disk, as with `synchronous=FULL`. Meanwhile the writer
/// can run its next transaction.
///
/// Readers see a commit before it is synced. Jobs still reach the sender
/// only through a write's completion, an accepted event's or a claim's
/// lease, so no automatic attempt goes out before the sync that covers its
/// delivery.
fn run_syncer(wal: std::fs::File, receiver: mpsc::Receiver<Committed>, progress: &SyncProgress) {
    while let Ok(first) = receiver.recv() {
        let mut batches = vec![first];
        while let Ok(more) = receiver.try_recv() {
            batches.push(more);
        }
        let synced = wal
            .sync_data()
            .map_err(|error| format!("syncing the WAL failed: {error}"));
        if let Err(error) = &synced {
            tracing::error!(%error, "SQLite WAL sync failed");
        }
        let count = batches.len() as u64;
        for batch in batches {
            let outcome = batch.result.and_then(|()| synced.clone());
            for completion in batch.completions {
                completion(outcome.clone());
            }
        }
        progress.advance(count);
    }
}

/// Runs a batch of writes in one transaction.
///
/// The writes first run one after another with no savepoint, since a
/// savepoint copies every page a write touches first. When all succeed,
/// the transaction commits. When one fails, the whole transaction is rolled
/// back and every write runs again in its own savepoint, so the failed one
/// is undone alone and the others commit.
fn run_batch(connection: &Connection, mut batch: Vec<WriteOp>) -> Committed {
    let mut result = run_cached(connection, "BEGIN IMMEDIATE");
    if result.is_ok() && !batch.iter_mut().all(|op| op.run(Some(connection))) {
        // Some errors end the transaction themselves.
        if !connection.is_autocommit() {
            let _ = connection.execute_batch("ROLLBACK");
        }
        result = run_cached(connection, "BEGIN IMMEDIATE");
        if result.is_ok() {
            for op in &mut batch {
                run_in_savepoint(connection, op.as_mut());
                // Some errors, such as a full disk, make SQLite roll back the
                // whole transaction. The writes that ran are then undone, and
                // the others must not run outside a transaction.
                if connection.is_autocommit() {
                    result = Err("SQLite rolled the transaction back".to_owned());
                    break;
                }
            }
        }
    }
    let committed = result.and_then(|()| {
        run_cached(connection, "COMMIT").inspect_err(|_| {
            let _ = connection.execute_batch("ROLLBACK");
        })
    });
    if let Err(error) = &committed {
        tracing::error!(%error, "SQLite transaction failed");
    }
    Committed {
        completions: batch.into_iter().map(|op| op.into_completion()).collect(),
        result: committed,
    }
}

/// Runs one write in a savepoint, which is rolled back if the write fails.
fn run_in_savepoint(connection: &Connection, op: &mut dyn PendingWrite) {
    if let Err(error) = run_cached(connection, "SAVEPOINT write_op") {
        tracing::error!(%error, "SQLite savepoint failed");
        op.run(None);
        return;
    }
    let ended = if op.run(Some(connection)) {
        run_cached(connection, "RELEASE write_op")
    } else {
        run_cached(connection, "ROLLBACK TO write_op")
            .and_then(|()| run_cached(connection, "RELEASE write_op"))
    };
    if let Err(error) = ended {
        tracing::error!(%error, "SQLite savepoint release failed");
    }
}

const WEBHOOK_COLUMNS: &str =
    "id, business_id, url, events, is_active, secret, created_at, updated_at";

fn parse_uuid(text: String) -> rusqlite::Result<Uuid> {
    Uuid::parse_str(&text).map_err(|error| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(error))
    })
}

fn webhook_from_row(row: &Row<'_>) -> rusqlite::Result<Webhook> {
    Ok(Webhook {
        id: parse_uuid(row.get(0)?)?,
        business_id: parse_uuid(row.get(1)?)?,
        url: row.get(2)?,
        events: split_events(&row.get::<_, String>(3)?),
        is_active: row.get(4)?,
        secret: row.get(5)?,
        created_at: row.get(6)?,
        updated_at: row.get(7)?,
    })
}

fn select_webhook(c: &Connection, business_id: Uuid, id: Uuid) -> StoreResult<Option<Webhook>> {
    let webhook = c
        .prepare_cached(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = ?1 AND business_id = ?2"
        ))?
        .query_row(
            params![id.to_string(), business_id.to_string()],
            webhook_from_row,
        )
        .optional()?;
    Ok(webhook)
}

fn accept_event(c: &Connection, event: &NewEvent) -> StoreResult<AcceptedEvent> {
    let business = event.business_id.to_string();
    let aggregate = event.aggregate_id.to_string();
    let entity = event.event.entity.name;

    let payload = match &event.payload {
        Some(payload) => payload.clone(),
        None => {
            let stored: Option<String> = c
                .prepare_cached(
                    "SELECT state FROM aggregate_states
                     WHERE business_id = ?1 AND entity = ?2 AND aggregate_id = ?3",
                )?
                .query_row(params![business, entity, aggregate], |row| row.get(0))
                .optional()?;
            let stored = stored.ok_or(StoreError::NoPreviousState(event.aggregate_id))?;
            let previous: Map<String, Value> =
                serde_json::from_str(&stored).context("decoding a stored aggregate state")?;
            build_payload(
                event.event,
                event.aggregate_id,
                &event.occurred_on,
                &event.data,
                Some(&previous),
            )
        }
    };

    let event_id = event.id.to_string();
    c.prepare_cached(
        "INSERT INTO events (id, business_id, event, aggregate_id, payload, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        event_id,
        business,
        event.event.name,
        aggregate,
        payload,
        event.accepted_at
    ])?;

    if event.event.is_deletion() {
        c.prepare_cached(
            "DELETE FROM aggregate_states
             WHERE business_id = ?1 AND entity = ?2 AND aggregate_id = ?3",
        )?
        .execute(params![business, entity, aggregate])?;
    } else {
        let state = serde_json::to_string(&event.data).context("encoding an aggregate state")?;
        c.prepare_cached(
            "INSERT INTO aggregate_states (business_id, entity, aggregate_id, state, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (business_id, entity, aggregate_id)
             DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
        )?
        .execute(params![
            business,
            entity,
            aggregate,
            state,
            event.accepted_at
        ])?;
    }

    let payload = Bytes::from(payload);
    let (due_at, leased_by) = event.delivery_schedule();
    let mut subscribers = c.prepare_cached(
        "SELECT id, url, secret, events FROM webhooks WHERE business_id = ?1 AND is_active = 1",
    )?;
    let mut insert = c.prepare_cached(
        "INSERT INTO deliveries (id, webhook_id, event_id, event, aggregate_id, status,
            created_at, next_attempt_at, due_at, leased_by)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?9, ?6, ?7, ?8)",
    )?;
    let mut rows = subscribers.query(params![business])?;
    let mut jobs = Vec::new();
    while let Some(row) = rows.next()? {
        let events: String = row.get(3)?;
        if !events.split(',').any(|name| name == event.event.name) {
            continue;
        }
        let webhook_id: String = row.get(0)?;
        let delivery_id = Uuid::now_v7();
        insert.execute(params![
            delivery_id.to_string(),
            webhook_id,
            event_id,
            event.event.name,
            aggregate,
            event.accepted_at,
            due_at,
            leased_by,
            v7_micros(delivery_id),
        ])?;
        jobs.push(event.first_job(
            delivery_id,
            parse_uuid(webhook_id)?,
            row.get(1)?,
            row.get(2)?,
            payload.clone(),
            due_at,
        ));
    }
    Ok(AcceptedEvent {
        event_id: event.id,
        jobs,
    })
}

/// Finds the first webhook after `after` (in id order) with a delivery in
/// the due index, and its earliest due time. The index is ordered by
/// `(webhook_id, due_at)`, so this is one seek.
fn next_due_webhook(c: &Connection, after: &str) -> StoreResult<Option<(String, i64)>> {
    let next = c
        .prepare_cached(
            "SELECT webhook_id, due_at FROM deliveries
             WHERE due_at IS NOT NULL AND webhook_id > ?1
             ORDER BY webhook_id, due_at
             LIMIT 1",
        )?
        .query_row(params![after], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    Ok(next)
}

/// Finds due deliveries on a reader connection, webhook by webhook in id
/// order, starting after `claim.after_webhook` and wrapping around, so
/// successive claims take turns between webhooks. Each webhook gives at
/// most `claim.per_webhook` deliveries, oldest first. The webhooks in
/// `claim.skip_webhooks` give none, and only their first index entry is read.
fn find_due(c: &Connection, claim: &Claim) -> StoreResult<Vec<Job>> {
    let skip: HashSet<String> = claim.skip_webhooks.iter().map(Uuid::to_string).collect();
    let start = claim
        .after_webhook
        .map(|id| id.to_string())
        .unwrap_or_default();
    let mut jobs = Vec::new();
    let mut cursor = start.clone();
    let mut wrapped = start.is_empty();
    while jobs.len() < claim.limit {
        let Some((webhook_id, earliest)) = next_due_webhook(c, &cursor)? else {
            if wrapped {
                break;
            }
            wrapped = true;
            cursor.clear();
            continue;
        };
        if wrapped && !start.is_empty() && webhook_id > start {
            break;
        }
        if earliest <= claim.now && !skip.contains(&webhook_id) {
            let limit = claim.per_webhook.min(claim.limit - jobs.len());
            find_due_of_webhook(c, claim, &webhook_id, limit, &mut jobs)?;
        }
        cursor = webhook_id;
    }
    Ok(jobs)
}

/// Adds up to `limit` due deliveries of one webhook to `jobs`, oldest first.
fn find_due_of_webhook(
    c: &Connection,
    claim: &Claim,
    webhook_id: &str,
    limit: usize,
    jobs: &mut Vec<Job>,
) -> StoreResult<()> {
    let webhook = c
        .prepare_cached("SELECT url, secret FROM webhooks WHERE id = ?1")?
        .query_row(params![webhook_id], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })
        .optional()?;
    let Some((url, secret)) = webhook else {
        return Ok(());
    };
    let webhook_uuid = parse_uuid(webhook_id.to_owned())?;
    let mut select = c.prepare_cached(
        "SELECT d.id, d.event, d.auto_attempts, e.payload, d.event_id
         FROM deliveries d
         JOIN events e ON e.id = d.event_id
         WHERE d.webhook_id = ?1 AND d.due_at IS NOT NULL AND d.due_at <= ?2
         ORDER BY d.due_at
         LIMIT ?3",
    )?;
    let mut rows = select.query(params![webhook_id, claim.now, limit as i64])?;
    while let Some(row) = rows.next()? {
        jobs.push(Job {
            delivery_id: parse_uuid(row.get(0)?)?,
            webhook_id: webhook_uuid,
            event_id: parse_uuid(row.get(4)?)?,
            event: row.get(1)?,
            auto_attempts: row.get(2)?,
            url: url.clone(),
            secret: secret.clone(),
            payload: Bytes::from(row.get::<_, Vec<u8>>(3)?),
            trigger: Trigger::Automatic,
            lease_until: claim.lease_until,
        });
    }
    Ok(())
}

/// Leases the found deliveries that are still due, on the writer, and
/// returns those. A delivery leased or finished since it was found is dropped.
fn lease_found(c: &Connection, claim: &Claim, found: &[Job]) -> StoreResult<Vec<Job>> {
    let mut lease = c.prepare_cached(
        "UPDATE deliveries SET due_at = ?1, leased_by = ?2
         WHERE webhook_id = ?5 AND id = ?3 AND due_at IS NOT NULL AND due_at <= ?4",
    )?;
    let mut leased = Vec::with_capacity(found.len());
    for job in found {
        let changed = lease.execute(params![
            claim.lease_until,
            claim.owner,
            job.delivery_id.to_string(),
            claim.now,
            job.webhook_id.to_string(),
        ])?;
        if changed == 1 {
            leased.push(job.clone());
        }
    }
    Ok(leased)
}

/// Stores an attempt and moves its delivery on.
fn record_attempt(c: &Connection, attempt: &AttemptRecord) -> StoreResult<()> {
    let id = attempt.delivery_id.to_string();
    let webhook_id = attempt.webhook_id.to_string();
    let current = c
        .prepare_cached(
            "SELECT status, due_at, attempt_count, auto_attempts, leased_by, next_attempt_at
             FROM deliveries
             WHERE webhook_id = ?1 AND id = ?2",
        )?
        .query_row(params![webhook_id, id], |row| {
            Ok(DeliveryState {
                status: row.get(0)?,
                due_at: row.get(1)?,
                attempt_count: row.get(2)?,
                auto_attempts: row.get(3)?,
                leased_by: row.get(4)?,
                next_attempt_at: row.get(5)?,
            })
        })
        .optional()?;
    // The webhook and its history were deleted while the attempt ran.
    let Some(current) = current else {
        return Ok(());
    };
    let update = apply_attempt(&current, attempt);
    c.prepare_cached(
        "INSERT INTO attempts (delivery_id, number, trigger, started_at, duration_ms,
            status_code, error_kind, response_body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        id,
        update.attempt_count,
        attempt.trigger.as_str(),
        attempt.started_at,
        attempt.duration_ms,
        attempt.status_code,
        attempt.error_kind.map(ErrorKind::as_str),
        attempt.response_body,
    ])?;
    c.prepare_cached(
        "UPDATE deliveries
         SET attempt_count = ?1, last_attempt_at = ?2, last_status_code = ?3,
            status = ?4, due_at = ?5, next_attempt_at = ?6, leased_by = ?7, auto_attempts = ?9
         WHERE webhook_id = ?10 AND id = ?8",
    )?
    .execute(params![
        update.attempt_count,
        attempt.started_at,
        attempt.status_code,
        update.status,
        update.due_at,
        update.next_attempt_at,
        update.leased_by,
        id,
        update.auto_attempts,
        webhook_id,
    ])?;
    Ok(())
}

/// Operations for operators: encrypting secrets at rest, health and queue depth.
impl SqliteStore {
    pub async fn webhook_secrets(&self) -> StoreResult<Vec<(Uuid, String)>> {
        self.read(|c| {
            let rows = c
                .prepare_cached("SELECT id, secret FROM webhooks ORDER BY id")?
                .query_map([], |row| Ok((parse_uuid(row.get(0)?)?, row.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    pub async fn replace_webhook_secret(
        &self,
        id: Uuid,
        old: String,
        new: String,
    ) -> StoreResult<bool> {
        self.write(move |c| {
            let changed = c.execute(
                "UPDATE webhooks SET secret = ?1 WHERE id = ?2 AND secret = ?3",
                params![new, id.to_string(), old],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    pub async fn ping(&self) -> StoreResult<()> {
        self.read(|c| {
            c.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }

    pub async fn queue_stats(&self, now: i64) -> StoreResult<QueueStats> {
        self.read(move |c| {
            let stats = c.query_row(
                "SELECT
                    COUNT(*) FILTER (WHERE due_at <= ?1),
                    COUNT(*) FILTER (WHERE due_at > ?1),
                    MIN(due_at)
                 FROM deliveries WHERE due_at IS NOT NULL",
                params![now],
                |row| {
                    Ok(QueueStats {
                        due: row.get::<_, i64>(0)? as u64,
                        scheduled: row.get::<_, i64>(1)? as u64,
                        earliest_due_at: row.get(2)?,
                    })
                },
            )?;
            Ok(stats)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens a store on a new file in a temporary folder, which the caller
    /// keeps for as long as it uses the store.
    async fn open_fresh() -> (tempfile::TempDir, SqliteStore) {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("store.db");
        let store = SqliteStore::open(path.to_str().expect("a UTF-8 path"))
            .await
            .expect("opening the store");
        (folder, store)
    }

    /// Creates a file with the first schema only, as the first release left it.
    fn first_schema(path: &str) -> Connection {
        let connection = Connection::open(path).expect("creating the first schema");
        connection
            .execute_batch(MIGRATIONS[0])
            .expect("applying the first migration");
        connection
            .pragma_update(None, "user_version", 1)
            .expect("recording the first version");
        connection
    }

    /// Pending migrations are rejected while a `serve` process holds the
    /// file's lock, and so is a schema newer than the binary's migrations.
    #[tokio::test]
    async fn migrations_need_lock_and_known_schema() {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("store.db");
        let path = path.to_str().expect("a UTF-8 path");
        drop(first_schema(path));
        let server = std::fs::File::create(format!("{path}.lock")).expect("the lock file");
        server.try_lock().expect("locking as a server would");
        let locked = SqliteStore::open(path)
            .await
            .err()
            .expect("a held lock stops the migrations");
        assert!(
            locked.to_string().contains("a serve process is using it"),
            "{locked:#}"
        );
        let version: i64 = Connection::open(path)
            .and_then(|c| c.pragma_query_value(None, "user_version", |row| row.get(0)))
            .expect("reading the version");
        assert_eq!(version, 1);

        drop(server);
        SqliteStore::open(path)
            .await
            .expect("migrating once the lock is free");
        Connection::open(path)
            .and_then(|c| c.pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1))
            .expect("marking the schema newer");
        let newer = SqliteStore::open(path)
            .await
            .err()
            .expect("a newer schema is rejected");
        assert!(
            newer
                .to_string()
                .contains("this binary supports versions up to"),
            "{newer:#}"
        );
    }

    /// A millisecond of 2026 at which the recovery test creates deliveries.
    const WINDOW_START: u64 = 1_780_000_000_000;

    /// Stores an active webhook subscribed to `booking.created`.
    fn insert_webhook(c: &Connection, id: &str, business: &str) -> rusqlite::Result<()> {
        c.execute(
            "INSERT INTO webhooks (id, business_id, url, events, is_active, secret,
                created_at, updated_at)
             VALUES (?1, ?2, 'http://127.0.0.1:9/', 'booking.created', 1, 's', 0, 0)",
            params![id, business],
        )?;
        Ok(())
    }

    /// Deliveries stored by the first schema keep every column when the
    /// second migration rebuilds the table in webhook order, except that
    /// the fifth sets `created_at` to the time in the delivery's id.
    #[tokio::test]
    async fn migration_keeps_deliveries() {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("store.db");
        let path = path.to_str().expect("a UTF-8 path");
        let delivery_id = Uuid::now_v7();
        let delivery = delivery_id.to_string();
        {
            let connection = first_schema(path);
            connection
                .execute(
                    "INSERT INTO deliveries (id, webhook_id, event_id, event, aggregate_id,
                        status, attempt_count, auto_attempts, is_test, created_at,
                        next_attempt_at, due_at, leased_by, last_attempt_at, last_status_code)
                     VALUES (?1, 'w', 'e', 'booking.created', 'a', 'pending', 2, 1, 0, 10,
                        20, 30, 'worker-x', 40, 503)",
                    params![delivery],
                )
                .expect("storing a delivery");
        }

        let store = SqliteStore::open(path).await.expect("migrating the store");
        let id = delivery.clone();
        let row = store
            .read(move |c| {
                let version: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
                let row = c.query_row(
                    "SELECT webhook_id, status, attempt_count, auto_attempts, created_at,
                        next_attempt_at, due_at, leased_by, last_attempt_at, last_status_code
                     FROM deliveries WHERE id = ?1",
                    params![id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            [
                                r.get::<_, i64>(2)?,
                                r.get(3)?,
                                r.get(4)?,
                                r.get(5)?,
                                r.get(6)?,
                            ],
                            r.get::<_, String>(7)?,
                            (r.get::<_, i64>(8)?, r.get::<_, i64>(9)?),
                        ))
                    },
                )?;
                Ok((version, row))
            })
            .await
            .expect("reading the migrated delivery");
        assert_eq!(row.0, MIGRATIONS.len() as i64);
        assert_eq!(row.1.0, "w");
        assert_eq!(row.1.1, "pending");
        assert_eq!(row.1.2, [2, 1, v7_micros(delivery_id), 20, 30]);
        assert_eq!(row.1.3, "worker-x");
        assert_eq!(row.1.4, (40, 503));
    }

    /// A recovery larger than one chunk requeues every row once, also when
    /// many rows share one millisecond across a chunk boundary.
    #[tokio::test]
    async fn unrecorded_skips_stored_attempts() {
        let (_folder, store) = open_fresh().await;
        let stored = Uuid::now_v7();
        let other = Uuid::now_v7();
        let stored_text = stored.to_string();
        store
            .write(move |c| {
                c.execute(
                    "INSERT INTO attempts (delivery_id, number, trigger, started_at, duration_ms)
                     VALUES (?1, 1, 'automatic', 5000, 3)",
                    params![stored_text],
                )?;
                Ok(())
            })
            .await
            .expect("inserting an attempt");
        let attempt = |delivery_id: Uuid, started_at: i64| AttemptRecord {
            delivery_id,
            webhook_id: Uuid::now_v7(),
            trigger: Trigger::Automatic,
            owner: Some("worker".to_owned()),
            started_at,
            duration_ms: 3,
            status_code: Some(204),
            error_kind: None,
            response_body: None,
            succeeded: true,
            retry_at: None,
        };

        let unrecorded = store
            .unrecorded(vec![
                attempt(stored, 5000),
                attempt(stored, 6000),
                attempt(other, 5000),
            ])
            .await
            .expect("reading attempts");
        let keys: Vec<(Uuid, i64)> = unrecorded
            .iter()
            .map(|attempt| (attempt.delivery_id, attempt.started_at))
            .collect();
        assert_eq!(keys, [(stored, 6000), (other, 5000)]);
    }

    #[tokio::test]
    async fn recovery_spans_chunks() {
        let (_folder, store) = open_fresh().await;
        let business = Uuid::new_v4();
        let webhook = Uuid::now_v7();
        let total = 2 * RECOVER_CHUNK + 7;
        store
            .write(move |c| {
                insert_webhook(c, &webhook.to_string(), &business.to_string())?;
                let mut insert = c.prepare(
                    "INSERT INTO deliveries (id, webhook_id, event_id, event, aggregate_id,
                        status, created_at)
                     VALUES (?1, ?2, ?3, 'booking.created', 'a', ?4, ?5)",
                )?;
                let mut store_at = |millis: u64, status: &str| {
                    let id = v7_at(millis);
                    insert.execute(params![
                        id.to_string(),
                        webhook.to_string(),
                        Uuid::now_v7().to_string(),
                        status,
                        v7_micros(id),
                    ])
                };
                for n in 0..total {
                    // Three milliseconds only, so chunk edges fall inside runs of equal times.
                    let status = if n % 10 == 0 { "cancelled" } else { "failed" };
                    store_at(WINDOW_START + n as u64 % 3, status)?;
                }
                // A delivery still pending and those outside the window stay as they are.
                store_at(WINDOW_START + 1, "pending")?;
                store_at(WINDOW_START - 1, "failed")?;
                store_at(WINDOW_START + 3, "failed")?;
                Ok(())
            })
            .await
            .expect("inserting failed deliveries");

        let outcome = store
            .recover(Recovery {
                business_id: business,
                webhook_id: webhook,
                since: WINDOW_START as i64 * 1000,
                until: (WINDOW_START as i64 + 3) * 1000,
                dry_run: false,
                now: 42,
            })
            .await
            .expect("recovering");
        assert_eq!(outcome, RecoveryOutcome::Requeued(total as u64));
        let counts: Vec<(String, i64, Option<i64>)> = store
            .read(|c| {
                let rows = c
                    .prepare(
                        "SELECT status, COUNT(*), MIN(due_at) FROM deliveries
                         GROUP BY status ORDER BY status",
                    )?
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
            .expect("counting deliveries");
        assert_eq!(
            counts,
            vec![
                ("failed".to_owned(), 2, None),
                ("pending".to_owned(), total as i64 + 1, Some(42)),
            ]
        );
    }

    /// A later chunk of a recovery starts after the rows requeued before
    /// it, so it does about the same work as the first chunk of a range.
    /// The work is counted in SQLite's virtual machine steps, not in time.
    #[test]
    fn requeue_chunk_skips_requeued_rows() {
        let (_folder, c) = migrated_connection();
        let webhook = Uuid::now_v7().to_string();
        insert_webhook(&c, &webhook, &Uuid::new_v4().to_string()).expect("a webhook");
        let rows = 12 * RECOVER_CHUNK as u64;
        let mut insert = c
            .prepare(
                "INSERT INTO deliveries (id, webhook_id, event_id, event, aggregate_id,
                    status, created_at)
                 VALUES (?1, ?2, ?3, 'booking.created', 'a', 'failed', ?4)",
            )
            .expect("preparing the insert");
        let mut ids = Vec::new();
        for n in 0..rows {
            let id = v7_at(WINDOW_START + n);
            insert
                .execute(params![
                    id.to_string(),
                    webhook,
                    Uuid::now_v7().to_string(),
                    v7_micros(id)
                ])
                .expect("storing a failed delivery");
            ids.push(id.to_string());
        }
        let (low, high) = id_window(
            WINDOW_START as i64 * 1000,
            (WINDOW_START + rows) as i64 * 1000,
        );
        // Requeues one chunk and returns its row count and VM steps.
        let requeue = |sql: &str, lower: &str| {
            let mut statement = c.prepare(sql).expect("preparing a chunk");
            let changed = statement
                .query_map(
                    params![webhook, 0, i64::MAX, 42, RECOVER_CHUNK as i64, lower, high],
                    |row| row.get::<_, String>(0),
                )
                .expect("requeuing a chunk")
                .count();
            (
                changed,
                statement.get_status(rusqlite::StatementStatus::VmStep),
            )
        };

        let (first_rows, first_steps) = requeue(REQUEUE_FIRST_CHUNK, &low);
        assert_eq!(first_rows, RECOVER_CHUNK);
        c.execute(
            "UPDATE deliveries SET status = 'pending' WHERE id < ?1",
            params![ids[ids.len() - 2 * RECOVER_CHUNK]],
        )
        .expect("marking most rows requeued");
        let last_requeued = &ids[ids.len() - 2 * RECOVER_CHUNK - 1];
        let (next_rows, next_steps) = requeue(REQUEUE_NEXT_CHUNK, last_requeued);

        assert_eq!(next_rows, RECOVER_CHUNK);
        // Reading the requeued rows too would add about four steps per row,
        // 40 % here.
        assert!(
            next_steps <= first_steps + first_steps / 10,
            "a chunk after {} requeued rows took {next_steps} steps, the first {first_steps}",
            rows as usize - 2 * RECOVER_CHUNK
        );
    }

    /// Claims take turns between webhooks, take at most `per_webhook` of
    /// each, oldest due first, and take none of a skipped webhook.
    #[tokio::test]
    async fn claims_walk_webhooks_in_turn() {
        let (_folder, store) = open_fresh().await;
        let business = Uuid::new_v4();
        // v7 ids made one after another sort in this order.
        let webhooks: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        // Due times per webhook. `None` is a finished delivery, and 900 is not due yet.
        let plan: [&[Option<i64>]; 3] = [
            &[Some(30), Some(10), Some(20), None, Some(40)],
            &[Some(15), Some(900), Some(5)],
            &[Some(1), Some(2), Some(3), Some(4)],
        ];
        let rows = webhooks.clone();
        store
            .write(move |c| {
                let event = Uuid::now_v7().to_string();
                c.execute(
                    "INSERT INTO events (id, business_id, event, aggregate_id, payload, created_at)
                     VALUES (?1, ?2, 'booking.created', 'a', CAST('{}' AS BLOB), 0)",
                    params![event, business.to_string()],
                )?;
                for (webhook, dues) in rows.iter().zip(plan) {
                    insert_webhook(c, &webhook.to_string(), &business.to_string())?;
                    for due in dues {
                        c.execute(
                            "INSERT INTO deliveries (id, webhook_id, event_id, event,
                                aggregate_id, status, created_at, due_at)
                             VALUES (?1, ?2, ?3, 'booking.created', 'a', 'pending', 0, ?4)",
                            params![Uuid::now_v7().to_string(), webhook.to_string(), event, due],
                        )?;
                    }
                }
                Ok(())
            })
            .await
            .expect("inserting deliveries");

        let find = |claim: Claim| {
            let store = store.clone();
            async move {
                let jobs = store
                    .read(move |c| find_due(c, &claim))
                    .await
                    .expect("finding due deliveries");
                jobs.iter().map(|job| job.webhook_id).collect::<Vec<_>>()
            }
        };
        let claim = |limit, per_webhook, skip_webhooks, after_webhook| Claim {
            owner: "test".to_owned(),
            now: 100,
            lease_until: 1000,
            limit,
            per_webhook,
            skip_webhooks,
            after_webhook,
        };
        let [a, b, c] = [webhooks[0], webhooks[1], webhooks[2]];

        assert_eq!(
            find(claim(100, 2, Vec::new(), None)).await,
            vec![a, a, b, b, c, c]
        );
        // Starting after `a` and skipping `b`, a claim takes all of `c`, then wraps around to `a`.
        assert_eq!(
            find(claim(5, 10, vec![b], Some(a))).await,
            vec![c, c, c, c, a]
        );
        // Within a webhook the oldest due comes first, and the delivery due at 900 is not due.
        let due_of_b: Vec<i64> = {
            let claimed = store
                .read(move |conn| find_due(conn, &claim(10, 10, vec![a, c], None)))
                .await
                .expect("finding due deliveries");
            let ids: Vec<String> = claimed.iter().map(|j| j.delivery_id.to_string()).collect();
            store
                .read(move |conn| {
                    let mut dues = Vec::new();
                    for id in ids {
                        dues.push(conn.query_row(
                            "SELECT due_at FROM deliveries WHERE id = ?1",
                            params![id],
                            |row| row.get(0),
                        )?);
                    }
                    Ok(dues)
                })
                .await
                .expect("reading due times")
        };
        assert_eq!(due_of_b, vec![5, 15]);
        assert_eq!(store.next_due_at().await.expect("next due time"), Some(1));
    }

    /// The outcome of a test write after it inserts its key.
    #[derive(Clone, Copy)]
    enum KeyWrite {
        Succeeds,
        Fails,
        /// Rolls back the whole transaction and fails, as SQLite itself
        /// does on some errors, such as a full disk.
        EndsTransaction,
    }

    /// Builds a pending write that inserts one API key and counts its runs.
    fn key_write(
        key: &'static str,
        then: KeyWrite,
        runs: Arc<std::sync::atomic::AtomicUsize>,
    ) -> (WriteOp, oneshot::Receiver<StoreResult<()>>) {
        let (sender, receiver) = oneshot::channel();
        let op: WriteOp = Box::new(Write {
            f: move |c: &Connection| {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                c.execute(
                    "INSERT INTO api_keys (key_hash, business_id, created_at) VALUES (?1, 'b', 0)",
                    params![key],
                )?;
                match then {
                    KeyWrite::Succeeds => Ok(()),
                    KeyWrite::Fails => Err(StoreError::WebhookLimit(0)),
                    KeyWrite::EndsTransaction => {
                        c.execute_batch("ROLLBACK")?;
                        Err(StoreError::WebhookLimit(0))
                    }
                }
            },
            bytes: 0,
            result: None,
            sender,
        });
        (op, receiver)
    }

    /// Opens a connection to a new migrated file in a temporary folder,
    /// which the caller keeps for as long as it uses the connection.
    fn migrated_connection() -> (tempfile::TempDir, Connection) {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("batch.db");
        let path = path.to_str().expect("a UTF-8 path");
        let mut c = open_connection(path).expect("opening the file");
        migrate(&mut c, path).expect("migrating");
        (folder, c)
    }

    /// Runs a batch of key writes as the writer does, completes it as the
    /// syncer would, and returns each write's outcome, the runs of the
    /// batch's writes, and the stored keys.
    fn run_key_batch(
        c: &Connection,
        writes: &[(&'static str, KeyWrite)],
    ) -> (Vec<bool>, usize, Vec<String>) {
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (batch, receivers): (Vec<_>, Vec<_>) = writes
            .iter()
            .map(|&(key, then)| key_write(key, then, runs.clone()))
            .unzip();
        let committed = run_batch(c, batch);
        for completion in committed.completions {
            completion(committed.result.clone());
        }
        let outcomes = receivers
            .into_iter()
            .map(|mut receiver| receiver.try_recv().expect("a completed write").is_ok())
            .collect();
        let keys = c
            .prepare("SELECT key_hash FROM api_keys ORDER BY key_hash")
            .expect("listing keys")
            .query_map([], |row| row.get(0))
            .expect("listing keys")
            .collect::<Result<Vec<String>, _>>()
            .expect("reading keys");
        (
            outcomes,
            runs.load(std::sync::atomic::Ordering::SeqCst),
            keys,
        )
    }

    /// A batch whose writes all succeed runs each write once, without
    /// savepoints. When one fails after writing, the batch runs again with
    /// a savepoint per write: the failed write leaves nothing behind and
    /// the others commit.
    #[test]
    fn failed_write_is_undone_alone() {
        let (_folder, c) = migrated_connection();

        use KeyWrite::*;
        let (outcomes, runs, keys) = run_key_batch(&c, &[("a", Succeeds), ("b", Succeeds)]);
        assert_eq!(outcomes, [true, true]);
        assert_eq!(runs, 2);
        assert_eq!(keys, ["a", "b"]);

        let (outcomes, runs, keys) =
            run_key_batch(&c, &[("c", Succeeds), ("d", Fails), ("e", Succeeds)]);
        assert_eq!(outcomes, [true, false, true]);
        // The first pass stops at the failed write; the second runs all three.
        assert_eq!(runs, 2 + 3);
        assert_eq!(keys, ["a", "b", "c", "e"]);
        assert!(c.is_autocommit(), "no transaction is left open");
    }

    /// When SQLite rolls back the whole transaction during the second pass,
    /// the writes that ran are undone, the rest do not run outside a
    /// transaction, and every write reports a failure.
    #[test]
    fn ended_transaction_fails_whole_batch() {
        let (_folder, c) = migrated_connection();

        use KeyWrite::*;
        let (outcomes, runs, keys) = run_key_batch(
            &c,
            &[("f", Succeeds), ("g", EndsTransaction), ("h", Succeeds)],
        );
        assert_eq!(outcomes, [false, false, false]);
        // Two runs in the first pass, two in the second, which stops at "g".
        assert_eq!(runs, 2 + 2);
        assert!(keys.is_empty(), "no key is stored: {keys:?}");
        assert!(c.is_autocommit(), "no transaction is left open");
    }

    /// Runs `run_syncer` over `file` for two transactions, one committed and
    /// one failed, and returns the outcome each write was given.
    fn sync_two_transactions(file: std::fs::File) -> Vec<Result<(), String>> {
        let (sender, receiver) = mpsc::channel::<Committed>();
        let progress = Arc::new(SyncProgress::default());
        let synced = progress.clone();
        let syncer = std::thread::spawn(move || run_syncer(file, receiver, &synced));
        let (outcomes, reported) = mpsc::channel();
        for result in [Ok(()), Err("disk full".to_owned())] {
            let outcomes = outcomes.clone();
            let completion: Completion = Box::new(move |outcome| {
                outcomes.send(outcome).expect("reporting an outcome");
            });
            sender
                .send(Committed {
                    completions: vec![completion],
                    result,
                })
                .expect("handing a transaction to the syncer");
        }
        progress.wait_for(2);
        drop(sender);
        syncer.join().expect("the syncer thread");
        drop(outcomes);
        reported.iter().collect()
    }

    /// A write is reported done with its transaction's outcome and the WAL
    /// sync's. A failed sync fails every write it was to cover.
    #[test]
    fn syncer_reports_writes_after_the_sync() {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("store.db-wal");
        std::fs::write(&path, b"frames").expect("writing a file");
        let file = std::fs::File::open(&path).expect("opening the file");
        assert_eq!(
            sync_two_transactions(file),
            vec![Ok(()), Err("disk full".to_owned())]
        );

        // A character device cannot be synced (EINVAL).
        let unsyncable = std::fs::File::open("/dev/null").expect("opening /dev/null");
        let outcomes = sync_two_transactions(unsyncable);
        assert!(
            matches!(&outcomes[0], Err(message) if message.starts_with("syncing the WAL failed")),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[1], Err("disk full".to_owned()));
    }

    /// Purging walks every webhook's deliveries, stops at `batch` rows per
    /// call, and keeps pending deliveries and the events they refer to.
    #[tokio::test]
    async fn purge_spans_webhooks_in_batches() {
        let (_folder, store) = open_fresh().await;
        let business = Uuid::new_v4().to_string();
        let kept_event = Uuid::now_v7().to_string();
        let kept_delivery = Uuid::now_v7().to_string();
        let (event, pending) = (kept_event.clone(), kept_delivery.clone());
        store
            .write(move |c| {
                c.execute(
                    "INSERT INTO events (id, business_id, event, aggregate_id, payload, created_at)
                     VALUES (?1, ?2, 'booking.created', 'a', CAST('{}' AS BLOB), 100)",
                    params![event, business],
                )?;
                let mut insert = c.prepare(
                    "INSERT INTO deliveries (id, webhook_id, event_id, event, aggregate_id,
                        status, created_at)
                     VALUES (?1, ?2, ?3, 'booking.created', 'a', ?4, 100)",
                )?;
                // Finished deliveries per webhook: 3, 2 and 1.
                for finished in [3, 2, 1] {
                    let webhook = Uuid::now_v7().to_string();
                    insert_webhook(c, &webhook, &business)?;
                    for _ in 0..finished {
                        let id = Uuid::now_v7().to_string();
                        insert.execute(params![id, webhook, event, "succeeded"])?;
                        c.execute(
                            "INSERT INTO attempts (delivery_id, number, trigger, started_at,
                                duration_ms)
                             VALUES (?1, 1, 'automatic', 100, 1)",
                            params![id],
                        )?;
                    }
                    if finished == 3 {
                        insert.execute(params![pending, webhook, event, "pending"])?;
                    }
                }
                Ok(())
            })
            .await
            .expect("inserting deliveries");

        let cutoff = now_micros() + 1_000_000;
        let purged: Vec<u64> = [
            store.purge_history(cutoff, 4).await.expect("first purge"),
            store.purge_history(cutoff, 4).await.expect("second purge"),
            store.purge_history(cutoff, 4).await.expect("third purge"),
        ]
        .to_vec();
        assert_eq!(purged, vec![4, 2, 0]);

        let left = store
            .read(|c| {
                let deliveries: Vec<String> = c
                    .prepare("SELECT id FROM deliveries")?
                    .query_map([], |row| row.get(0))?
                    .collect::<Result<_, _>>()?;
                let attempts: i64 =
                    c.query_row("SELECT COUNT(*) FROM attempts", [], |row| row.get(0))?;
                let events: Vec<String> = c
                    .prepare("SELECT id FROM events")?
                    .query_map([], |row| row.get(0))?
                    .collect::<Result<_, _>>()?;
                Ok((deliveries, attempts, events))
            })
            .await
            .expect("reading what is left");
        assert_eq!(left.0, vec![kept_delivery]);
        assert_eq!(left.1, 0);
        assert_eq!(left.2, vec![kept_event]);
    }
}
