//! The PostgreSQL store: a connection pool shared by any number of processes.
//!
//! Every operation that writes more than one statement runs in one
//! transaction. Claims lease rows with `FOR UPDATE SKIP LOCKED`, so two
//! processes never lease the same delivery at once. Work that another process
//! should pick up at once is announced with `NOTIFY` on [`DUE_CHANNEL`], and
//! webhook changes on [`WEBHOOK_CHANNEL`]. PostgreSQL delivers a notification
//! only when its transaction commits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Config, NoTls, Row};
use uuid::Uuid;

use self::accept::AcceptQueue;
use self::pipeline::PipelinedTransaction;
use super::model::*;
use super::{StoreError, StoreResult, redact_url};
use crate::domain::clock::now_micros;
use crate::domain::payload::PING_EVENT;

mod accept;
mod pipeline;

/// The channel that announces deliveries due now which no process holds.
pub const DUE_CHANNEL: &str = "citapro_due";
/// The channel that announces webhook changes, with `<id>:<state>` as payload.
pub const WEBHOOK_CHANNEL: &str = "citapro_webhook";

/// Pool connections when the URL has no `pool_max_size` parameter.
pub const DEFAULT_POOL_MAX_SIZE: usize = 16;
/// The URL query parameter that sets the pool size. It is removed before the
/// URL is passed to tokio-postgres, which rejects unknown parameters.
const POOL_MAX_SIZE_PARAMETER: &str = "pool_max_size";
/// Time limit of one TCP connect when the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an operation waits for a free pool connection before it fails.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Session-level advisory lock key held while migrations run: the bytes of
/// "citapro m" read as a big-endian integer, so other applications are
/// unlikely to pick the same key.
const MIGRATION_LOCK_KEY: i64 = 0x6369_7461_7072_6f6d;
/// First key of the two-key transaction lock that serializes webhook creation
/// per business; the second key is `hashtext(business_id)`.
const WEBHOOK_LIMIT_LOCK_CLASS: i32 = 0x6369_7477;

const MIGRATIONS: &[&str] = &[
    include_str!("sql/postgres_v1.sql"),
    include_str!("sql/postgres_v2.sql"),
    include_str!("sql/postgres_v3.sql"),
];

/// Event batches written at once, each on its own pool connection. Fewer
/// batches make larger ones, which cost less CPU per event. A second one
/// keeps events flowing while the first waits for its commit.
const ACCEPT_BATCHES: usize = 2;

/// Signals buffered for the listener's consumer.
const SIGNAL_BUFFER: usize = 256;
/// The first and the longest wait before the listener reconnects.
const LISTEN_RETRY_MIN: Duration = Duration::from_millis(200);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(10);
/// How often the listener checks that its connection still responds, so a
/// silently dropped connection does not stop notifications for long.
const LISTEN_HEALTH_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    config: Arc<Config>,
    accept_queue: AcceptQueue,
}

/// A parsed `postgres://` URL.
struct ConnectionSettings {
    config: Config,
    pool_max_size: usize,
}

/// Parses a `postgres://` or `postgresql://` URL into the tokio-postgres
/// settings and the pool size, which the `pool_max_size` query parameter sets.
fn parse_url(url: &str) -> anyhow::Result<ConnectionSettings> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut pool_max_size = DEFAULT_POOL_MAX_SIZE;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != POOL_MAX_SIZE_PARAMETER {
            kept.push(pair);
            continue;
        }
        pool_max_size = value
            .parse::<usize>()
            .ok()
            .filter(|size| *size >= 1)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "invalid {POOL_MAX_SIZE_PARAMETER} {value:?} in database URL {}: \
                     expected a whole number of at least 1",
                    redact_url(url)
                )
            })?;
    }
    let cleaned = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut config: Config = cleaned.parse().map_err(|error| {
        anyhow::anyhow!(
            "invalid PostgreSQL URL {}: {}",
            redact_url(url),
            error_chain(&error)
        )
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("citapro-webhooks");
    }
    Ok(ConnectionSettings {
        config,
        pool_max_size,
    })
}

/// Opens one connection outside the pool and drives it on its own task.
async fn connect(config: &Config) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "a PostgreSQL connection ended with an error");
        }
    });
    Ok(client)
}

/// Applies pending migrations while holding [`MIGRATION_LOCK_KEY`], so
/// processes that start together apply each migration once.
async fn migrate(config: &Config) -> anyhow::Result<()> {
    let mut client = connect(config)
        .await
        .context("connecting to PostgreSQL to apply migrations")?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("taking the PostgreSQL migration lock")?;
    let outcome = apply_migrations(&mut client).await;
    // Closing the session would release the lock too; unlocking first lets
    // a waiting process go on without waiting for the connection to close.
    if let Err(error) = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
    {
        tracing::warn!(%error, "releasing the PostgreSQL migration lock failed");
    }
    outcome
}

async fn apply_migrations(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    // Keeps the "already exists, skipping" notice out of every start-up's log.
    client
        .batch_execute("SET client_min_messages TO warning")
        .await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version BIGINT PRIMARY KEY,
                applied_at BIGINT NOT NULL
            )",
        )
        .await
        .context("creating the schema_migrations table")?;
    let applied: i64 = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )
        .await?
        .try_get(0)?;
    let known = MIGRATIONS.len() as i64;
    if applied > known {
        anyhow::bail!(
            "the database schema is at version {applied}, newer than this binary knows \
             ({known}); run a newer citapro-webhooks"
        );
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let version = index as i64 + 1;
        let transaction = client.transaction().await?;
        transaction
            .batch_execute(sql)
            .await
            .with_context(|| format!("applying PostgreSQL migration {version}"))?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[&version, &now_micros()],
            )
            .await?;
        transaction.commit().await?;
        tracing::info!(version, "applied PostgreSQL migration");
    }
    Ok(())
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Runs a statement through the connection's prepared-statement cache.
async fn execute(client: &impl GenericClient, sql: &str, params: Params<'_>) -> StoreResult<u64> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.execute(&statement, params).await?)
}

async fn query(
    client: &impl GenericClient,
    sql: &str,
    params: Params<'_>,
) -> StoreResult<Vec<Row>> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query(&statement, params).await?)
}

async fn query_opt(
    client: &impl GenericClient,
    sql: &str,
    params: Params<'_>,
) -> StoreResult<Option<Row>> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query_opt(&statement, params).await?)
}

async fn query_one(client: &impl GenericClient, sql: &str, params: Params<'_>) -> StoreResult<Row> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query_one(&statement, params).await?)
}

