//! Delivery: lease due work, send it fairly, record every attempt.
//!
//! New deliveries arrive from the API already leased to this process and are
//! sent at once. A poller leases the rest (retries, and work whose holder
//! died) from the store when it falls due. A scheduler task keeps one queue
//! per endpoint, with a cap on requests in flight to each endpoint and on the
//! total, so one slow endpoint only ever waits on itself.

pub mod retry;
pub mod sender;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::ServiceConfig;
use crate::domain::clock::now_micros;
use crate::metrics::{AttemptLabels, OutcomeLabels, metrics, status_class};
use crate::store::{AttemptRecord, Claim, Job, Store, Trigger};
use retry::{next_delay, random_fraction};
use sender::{AttemptOutcome, Sender};

/// Deliveries leased in one claim at most.
const CLAIM_BATCH: usize = 1000;
/// The poller claims more only while fewer jobs than this wait locally.
const LOCAL_BACKLOG: usize = 4000;
/// Jobs kept waiting for one endpoint at most; more are handed back to the store.
const ENDPOINT_BACKLOG: usize = 200;
/// The poller looks for due work at least this often.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// The wait between polls while all due work belongs to full endpoints.
const BUSY_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a lease outlasts the request deadline by default, to record the outcome.
pub const DEFAULT_LEASE_MARGIN: Duration = Duration::from_secs(30);
/// How long a deactivated or deleted endpoint's late-arriving jobs are dropped.
const DISABLED_MEMORY: Duration = Duration::from_secs(300);

/// What the delivery side needs from the service.
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

enum Command {
    Jobs(Vec<Job>),
    Done { webhook_id: Uuid, delivery_id: Uuid },
    WebhookChanged { webhook_id: Uuid, active: bool },
    Status(oneshot::Sender<LocalStatus>),
}

