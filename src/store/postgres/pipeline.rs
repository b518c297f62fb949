//! Transactions whose `BEGIN` and `COMMIT` share round trips with their
//! statements.
//!
//! tokio-postgres's own transactions wait for `BEGIN` and for `COMMIT` in
//! round trips of their own. Here `BEGIN` goes out in front of the first
//! statements and `COMMIT` right behind the last ones, so a transaction
//! that reads and then writes takes two round trips instead of four.
//!
//! PostgreSQL runs a connection's statements in the order they were sent.
//! After an error it rejects the transaction's later statements, and the
//! `COMMIT` behind them only rolls back. So the transaction committed
//! exactly when every statement and the `COMMIT` succeeded.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::{Client, GenericClient};
use tokio_postgres::{Row, Statement};

use super::Params;
use crate::store::StoreResult;

/// A pool connection inside a transaction.
///
/// A transaction dropped before it ended closes its connection instead of
/// handing it back to the pool, and PostgreSQL rolls the transaction back.
/// The next user of the pool never finds a transaction left open.
pub(super) struct PipelinedTransaction {
    client: Option<Client>,
    ended: AtomicBool,
}

impl PipelinedTransaction {
    pub(super) fn new(client: Client) -> PipelinedTransaction {
        PipelinedTransaction {
            client: Some(client),
            ended: AtomicBool::new(false),
        }
    }

    pub(super) fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("the connection is held until the transaction is dropped")
    }

    /// Sends `BEGIN`. Joined with `biased` in front of the first
    /// statements, it goes out in their round trip.
    pub(super) async fn begin(&self) -> StoreResult<()> {
        self.client().batch_execute("BEGIN").await?;
        Ok(())
    }

    /// Sends `BEGIN`, the `SET LOCAL` statements in `settings` and the
    /// transaction's first statement in one round trip, and returns the
    /// statement's rows. The first error is the cause, because PostgreSQL
    /// rejects every later statement of a failed transaction.
    pub(super) async fn begin_and_query(
        &self,
        settings: &str,
        statement: &Statement,
        params: Params<'_>,
    ) -> StoreResult<Vec<Row>> {
        let (begun, set, rows) = tokio::join!(
            biased;
            self.begin(),
            self.client().batch_execute(settings),
            self.client().query(statement, params),
        );
        begun?;
        set?;
        Ok(rows?)
    }

    /// Sends `COMMIT` right behind the statements of `writes` and waits for
    /// both. The transaction has ended when this returns, committed if the
    /// result is `Ok`.
    ///
    /// `writes` must send all its statements when it is first polled, so
    /// that they go out before `COMMIT`. Statements that are already
    /// prepared, or found in the connection's statement cache, are sent
    /// then. One that has to be prepared first would follow the `COMMIT`
    /// and run outside the transaction, so callers prepare their statements
    /// before they begin.
    pub(super) async fn commit_after<T>(
        &self,
        writes: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let (written, committed) =
            tokio::join!(biased; writes, self.client().batch_execute("COMMIT"));
        // A reply to `COMMIT`, an error included, ends the transaction. A
        // broken connection is discarded by the pool.
        self.ended.store(true, Ordering::Relaxed);
        let value = written?;
        committed?;
        Ok(value)
    }

    /// Rolls back, after a statement failed before the writes were sent.
    pub(super) async fn rollback(&self) {
        if self.client().batch_execute("ROLLBACK").await.is_ok() {
            self.ended.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for PipelinedTransaction {
    fn drop(&mut self) {
        if !self.ended.load(Ordering::Relaxed)
            && let Some(client) = self.client.take()
        {
            // Detached from the pool, the connection closes when dropped.
            drop(Client::take(client));
        }
    }
}