/// Queues the notification of `$2` on channel `$1`. PostgreSQL sends it when
/// the transaction commits.
const NOTIFY: &str = "SELECT pg_notify($1, $2)";

/// Plans for statements that join a batch of keys to a table's primary key:
/// a nested loop that probes the key once per row of the batch.
///
/// Left to choose, PostgreSQL scans the whole table when its statistics show
/// that it is small, as they do until `deliveries` has first been analyzed,
/// and it cannot tell then that a `(webhook_id, id)` pair matches at most one
/// row. A plan made so stays cached on the pooled connection while the table
/// grows. With these settings every plan, cached or not, costs a few index
/// probes per key whatever the table's size, and no batch is planned again.
const KEY_BATCH_PLANS: &str = "SET LOCAL enable_hashjoin = off;
     SET LOCAL enable_mergejoin = off; SET LOCAL enable_seqscan = off";

/// Leases up to `$3` due deliveries. One statement, so the lease is taken in
/// the same transaction as the row locks. SKIP LOCKED passes over rows that
/// another process is claiming, and a row it already leased no longer
/// matches `due_at <= now`.
const CLAIM_DUE: &str = "WITH due AS (
         SELECT webhook_id, id, due_at FROM deliveries
         WHERE due_at IS NOT NULL AND due_at <= $1 AND NOT (webhook_id = ANY($2))
         ORDER BY due_at
         LIMIT $3
         FOR UPDATE SKIP LOCKED
     ), leased AS (
         UPDATE deliveries d SET due_at = $4, leased_by = $5
         FROM due WHERE d.webhook_id = due.webhook_id AND d.id = due.id
         RETURNING d.id, d.webhook_id, d.event_id, d.event, d.auto_attempts,
             due.due_at AS was_due_at
     )
     SELECT l.id, l.webhook_id, l.event, l.auto_attempts, w.url, w.secret, e.payload,
         l.event_id
     FROM leased l
     JOIN webhooks w ON w.id = l.webhook_id
     JOIN events e ON e.id = l.event_id
     ORDER BY l.was_due_at";

/// Locks the deliveries of a batch of attempts, found by their primary key
/// `(webhook_id, id)`. Locking in id order keeps two batches from
/// deadlocking.
const LOCK_DELIVERIES: &str = "SELECT d.id, d.status, d.due_at, d.attempt_count,
        d.auto_attempts, d.leased_by, d.next_attempt_at, d.webhook_id
     FROM UNNEST($1::text[], $2::text[]) AS k (webhook_id, id)
     JOIN deliveries d ON d.webhook_id = k.webhook_id AND d.id = k.id
     ORDER BY d.id FOR UPDATE OF d";

const INSERT_ATTEMPTS: &str = "INSERT INTO attempts (delivery_id, number, trigger, started_at,
        duration_ms, status_code, error_kind, response_body)
     SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[],
        $6::int[], $7::text[], $8::text[])";

const UPDATE_DELIVERIES: &str = "UPDATE deliveries d SET attempt_count = u.attempt_count,
        auto_attempts = u.auto_attempts, last_attempt_at = u.last_attempt_at,
        last_status_code = u.last_status_code, status = u.status, due_at = u.due_at,
        next_attempt_at = u.next_attempt_at, leased_by = u.leased_by
     FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::int[],
        $6::text[], $7::bigint[], $8::bigint[], $9::text[], $10::text[])
        AS u(id, attempt_count, auto_attempts, last_attempt_at, last_status_code,
             status, due_at, next_attempt_at, leased_by, webhook_id)
     WHERE d.webhook_id = u.webhook_id AND d.id = u.id";

/// Queues a notification that is sent when the transaction commits.
async fn notify(client: &impl GenericClient, channel: &str, payload: &str) -> StoreResult<()> {
    execute(client, NOTIFY, &[&channel, &payload]).await?;
    Ok(())
}

/// Joins an error's message with its sources, such as the server's message
/// behind tokio-postgres's "db error".
pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

async fn pool_client(pool: &Pool) -> StoreResult<deadpool_postgres::Client> {
    pool.get().await.map_err(|error| {
        StoreError::Backend(anyhow::anyhow!(
            "getting a PostgreSQL connection from the pool failed: {}",
            error_chain(&error)
        ))
    })
}

fn parse_uuid(text: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(text).map_err(|error| {
        StoreError::Backend(anyhow::anyhow!("invalid stored id {text:?}: {error}"))
    })
}

impl PostgresStore {
    /// Connects to the database of `url`, applies pending migrations and
    /// builds the connection pool.
    pub async fn open(url: &str) -> anyhow::Result<PostgresStore> {
        let settings = parse_url(url)?;
        migrate(&settings.config)
            .await
            .with_context(|| format!("preparing PostgreSQL database {}", redact_url(url)))?;
        let manager = Manager::from_config(
            settings.config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_max_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .context("building the PostgreSQL connection pool")?;
        let accept_queue = AcceptQueue::start(pool.clone(), ACCEPT_BATCHES);
        Ok(PostgresStore {
            pool,
            config: Arc::new(settings.config),
            accept_queue,
        })
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Client> {
        pool_client(&self.pool).await
    }

    /// Starts a task that listens on [`DUE_CHANNEL`] and [`WEBHOOK_CHANNEL`]
    /// on a connection of its own and forwards what arrives. After every
    /// (re)connect it sends [`StoreSignal::Due`], because notifications sent
    /// while it was disconnected are lost. The task stops when the receiver
    /// is dropped.
    pub fn subscribe(&self) -> mpsc::Receiver<StoreSignal> {
        let (sender, receiver) = mpsc::channel(SIGNAL_BUFFER);
        tokio::spawn(listen(self.config.clone(), sender));
        receiver
    }

    pub async fn release_all_leases(&self, now: i64) -> StoreResult<u64> {
        let client = self.client().await?;
        execute(
            &client,
            "UPDATE deliveries SET leased_by = NULL, due_at = LEAST(due_at, $1)
             WHERE leased_by IS NOT NULL AND due_at IS NOT NULL",
            &[&now],
        )
        .await
    }

    pub async fn insert_api_key(&self, business_id: Uuid, key_hash: String) -> StoreResult<()> {
        let client = self.client().await?;
        execute(
            &client,
            "INSERT INTO api_keys (key_hash, business_id, created_at) VALUES ($1, $2, $3)",
            &[&key_hash, &business_id.to_string(), &now_micros()],
        )
        .await?;
        Ok(())
    }

    pub async fn find_api_key(&self, key_hash: String) -> StoreResult<Option<Uuid>> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT business_id FROM api_keys WHERE key_hash = $1",
            &[&key_hash],
        )
        .await?;
        Ok(row
            .map(|row| row.try_get::<_, String>(0))
            .transpose()?
            .and_then(|text| Uuid::parse_str(&text).ok()))
    }

