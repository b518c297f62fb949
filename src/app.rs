//! Start-up of `serve`: open the store, start the workers, serve the API.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, router, worker_router};
use crate::config::Role;
use crate::config::ServiceConfig;
use crate::config::secret_cipher;
use crate::delivery::Dispatcher;
use crate::delivery::sender::{Lookup, Sender};
use crate::delivery::{self, DeliveryContext};
use crate::domain::clock::now_micros;
use crate::store::cipher::{SecretCipher, is_encrypted, open_secret};
use crate::store::{Store, StoreSignal};

/// Options of a service run that only tests change.
#[derive(Default, Clone)]
pub struct RunOptions {
    /// Replaces the system resolver for delivery destinations.
    pub lookup: Option<Arc<dyn Lookup>>,
}

/// Runs the service on a bound listener until `shutdown` is cancelled.
///
/// With [`Role::Worker`] the listener serves only `/healthz`, `/readyz` and
/// `/metrics`. On shutdown the HTTP server stops taking requests and
/// finishes the ones under way, then the workers finish their attempts and
/// release their leases.
pub async fn run(
    config: ServiceConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
    options: RunOptions,
) -> anyhow::Result<()> {
    let cipher = secret_cipher(
        config.encryption_key.as_deref(),
        &config.previous_encryption_keys,
    )?;
    let store = Store::open(&config.database_url).await?;
    check_secrets(&store, cipher.as_deref()).await?;
    let _lock = take_over_sqlite(&store, &config).await?;

    let sender = Sender::new(
        config.destinations,
        config.request_timeout,
        config.max_in_flight,
        options.lookup,
        config.extra_ca_file.as_deref(),
    )?
    .with_cipher(cipher.clone());
    let context = DeliveryContext::new(store.clone(), sender, &config);
    let workers_shutdown = CancellationToken::new();
    let (dispatcher, mut workers) = if config.role.runs_workers() {
        let (dispatcher, mut tasks) =
            delivery::start(context.clone(), &config, workers_shutdown.clone());
        tasks.spawn(purge_history(
            store.clone(),
            config.history_retention,
            workers_shutdown.clone(),
        ));
        if let Some(signals) = store.subscribe() {
            tasks.spawn(forward_store_signals(
                signals,
                dispatcher.clone(),
                workers_shutdown.clone(),
            ));
        }
        (Some(dispatcher), tasks)
    } else {
        (None, tokio::task::JoinSet::new())
    };

    // `worker` names this process in the `leased_by` column of deliveries.
    let worker = config.role.runs_workers().then(|| context.owner.clone());
    let address = listener.local_addr()?;
    tracing::info!(%address, role = ?config.role, worker = worker.as_deref(), "listening");
    let state = AppState::new(store.clone(), config.clone(), dispatcher, context);
    let app = if config.role.runs_api() {
        router(state)
    } else {
        worker_router(state)
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .context("serving HTTP")?;

    workers_shutdown.cancel();
    while workers.join_next().await.is_some() {}
    tracing::info!("stopped");
    Ok(())
}

/// Fails start-up when a stored webhook secret cannot be read with the
/// configured keys, so a wrong key is found before any delivery fails.
async fn check_secrets(store: &Store, cipher: Option<&SecretCipher>) -> anyhow::Result<()> {
    let secrets = store.webhook_secrets().await?;
    let mut unreadable = secrets
        .iter()
        .filter_map(|(id, stored)| open_secret(cipher, stored).err().map(|error| (id, error)));
    if let Some((id, error)) = unreadable.next() {
        let count = 1 + unreadable.count();
        anyhow::bail!("{count} webhook secrets cannot be decrypted (first: webhook {id}): {error}");
    }
    if cipher.is_some() {
        let plain = secrets
            .iter()
            .filter(|(_, stored)| !is_encrypted(stored))
            .count();
        if plain > 0 {
            tracing::warn!(
                count = plain,
                "webhook secrets are stored in plain text; run encrypt-secrets"
            );
        }
    }
    Ok(())
}

/// Makes this process the only `serve` on a SQLite file, then takes back the
/// leases a crashed earlier process left, so its work is sent again at once.
async fn take_over_sqlite(store: &Store, config: &ServiceConfig) -> anyhow::Result<Option<File>> {
    let Some(path) = store.sqlite_path() else {
        return Ok(None);
    };
    // One process per file means an API-only process would accept events
    // that no worker ever sends.
    anyhow::ensure!(
        config.role != Role::Api,
        "serve --role api needs PostgreSQL, because only one serve process may use the \
         SQLite file {path} and nothing would send its deliveries; use --role all"
    );
    let lock_path = format!("{path}.lock");
    let file = File::create(&lock_path).with_context(|| format!("creating {lock_path}"))?;
    file.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another serve process is using {path}; run one process per SQLite file, \
             or use PostgreSQL for several"
        )
    })?;
    if config.role.runs_workers() {
        let released = store.release_all_leases(now_micros()).await?;
        if released > 0 {
            tracing::info!(
                count = released,
                "took back deliveries leased by an earlier process"
            );
        }
    }
    Ok(Some(file))
}

/// Hands what other processes did to this process's delivery workers: due
/// work wakes the poller, and a deactivated or deleted webhook's queued jobs
/// are dropped.
async fn forward_store_signals(
    mut signals: tokio::sync::mpsc::Receiver<StoreSignal>,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
) {
    loop {
        let signal = tokio::select! {
            signal = signals.recv() => signal,
            () = shutdown.cancelled() => return,
        };
        match signal {
            Some(StoreSignal::Due) => dispatcher.wake(),
            Some(StoreSignal::WebhookChanged { webhook_id, active }) => {
                dispatcher.webhook_changed(webhook_id, active);
            }
            None => return,
        }
    }
}

/// Rows removed by one purge transaction at most, so that other writes wait only briefly.
const PURGE_BATCH: usize = 500;
/// The maximum wait between two purges.
const MAX_PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes history older than the retention period, in small batches. It
/// looks at least ten times per retention period, so a row outlives the
/// period by at most a tenth of it (and never by more than a minute).
async fn purge_history(store: Store, retention: Duration, shutdown: CancellationToken) {
    let interval = (retention / 10).clamp(Duration::from_millis(100), MAX_PURGE_INTERVAL);
    loop {
        let cutoff = now_micros() - retention.as_micros() as i64;
        loop {
            match store.purge_history(cutoff, PURGE_BATCH).await {
                Ok(removed) if removed > 0 => {
                    tracing::debug!(removed, "purged old delivery history");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(_) => break,
                Err(error) => {
                    tracing::error!(%error, "purging old delivery history failed");
                    break;
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
