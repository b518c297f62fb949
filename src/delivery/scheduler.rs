//! The scheduler: one queue per endpoint, a cap on requests in flight to
//! each endpoint and in all, and turns taken between endpoints.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::attempt::{attempt_record, hold_lease, log_outcome};
use super::recorder::RecorderHandle;
use super::{DeliveryContext, Dispatcher};
use crate::metrics::metrics;
use crate::store::{DeliveryKey, Job};

/// The poller claims more only while fewer jobs than this wait here.
pub(super) const LOCAL_BACKLOG: usize = 10_000;
/// Jobs kept waiting for one endpoint at most. More are handed back to the
/// store, and the poller skips the endpoint while half of this waits.
const ENDPOINT_BACKLOG: usize = 1000;
/// Jobs of one endpoint in one claim at most. An endpoint is skipped while
/// this many wait, so a claim never fills its queue past [`ENDPOINT_BACKLOG`].
pub(super) const CLAIM_PER_ENDPOINT: usize = ENDPOINT_BACKLOG / 2;
/// Jobs waiting here in all at most before new ones are handed back.
const MAX_WAITING: usize = 2 * LOCAL_BACKLOG;
/// Attempts finished but not yet stored, at most. When the store falls
/// behind the receivers, no new attempt starts until some are stored, so
/// the outcomes waiting in memory (and the attempts that a crash would make
/// again) stay bounded.
const MAX_UNRECORDED: usize = 4096;
/// How long a deactivated or deleted endpoint's late-arriving jobs are dropped.
const DISABLED_MEMORY: Duration = Duration::from_secs(300);

pub(super) enum Command {
    Jobs(Vec<Job>),
    /// An attempt's response was read: its endpoint has a free slot.
    Sent {
        webhook_id: Uuid,
    },
    /// These deliveries' attempts are stored: they may be claimed again.
    Recorded(Vec<Uuid>),
    WebhookChanged {
        webhook_id: Uuid,
        active: bool,
    },
    Status(oneshot::Sender<LocalStatus>),
}

/// The scheduler's load, which the poller reads before claiming more work.
pub(super) struct LocalStatus {
    pub backlog: usize,
    pub full_endpoints: Vec<Uuid>,
}

#[derive(Default)]
struct EndpointQueue {
    in_flight: usize,
    waiting: VecDeque<Job>,
    in_ready: bool,
}

pub(super) struct Scheduler {
    context: DeliveryContext,
    dispatcher: Dispatcher,
    recorder: RecorderHandle,
    endpoint_concurrency: usize,
    max_in_flight: usize,
    endpoints: HashMap<Uuid, EndpointQueue>,
    /// Endpoints with waiting jobs and room in flight, in turn order.
    ready: VecDeque<Uuid>,
    in_flight: usize,
    waiting: usize,
    /// Deliveries queued, in flight or being recorded here, so a repeated
    /// claim of one of them is ignored.
    held: HashSet<Uuid>,
    disabled: HashMap<Uuid, Instant>,
}

impl Scheduler {
    pub fn new(
        context: DeliveryContext,
        dispatcher: Dispatcher,
        recorder: RecorderHandle,
        endpoint_concurrency: usize,
        max_in_flight: usize,
    ) -> Scheduler {
        Scheduler {
            context,
            dispatcher,
            recorder,
            endpoint_concurrency,
            max_in_flight,
            endpoints: HashMap::new(),
            ready: VecDeque::new(),
            in_flight: 0,
            waiting: 0,
            held: HashSet::new(),
            disabled: HashMap::new(),
        }
    }