    pub async fn insert_producer_token(&self, name: String, token_hash: String) -> StoreResult<()> {
        let client = self.client().await?;
        execute(
            &client,
            "INSERT INTO producer_tokens (token_hash, name, created_at) VALUES ($1, $2, $3)",
            &[&token_hash, &name, &now_micros()],
        )
        .await?;
        Ok(())
    }

    pub async fn producer_token_exists(&self, token_hash: String) -> StoreResult<bool> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT 1 FROM producer_tokens WHERE token_hash = $1",
            &[&token_hash],
        )
        .await?;
        Ok(row.is_some())
    }

    pub async fn create_webhook(&self, webhook: Webhook, limit: usize) -> StoreResult<()> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        let business = webhook.business_id.to_string();

        // Two requests of one business could both count below the limit;
        // this lock makes the second one count after the first commits.
        execute(
            &transaction,
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&WEBHOOK_LIMIT_LOCK_CLASS, &business],
        )
        .await?;

        let count: i64 = query_one(
            &transaction,
            "SELECT COUNT(*) FROM webhooks WHERE business_id = $1",
            &[&business],
        )
        .await?
        .try_get(0)?;
        if count as usize >= limit {
            return Err(StoreError::WebhookLimit(limit));
        }

        execute(
            &transaction,
            "INSERT INTO webhooks
               (id, business_id, url, events, is_active, secret, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &webhook.id.to_string(),
                &business,
                &webhook.url,
                &join_events(&webhook.events),
                &webhook.is_active,
                &webhook.secret,
                &webhook.created_at,
                &webhook.updated_at,
            ],
        )
        .await?;
        transaction.commit().await?;
        Ok(())
    }

    pub async fn list_webhooks(&self, business_id: Uuid) -> StoreResult<Vec<Webhook>> {
        let client = self.client().await?;
        let rows = query(
            &client,
            &format!(
                "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE business_id = $1
                 ORDER BY created_at DESC, id DESC"
            ),
            &[&business_id.to_string()],
        )
        .await?;
        rows.iter().map(webhook_from_row).collect()
    }

    pub async fn get_webhook(&self, business_id: Uuid, id: Uuid) -> StoreResult<Option<Webhook>> {
        let client = self.client().await?;
        select_webhook(&client, business_id, id, "").await
    }

    pub async fn update_webhook(&self, change: WebhookChange) -> StoreResult<Option<Webhook>> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        let id = change.id.to_string();
        let row = query_opt(
            &transaction,
            &format!(
                "UPDATE webhooks SET url = $1, events = $2, is_active = $3, updated_at = $4
                 WHERE id = $5 AND business_id = $6
                 RETURNING {WEBHOOK_COLUMNS}"
            ),
            &[
                &change.url,
                &join_events(&change.events),
                &change.is_active,
                &change.updated_at,
                &id,
                &change.business_id.to_string(),
            ],
        )
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let webhook = webhook_from_row(&row)?;

        if !change.is_active {
            execute(
                &transaction,
                "UPDATE deliveries SET status = 'cancelled', due_at = NULL,
                    next_attempt_at = NULL, leased_by = NULL
                 WHERE webhook_id = $1 AND status = 'pending'",
                &[&id],
            )
            .await?;
        }

        let state = if change.is_active {
            WEBHOOK_ACTIVE
        } else {
            WEBHOOK_INACTIVE
        };
        notify(&transaction, WEBHOOK_CHANNEL, &format!("{id}:{state}")).await?;
        transaction.commit().await?;
        Ok(Some(webhook))
    }

    pub async fn delete_webhook(&self, business_id: Uuid, id: Uuid) -> StoreResult<bool> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        let id_text = id.to_string();
        let deleted = execute(
            &transaction,
            "DELETE FROM webhooks WHERE id = $1 AND business_id = $2",
            &[&id_text, &business_id.to_string()],
        )
        .await?;
        if deleted == 0 {
            return Ok(false);
        }

        // Deliveries go first: an attempt being recorded locks its delivery
        // row, so this waits for it, and the attempts deleted next include
        // the one it wrote.
        // NOTE: the webhook's row stays locked while its whole history is
        // deleted, and event batches that select its business wait for it.
        let delivery_ids: Vec<String> = query(
            &transaction,
            "DELETE FROM deliveries WHERE webhook_id = $1 RETURNING id",
            &[&id_text],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
        execute(
            &transaction,
            "DELETE FROM attempts WHERE delivery_id = ANY($1)",
            &[&delivery_ids],
        )
        .await?;

        notify(
            &transaction,
            WEBHOOK_CHANNEL,
            &format!("{id_text}:{WEBHOOK_DELETED}"),
        )
        .await?;
        transaction.commit().await?;
        Ok(true)
    }

    /// Writes the event in a batch with other concurrent calls, and returns
    /// after that batch committed.
    pub async fn accept_event(&self, event: NewEvent) -> StoreResult<AcceptedEvent> {
        self.accept_queue.accept(event).await
    }

    pub async fn claim_due(&self, claim: Claim) -> StoreResult<Vec<Job>> {
        let client = self.client().await?;
        let skip: Vec<String> = claim.skip_webhooks.iter().map(Uuid::to_string).collect();
        let statement = client.prepare_cached(CLAIM_DUE).await?;
        let params: Params = &[
            &claim.now,
            &skip,
            &(claim.limit as i64),
            &claim.lease_until,
            &claim.owner,
        ];
        // One round trip: `COMMIT` goes out right behind the statement.
        let transaction = PipelinedTransaction::new(client);
        let rows = transaction
            .commit_after(transaction.begin_and_query(KEY_BATCH_PLANS, &statement, params))
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Job {
                    delivery_id: parse_uuid(row.try_get(0)?)?,
                    webhook_id: parse_uuid(row.try_get(1)?)?,
                    event_id: parse_uuid(row.try_get(7)?)?,
                    event: row.try_get(2)?,
                    auto_attempts: row.try_get::<_, i64>(3)? as u32,
                    url: row.try_get(4)?,
                    secret: row.try_get(5)?,
                    payload: Bytes::from(row.try_get::<_, Vec<u8>>(6)?),
                    trigger: Trigger::Automatic,
                    lease_until: claim.lease_until,
                })
            })
            .collect()
    }

    pub async fn next_due_at(&self) -> StoreResult<Option<i64>> {
        let client = self.client().await?;
        let row = query_one(
            &client,
            "SELECT MIN(due_at) FROM deliveries WHERE due_at IS NOT NULL",
            &[],
        )
        .await?;
        Ok(row.try_get(0)?)
    }

    pub async fn renew_lease(
        &self,
        delivery: DeliveryKey,
        owner: String,
        until: i64,
    ) -> StoreResult<bool> {
        let client = self.client().await?;
        let renewed = execute(
            &client,
            "UPDATE deliveries SET due_at = $1
             WHERE webhook_id = $4 AND id = $2 AND leased_by = $3 AND status = 'pending'",
            &[
                &until,
                &delivery.delivery_id.to_string(),
                &owner,
                &delivery.webhook_id.to_string(),
            ],
        )
        .await?;
        Ok(renewed == 1)
    }

    pub async fn release_leases(
        &self,
        deliveries: Vec<DeliveryKey>,
        owner: String,
    ) -> StoreResult<()> {
        let (webhook_ids, ids): (Vec<String>, Vec<String>) = deliveries
            .iter()
            .map(|key| (key.webhook_id.to_string(), key.delivery_id.to_string()))
            .unzip();
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        let released = execute(
            &transaction,
            "UPDATE deliveries d SET leased_by = NULL, due_at = $1
             FROM UNNEST($4::text[], $2::text[]) AS k (webhook_id, id)
             WHERE d.webhook_id = k.webhook_id AND d.id = k.id
               AND d.leased_by = $3 AND d.due_at IS NOT NULL",
            &[&now_micros(), &ids, &owner, &webhook_ids],
        )
        .await?;
        if released > 0 {
            notify(&transaction, DUE_CHANNEL, "").await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Records attempts in one transaction with two round trips, whatever
    /// their number: lock the deliveries, apply the attempts in order in
    /// memory, then write the attempts and the new states with `UNNEST`.
    pub async fn record_attempts(&self, attempts: Arc<[AttemptRecord]>) -> StoreResult<()> {
        if attempts.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let (lock, insert, update) = tokio::try_join!(
            client.prepare_cached(LOCK_DELIVERIES),
            client.prepare_cached(INSERT_ATTEMPTS),
            client.prepare_cached(UPDATE_DELIVERIES),
        )?;
        let transaction = PipelinedTransaction::new(client);
        let mut keys: Vec<(String, String)> = attempts
            .iter()
            .map(|a| (a.delivery_id.to_string(), a.webhook_id.to_string()))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let (ids, webhook_ids): (Vec<String>, Vec<String>) = keys.into_iter().unzip();
        let lock_params: Params = &[&webhook_ids, &ids];
        let rows = match transaction
            .begin_and_query(KEY_BATCH_PLANS, &lock, lock_params)
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                transaction.rollback().await;
                return Err(error);
            }
        };
        let mut locked: HashMap<String, LockedDelivery> = HashMap::new();
        for row in &rows {
            let state = DeliveryState {
                status: row.try_get(1)?,
                due_at: row.try_get(2)?,
                attempt_count: row.try_get(3)?,
                auto_attempts: row.try_get(4)?,
                leased_by: row.try_get(5)?,
                next_attempt_at: row.try_get(6)?,
            };
            let delivery = LockedDelivery {
                webhook_id: row.try_get(7)?,
                state,
                last_attempt_at: 0,
                last_status_code: None,
            };
            locked.insert(row.try_get(0)?, delivery);
        }

        let mut rows = AttemptRows::default();
        for attempt in attempts.iter() {
            let id = attempt.delivery_id.to_string();
            // A delivery deleted with its webhook while the attempt ran.
            let Some(delivery) = locked.get_mut(&id) else {
                continue;
            };
            delivery.state = apply_attempt(&delivery.state, attempt);
            delivery.last_attempt_at = attempt.started_at;
            delivery.last_status_code = attempt.status_code.map(i32::from);
            rows.push(id, delivery.state.attempt_count, attempt);
        }
        let mut update_rows = DeliveryRows::default();
        for (id, delivery) in locked {
            update_rows.push(id, delivery);
        }
        let client = transaction.client();
        let insert_params: Params = &[
            &rows.delivery_ids,
            &rows.numbers,
            &rows.triggers,
            &rows.started_at,
            &rows.duration_ms,
            &rows.status_codes,
            &rows.error_kinds,
            &rows.response_bodies,
        ];
        let update_params: Params = &[
            &update_rows.ids,
            &update_rows.attempt_counts,
            &update_rows.auto_attempts,
            &update_rows.last_attempt_at,
            &update_rows.last_status_codes,
            &update_rows.statuses,
            &update_rows.due_at,
            &update_rows.next_attempt_at,
            &update_rows.leased_by,
            &update_rows.webhook_ids,
        ];
        transaction
            .commit_after(async {
                let (inserted, updated) = tokio::join!(
                    biased;
                    client.execute(&insert, insert_params),
                    client.execute(&update, update_params),
                );
                inserted?;
                updated?;
                Ok(())
            })
            .await
    }

    pub async fn unrecorded(
        &self,
        attempts: Vec<AttemptRecord>,
    ) -> StoreResult<Vec<AttemptRecord>> {
        let ids: Vec<String> = attempts.iter().map(|a| a.delivery_id.to_string()).collect();
        let client = self.client().await?;
        let rows = query(
            &client,
            "SELECT delivery_id, started_at FROM attempts WHERE delivery_id = ANY($1)",
            &[&ids],
        )
        .await?;
        let mut stored = std::collections::HashSet::new();
        for row in &rows {
            stored.insert((parse_uuid(row.try_get(0)?)?, row.try_get::<_, i64>(1)?));
        }
        Ok(attempts
            .into_iter()
            .filter(|attempt| !stored.contains(&(attempt.delivery_id, attempt.started_at)))
            .collect())
    }

    pub async fn record_attempt(&self, attempt: AttemptRecord) -> StoreResult<()> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        record_attempt(&transaction, &attempt).await?;
        transaction.commit().await?;
        Ok(())
    }

    pub async fn list_deliveries(&self, page: DeliveryQuery) -> StoreResult<Option<Vec<Delivery>>> {
        let client = self.client().await?;
        if !webhook_exists(&client, page.business_id, page.webhook_id).await? {
            return Ok(None);
        }
        let webhook_id = page.webhook_id.to_string();
        let limit = page.limit as i64;
        // A delivery's `created_at` is the time in its v7 id (see migration
        // 3), so the order by `(created_at, id)` is the id order, and a
        // cursor's id alone marks its place.
        let after = page.after.map(|(_, id)| id.to_string());

        // Only the filters in use go into the statement, so the planner can
        // walk the primary key (webhook_id, id) for every variant.
        let mut sql =
            format!("SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.webhook_id = $1");
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&webhook_id, &limit];
        if let Some(status) = &page.status {
            params.push(status);
            sql.push_str(&format!(" AND d.status = ${}", params.len()));
        }
        if let Some(event) = &page.event {
            params.push(event);
            sql.push_str(&format!(" AND d.event = ${}", params.len()));
        }
        if let Some(id) = &after {
            params.push(id);
            sql.push_str(&format!(" AND d.id < ${}", params.len()));
        }
        sql.push_str(" ORDER BY d.id DESC LIMIT $2");
        let rows = query(&client, &sql, &params).await?;
        Ok(Some(
            rows.iter()
                .map(delivery_from_row)
                .collect::<StoreResult<_>>()?,
        ))
    }

    pub async fn get_delivery(
        &self,
        business_id: Uuid,
        webhook_id: Uuid,
        delivery_id: Uuid,
    ) -> StoreResult<Option<DeliveryDetail>> {
        let mut client = self.client().await?;
        // One snapshot, so the delivery's counters and its attempts agree.
        let client = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        if !webhook_exists(&client, business_id, webhook_id).await? {
            return Ok(None);
        }

        let delivery_text = delivery_id.to_string();
        let row = query_opt(
            &client,
            &format!(
                "SELECT {DELIVERY_COLUMNS}, e.payload FROM deliveries d
                 JOIN events e ON e.id = d.event_id
                 WHERE d.id = $1 AND d.webhook_id = $2"
            ),
            &[&delivery_text, &webhook_id.to_string()],
        )
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let delivery = delivery_from_row(&row)?;
        let payload: Vec<u8> = row.try_get(11)?;

        let attempts = query(
            &client,
            "SELECT number, trigger, started_at, duration_ms, status_code, error_kind,
                response_body
             FROM attempts WHERE delivery_id = $1 ORDER BY number",
            &[&delivery_text],
        )
        .await?
        .iter()
        .map(|row| {
            Ok(Attempt {
                number: row.try_get(0)?,
                trigger: row.try_get(1)?,
                started_at: row.try_get(2)?,
                duration_ms: row.try_get(3)?,
                status_code: row.try_get::<_, Option<i32>>(4)?.map(i64::from),
                error_kind: row.try_get(5)?,
                response_body: row.try_get(6)?,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
        Ok(Some(DeliveryDetail {
            delivery,
            payload,
            attempts,
        }))
    }

    pub async fn manual_job(
        &self,
        business_id: Uuid,
        webhook_id: Uuid,
        delivery_id: Uuid,
    ) -> StoreResult<Option<Job>> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT d.event, d.auto_attempts, w.url, w.secret, e.payload, d.event_id
             FROM deliveries d
             JOIN webhooks w ON w.id = d.webhook_id
             JOIN events e ON e.id = d.event_id
             WHERE d.id = $1 AND d.webhook_id = $2 AND w.business_id = $3",
            &[
                &delivery_id.to_string(),
                &webhook_id.to_string(),
                &business_id.to_string(),
            ],
        )
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(Job {
            delivery_id,
            webhook_id,
            event_id: parse_uuid(row.try_get(5)?)?,
            event: row.try_get(0)?,
            auto_attempts: row.try_get::<_, i64>(1)? as u32,
            url: row.try_get(2)?,
            secret: row.try_get(3)?,
            payload: Bytes::from(row.try_get::<_, Vec<u8>>(4)?),
            trigger: Trigger::Manual,
            lease_until: 0,
        }))
    }

    pub async fn create_test_delivery(&self, test: TestDelivery) -> StoreResult<Option<Job>> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        // FOR SHARE keeps the webhook from being deleted before this commits.
        let Some(webhook) =
            select_webhook(&transaction, test.business_id, test.webhook_id, "FOR SHARE").await?
        else {
            return Ok(None);
        };

        let event_id = Uuid::now_v7();
        let delivery_id = Uuid::now_v7();
        let event_text = event_id.to_string();
        let webhook_text = test.webhook_id.to_string();
        execute(
            &transaction,
            "INSERT INTO events (id, business_id, event, aggregate_id, payload, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &event_text,
                &test.business_id.to_string(),
                &PING_EVENT,
                &webhook_text,
                &test.payload,
                &test.now,
            ],
        )
        .await?;

        execute(
            &transaction,
            "INSERT INTO deliveries (id, webhook_id, event_id, event, aggregate_id, status,
                created_at, is_test)
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, TRUE)",
            &[
                &delivery_id.to_string(),
                &webhook_text,
                &event_text,
                &PING_EVENT,
                &webhook_text,
                &v7_micros(delivery_id),
            ],
        )
        .await?;
        transaction.commit().await?;

        Ok(Some(Job {
            delivery_id,
            webhook_id: test.webhook_id,
            event_id,
            event: PING_EVENT.to_owned(),
            url: webhook.url,
            secret: webhook.secret,
            payload: Bytes::from(test.payload),
            auto_attempts: 0,
            trigger: Trigger::Test,
            lease_until: 0,
        }))
    }

    pub async fn recover(&self, recovery: Recovery) -> StoreResult<RecoveryOutcome> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        // FOR SHARE makes a concurrent deactivation wait, so it cancels what
        // this requeues instead of missing it.
        let webhook = select_webhook(
            &transaction,
            recovery.business_id,
            recovery.webhook_id,
            "FOR SHARE",
        )
        .await?;
        let Some(webhook) = webhook else {
            return Ok(RecoveryOutcome::WebhookNotFound);
        };
        if !webhook.is_active {
            return Ok(RecoveryOutcome::WebhookInactive);
        }

        let webhook_id = recovery.webhook_id.to_string();
        let (first_id, end_id) = id_window(recovery.since, recovery.until);
        let count = if recovery.dry_run {
            let count: i64 = query_one(
                &transaction,
                "SELECT COUNT(*) FROM deliveries
                 WHERE webhook_id = $1 AND id >= $4 AND id < $5
                   AND created_at >= $2 AND created_at < $3
                   AND status IN ('failed', 'cancelled') AND NOT is_test",
                &[
                    &webhook_id,
                    &recovery.since,
                    &recovery.until,
                    &first_id,
                    &end_id,
                ],
            )
            .await?
            .try_get(0)?;
            count as u64
        } else {
            execute(
                &transaction,
                "UPDATE deliveries SET status = 'pending', auto_attempts = 0, due_at = $4,
                    next_attempt_at = $4, leased_by = NULL
                 WHERE webhook_id = $1 AND id >= $5 AND id < $6
                   AND created_at >= $2 AND created_at < $3
                   AND status IN ('failed', 'cancelled') AND NOT is_test",
                &[
                    &webhook_id,
                    &recovery.since,
                    &recovery.until,
                    &recovery.now,
                    &first_id,
                    &end_id,
                ],
            )
            .await?
        };

        if count > 0 && !recovery.dry_run {
            notify(&transaction, DUE_CHANNEL, "").await?;
        }
        transaction.commit().await?;
        Ok(RecoveryOutcome::Requeued(count))
    }

    /// Deletes finished deliveries and unreferenced events created before
    /// `cutoff`. Rows are found by their id: a UUID v7 created before
    /// `cutoff` sorts below [`v7_floor`] of it. Deliveries are found webhook
    /// by webhook through the primary key `(webhook_id, id)`, which finds
    /// them all because every delivery belongs to a stored webhook.
    pub async fn purge_history(&self, cutoff: i64, batch: usize) -> StoreResult<u64> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        let batch = batch as i64;
        let floor = v7_floor(cutoff);

        // SKIP LOCKED lets several processes purge at once, and passes over
        // a delivery whose manual attempt is being recorded.
        let delivery_ids: Vec<String> = query(
            &transaction,
            "DELETE FROM deliveries d USING (
                 SELECT o.webhook_id, o.id FROM webhooks w
                 CROSS JOIN LATERAL (
                     SELECT webhook_id, id FROM deliveries
                     WHERE webhook_id = w.id AND id < $3 AND created_at < $1
                       AND status <> 'pending'
                     ORDER BY id
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED) o
                 LIMIT $2) old
             WHERE d.webhook_id = old.webhook_id AND d.id = old.id
             RETURNING d.id",
            &[&cutoff, &batch, &floor],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
        execute(
            &transaction,
            "DELETE FROM attempts WHERE delivery_id = ANY($1)",
            &[&delivery_ids],
        )
        .await?;

        // NOTE: each call reads again, from the oldest, every old event that
        // a delivery still references, such as a pending retry. That took
        // 0.1 to 0.3 s per call with 300 000 old deliveries.
        let events = execute(
            &transaction,
            "DELETE FROM events WHERE id IN (
                 SELECT e.id FROM events e
                 WHERE e.id < $3 AND e.created_at < $1
                   AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)
                 ORDER BY e.id
                 LIMIT $2)",
            &[&cutoff, &batch, &floor],
        )
        .await?;
        transaction.commit().await?;
        Ok(delivery_ids.len() as u64 + events)
    }
}

