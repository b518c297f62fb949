//! Accepting events in batches.
//!
//! Every commit waits for a WAL flush, so a transaction per event caps the
//! accept rate at the server's commit rate. Concurrent `accept_event` calls
//! therefore put their events on a queue, and a task writes everything
//! queued in one transaction with two round trips, whatever the batch size:
//! `BEGIN` with the locking reads, then the inserts with `UNNEST` and
//! `COMMIT`. The statements of a round trip are pipelined. Each caller gets
//! its result after the commit. Up to `max_batches` batches run at once,
//! each on its own pool connection, and a batch that starts while another
//! is being written waits briefly for more events. A batch that fails is
//! written again one event at a time, so an event that the database
//! rejects fails alone.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use deadpool_postgres::{Client, GenericClient, Pool};
use serde_json::{Map, Value};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::{self, Instant};
use tokio_postgres::Statement;
use uuid::Uuid;

use super::pipeline::PipelinedTransaction;
use super::{DUE_CHANNEL, NOTIFY, Params, parse_uuid, pool_client};
use crate::domain::payload::build_payload;
use crate::store::model::v7_micros;
use crate::store::{AcceptedEvent, Job, NewEvent, StoreError, StoreResult};

/// Events written in one transaction at most.
const MAX_BATCH_EVENTS: usize = 256;

/// The maximum number of events that a batch waits for while another batch
/// is being written. It waits for as many as recent batches had, so at a
/// low rate it hardly waits. Without the wait, the first event after a
/// commit makes a batch of its own, which costs the database almost as
/// much as a full one.
const GATHER_EVENTS: usize = 16;

/// The maximum wait for more events. A batch that starts while no other one
/// is being written does not wait.
const GATHER_WAIT: Duration = Duration::from_millis(1);

/// Locks the stored states of the batch's aggregates in the order of the
/// sorted key arrays, the order in which the upsert takes them too, so two
/// batches do not wait for each other's rows in a cycle. A deadlock that
/// PostgreSQL still detects fails the batch, which is then written again
/// one event at a time.
const LOCK_STATES: &str = "SELECT k.position, s.state
     FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[]) WITH ORDINALITY
         AS k (business_id, entity, aggregate_id, position)
     JOIN aggregate_states s USING (business_id, entity, aggregate_id)
     ORDER BY k.position
     FOR UPDATE OF s";

/// Selects the active subscribers of each (business, event name) pair.
/// FOR SHARE makes a concurrent deactivation or deletion of a subscriber wait
/// for this commit, so it cancels or deletes the deliveries added here.
const SELECT_SUBSCRIBERS: &str = "SELECT t.position, w.id, w.url, w.secret
     FROM UNNEST($1::TEXT[], $2::TEXT[]) WITH ORDINALITY AS t (business_id, event, position)
     JOIN webhooks w ON w.business_id = t.business_id
     WHERE w.is_active AND t.event = ANY(string_to_array(w.events, ','))
     ORDER BY t.position, w.created_at, w.id
     FOR SHARE OF w";

const INSERT_EVENTS: &str =
    "INSERT INTO events (id, business_id, event, aggregate_id, payload, created_at)
     SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BYTEA[],
         $6::BIGINT[])";

/// Each key occurs at most once, because an `ON CONFLICT DO UPDATE`
/// statement cannot change one row twice.
const UPSERT_STATES: &str =
    "INSERT INTO aggregate_states (business_id, entity, aggregate_id, state, updated_at)
     SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[])
     ON CONFLICT (business_id, entity, aggregate_id)
     DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at";

const DELETE_STATES: &str = "DELETE FROM aggregate_states s
     USING UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[]) AS k (business_id, entity, aggregate_id)
     WHERE s.business_id = k.business_id AND s.entity = k.entity
         AND s.aggregate_id = k.aggregate_id";

