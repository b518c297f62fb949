//! Start-up of `serve`: open the store, start the workers, serve the API.

use std::fs::File;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, router};
use crate::config::ServiceConfig;
use crate::delivery::sender::{Lookup, Sender};
use crate::delivery::{self, DeliveryContext};
use crate::domain::clock::now_micros;
use crate::store::Store;

/// Options of a service run that only tests change.
#[derive(Default, Clone)]
pub struct RunOptions {
    /// Replaces the system resolver for delivery destinations.
    pub lookup: Option<Arc<dyn Lookup>>,
}

/// Runs the service on a bound listener until `shutdown` is cancelled.
///
/// On shutdown the API stops taking requests and finishes the ones under
/// way, then the workers finish their attempts and release their leases.
pub async fn run(
    config: ServiceConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
    options: RunOptions,
) -> anyhow::Result<()> {
    let store = Store::open(&config.database_url).await?;
    let _lock = take_over_sqlite(&store, &config).await?;

    let workers_shutdown = CancellationToken::new();
    let (dispatcher, mut workers) = if config.role.runs_workers() {
        let sender = Sender::new(config.destinations, config.request_timeout, options.lookup)?;
        let context = DeliveryContext::new(store.clone(), sender, &config);
        let (dispatcher, tasks) = delivery::start(context, &config, workers_shutdown.clone());
        (Some(dispatcher), tasks)
    } else {
        (None, tokio::task::JoinSet::new())
    };

    let address = listener.local_addr()?;
    tracing::info!(%address, role = ?config.role, "listening");
    if config.role.runs_api() {
        let app = router(AppState::new(store.clone(), config.clone(), dispatcher));
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await
            .context("serving HTTP")?;
    } else {
        drop(listener);
        shutdown.cancelled().await;
    }

    workers_shutdown.cancel();
    while workers.join_next().await.is_some() {}
    tracing::info!("stopped");
    Ok(())
}

/// Makes this process the only `serve` on a SQLite file, then takes back the
/// leases a crashed earlier process left, so its work is sent again at once.
async fn take_over_sqlite(store: &Store, config: &ServiceConfig) -> anyhow::Result<Option<File>> {
    let Some(path) = store.sqlite_path() else {
        return Ok(None);
    };
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