    pub async fn run(
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
            Command::Sent { webhook_id } => {
                self.in_flight -= 1;
                metrics().requests_in_flight.dec();
                if let Some(queue) = self.endpoints.get_mut(&webhook_id) {
                    queue.in_flight -= 1;
                    if queue.in_flight == 0 && queue.waiting.is_empty() {
                        self.endpoints.remove(&webhook_id);
                    } else {
                        self.mark_ready(webhook_id);
                    }
                }
            }
            Command::Recorded(delivery_ids) => {
                for id in delivery_ids {
                    self.held.remove(&id);
                }
            }
            Command::WebhookChanged { webhook_id, active } => {
                let dropped: Vec<DeliveryKey> = match self.endpoints.get_mut(&webhook_id) {
                    Some(queue) => queue.waiting.drain(..).map(|job| job.key()).collect(),
                    None => Vec::new(),
                };
                for key in &dropped {
                    self.held.remove(&key.delivery_id);
                }
                self.waiting -= dropped.len();
                if active {
                    self.disabled.remove(&webhook_id);
                    // Queued jobs carry the old URL and secret: hand them
                    // back, so the poller claims them again with the new ones.
                    self.release(dropped);
                } else {
                    // Deactivation cancelled these deliveries in the store.
                    self.disabled.insert(webhook_id, Instant::now());
                }
                self.disabled
                    .retain(|_, since| since.elapsed() < DISABLED_MEMORY);
            }
            Command::Status(reply) => {
                let full_endpoints = self
                    .endpoints
                    .iter()
                    .filter(|(_, queue)| queue.waiting.len() >= CLAIM_PER_ENDPOINT)
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
            if queue.waiting.len() >= ENDPOINT_BACKLOG || self.waiting >= MAX_WAITING {
                self.held.remove(&job.delivery_id);
                overflow.push(job.key());
                continue;
            }
            let webhook_id = job.webhook_id;
            queue.waiting.push_back(job);
            self.waiting += 1;
            self.mark_ready(webhook_id);
        }
        self.release(overflow);
    }

    /// Gives leases back to the store, due at once, so the poller (of this
    /// or another process) claims those deliveries again.
    fn release(&self, deliveries: Vec<DeliveryKey>) {
        if deliveries.is_empty() {
            return;
        }
        let store = self.context.store.clone();
        let owner = self.context.owner.clone();
        tokio::spawn(async move {
            if let Err(error) = store.release_leases(deliveries, owner).await {
                tracing::error!(%error, "releasing leases of queued deliveries failed");
            }
        });
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

    /// Attempts that have finished and wait to be stored: the held
    /// deliveries that are neither waiting nor in flight.
    fn unrecorded(&self) -> usize {
        self.held
            .len()
            .saturating_sub(self.waiting + self.in_flight)
    }

    fn start_ready(&mut self, attempts: &mut JoinSet<()>) {
        while self.in_flight < self.max_in_flight
            && self.in_flight + self.unrecorded() < MAX_UNRECORDED
        {
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
            // The poller skips a full endpoint; tell it when this one has room.
            if queue.waiting.len() + 1 == CLAIM_PER_ENDPOINT {
                self.dispatcher.wake();
            }
            queue.in_flight += 1;
            self.in_flight += 1;
            metrics().requests_in_flight.inc();
            self.waiting -= 1;
            self.mark_ready(webhook_id);

            let context = self.context.clone();
            let commands = self.dispatcher.commands.clone();
            let recorder = self.recorder.clone();
            attempts.spawn(async move {
                let webhook_id = job.webhook_id;
                run_job(&context, job, &recorder, &commands).await;
                let _ = commands.send(Command::Sent { webhook_id });
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
        let mut waiting: Vec<DeliveryKey> = self
            .endpoints
            .values()
            .flat_map(|queue| queue.waiting.iter().map(Job::key))
            .collect();
        while let Ok(command) = receiver.try_recv() {
            if let Command::Jobs(jobs) = command {
                waiting.extend(jobs.iter().map(Job::key));
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

/// Makes one automatic attempt of a job and hands its outcome to the
/// recorder. A job that may not be sent any more is forgotten at once.
async fn run_job(
    context: &DeliveryContext,
    job: Job,
    recorder: &RecorderHandle,
    commands: &mpsc::UnboundedSender<Command>,
) {
    if !hold_lease(context, &job).await {
        let _ = commands.send(Command::Recorded(vec![job.delivery_id]));
        return;
    }
    // Boxed, so the task spawned per attempt stays small: a future is
    // copied into its task, and the request's state is large.
    let outcome = Box::pin(context.sender.attempt(&job)).await;
    let record = attempt_record(context, &job, &outcome);
    log_outcome(&job, &outcome, &record);
    recorder.record(record);
}