/// A delivery's `created_at` is the time in its v7 id (see migration 3), and
/// its first attempt is due when its event was accepted.
const INSERT_DELIVERIES: &str = "INSERT INTO deliveries (id, webhook_id, event_id, event,
         aggregate_id, status, created_at, next_attempt_at, due_at, leased_by)
     SELECT d.id, d.webhook_id, d.event_id, d.event, d.aggregate_id, 'pending', d.created_at,
         d.accepted_at, d.due_at, d.leased_by
     FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::BIGINT[],
         $7::BIGINT[], $8::TEXT[], $9::BIGINT[])
         AS d (id, webhook_id, event_id, event, aggregate_id, created_at, due_at, leased_by,
             accepted_at)";

/// The sending side of the queue of events waiting for a batch.
#[derive(Clone)]
pub(super) struct AcceptQueue {
    sender: mpsc::UnboundedSender<PendingEvent>,
}

struct PendingEvent {
    event: NewEvent,
    reply: oneshot::Sender<StoreResult<AcceptedEvent>>,
}

impl AcceptQueue {
    /// Starts the task that writes queued events in batches of up to
    /// [`MAX_BATCH_EVENTS`], with at most `max_batches` transactions open at
    /// once. The task stops when every clone of the queue is dropped.
    pub(super) fn start(pool: Pool, max_batches: usize) -> AcceptQueue {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, receiver, max_batches.max(1)));
        AcceptQueue { sender }
    }

    /// Queues an event and waits until its batch has committed or failed.
    pub(super) async fn accept(&self, event: NewEvent) -> StoreResult<AcceptedEvent> {
        let (reply, outcome) = oneshot::channel();
        self.sender
            .send(PendingEvent { event, reply })
            .map_err(|_| writer_stopped())?;
        outcome.await.map_err(|_| writer_stopped())?
    }
}

fn writer_stopped() -> StoreError {
    StoreError::Backend(anyhow::anyhow!(
        "the PostgreSQL event writer stopped before the event was written"
    ))
}

async fn run(pool: Pool, mut receiver: mpsc::UnboundedReceiver<PendingEvent>, max_batches: usize) {
    let permits = Arc::new(Semaphore::new(max_batches));
    let mut pending = Vec::new();
    // The size of recent batches: the last one's, or three quarters of the
    // estimate before it if that is larger, so one small batch under load
    // does not make the next ones small too.
    let mut recent_size = 0;
    loop {
        // Taking the permit before the events lets events queue up while
        // every batch is busy, so the next batch takes all of them.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        if receiver.recv_many(&mut pending, MAX_BATCH_EVENTS).await == 0 {
            break;
        }
        let others_writing = max_batches - permits.available_permits() > 1;
        if others_writing {
            gather(&mut receiver, &mut pending, recent_size.min(GATHER_EVENTS)).await;
        }
        recent_size = pending.len().max(recent_size * 3 / 4);
        let batch = std::mem::take(&mut pending);
        let pool = pool.clone();
        tokio::spawn(async move {
            write_and_reply(&pool, batch).await;
            drop(permit);
        });
    }
}

/// Adds events to a batch until it has `target` events or [`GATHER_WAIT`]
/// has passed.
async fn gather(
    receiver: &mut mpsc::UnboundedReceiver<PendingEvent>,
    batch: &mut Vec<PendingEvent>,
    target: usize,
) {
    let deadline = Instant::now() + GATHER_WAIT;
    while batch.len() < target {
        let room = MAX_BATCH_EVENTS - batch.len();
        match time::timeout_at(deadline, receiver.recv_many(batch, room)).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Writes a batch and sends each caller its event's result. A caller that
/// stopped waiting gets nothing, but its event is still written.
///
/// A batch that fails is written again one event at a time, a batch of
/// one event included. When an event fails again, it may still have been
/// committed by the first write, whose `COMMIT` can succeed on the server
/// while its reply is lost with the connection. Its caller then gets the
/// stored event, not the error.
async fn write_and_reply(pool: &Pool, batch: Vec<PendingEvent>) {
    let (events, replies): (Vec<NewEvent>, Vec<_>) = batch
        .into_iter()
        .map(|pending| (pending.event, pending.reply))
        .unzip();
    let error = match write_batch(pool, &events).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
            return;
        }
        Err(error) => error,
    };
    tracing::warn!(
        %error,
        events = events.len(),
        "writing a batch of events failed; writing them one at a time"
    );
    for (event, reply) in events.iter().zip(replies) {
        let outcome = match write_batch(pool, std::slice::from_ref(event)).await {
            Ok(mut outcomes) => outcomes.pop().expect("one outcome per event"),
            Err(error) => match find_committed(pool, event).await {
                Ok(Some(accepted)) => Ok(accepted),
                Ok(None) => Err(error),
                Err(lookup_error) => {
                    tracing::warn!(
                        error = %lookup_error,
                        event.id = %event.id,
                        "looking up an event after a failed write failed"
                    );
                    Err(error)
                }
            },
        };
        let _ = reply.send(outcome);
    }
}