/// Webhook states in [`WEBHOOK_CHANNEL`] payloads.
const WEBHOOK_ACTIVE: &str = "active";
const WEBHOOK_INACTIVE: &str = "inactive";
const WEBHOOK_DELETED: &str = "deleted";

/// Parses a [`WEBHOOK_CHANNEL`] payload, `<webhook id>:<state>`.
fn parse_webhook_signal(payload: &str) -> Option<StoreSignal> {
    let (id, state) = payload.split_once(':')?;
    let active = match state {
        WEBHOOK_ACTIVE => true,
        WEBHOOK_INACTIVE | WEBHOOK_DELETED => false,
        _ => return None,
    };
    Some(StoreSignal::WebhookChanged {
        webhook_id: Uuid::parse_str(id).ok()?,
        active,
    })
}

/// Keeps a listening connection open and forwards its notifications until
/// `signals` is closed, reconnecting with exponential backoff.
async fn listen(config: Arc<Config>, signals: mpsc::Sender<StoreSignal>) {
    let mut failures: u32 = 0;
    loop {
        let outcome = tokio::select! {
            outcome = listen_once(&config, &signals, &mut failures) => outcome,
            () = signals.closed() => return,
        };
        match outcome {
            Ok(()) => return,
            Err(error) => {
                // `listen_once` resets the count once it has subscribed.
                failures += 1;
                let retry_wait = listen_retry_wait(failures);
                tracing::warn!(
                    error = format!("{error:#}"),
                    failures,
                    retry_in_ms = retry_wait.as_millis() as u64,
                    "the PostgreSQL notification listener failed; reconnecting"
                );
                tokio::select! {
                    () = tokio::time::sleep(retry_wait) => {}
                    () = signals.closed() => return,
                }
            }
        }
    }
}

