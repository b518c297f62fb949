//! Delivery: lease due work, send it fairly, record every attempt.
//!
//! New deliveries arrive from the API already leased to this process and are
//! sent at once. A poller leases the rest (retries, and work whose holder
//! died) from the store when it falls due. A scheduler task keeps one queue
//! per endpoint, with a cap on requests in flight to each endpoint and on the
//! total, so one slow endpoint only ever waits on itself. A recorder writes
//! finished attempts in batches, so a request slot is free again as soon as
//! its response is read.

mod attempt;
mod poller;
mod recorder;
pub mod retry;
mod scheduler;
pub mod sender;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use attempt::attempt_record;

use crate::config::ServiceConfig;
use crate::store::{Job, Lease, Store};
use scheduler::{Command, Scheduler};
use sender::Sender;

/// How long a lease outlasts the request deadline by default, to record the outcome.
pub const DEFAULT_LEASE_MARGIN: Duration = Duration::from_secs(30);

/// The shared state of the delivery workers.
#[derive(Clone)]
pub struct DeliveryContext {
    pub store: Store,
    pub sender: Sender,
    pub retry_schedule: Arc<Vec<Duration>>,
    pub request_timeout: Duration,
    /// How long a lease outlasts the request deadline.
    pub lease_margin: Duration,
    /// This process's name on leases.
    pub owner: String,
}

impl DeliveryContext {
    pub fn new(store: Store, sender: Sender, config: &ServiceConfig) -> DeliveryContext {
        DeliveryContext {
            store,
            sender,
            retry_schedule: Arc::new(config.retry_schedule.clone()),
            request_timeout: config.request_timeout,
            lease_margin: config.lease_margin,
            owner: format!("worker-{}", Uuid::new_v4()),
        }
    }

    /// Returns when a lease taken now should end.
    pub fn lease_until(&self, now: i64) -> i64 {
        now + micros(self.request_timeout + self.lease_margin)
    }
}

fn micros(duration: Duration) -> i64 {
    duration.as_micros() as i64
}

/// The handle that the API and the poller use to hand work to the scheduler.
#[derive(Clone)]
pub struct Dispatcher {
    commands: mpsc::UnboundedSender<Command>,
    wake: Arc<Notify>,
    context: DeliveryContext,
}

impl Dispatcher {
    /// Returns the lease that new deliveries of this process start with.
    pub fn new_lease(&self, now: i64) -> Lease {
        Lease {
            owner: self.context.owner.clone(),
            until: self.context.lease_until(now),
        }
    }

    /// Queues jobs that this process already holds the lease of.
    pub fn submit(&self, jobs: Vec<Job>) {
        if !jobs.is_empty() {
            let _ = self.commands.send(Command::Jobs(jobs));
        }
    }

    /// Tells the scheduler that a webhook was changed, deactivated or deleted,
    /// so queued jobs of an inactive endpoint are dropped without an attempt.
    pub fn webhook_changed(&self, webhook_id: Uuid, active: bool) {
        let _ = self
            .commands
            .send(Command::WebhookChanged { webhook_id, active });
    }

    /// Tells whether the scheduler still takes work.
    pub fn is_running(&self) -> bool {
        !self.commands.is_closed()
    }

    /// Wakes the poller, for work that became due early.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Starts the scheduler, the poller and the recorder. They stop when
/// `shutdown` is cancelled; the returned set finishes once in-flight
/// attempts are recorded and the remaining leases are released.
pub fn start(
    context: DeliveryContext,
    config: &ServiceConfig,
    shutdown: CancellationToken,
) -> (Dispatcher, JoinSet<()>) {
    let (commands, receiver) = mpsc::unbounded_channel();
    let wake = Arc::new(Notify::new());
    let dispatcher = Dispatcher {
        commands: commands.clone(),
        wake: wake.clone(),
        context: context.clone(),
    };
    let (recorder, recorder_task) = recorder::start(context.store.clone(), commands, wake.clone());
    let scheduler = Scheduler::new(
        context,
        dispatcher.clone(),
        recorder,
        config.endpoint_concurrency.max(1),
        config.max_in_flight.max(1),
    );
    let mut tasks = JoinSet::new();
    tasks.spawn(scheduler.run(receiver, shutdown.clone()));
    tasks.spawn(poller::poll(dispatcher.clone(), shutdown));
    tasks.spawn(recorder_task);
    (dispatcher, tasks)
}