/// What the poller needs to know before claiming more work.
struct LocalStatus {
    backlog: usize,
    full_endpoints: Vec<Uuid>,
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
    pub fn new_lease(&self, now: i64) -> crate::store::Lease {
        crate::store::Lease {
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

/// Starts the scheduler and the poller. They stop when `shutdown` is
/// cancelled; the returned set finishes once in-flight attempts are recorded
/// and the remaining leases are released.
pub fn start(
    context: DeliveryContext,
    config: &ServiceConfig,
    shutdown: CancellationToken,
) -> (Dispatcher, JoinSet<()>) {
    let (commands, receiver) = mpsc::unbounded_channel();
    let dispatcher = Dispatcher {
        commands,
        wake: Arc::new(Notify::new()),
        context: context.clone(),
    };
    let scheduler = Scheduler {
        context,
        dispatcher: dispatcher.clone(),
        endpoint_concurrency: config.endpoint_concurrency.max(1),
        max_in_flight: config.max_in_flight.max(1),
        endpoints: HashMap::new(),
        ready: VecDeque::new(),
        in_flight: 0,
        waiting: 0,
        held: HashSet::new(),
        disabled: HashMap::new(),
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(scheduler.run(receiver, shutdown.clone()));
    tasks.spawn(poll(dispatcher.clone(), shutdown));
    (dispatcher, tasks)
}

#[derive(Default)]
struct EndpointQueue {
    in_flight: usize,
    waiting: VecDeque<Job>,
    in_ready: bool,
}

struct Scheduler {
    context: DeliveryContext,
    dispatcher: Dispatcher,
    endpoint_concurrency: usize,
    max_in_flight: usize,
    endpoints: HashMap<Uuid, EndpointQueue>,
    /// Endpoints with waiting jobs and room in flight, in turn order.
    ready: VecDeque<Uuid>,
    in_flight: usize,
    waiting: usize,
    /// Deliveries queued or in flight here, so a repeated claim is ignored.
    held: HashSet<Uuid>,
    disabled: HashMap<Uuid, Instant>,
}

impl Scheduler {
    async fn run(
        mut self,
        mut receiver: mpsc::UnboundedReceiver<Command>,
        shutdown: CancellationToken,
    ) {
        let mut attempts = JoinSet::new();
        loop {
            tokio::select! {
                command = receiver.recv() => match command {
                    Some(command) => self.handle(command),
                    None => break,
                },
                Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
                () = shutdown.cancelled() => break,
            }
            self.start_ready(&mut attempts);
        }
        self.drain(receiver, attempts).await;
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Jobs(jobs) => self.enqueue(jobs),
            Command::Done {
                webhook_id,
                delivery_id,
            } => {
                self.in_flight -= 1;
                metrics().requests_in_flight.dec();
                self.held.remove(&delivery_id);
                if let Some(queue) = self.endpoints.get_mut(&webhook_id) {
                    queue.in_flight -= 1;
                    if queue.in_flight == 0 && queue.waiting.is_empty() {
                        self.endpoints.remove(&webhook_id);
                    } else {
                        self.mark_ready(webhook_id);
                    }
                }
            }
            Command::WebhookChanged { webhook_id, active } => {
                if active {
                    self.disabled.remove(&webhook_id);
                } else {
                    self.disabled.insert(webhook_id, Instant::now());
                    if let Some(queue) = self.endpoints.get_mut(&webhook_id) {
                        for job in queue.waiting.drain(..) {
                            self.held.remove(&job.delivery_id);
                            self.waiting -= 1;
                        }
                    }
                }
                self.disabled
                    .retain(|_, since| since.elapsed() < DISABLED_MEMORY);
            }
            Command::Status(reply) => {
                let full_endpoints = self
                    .endpoints
                    .iter()
                    .filter(|(_, queue)| queue.waiting.len() >= ENDPOINT_BACKLOG / 2)
                    .map(|(id, _)| *id)
                    .collect();
                let _ = reply.send(LocalStatus {
                    backlog: self.waiting,
                    full_endpoints,
                });
            }
        }
    }

    fn enqueue(&mut self, jobs: Vec<Job>) {
        let mut overflow = Vec::new();
        for job in jobs {
            if self.disabled.contains_key(&job.webhook_id) || !self.held.insert(job.delivery_id) {
                continue;
            }
            let queue = self.endpoints.entry(job.webhook_id).or_default();
            if queue.waiting.len() >= ENDPOINT_BACKLOG {
                self.held.remove(&job.delivery_id);
                overflow.push(job.delivery_id);
                continue;
            }
            let webhook_id = job.webhook_id;
            queue.waiting.push_back(job);
            self.waiting += 1;
            self.mark_ready(webhook_id);
        }
        if !overflow.is_empty() {
            let store = self.context.store.clone();
            let owner = self.context.owner.clone();
            tokio::spawn(async move {
                if let Err(error) = store.release_leases(overflow, owner).await {
                    tracing::error!(%error, "releasing leases of an endpoint's overflow failed");
                }
            });
        }
    }

    fn mark_ready(&mut self, webhook_id: Uuid) {
        if let Some(queue) = self.endpoints.get_mut(&webhook_id)
            && !queue.in_ready
            && !queue.waiting.is_empty()
            && queue.in_flight < self.endpoint_concurrency
        {
            queue.in_ready = true;
            self.ready.push_back(webhook_id);
        }
    }

    fn start_ready(&mut self, attempts: &mut JoinSet<()>) {
        while self.in_flight < self.max_in_flight {
            let Some(webhook_id) = self.ready.pop_front() else {
                break;
            };
            let Some(queue) = self.endpoints.get_mut(&webhook_id) else {
                continue;
            };
            queue.in_ready = false;
            let Some(job) = queue.waiting.pop_front() else {
                continue;
            };
            queue.in_flight += 1;
            self.in_flight += 1;
            metrics().requests_in_flight.inc();
            self.waiting -= 1;
            self.mark_ready(webhook_id);

            let context = self.context.clone();
            let commands = self.dispatcher.commands.clone();
            let wake = self.dispatcher.wake.clone();
            attempts.spawn(async move {
                let (webhook_id, delivery_id) = (job.webhook_id, job.delivery_id);
                run_job(&context, job, &wake).await;
                let _ = commands.send(Command::Done {
                    webhook_id,
                    delivery_id,
                });
            });
        }
    }

    /// Lets in-flight attempts finish and gives back the leases of waiting jobs.
    async fn drain(
        self,
        mut receiver: mpsc::UnboundedReceiver<Command>,
        mut attempts: JoinSet<()>,
    ) {
        receiver.close();
        let mut waiting: Vec<Uuid> = self
            .endpoints
            .values()
            .flat_map(|queue| queue.waiting.iter().map(|job| job.delivery_id))
            .collect();
        while let Ok(command) = receiver.try_recv() {
            if let Command::Jobs(jobs) = command {
                waiting.extend(jobs.iter().map(|job| job.delivery_id));
            }
        }
        let deadline = self.context.request_timeout + Duration::from_secs(5);
        let finished = tokio::time::timeout(deadline, async {
            while attempts.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                remaining = attempts.len(),
                "attempts still running at shutdown"
            );
        }
        if !waiting.is_empty() {
            let count = waiting.len();
            match self
                .context
                .store
                .release_leases(waiting, self.context.owner.clone())
                .await
            {
                Ok(()) => tracing::info!(count, "released leases of queued deliveries"),
                Err(error) => tracing::error!(%error, "releasing leases at shutdown failed"),
            }
        }
    }
}

/// Makes one automatic attempt of a job and records it. After scheduling a
/// retry it wakes the poller, whose sleep may end later than the retry is due.
async fn run_job(context: &DeliveryContext, job: Job, wake: &Notify) {
    let now = now_micros();
    if now + micros(context.request_timeout + Duration::from_secs(5)) > job.lease_until {
        let until = context.lease_until(now);
        match context
            .store
            .renew_lease(job.delivery_id, context.owner.clone(), until)
            .await
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                tracing::error!(%error, delivery.id = %job.delivery_id, "renewing a lease failed");
                return;
            }
        }
    }
    let outcome = context.sender.attempt(&job).await;
    let record = attempt_record(context, &job, &outcome);
    log_outcome(&job, &outcome, &record);
    let retry_scheduled = record.retry_at.is_some();
    match context.store.record_attempt(record).await {
        Ok(()) if retry_scheduled => wake.notify_one(),
        Ok(()) => {}
        // The lease runs out and the delivery is attempted again.
        Err(error) => {
            tracing::error!(%error, delivery.id = %job.delivery_id, "recording an attempt failed");
        }
    }
}

/// Builds the record of an attempt, with the retry decision for automatic ones.
pub fn attempt_record(
    context: &DeliveryContext,
    job: &Job,
    outcome: &AttemptOutcome,
) -> AttemptRecord {
    let succeeded = outcome.succeeded();
    let retry_at = if succeeded || job.trigger != Trigger::Automatic {
        None
    } else {
        next_delay(
            &context.retry_schedule,
            job.auto_attempts + 1,
            outcome.retry_after,
            random_fraction(),
        )
        .map(|delay| now_micros() + micros(delay))
    };
    observe_attempt(job, outcome, succeeded, retry_at.is_none());
    AttemptRecord {
        delivery_id: job.delivery_id,
        trigger: job.trigger,
        owner: (job.trigger == Trigger::Automatic).then(|| context.owner.clone()),
        started_at: outcome.started_at_micros,
        duration_ms: outcome.duration_ms,
        status_code: outcome.status_code,
        error_kind: outcome.error_kind,
        response_body: outcome.response_body.clone(),
        succeeded,
        retry_at,
    }
}

fn observe_attempt(job: &Job, outcome: &AttemptOutcome, succeeded: bool, final_attempt: bool) {
    let metrics = metrics();
    metrics
        .attempts
        .get_or_create(&AttemptLabels {
            status_class: status_class(outcome.status_code),
            error_kind: outcome.error_kind.map_or("none", |kind| kind.as_str()),
            trigger: job.trigger.as_str(),
        })
        .inc();
    metrics
        .attempt_duration
        .observe(outcome.duration_ms as f64 / 1000.0);
    if job.trigger == Trigger::Automatic && final_attempt {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        metrics
            .deliveries_finished
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

fn log_outcome(job: &Job, outcome: &AttemptOutcome, record: &AttemptRecord) {
    let attempt = job.auto_attempts + 1;
    let error_kind = outcome.error_kind.map(|kind| kind.as_str());
    if record.succeeded {
        tracing::debug!(webhook.id = %job.webhook_id, delivery.id = %job.delivery_id, attempt, "delivered");
    } else if record.retry_at.is_some() {
        tracing::warn!(
            webhook.id = %job.webhook_id, delivery.id = %job.delivery_id, attempt,
            status = outcome.status_code, error_kind, "attempt failed; retry scheduled"
        );
    } else {
        tracing::warn!(
            webhook.id = %job.webhook_id, delivery.id = %job.delivery_id, attempt,
            status = outcome.status_code, error_kind, "attempt failed; no retries left"
        );
    }
}

/// Leases due deliveries from the store and hands them to the scheduler.
async fn poll(dispatcher: Dispatcher, shutdown: CancellationToken) {
    let context = dispatcher.context.clone();
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
                skip_webhooks: status.full_endpoints,
            };
            match context.store.claim_due(claim).await {
                Ok(jobs) => {
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
                // that are full here; look again a little later.
                if until_due.is_zero() && claimed_none {
                    BUSY_POLL_INTERVAL
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