/// Returns the wait before reconnecting after `failures` failures in a
/// row: [`LISTEN_RETRY_MIN`], doubled after each further failure, up to
/// [`LISTEN_RETRY_MAX`].
fn listen_retry_wait(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (LISTEN_RETRY_MIN * 2u32.pow(doublings)).min(LISTEN_RETRY_MAX)
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Listens on one connection until it fails (an error) or the consumer goes
/// away (`Ok`). Resets `failures` once the connection listens.
async fn listen_once(
    config: &Config,
    signals: &mpsc::Sender<StoreSignal>,
    failures: &mut u32,
) -> anyhow::Result<()> {
    let (client, mut connection) = config
        .connect(NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    // Notifications arrive only through the connection object, so this task
    // polls it itself instead of handing it to tokio-postgres's usual spawn.
    let (notification_sender, mut notifications) = mpsc::unbounded_channel();
    let _driver = AbortOnDrop(tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(notification))) => {
                    if notification_sender.send(Ok(notification)).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    let _ = notification_sender.send(Err(error));
                    return;
                }
                None => return,
            }
        }
    }));
    client
        .batch_execute(&format!("LISTEN {DUE_CHANNEL}; LISTEN {WEBHOOK_CHANNEL}"))
        .await
        .context("subscribing to PostgreSQL notifications")?;
    if *failures > 0 {
        tracing::info!("the PostgreSQL notification listener reconnected");
    }
    *failures = 0;
    // Work may have become due while nothing listened.
    let _ = signals.try_send(StoreSignal::Due);

    let mut health = tokio::time::interval(LISTEN_HEALTH_INTERVAL);
    health.tick().await;
    loop {
        tokio::select! {
            message = notifications.recv() => {
                let notification = match message {
                    Some(Ok(notification)) => notification,
                    Some(Err(error)) => return Err(error).context("reading PostgreSQL notifications"),
                    None => anyhow::bail!("the PostgreSQL listening connection closed"),
                };
                let signal = if notification.channel() == DUE_CHANNEL {
                    Some(StoreSignal::Due)
                } else {
                    parse_webhook_signal(notification.payload())
                };
                match signal {
                    // A wake-up already waiting covers this one, so a full buffer drops it.
                    Some(StoreSignal::Due) => {
                        if let Err(mpsc::error::TrySendError::Closed(_)) =
                            signals.try_send(StoreSignal::Due)
                        {
                            return Ok(());
                        }
                    }
                    Some(signal) => {
                        if signals.send(signal).await.is_err() {
                            return Ok(());
                        }
                    }
                    None => tracing::warn!(
                        channel = notification.channel(),
                        payload = notification.payload(),
                        "ignored a malformed PostgreSQL notification"
                    ),
                }
            }
            _ = health.tick() => {
                tokio::time::timeout(CONNECT_TIMEOUT, client.simple_query("SELECT 1"))
                    .await
                    .context("the PostgreSQL listening connection did not answer")?
                    .context("checking the PostgreSQL listening connection")?;
            }
        }
    }
}

