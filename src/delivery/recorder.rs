//! Batched recording of automatic attempts.
//!
//! Attempts that finish while a batch is being written wait and go into the
//! next one, so a busy worker writes many attempts per transaction. Once a
//! batch is stored, the scheduler drops those deliveries from its held set, and the poller
//! is woken when a retry was scheduled.

use std::sync::Arc;

use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use super::scheduler::Command;
use crate::store::{AttemptRecord, Store};

/// Attempts written in one transaction at most.
const MAX_BATCH: usize = 500;

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
        match store.record_attempts(std::mem::take(&mut batch)).await {
            Ok(()) if retry_scheduled => wake.notify_one(),
            Ok(()) => {}
            // The leases run out and the deliveries are attempted again.
            Err(error) => tracing::error!(
                %error,
                count = delivery_ids.len(),
                "recording attempts failed"
            ),
        }
        let _ = commands.send(Command::Recorded(delivery_ids));
    }
}
