//! The poller: leases due deliveries from the store when this process has room.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::Dispatcher;
use super::scheduler::{CLAIM_PER_ENDPOINT, Command, LOCAL_BACKLOG};
use crate::domain::clock::now_micros;
use crate::store::Claim;

/// Deliveries leased in one claim at most.
const CLAIM_BATCH: usize = 1000;
/// The poller looks for due work at least this often.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Leases due deliveries from the store and hands them to the scheduler.
pub(super) async fn poll(dispatcher: Dispatcher, shutdown: CancellationToken) {
    let context = dispatcher.context.clone();
    let mut after_webhook = None;
    loop {
        let (reply, status) = oneshot::channel();
        if dispatcher.commands.send(Command::Status(reply)).is_err() {
            return;
        }
        let Ok(status) = status.await else { return };

        let mut claimed_full = false;
        let mut claimed_none = true;
        if status.backlog < LOCAL_BACKLOG {
            let now = now_micros();
            let limit = CLAIM_BATCH.min(LOCAL_BACKLOG - status.backlog);
            let claim = Claim {
                owner: context.owner.clone(),
                now,
                lease_until: context.lease_until(now),
                limit,
                per_webhook: CLAIM_PER_ENDPOINT,
                skip_webhooks: status.full_endpoints,
                after_webhook,
            };
            match context.store.claim_due(claim).await {
                Ok(jobs) => {
                    if let Some(last) = jobs.last() {
                        after_webhook = Some(last.webhook_id);
                    }
                    claimed_full = jobs.len() == limit;
                    claimed_none = jobs.is_empty();
                    dispatcher.submit(jobs);
                }
                Err(error) => tracing::error!(%error, "claiming due deliveries failed"),
            }
        }
        if claimed_full {
            tokio::task::yield_now().await;
            continue;
        }

        let wait = match context.store.next_due_at().await {
            Ok(Some(due)) => {
                let until_due = Duration::from_micros((due - now_micros()).max(0) as u64);
                // Due work that could not be claimed belongs to endpoints
                // that are full here. The scheduler wakes the poller when one
                // of them has room again, and the recorder when a retry is
                // scheduled, so waiting the full interval delays nothing.
                if until_due.is_zero() && claimed_none {
                    MAX_POLL_INTERVAL
                } else {
                    until_due.min(MAX_POLL_INTERVAL)
                }
            }
            Ok(None) => MAX_POLL_INTERVAL,
            Err(error) => {
                tracing::error!(%error, "reading the next due time failed");
                MAX_POLL_INTERVAL
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {}
            () = dispatcher.wake.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}