const DELIVERY_COLUMNS: &str = "d.id, d.webhook_id, d.event_id, d.event, d.aggregate_id, \
     d.status, d.attempt_count, d.created_at, d.last_attempt_at, d.next_attempt_at, \
     d.last_status_code";

fn delivery_from_row(row: &Row) -> StoreResult<Delivery> {
    Ok(Delivery {
        id: parse_uuid(row.try_get(0)?)?,
        webhook_id: parse_uuid(row.try_get(1)?)?,
        event_id: parse_uuid(row.try_get(2)?)?,
        event: row.try_get(3)?,
        aggregate_id: row.try_get(4)?,
        status: row.try_get(5)?,
        attempt_count: row.try_get(6)?,
        created_at: row.try_get(7)?,
        last_attempt_at: row.try_get(8)?,
        next_attempt_at: row.try_get(9)?,
        last_status_code: row.try_get::<_, Option<i32>>(10)?.map(i64::from),
    })
}

const WEBHOOK_COLUMNS: &str =
    "id, business_id, url, events, is_active, secret, created_at, updated_at";

fn webhook_from_row(row: &Row) -> StoreResult<Webhook> {
    Ok(Webhook {
        id: parse_uuid(row.try_get(0)?)?,
        business_id: parse_uuid(row.try_get(1)?)?,
        url: row.try_get(2)?,
        events: split_events(row.try_get(3)?),
        is_active: row.try_get(4)?,
        secret: row.try_get(5)?,
        created_at: row.try_get(6)?,
        updated_at: row.try_get(7)?,
    })
}

