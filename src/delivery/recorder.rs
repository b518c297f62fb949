//! Batched recording of automatic attempts.
//!
//! Attempts that finish while a batch is being written wait and go into the
//! next one, so a busy worker writes many attempts per transaction. A batch
//! that fails is tried again one attempt at a time. Once a batch is stored,
//! the scheduler drops those deliveries from its held set, and the poller
//! is woken when a retry was scheduled.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use super::scheduler::Command;
use crate::store::{AttemptRecord, Store};

/// Attempts written in one transaction at most.
const MAX_BATCH: usize = 500;

/// Tries to record an attempt, the batch's included, before giving up.
const RECORD_TRIES: u32 = 6;

/// The wait before the second try, doubled before each further one. The
/// five waits add up to 3.1 s.
const RECORD_RETRY_WAIT: Duration = Duration::from_millis(100);

/// Sends finished attempts to the recorder.
#[derive(Clone)]
pub struct RecorderHandle {
    sender: mpsc::UnboundedSender<AttemptRecord>,
}

impl RecorderHandle {
    pub fn record(&self, attempt: AttemptRecord) {
        if let Err(error) = self.sender.send(attempt) {
            // Only during shutdown: the lease runs out and the delivery is
            // attempted again by the next holder.
            tracing::error!(delivery.id = %error.0.delivery_id, "the recorder has stopped; attempt not recorded");
        }
    }
}

/// Creates the recorder's handle and the task that writes batches until
/// every handle is dropped.
pub fn start(
    store: Store,
    commands: mpsc::UnboundedSender<Command>,
    wake: Arc<Notify>,
) -> (RecorderHandle, impl Future<Output = ()> + Send + 'static) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let task = run(store, receiver, commands, wake);
    (RecorderHandle { sender }, task)
}

async fn run(
    store: Store,
    mut receiver: mpsc::UnboundedReceiver<AttemptRecord>,
    commands: mpsc::UnboundedSender<Command>,
    wake: Arc<Notify>,
) {
    let mut batch = Vec::new();
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let delivery_ids: Vec<Uuid> = batch.iter().map(|attempt| attempt.delivery_id).collect();
        let retry_scheduled = batch.iter().any(|attempt| attempt.retry_at.is_some());
        record(&store, std::mem::take(&mut batch)).await;
        if retry_scheduled {
            wake.notify_one();
        }
        let _ = commands.send(Command::Recorded(delivery_ids));
    }
}

/// Records a batch. When that fails, each attempt is recorded on its own,
/// so an attempt that the store rejects cannot hold back the others. An
/// attempt is tried up to [`RECORD_TRIES`] times in all, with a growing
/// wait, and skipped once it is found stored: the failed write's commit
/// may have succeeded before its connection was lost.
async fn record(store: &Store, attempts: Vec<AttemptRecord>) {
    let Err(error) = store.record_attempts(attempts.clone()).await else {
        return;
    };
    tracing::warn!(
        %error,
        count = attempts.len(),
        "recording attempts failed; recording them one at a time"
    );
    for attempt in attempts {
        record_alone(store, attempt).await;
    }
}

async fn record_alone(store: &Store, attempt: AttemptRecord) {
    let mut wait = RECORD_RETRY_WAIT;
    for tries in 2..=RECORD_TRIES {
        tokio::time::sleep(wait).await;
        wait *= 2;
        let outcome = match store.unrecorded(vec![attempt.clone()]).await {
            Ok(unrecorded) if unrecorded.is_empty() => return,
            Ok(_) => store.record_attempts(vec![attempt.clone()]).await,
            Err(error) => Err(error),
        };
        let Err(error) = outcome else {
            return;
        };
        if tries == RECORD_TRIES {
            // The lease runs out and the delivery is attempted again.
            tracing::error!(
                %error,
                delivery.id = %attempt.delivery_id,
                tries,
                "recording an attempt failed; giving up"
            );
        }
    }
}