/// Finds `event` stored with its id, business, aggregate and acceptance
/// time, and returns it with the deliveries that are still leased to its
/// lease's owner (all of its deliveries without a lease).
async fn find_committed(pool: &Pool, event: &NewEvent) -> StoreResult<Option<AcceptedEvent>> {
    let client = pool_client(pool).await?;
    let rows = client
        .query(
            "SELECT e.payload, d.id, d.webhook_id, d.due_at, d.leased_by, w.url, w.secret
             FROM events e
             LEFT JOIN (deliveries d JOIN webhooks w ON w.id = d.webhook_id)
                 ON d.event_id = e.id
             WHERE e.id = $1 AND e.business_id = $2 AND e.aggregate_id = $3
                 AND e.created_at = $4
             ORDER BY w.created_at, w.id",
            &[
                &event.id.to_string(),
                &event.business_id.to_string(),
                &event.aggregate_id.to_string(),
                &event.accepted_at,
            ],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let payload = Bytes::from(first.try_get::<_, Vec<u8>>(0)?);
    let mut jobs = Vec::new();
    for row in &rows {
        let Some(delivery_id) = row.try_get::<_, Option<&str>>(1)? else {
            continue;
        };
        let Some(lease_until) = row.try_get::<_, Option<i64>>(3)? else {
            continue;
        };
        let leased_by: Option<&str> = row.try_get(4)?;
        if leased_by != event.delivery_schedule().1 {
            continue;
        }
        jobs.push(event.first_job(
            parse_uuid(delivery_id)?,
            parse_uuid(row.try_get(2)?)?,
            row.try_get(5)?,
            row.try_get(6)?,
            payload.clone(),
            lease_until,
        ));
    }
    Ok(Some(AcceptedEvent {
        event_id: event.id,
        jobs,
    }))
}

/// The sorted distinct values of a batch, and the index of each event's value.
struct Distinct<T> {
    values: Vec<T>,
    of_event: Vec<usize>,
}

impl<T: Ord + Clone> Distinct<T> {
    fn new(per_event: Vec<T>) -> Distinct<T> {
        let mut values = per_event.clone();
        values.sort_unstable();
        values.dedup();
        let of_event = per_event
            .iter()
            .map(|value| values.binary_search(value).expect("every value is listed"))
            .collect();
        Distinct { values, of_event }
    }
}

/// A `(business id, entity, aggregate id)` key of `aggregate_states`.
type StateKey = (String, &'static str, String);

struct Subscriber {
    id: Uuid,
    url: String,
    secret: String,
}

/// Writes a batch in one transaction. An event that cannot be accepted on
/// its own, such as an update without a stored state, gets its error in the
/// returned list and changes nothing. An error of the whole batch means that
/// nothing was committed, unless the `COMMIT` itself failed, when the outcome
/// is unknown. Writing such a batch again is still safe, because an event
/// whose row was committed then fails on its primary key.
async fn write_batch(
    pool: &Pool,
    events: &[NewEvent],
) -> StoreResult<Vec<StoreResult<AcceptedEvent>>> {
    let keys = Distinct::new(
        events
            .iter()
            .map(|event| {
                (
                    event.business_id.to_string(),
                    event.event.entity.name,
                    event.aggregate_id.to_string(),
                )
            })
            .collect::<Vec<StateKey>>(),
    );
    let topics = Distinct::new(
        events
            .iter()
            .map(|event| (event.business_id.to_string(), event.event.name))
            .collect(),
    );
    // Stored states are read only for updates without `previous`. Deletions
    // lock them too, because their DELETE cannot take rows in key order.
    let lock_states = events
        .iter()
        .any(|event| event.payload.is_none() || event.event.is_deletion());

    let client = pool_client(pool).await?;
    let statements = Statements::prepare(&client).await?;
    let transaction = PipelinedTransaction::new(client);
    // Pipelined in this order, so the first error is the cause and any
    // later one only reports the aborted transaction.
    let (begun, stored, subscribers) = tokio::join!(
        biased;
        transaction.begin(),
        async {
            if lock_states {
                select_states(transaction.client(), &statements.lock_states, &keys.values)
                    .await
                    .map(Some)
            } else {
                Ok(None)
            }
        },
        select_subscribers(
            transaction.client(),
            &statements.select_subscribers,
            &topics.values
        ),
    );
    let (stored, subscribers) = match begun
        .and(stored)
        .and_then(|stored| Ok((stored, subscribers?)))
    {
        Ok(read) => read,
        Err(error) => {
            transaction.rollback().await;
            return Err(error);
        }
    };

    let mut rows = BatchRows::default();
    let mut outcomes = Vec::with_capacity(events.len());
    // The state of each key as the events so far leave it. Without
    // `lock_states` nothing reads it before an event of the batch sets it.
    let mut states = stored.unwrap_or_else(|| vec![None; keys.values.len()]);
    let mut state_changed_at: Vec<Option<i64>> = vec![None; keys.values.len()];
    for (index, event) in events.iter().enumerate() {
        let key = keys.of_event[index];
        let outcome = plan_event(
            event,
            &mut states[key],
            &subscribers[topics.of_event[index]],
            &mut rows,
        );
        if outcome.is_ok() {
            state_changed_at[key] = Some(event.accepted_at);
        }
        outcomes.push(outcome);
    }
    for (key, changed_at) in state_changed_at.iter().enumerate() {
        if let Some(changed_at) = changed_at {
            rows.push_state(&keys.values[key], states[key].take(), *changed_at);
        }
    }

    transaction
        .commit_after(write_rows(transaction.client(), &statements, &rows))
        .await?;
    Ok(outcomes)
}

/// Reads and locks the stored states of `keys`, which must be sorted.
/// Returns each key's state, or `None` where no state is stored.
async fn select_states(
    client: &Client,
    statement: &Statement,
    keys: &[StateKey],
) -> StoreResult<Vec<Option<String>>> {
    let businesses: Vec<&str> = keys.iter().map(|key| key.0.as_str()).collect();
    let entities: Vec<&str> = keys.iter().map(|key| key.1).collect();
    let aggregates: Vec<&str> = keys.iter().map(|key| key.2.as_str()).collect();
    let rows = client
        .query(statement, &[&businesses, &entities, &aggregates])
        .await?;
    let mut states = vec![None; keys.len()];
    for row in rows {
        let position: i64 = row.try_get(0)?;
        states[position as usize - 1] = Some(row.try_get(1)?);
    }
    Ok(states)
}

/// Returns the active subscribers of each `(business id, event name)` pair,
/// oldest first.
async fn select_subscribers(
    client: &Client,
    statement: &Statement,
    topics: &[(String, &'static str)],
) -> StoreResult<Vec<Vec<Subscriber>>> {
    let businesses: Vec<&str> = topics.iter().map(|topic| topic.0.as_str()).collect();
    let names: Vec<&str> = topics.iter().map(|topic| topic.1).collect();
    let rows = client.query(statement, &[&businesses, &names]).await?;
    let mut subscribers: Vec<Vec<Subscriber>> = topics.iter().map(|_| Vec::new()).collect();
    for row in rows {
        let position: i64 = row.try_get(0)?;
        subscribers[position as usize - 1].push(Subscriber {
            id: parse_uuid(row.try_get(1)?)?,
            url: row.try_get(2)?,
            secret: row.try_get(3)?,
        });
    }
    Ok(subscribers)
}

/// Builds an event's payload, rows and jobs, and applies it to `state`, its
/// aggregate's current state. An event that fails leaves `state` and `rows`
/// as they were.
fn plan_event(
    event: &NewEvent,
    state: &mut Option<String>,
    subscribers: &[Subscriber],
    rows: &mut BatchRows,
) -> StoreResult<AcceptedEvent> {
    let payload = match &event.payload {
        Some(payload) => Bytes::copy_from_slice(payload),
        None => {
            let stored = state
                .as_deref()
                .ok_or(StoreError::NoPreviousState(event.aggregate_id))?;
            let previous: Map<String, Value> =
                serde_json::from_str(stored).context("decoding a stored aggregate state")?;
            Bytes::from(build_payload(
                event.event,
                event.aggregate_id,
                &event.occurred_on,
                &event.data,
                Some(&previous),
            ))
        }
    };
    let new_state = if event.event.is_deletion() {
        None
    } else {
        Some(serde_json::to_string(&event.data).context("encoding an aggregate state")?)
    };
    *state = new_state;

    let (due_at, leased_by) = event.delivery_schedule();
    let jobs: Vec<Job> = subscribers
        .iter()
        .map(|subscriber| {
            event.first_job(
                Uuid::now_v7(),
                subscriber.id,
                subscriber.url.clone(),
                subscriber.secret.clone(),
                payload.clone(),
                due_at,
            )
        })
        .collect();
    rows.push_event(event, payload, &jobs, due_at, leased_by);
    Ok(AcceptedEvent {
        event_id: event.id,
        jobs,
    })
}

/// The columns of the rows that a batch inserts, updates and deletes.
#[derive(Default)]
struct BatchRows<'a> {
    event_ids: Vec<String>,
    event_businesses: Vec<String>,
    event_names: Vec<&'static str>,
    event_aggregates: Vec<String>,
    event_payloads: Vec<Bytes>,
    event_created_at: Vec<i64>,

    state_businesses: Vec<&'a str>,
    state_entities: Vec<&'static str>,
    state_aggregates: Vec<&'a str>,
    states: Vec<String>,
    state_updated_at: Vec<i64>,

    deleted_businesses: Vec<&'a str>,
    deleted_entities: Vec<&'static str>,
    deleted_aggregates: Vec<&'a str>,

    delivery_ids: Vec<String>,
    delivery_webhooks: Vec<String>,
    delivery_events: Vec<String>,
    delivery_names: Vec<&'static str>,
    delivery_aggregates: Vec<String>,
    delivery_created_at: Vec<i64>,
    delivery_accepted_at: Vec<i64>,
    delivery_due_at: Vec<i64>,
    delivery_leased_by: Vec<Option<String>>,
}

impl<'a> BatchRows<'a> {
    fn push_event(
        &mut self,
        event: &NewEvent,
        payload: Bytes,
        jobs: &[Job],
        due_at: i64,
        leased_by: Option<&str>,
    ) {
        let event_id = event.id.to_string();
        let aggregate = event.aggregate_id.to_string();
        for job in jobs {
            self.delivery_ids.push(job.delivery_id.to_string());
            self.delivery_webhooks.push(job.webhook_id.to_string());
            self.delivery_events.push(event_id.clone());
            self.delivery_names.push(event.event.name);
            self.delivery_aggregates.push(aggregate.clone());
            self.delivery_created_at.push(v7_micros(job.delivery_id));
            self.delivery_accepted_at.push(event.accepted_at);
            self.delivery_due_at.push(due_at);
            self.delivery_leased_by.push(leased_by.map(str::to_owned));
        }
        self.event_ids.push(event_id);
        self.event_businesses.push(event.business_id.to_string());
        self.event_names.push(event.event.name);
        self.event_aggregates.push(aggregate);
        self.event_payloads.push(payload);
        self.event_created_at.push(event.accepted_at);
    }

    /// Adds the final state of a key: stored when `state` is set, deleted
    /// otherwise.
    fn push_state(&mut self, key: &'a StateKey, state: Option<String>, changed_at: i64) {
        match state {
            Some(state) => {
                self.state_businesses.push(&key.0);
                self.state_entities.push(key.1);
                self.state_aggregates.push(&key.2);
                self.states.push(state);
                self.state_updated_at.push(changed_at);
            }
            None => {
                self.deleted_businesses.push(&key.0);
                self.deleted_entities.push(key.1);
                self.deleted_aggregates.push(&key.2);
            }
        }
    }
}

/// The statements of a batch, prepared before its transaction begins, so
/// that each one is sent in its round trip.
struct Statements {
    lock_states: Statement,
    select_subscribers: Statement,
    insert_events: Statement,
    upsert_states: Statement,
    delete_states: Statement,
    insert_deliveries: Statement,
    notify: Statement,
}

impl Statements {
    /// Takes the statements from the connection's cache, preparing those
    /// that are not in it yet.
    async fn prepare(client: &Client) -> StoreResult<Statements> {
        let (
            lock_states,
            select_subscribers,
            insert_events,
            upsert_states,
            delete_states,
            insert_deliveries,
            notify,
        ) = tokio::try_join!(
            client.prepare_cached(LOCK_STATES),
            client.prepare_cached(SELECT_SUBSCRIBERS),
            client.prepare_cached(INSERT_EVENTS),
            client.prepare_cached(UPSERT_STATES),
            client.prepare_cached(DELETE_STATES),
            client.prepare_cached(INSERT_DELIVERIES),
            client.prepare_cached(NOTIFY),
        )?;
        Ok(Statements {
            lock_states,
            select_subscribers,
            insert_events,
            upsert_states,
            delete_states,
            insert_deliveries,
            notify,
        })
    }
}

/// Sends a batch's writes as one pipeline, in statement order, and returns
/// the first error. Unleased deliveries wake the workers of every instance
/// with a notification on [`DUE_CHANNEL`].
async fn write_rows(
    client: &Client,
    statements: &Statements,
    rows: &BatchRows<'_>,
) -> StoreResult<()> {
    if rows.event_ids.is_empty() {
        return Ok(());
    }
    let payloads: Vec<&[u8]> = rows.event_payloads.iter().map(Bytes::as_ref).collect();
    let wake_workers = rows.delivery_leased_by.iter().any(Option::is_none);
    let outcomes = tokio::join!(
        biased;
        async {
            let params: Params = &[
                &rows.event_ids,
                &rows.event_businesses,
                &rows.event_names,
                &rows.event_aggregates,
                &payloads,
                &rows.event_created_at,
            ];
            client.execute(&statements.insert_events, params).await
        },
        async {
            if rows.states.is_empty() {
                return Ok(0);
            }
            let params: Params = &[
                &rows.state_businesses,
                &rows.state_entities,
                &rows.state_aggregates,
                &rows.states,
                &rows.state_updated_at,
            ];
            client.execute(&statements.upsert_states, params).await
        },
        async {
            if rows.deleted_businesses.is_empty() {
                return Ok(0);
            }
            let params: Params = &[
                &rows.deleted_businesses,
                &rows.deleted_entities,
                &rows.deleted_aggregates,
            ];
            client.execute(&statements.delete_states, params).await
        },
        async {
            if rows.delivery_ids.is_empty() {
                return Ok(0);
            }
            let params: Params = &[
                &rows.delivery_ids,
                &rows.delivery_webhooks,
                &rows.delivery_events,
                &rows.delivery_names,
                &rows.delivery_aggregates,
                &rows.delivery_created_at,
                &rows.delivery_due_at,
                &rows.delivery_leased_by,
                &rows.delivery_accepted_at,
            ];
            client.execute(&statements.insert_deliveries, params).await
        },
        async {
            if !wake_workers {
                return Ok(0);
            }
            client.execute(&statements.notify, &[&DUE_CHANNEL, &""]).await
        },
    );
    outcomes.0?;
    outcomes.1?;
    outcomes.2?;
    outcomes.3?;
    outcomes.4?;
    Ok(())
}