/// Reads one webhook of a business; `locking` is empty or a locking clause
/// such as `FOR SHARE`.
async fn select_webhook(
    client: &impl GenericClient,
    business_id: Uuid,
    id: Uuid,
    locking: &str,
) -> StoreResult<Option<Webhook>> {
    let row = query_opt(
        client,
        &format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1 AND business_id = $2 {locking}"
        ),
        &[&id.to_string(), &business_id.to_string()],
    )
    .await?;
    row.as_ref().map(webhook_from_row).transpose()
}

async fn webhook_exists(
    client: &impl GenericClient,
    business_id: Uuid,
    webhook_id: Uuid,
) -> StoreResult<bool> {
    let row = query_opt(
        client,
        "SELECT 1 FROM webhooks WHERE id = $1 AND business_id = $2",
        &[&webhook_id.to_string(), &business_id.to_string()],
    )
    .await?;
    Ok(row.is_some())
}

async fn record_attempt(
    transaction: &deadpool_postgres::Transaction<'_>,
    attempt: &AttemptRecord,
) -> StoreResult<()> {
    let id = attempt.delivery_id.to_string();
    let webhook_id = attempt.webhook_id.to_string();
    let current = query_opt(
        transaction,
        "SELECT status, due_at, attempt_count, auto_attempts, leased_by, next_attempt_at
         FROM deliveries WHERE webhook_id = $2 AND id = $1
         FOR UPDATE",
        &[&id, &webhook_id],
    )
    .await?;
    // The webhook and its history were deleted while the attempt ran.
    let Some(current) = current else {
        return Ok(());
    };

    let current = DeliveryState {
        status: current.try_get(0)?,
        due_at: current.try_get(1)?,
        attempt_count: current.try_get(2)?,
        auto_attempts: current.try_get(3)?,
        leased_by: current.try_get(4)?,
        next_attempt_at: current.try_get(5)?,
    };
    let update = apply_attempt(&current, attempt);
    let status_code = attempt.status_code.map(i32::from);

    execute(
        transaction,
        "INSERT INTO attempts (delivery_id, number, trigger, started_at, duration_ms,
            status_code, error_kind, response_body)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &id,
            &update.attempt_count,
            &attempt.trigger.as_str(),
            &attempt.started_at,
            &attempt.duration_ms,
            &status_code,
            &attempt.error_kind.map(ErrorKind::as_str),
            &attempt.response_body,
        ],
    )
    .await?;

    execute(
        transaction,
        "UPDATE deliveries SET attempt_count = $1, last_attempt_at = $2, last_status_code = $3,
            status = $4, due_at = $5, next_attempt_at = $6, leased_by = $7, auto_attempts = $9
         WHERE webhook_id = $10 AND id = $8",
        &[
            &update.attempt_count,
            &attempt.started_at,
            &status_code,
            &update.status,
            &update.due_at,
            &update.next_attempt_at,
            &update.leased_by,
            &id,
            &update.auto_attempts,
            &webhook_id,
        ],
    )
    .await?;
    Ok(())
}

/// Columns of attempt rows, for one `INSERT … SELECT * FROM UNNEST`.
#[derive(Default)]
struct AttemptRows {
    delivery_ids: Vec<String>,
    numbers: Vec<i64>,
    triggers: Vec<&'static str>,
    started_at: Vec<i64>,
    duration_ms: Vec<i64>,
    status_codes: Vec<Option<i32>>,
    error_kinds: Vec<Option<&'static str>>,
    response_bodies: Vec<Option<String>>,
}

