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

/// The number of tries to record an attempt, the batch's try included.
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

/// Records a batch. When that fails, the attempts are tried again in
/// rounds, up to [`RECORD_TRIES`] tries in all, with a growing wait before
/// each round. A round first drops the attempts that are found stored,
/// because the failed write's commit may have succeeded before its
/// connection was lost. Then it records the others one at a time, so an
/// attempt that the store rejects cannot hold back the rest.
async fn record(store: &Store, attempts: Vec<AttemptRecord>) {
    let attempts: Arc<[AttemptRecord]> = attempts.into();
    let Err(mut error) = store.record_attempts(attempts.clone()).await else {
        return;
    };
    tracing::warn!(
        %error,
        count = attempts.len(),
        "recording attempts failed; trying them again one at a time"
    );
    let mut pending = attempts.to_vec();
    let mut wait = RECORD_RETRY_WAIT;
    for _ in 1..RECORD_TRIES {
        tokio::time::sleep(wait).await;
        wait *= 2;
        pending = match store.unrecorded(pending.clone()).await {
            Ok(unrecorded) => unrecorded,
            Err(lookup_error) => {
                error = lookup_error;
                continue;
            }
        };
        let mut failed = Vec::new();
        for attempt in pending {
            if let Err(record_error) = store.record_attempts(Arc::new([attempt.clone()])).await {
                error = record_error;
                failed.push(attempt);
            }
        }
        pending = failed;
        if pending.is_empty() {
            return;
        }
    }
    // The leases run out and the deliveries are attempted again.
    let delivery_ids: Vec<String> = pending
        .iter()
        .map(|attempt| attempt.delivery_id.to_string())
        .collect();
    tracing::error!(
        %error,
        delivery.ids = ?delivery_ids,
        tries = RECORD_TRIES,
        "recording attempts failed; giving up"
    );
}