impl AttemptRows {
    fn push(&mut self, delivery_id: String, number: i64, attempt: &AttemptRecord) {
        self.delivery_ids.push(delivery_id);
        self.numbers.push(number);
        self.triggers.push(attempt.trigger.as_str());
        self.started_at.push(attempt.started_at);
        self.duration_ms.push(attempt.duration_ms);
        self.status_codes.push(attempt.status_code.map(i32::from));
        self.error_kinds
            .push(attempt.error_kind.map(ErrorKind::as_str));
        self.response_bodies.push(attempt.response_body.clone());
    }
}

/// Columns of new delivery states, for one `UPDATE … FROM UNNEST`.
#[derive(Default)]
struct DeliveryRows {
    webhook_ids: Vec<String>,
    ids: Vec<String>,
    attempt_counts: Vec<i64>,
    auto_attempts: Vec<i64>,
    last_attempt_at: Vec<i64>,
    last_status_codes: Vec<Option<i32>>,
    statuses: Vec<String>,
    due_at: Vec<Option<i64>>,
    next_attempt_at: Vec<Option<i64>>,
    leased_by: Vec<Option<String>>,
}

/// A delivery locked by a batch of attempts, with its state after them.
struct LockedDelivery {
    webhook_id: String,
    state: DeliveryState,
    last_attempt_at: i64,
    last_status_code: Option<i32>,
}

impl DeliveryRows {
    fn push(&mut self, id: String, delivery: LockedDelivery) {
        let LockedDelivery {
            webhook_id,
            state,
            last_attempt_at,
            last_status_code,
        } = delivery;
        self.webhook_ids.push(webhook_id);
        self.ids.push(id);
        self.attempt_counts.push(state.attempt_count);
        self.auto_attempts.push(state.auto_attempts);
        self.last_attempt_at.push(last_attempt_at);
        self.last_status_codes.push(last_status_code);
        self.statuses.push(state.status);
        self.due_at.push(state.due_at);
        self.next_attempt_at.push(state.next_attempt_at);
        self.leased_by.push(state.leased_by);
    }
}

/// Operations for operators: encrypting secrets at rest, health and queue depth.
impl PostgresStore {
    pub async fn webhook_secrets(&self) -> StoreResult<Vec<(Uuid, String)>> {
        let client = self.client().await?;
        let rows = query(&client, "SELECT id, secret FROM webhooks ORDER BY id", &[]).await?;
        rows.iter()
            .map(|row| Ok((parse_uuid(row.get::<_, &str>(0))?, row.get(1))))
            .collect()
    }

    pub async fn replace_webhook_secret(
        &self,
        id: Uuid,
        old: String,
        new: String,
    ) -> StoreResult<bool> {
        let client = self.client().await?;
        let changed = execute(
            &client,
            "UPDATE webhooks SET secret = $1 WHERE id = $2 AND secret = $3",
            &[&new, &id.to_string(), &old],
        )
        .await?;
        Ok(changed == 1)
    }

    pub async fn ping(&self) -> StoreResult<()> {
        let client = self.client().await?;
        query_one(&client, "SELECT 1", &[]).await?;
        Ok(())
    }

    pub async fn queue_stats(&self, now: i64) -> StoreResult<QueueStats> {
        let client = self.client().await?;
        let row = query_one(
            &client,
            "SELECT
                COUNT(*) FILTER (WHERE due_at <= $1),
                COUNT(*) FILTER (WHERE due_at > $1),
                MIN(due_at)
             FROM deliveries WHERE due_at IS NOT NULL",
            &[&now],
        )
        .await?;
        Ok(QueueStats {
            due: row.get::<_, i64>(0) as u64,
            scheduled: row.get::<_, i64>(1) as u64,
            earliest_due_at: row.get(2),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_size_comes_from_the_url() {
        let settings = parse_url("postgres://app@db.example/webhooks?pool_max_size=40").unwrap();
        assert_eq!(settings.pool_max_size, 40);
        assert_eq!(settings.config.get_dbname(), Some("webhooks"));
    }

    #[test]
    fn pool_size_defaults_to_sixteen() {
        let settings = parse_url("postgresql://app@db.example/webhooks").unwrap();
        assert_eq!(settings.pool_max_size, DEFAULT_POOL_MAX_SIZE);
    }

    #[test]
    fn other_url_parameters_reach_tokio_postgres() {
        let settings = parse_url(
            "postgres://app@db.example/webhooks?pool_max_size=4&options=-c%20search_path%3Dt_1",
        )
        .unwrap();
        assert_eq!(settings.pool_max_size, 4);
        assert_eq!(settings.config.get_options(), Some("-c search_path=t_1"));
    }

    #[test]
    fn invalid_pool_size_is_rejected_without_the_password() {
        for size in ["0", "-1", "many", ""] {
            let url = format!("postgres://app:hunter2@db.example/webhooks?pool_max_size={size}");
            let error = parse_url(&url)
                .err()
                .expect("invalid pool size")
                .to_string();
            assert!(error.contains("pool_max_size"), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn unknown_url_parameter_is_rejected_without_the_password() {
        let error = parse_url("postgres://app:hunter2@db.example/webhooks?colour=blue")
            .err()
            .expect("unknown parameter")
            .to_string();
        assert!(error.contains("colour"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn listen_retry_wait_doubles_up_to_max() {
        assert_eq!(listen_retry_wait(1), LISTEN_RETRY_MIN);
        assert_eq!(listen_retry_wait(2), LISTEN_RETRY_MIN * 2);
        assert_eq!(listen_retry_wait(3), LISTEN_RETRY_MIN * 4);
        assert_eq!(listen_retry_wait(40), LISTEN_RETRY_MAX);
        assert_eq!(listen_retry_wait(u32::MAX), LISTEN_RETRY_MAX);
    }

    #[test]
    fn webhook_signals_parse() {
        let id = Uuid::now_v7();
        assert_eq!(
            parse_webhook_signal(&format!("{id}:inactive")),
            Some(StoreSignal::WebhookChanged {
                webhook_id: id,
                active: false
            })
        );
        assert_eq!(
            parse_webhook_signal(&format!("{id}:deleted")),
            Some(StoreSignal::WebhookChanged {
                webhook_id: id,
                active: false
            })
        );
        assert_eq!(
            parse_webhook_signal(&format!("{id}:active")),
            Some(StoreSignal::WebhookChanged {
                webhook_id: id,
                active: true
            })
        );
        assert_eq!(parse_webhook_signal(&format!("{id}:paused")), None);
        assert_eq!(parse_webhook_signal("not-a-uuid:active"), None);
    }
}
