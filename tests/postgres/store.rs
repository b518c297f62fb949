//! The PostgreSQL store's operations, called directly on a fresh schema.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use citapro_webhooks::domain::catalogue::find_event;
use citapro_webhooks::domain::clock::now_micros;
use citapro_webhooks::domain::payload::build_payload;
use citapro_webhooks::store::{
    AcceptedEvent, AttemptRecord, Claim, DeliveryQuery, ErrorKind, Job, Lease, NewEvent, Recovery,
    RecoveryOutcome, Store, StoreError, StoreSignal, Trigger, Webhook, WebhookChange,
};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::support::{TestSchema, wait_for};

async fn open(schema: &TestSchema) -> Store {
    Store::open(&schema.url)
        .await
        .unwrap_or_else(|error| panic!("opening schema {}: {error:#}", schema.name))
}

fn new_webhook(business: Uuid, events: &[&str], is_active: bool) -> Webhook {
    let now = now_micros();
    Webhook {
        id: Uuid::now_v7(),
        business_id: business,
        url: "http://127.0.0.1:9/hooks".to_owned(),
        events: events.iter().map(|name| (*name).to_owned()).collect(),
        is_active,
        secret: "a".repeat(64),
        created_at: now,
        updated_at: now,
    }
}

async fn add_webhook(store: &Store, business: Uuid, events: &[&str], is_active: bool) -> Webhook {
    let webhook = new_webhook(business, events, is_active);
    store
        .create_webhook(webhook.clone(), 100)
        .await
        .expect("creating a webhook");
    webhook
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("expected a JSON object, got {other}"),
    }
}

/// An event whose payload is built here; `stored_previous` leaves the
/// payload to the store, which builds it from the aggregate's stored state.
struct EventSpec {
    name: &'static str,
    business: Uuid,
    aggregate: Uuid,
    data: Value,
    stored_previous: bool,
    accepted_at: i64,
    lease: Option<Lease>,
}

impl EventSpec {
    fn created(business: Uuid) -> EventSpec {
        EventSpec {
            name: "booking.created",
            business,
            aggregate: Uuid::new_v4(),
            data: json!({ "status": "confirmed", "amount": 75.0 }),
            stored_previous: false,
            accepted_at: now_micros(),
            lease: None,
        }
    }

    fn build(self) -> NewEvent {
        let event = find_event(self.name).expect("a documented event");
        let data = object(self.data);
        let occurred_on = "2026-03-05 14:30:00".to_owned();
        let payload = (!self.stored_previous)
            .then(|| build_payload(event, self.aggregate, &occurred_on, &data, None));
        NewEvent {
            id: Uuid::now_v7(),
            business_id: self.business,
            event,
            aggregate_id: self.aggregate,
            occurred_on,
            data,
            payload,
            accepted_at: self.accepted_at,
            lease: self.lease,
        }
    }
}

fn claim(owner: &str, now: i64, lease_until: i64, limit: usize) -> Claim {
    Claim {
        owner: owner.to_owned(),
        now,
        lease_until,
        limit,
        per_webhook: limit,
        skip_webhooks: Vec::new(),
        after_webhook: None,
    }
}

/// Accepts a `booking.created` event for the business's one webhook and
/// claims its delivery for `worker-a`, leased for a minute. Returns the job
/// and the time of the claim.
async fn accept_and_claim(store: &Store, business: Uuid) -> (Job, i64) {
    store
        .accept_event(EventSpec::created(business).build())
        .await
        .expect("accepting");
    let now = now_micros();
    let mut jobs = store
        .claim_due(claim("worker-a", now, now + 60_000_000, 10))
        .await
        .expect("claiming");
    assert_eq!(jobs.len(), 1, "one due delivery");
    (jobs.pop().expect("one due delivery"), now)
}

fn failed_attempt(job: &Job, owner: &str, retry_at: Option<i64>) -> AttemptRecord {
    AttemptRecord {
        delivery_id: job.delivery_id,
        webhook_id: job.webhook_id,
        trigger: Trigger::Automatic,
        owner: Some(owner.to_owned()),
        started_at: now_micros(),
        duration_ms: 12,
        status_code: Some(503),
        error_kind: Some(ErrorKind::HttpStatus),
        response_body: Some("unavailable".to_owned()),
        succeeded: false,
        retry_at,
    }
}

fn succeeded_attempt(job: &Job, owner: &str) -> AttemptRecord {
    AttemptRecord {
        status_code: Some(204),
        error_kind: None,
        response_body: Some(String::new()),
        succeeded: true,
        retry_at: None,
        ..failed_attempt(job, owner, None)
    }
}

/// Reads `(status, due_at, leased_by)` of a delivery straight from the table.
async fn schedule(schema: &TestSchema, delivery_id: Uuid) -> (String, Option<i64>, Option<String>) {
    let row = schema
        .client()
        .await
        .query_one(
            "SELECT status, due_at, leased_by FROM deliveries WHERE id = $1",
            &[&delivery_id.to_string()],
        )
        .await
        .expect("reading a delivery row");
    (row.get(0), row.get(1), row.get(2))
}

async fn count_rows(schema: &TestSchema, table: &str) -> i64 {
    schema
        .client()
        .await
        .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
        .await
        .expect("counting rows")
        .get(0)
}

/// Waits for a signal that matches `wanted`, ignoring others (tests in other
/// schemas of the same database send on the same channels).
async fn expect_signal(
    signals: &mut mpsc::Receiver<StoreSignal>,
    matches: impl Fn(&StoreSignal) -> bool,
    description: &str,
) {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(signal) = signals.recv().await {
            if matches(&signal) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "no {description} signal arrived");
}

/// Subscribes and waits for the signal sent on connect, so the listener is
/// known to listen before the test acts.
async fn listening(store: &Store) -> mpsc::Receiver<StoreSignal> {
    let mut signals = store.subscribe().expect("PostgreSQL stores can subscribe");
    expect_signal(
        &mut signals,
        |signal| *signal == StoreSignal::Due,
        "initial",
    )
    .await;
    signals
}

#[tokio::test]
async fn accept_creates_one_delivery_per_subscriber() {
    let Some(schema) = TestSchema::create("accept_creates_one_delivery_per_subscriber").await
    else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    let subscriber = add_webhook(&store, business, &["booking.created"], true).await;
    let second = add_webhook(
        &store,
        business,
        &["client.created", "booking.created"],
        true,
    )
    .await;
    add_webhook(&store, business, &["booking.updated"], true).await;
    add_webhook(&store, business, &["booking.created"], false).await;
    add_webhook(&store, Uuid::new_v4(), &["booking.created"], true).await;

    let spec = EventSpec::created(business);
    let accepted_at = spec.accepted_at;
    let accepted = store.accept_event(spec.build()).await.expect("accepting");
    let mut webhooks: Vec<Uuid> = accepted.jobs.iter().map(|job| job.webhook_id).collect();
    webhooks.sort();
    let mut expected = vec![subscriber.id, second.id];
    expected.sort();
    assert_eq!(
        webhooks, expected,
        "deliveries go to active subscribers only"
    );
    assert_eq!(count_rows(&schema, "deliveries").await, 2);
    assert_eq!(count_rows(&schema, "events").await, 1);
    for job in &accepted.jobs {
        let (status, due_at, leased_by) = schedule(&schema, job.delivery_id).await;
        assert_eq!(status, "pending");
        assert_eq!(
            due_at,
            Some(accepted_at),
            "unleased deliveries are due at once"
        );
        assert_eq!(leased_by, None, "deliveries without a lease have no holder");
        assert_eq!(job.trigger, Trigger::Automatic);
        assert_eq!(job.auto_attempts, 0);
    }

    let mut leased = EventSpec::created(business);
    leased.lease = Some(Lease {
        owner: "worker-a".to_owned(),
        until: accepted_at + 60_000_000,
    });
    let accepted = store.accept_event(leased.build()).await.expect("accepting");
    assert_eq!(accepted.jobs.len(), 2);
    for job in &accepted.jobs {
        let (_, due_at, leased_by) = schedule(&schema, job.delivery_id).await;
        assert_eq!(
            due_at,
            Some(accepted_at + 60_000_000),
            "due when the lease ends"
        );
        assert_eq!(leased_by.as_deref(), Some("worker-a"));
        assert_eq!(job.lease_until, accepted_at + 60_000_000);
    }
}

#[tokio::test]
async fn update_without_previous_uses_stored_state() {
    let Some(schema) = TestSchema::create("update_without_previous_uses_stored_state").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    let webhook = add_webhook(&store, business, &["booking.updated"], true).await;
    let aggregate = Uuid::new_v4();
    let update = |status: &str| EventSpec {
        name: "booking.updated",
        business,
        aggregate,
        data: json!({ "status": status, "amount": 75.0 }),
        stored_previous: true,
        accepted_at: now_micros(),
        lease: None,
    };

    let error = store
        .accept_event(update("cancelled").build())
        .await
        .expect_err("no stored state yet");
    assert!(
        matches!(error, StoreError::NoPreviousState(id) if id == aggregate),
        "{error}"
    );
    assert_eq!(
        count_rows(&schema, "events").await,
        0,
        "a rejected event stores nothing"
    );

    let mut created = EventSpec::created(business);
    created.aggregate = aggregate;
    store.accept_event(created.build()).await.expect("created");
    let accepted = store
        .accept_event(update("cancelled").build())
        .await
        .expect("update from the stored state");
    assert_eq!(accepted.jobs.len(), 1);
    let payload: Value = serde_json::from_slice(&accepted.jobs[0].payload).expect("payload JSON");
    assert_eq!(
        payload["data"]["changes"],
        json!({ "status": { "old": "confirmed", "new": "cancelled" } }),
        "changes are computed against the stored state: {payload}"
    );
    let detail = store
        .get_delivery(business, webhook.id, accepted.jobs[0].delivery_id)
        .await
        .expect("reading the delivery")
        .expect("the delivery exists");
    assert_eq!(
        detail.payload,
        accepted.jobs[0].payload.to_vec(),
        "stored body is the sent body"
    );

    let mut deleted = EventSpec::created(business);
    deleted.name = "booking.deleted";
    deleted.aggregate = aggregate;
    store.accept_event(deleted.build()).await.expect("deleted");
    let error = store
        .accept_event(update("confirmed").build())
        .await
        .expect_err("the deletion removed the stored state");
    assert!(matches!(error, StoreError::NoPreviousState(_)), "{error}");
}

/// Counts the transactions that wrote `events`, from the rows' `xmin`.
async fn writing_transactions(schema: &TestSchema, events: &[Uuid]) -> i64 {
    let ids: Vec<String> = events.iter().map(Uuid::to_string).collect();
    schema
        .client()
        .await
        .query_one(
            "SELECT COUNT(DISTINCT xmin::TEXT) FROM events WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("reading the events' xmin")
        .get(0)
}

async fn stored_state(schema: &TestSchema, aggregate: Uuid) -> Option<Value> {
    let row = schema
        .client()
        .await
        .query_opt(
            "SELECT state FROM aggregate_states WHERE aggregate_id = $1",
            &[&aggregate.to_string()],
        )
        .await
        .expect("reading an aggregate state");
    row.map(|row| serde_json::from_str(row.get(0)).expect("state JSON"))
}

fn payload_changes(accepted: &AcceptedEvent) -> Value {
    let payload: Value = serde_json::from_slice(&accepted.jobs[0].payload).expect("payload JSON");
    payload["data"]["changes"].clone()
}

// `tokio::join!` polls every call once before the test's single-threaded
// runtime runs the store's writer task, so the joined events share a batch.

#[tokio::test]
async fn batch_applies_updates_in_order() {
    let Some(schema) = TestSchema::create("batch_applies_updates_in_order").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    let webhook = add_webhook(
        &store,
        business,
        &["booking.created", "booking.updated"],
        true,
    )
    .await;
    let aggregate = Uuid::new_v4();
    let mut created = EventSpec::created(business);
    created.aggregate = aggregate;
    let update = |status: &str| EventSpec {
        name: "booking.updated",
        business,
        aggregate,
        data: json!({ "status": status, "amount": 75.0 }),
        stored_previous: true,
        accepted_at: now_micros(),
        lease: None,
    };

    let (created, cancelled, confirmed) = tokio::join!(
        store.accept_event(created.build()),
        store.accept_event(update("cancelled").build()),
        store.accept_event(update("confirmed").build()),
    );
    let created = created.expect("created");
    let cancelled = cancelled.expect("update from the created state");
    let confirmed = confirmed.expect("update from the first update's state");
    assert_eq!(
        writing_transactions(
            &schema,
            &[created.event_id, cancelled.event_id, confirmed.event_id]
        )
        .await,
        1,
        "the three events are written in one batch"
    );
    for accepted in [&created, &cancelled, &confirmed] {
        assert_eq!(accepted.jobs.len(), 1);
        assert_eq!(accepted.jobs[0].webhook_id, webhook.id);
        assert_eq!(accepted.jobs[0].event_id, accepted.event_id);
    }
    assert_eq!(
        payload_changes(&cancelled),
        json!({ "status": { "old": "confirmed", "new": "cancelled" } }),
        "the first update starts from the created state"
    );
    assert_eq!(
        payload_changes(&confirmed),
        json!({ "status": { "old": "cancelled", "new": "confirmed" } }),
        "the second update starts from the first update's state"
    );
    assert_eq!(
        stored_state(&schema, aggregate).await,
        Some(json!({ "status": "confirmed", "amount": 75.0 })),
        "the last event's data is stored"
    );
    assert_eq!(count_rows(&schema, "deliveries").await, 3);
}

#[tokio::test]
async fn batch_rejects_update_after_deletion() {
    let Some(schema) = TestSchema::create("batch_rejects_update_after_deletion").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    add_webhook(
        &store,
        business,
        &["booking.created", "booking.updated", "booking.deleted"],
        true,
    )
    .await;
    let aggregate = Uuid::new_v4();
    let mut created = EventSpec::created(business);
    created.aggregate = aggregate;
    let mut deleted = EventSpec::created(business);
    deleted.name = "booking.deleted";
    deleted.aggregate = aggregate;
    let update = EventSpec {
        name: "booking.updated",
        business,
        aggregate,
        data: json!({ "status": "cancelled" }),
        stored_previous: true,
        accepted_at: now_micros(),
        lease: None,
    };
    let neighbour = EventSpec::created(business);
    let neighbour_aggregate = neighbour.aggregate;

    let (created, deleted, update, neighbour) = tokio::join!(
        store.accept_event(created.build()),
        store.accept_event(deleted.build()),
        store.accept_event(update.build()),
        store.accept_event(neighbour.build()),
    );
    let created = created.expect("created");
    let deleted = deleted.expect("deleted");
    let neighbour = neighbour.expect("an event of another aggregate");
    let error = update.expect_err("the deletion before it removed the state");
    assert!(
        matches!(error, StoreError::NoPreviousState(id) if id == aggregate),
        "{error}"
    );
    assert_eq!(
        writing_transactions(
            &schema,
            &[created.event_id, deleted.event_id, neighbour.event_id]
        )
        .await,
        1,
        "the accepted events are written in one batch"
    );
    assert_eq!(count_rows(&schema, "events").await, 3);
    assert_eq!(count_rows(&schema, "deliveries").await, 3);
    assert_eq!(
        stored_state(&schema, aggregate).await,
        None,
        "the deletion is the aggregate's last change"
    );
    assert!(
        stored_state(&schema, neighbour_aggregate).await.is_some(),
        "the other aggregate's state is stored"
    );
}

#[tokio::test]
async fn batch_keeps_each_event_lease() {
    let Some(schema) = TestSchema::create("batch_keeps_each_event_lease").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    let first = add_webhook(&store, business, &["booking.created"], true).await;
    let second = add_webhook(&store, business, &["booking.created"], true).await;
    let unleased = EventSpec::created(business);
    let accepted_at = unleased.accepted_at;
    let mut leased = EventSpec::created(business);
    leased.lease = Some(Lease {
        owner: "worker-a".to_owned(),
        until: accepted_at + 60_000_000,
    });

    let (unleased, leased) = tokio::join!(
        store.accept_event(unleased.build()),
        store.accept_event(leased.build()),
    );
    let unleased = unleased.expect("the unleased event");
    let leased = leased.expect("the leased event");
    assert_eq!(
        writing_transactions(&schema, &[unleased.event_id, leased.event_id]).await,
        1,
        "both events are written in one batch"
    );
    for accepted in [&unleased, &leased] {
        let webhooks: Vec<Uuid> = accepted.jobs.iter().map(|job| job.webhook_id).collect();
        assert_eq!(
            webhooks,
            vec![first.id, second.id],
            "jobs list the subscribers oldest first"
        );
    }
    for job in &unleased.jobs {
        assert_eq!(job.lease_until, accepted_at);
        assert_eq!(
            schedule(&schema, job.delivery_id).await,
            ("pending".to_owned(), Some(accepted_at), None),
            "unleased deliveries are due at once"
        );
    }
    for job in &leased.jobs {
        assert_eq!(job.lease_until, accepted_at + 60_000_000);
        assert_eq!(
            schedule(&schema, job.delivery_id).await,
            (
                "pending".to_owned(),
                Some(accepted_at + 60_000_000),
                Some("worker-a".to_owned())
            ),
            "leased deliveries are due when the lease ends"
        );
    }
}

#[tokio::test]
async fn failed_batch_retries_events_alone() {
    let Some(schema) = TestSchema::create("failed_batch_retries_events_alone").await else {
        return;
    };
    let store = open(&schema).await;
    let mut signals = listening(&open(&schema).await).await;
    let business = Uuid::new_v4();
    add_webhook(&store, business, &["booking.created"], true).await;
    let first = store
        .accept_event(EventSpec::created(business).build())
        .await
        .expect("accepting");
    while signals.try_recv().is_ok() {}

    // An event whose id is already stored makes the batch's insert fail.
    let mut duplicate = EventSpec::created(business).build();
    duplicate.id = first.event_id;
    let (before, duplicate, after) = tokio::join!(
        store.accept_event(EventSpec::created(business).build()),
        store.accept_event(duplicate),
        store.accept_event(EventSpec::created(business).build()),
    );
    let before = before.expect("the event before the duplicate");
    let after = after.expect("the event after the duplicate");
    let error = duplicate.expect_err("a second event with the same id");
    assert!(
        error.to_string().contains("duplicate key"),
        "the error names the cause: {error}"
    );
    assert_eq!(before.jobs.len(), 1);
    assert_eq!(after.jobs.len(), 1);
    assert_eq!(count_rows(&schema, "events").await, 3);
    assert_eq!(
        count_rows(&schema, "deliveries").await,
        3,
        "the duplicate adds no deliveries"
    );
    for accepted in [&before, &after] {
        let (status, _, leased_by) = schedule(&schema, accepted.jobs[0].delivery_id).await;
        assert_eq!(status, "pending");
        assert_eq!(leased_by, None);
    }
    expect_signal(
        &mut signals,
        |signal| *signal == StoreSignal::Due,
        "due after the retried events",
    )
    .await;
}

#[tokio::test]
async fn claim_leases_due_work_once() {
    let Some(schema) = TestSchema::create("claim_leases_due_work_once").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    let first = add_webhook(&store, business, &["booking.created"], true).await;
    let second = add_webhook(&store, business, &["booking.created"], true).await;
    for _ in 0..3 {
        store
            .accept_event(EventSpec::created(business).build())
            .await
            .expect("accepting");
    }

    let now = now_micros();
    let lease_until = now + 60_000_000;
    let mut skip_second = claim("worker-a", now, lease_until, 10);
    skip_second.skip_webhooks = vec![second.id];
    let jobs = store.claim_due(skip_second).await.expect("claiming");
    assert_eq!(jobs.len(), 3, "only the first webhook's deliveries");
    assert!(jobs.iter().all(|job| job.webhook_id == first.id));
    assert!(jobs.iter().all(|job| job.lease_until == lease_until));

    let jobs = store
        .claim_due(claim("worker-a", now, lease_until, 2))
        .await
        .expect("claiming");
    assert_eq!(jobs.len(), 2, "the limit caps a claim");
    let jobs = store
        .claim_due(claim("worker-b", now, lease_until, 10))
        .await
        .expect("claiming");
    assert_eq!(jobs.len(), 1, "leased deliveries are not claimed again");
    let jobs = store
        .claim_due(claim("worker-b", now, lease_until, 10))
        .await
        .expect("claiming");
    assert!(jobs.is_empty(), "everything is leased");
    assert_eq!(
        store.next_due_at().await.expect("next due"),
        Some(lease_until)
    );

    let after_lease = lease_until + 1;
    let jobs = store
        .claim_due(claim("worker-c", after_lease, after_lease + 60_000_000, 10))
        .await
        .expect("claiming");
    assert_eq!(jobs.len(), 6, "expired leases are taken over");
    for job in &jobs {
        let (_, _, leased_by) = schedule(&schema, job.delivery_id).await;
        assert_eq!(leased_by.as_deref(), Some("worker-c"));
    }
}

#[tokio::test]
async fn concurrent_claims_never_share_a_delivery() {
    let Some(schema) = TestSchema::create("concurrent_claims_never_share_a_delivery").await else {
        return;
    };
    let store = open(&schema).await;
    let other_process = open(&schema).await;
    let business = Uuid::new_v4();
    for _ in 0..4 {
        add_webhook(&store, business, &["booking.created"], true).await;
    }
    for _ in 0..50 {
        store
            .accept_event(EventSpec::created(business).build())
            .await
            .expect("accepting");
    }

    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..8 {
        let store = if index % 2 == 0 {
            store.clone()
        } else {
            other_process.clone()
        };
        tasks.spawn(async move {
            let owner = format!("worker-{index}");
            let mut claimed = Vec::new();
            loop {
                let now = now_micros();
                let jobs = store
                    .claim_due(claim(&owner, now, now + 600_000_000, 7))
                    .await
                    .expect("claiming");
                if jobs.is_empty() {
                    return claimed;
                }
                claimed.extend(jobs.into_iter().map(|job| job.delivery_id));
            }
        });
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    while let Some(claimed) = tasks.join_next().await {
        for id in claimed.expect("claim task") {
            total += 1;
            assert!(seen.insert(id), "delivery {id} was claimed twice");
        }
    }
    assert_eq!(total, 200, "every delivery is claimed exactly once");
}

#[tokio::test]
async fn record_attempt_moves_the_schedule() {
    let Some(schema) = TestSchema::create("record_attempt_moves_the_schedule").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    let webhook = add_webhook(&store, business, &["booking.created"], true).await;
    let (job, now) = accept_and_claim(&store, business).await;

    let retry_at = now + 10_000_000;
    store
        .record_attempt(failed_attempt(&job, "worker-a", Some(retry_at)))
        .await
        .expect("recording a failure");
    assert_eq!(
        schedule(&schema, job.delivery_id).await,
        ("pending".to_owned(), Some(retry_at), None),
        "a failure releases the lease and schedules the retry"
    );
    let detail = store
        .get_delivery(business, webhook.id, job.delivery_id)
        .await
        .expect("reading")
        .expect("exists");
    assert_eq!(detail.delivery.attempt_count, 1);
    assert_eq!(detail.delivery.next_attempt_at, Some(retry_at));
    assert_eq!(detail.delivery.last_status_code, Some(503));
    assert_eq!(detail.attempts.len(), 1);
    assert_eq!(detail.attempts[0].number, 1);
    assert_eq!(detail.attempts[0].trigger, "automatic");
    assert_eq!(
        detail.attempts[0].error_kind.as_deref(),
        Some("http_status")
    );
    assert_eq!(
        detail.attempts[0].response_body.as_deref(),
        Some("unavailable")
    );

    // worker-b takes the retry; a late record from worker-a leaves its lease alone.
    let retried = store
        .claim_due(claim("worker-b", retry_at, retry_at + 60_000_000, 1))
        .await
        .expect("claiming the retry")
        .pop()
        .expect("the retry is due");
    assert_eq!(retried.auto_attempts, 1, "the retry counter continues");
    store
        .record_attempt(failed_attempt(&job, "worker-a", Some(retry_at + 5)))
        .await
        .expect("recording a stale failure");
    assert_eq!(
        schedule(&schema, job.delivery_id).await,
        (
            "pending".to_owned(),
            Some(retry_at + 60_000_000),
            Some("worker-b".to_owned())
        ),
        "a stale holder's failure keeps the new holder's lease"
    );

    store
        .record_attempt(succeeded_attempt(&job, "worker-b"))
        .await
        .expect("recording a success");
    assert_eq!(
        schedule(&schema, job.delivery_id).await,
        ("succeeded".to_owned(), None, None)
    );
    let detail = store
        .get_delivery(business, webhook.id, job.delivery_id)
        .await
        .expect("reading")
        .expect("exists");
    let numbers: Vec<i64> = detail
        .attempts
        .iter()
        .map(|attempt| attempt.number)
        .collect();
    assert_eq!(numbers, [1, 2, 3], "attempts are numbered in order");
    assert_eq!(detail.delivery.status, "succeeded");
    assert_eq!(detail.delivery.last_status_code, Some(204));
}

#[tokio::test]
async fn leases_renew_and_release() {
    let Some(schema) = TestSchema::create("leases_renew_and_release").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    add_webhook(&store, business, &["booking.created"], true).await;
    let (job, now) = accept_and_claim(&store, business).await;

    let renewed = store
        .renew_lease(job.key(), "worker-a".to_owned(), now + 120_000_000)
        .await
        .expect("renewing");
    assert!(renewed, "the holder renews its lease");
    let renewed = store
        .renew_lease(job.key(), "worker-b".to_owned(), now + 180_000_000)
        .await
        .expect("renewing");
    assert!(!renewed, "another worker cannot renew the lease");
    assert_eq!(
        schedule(&schema, job.delivery_id).await.1,
        Some(now + 120_000_000)
    );

    store
        .release_leases(vec![job.key()], "worker-b".to_owned())
        .await
        .expect("releasing");
    let (_, _, holder) = schedule(&schema, job.delivery_id).await;
    assert_eq!(
        holder.as_deref(),
        Some("worker-a"),
        "only the holder releases"
    );
    store
        .release_leases(vec![job.key()], "worker-a".to_owned())
        .await
        .expect("releasing");
    let later = now_micros();
    let jobs = store
        .claim_due(claim("worker-b", later, later + 60_000_000, 10))
        .await
        .expect("claiming");
    assert_eq!(jobs.len(), 1, "a released delivery is due at once");
}

#[tokio::test]
async fn deactivation_cancels_pending_deliveries() {
    let Some(schema) = TestSchema::create("deactivation_cancels_pending_deliveries").await else {
        return;
    };
    let store = open(&schema).await;
    let mut signals = listening(&open(&schema).await).await;
    let business = Uuid::new_v4();
    let webhook = add_webhook(&store, business, &["booking.created"], true).await;
    let accepted = store
        .accept_event(EventSpec::created(business).build())
        .await
        .expect("accepting");

    let change = |is_active| WebhookChange {
        business_id: business,
        id: webhook.id,
        url: webhook.url.clone(),
        events: webhook.events.clone(),
        is_active,
        updated_at: now_micros(),
    };
    let updated = store
        .update_webhook(change(false))
        .await
        .expect("deactivating")
        .expect("the webhook exists");
    assert!(!updated.is_active);
    assert_eq!(
        schedule(&schema, accepted.jobs[0].delivery_id).await,
        ("cancelled".to_owned(), None, None)
    );
    let now = now_micros();
    let jobs = store
        .claim_due(claim("worker-a", now, now + 1, 10))
        .await
        .expect("claiming");
    assert!(jobs.is_empty(), "cancelled deliveries are never claimed");
    let webhook_id = webhook.id;
    expect_signal(
        &mut signals,
        |signal| {
            *signal
                == StoreSignal::WebhookChanged {
                    webhook_id,
                    active: false,
                }
        },
        "deactivation",
    )
    .await;

    let accepted = store
        .accept_event(EventSpec::created(business).build())
        .await
        .expect("accepting");
    assert!(
        accepted.jobs.is_empty(),
        "an inactive webhook gets no deliveries"
    );

    store
        .update_webhook(change(true))
        .await
        .expect("reactivating")
        .expect("the webhook exists");
    expect_signal(
        &mut signals,
        |signal| {
            *signal
                == StoreSignal::WebhookChanged {
                    webhook_id,
                    active: true,
                }
        },
        "reactivation",
    )
    .await;
    let other_business = WebhookChange {
        business_id: Uuid::new_v4(),
        ..change(false)
    };
    let missing = store
        .update_webhook(other_business)
        .await
        .expect("updating");
    assert!(missing.is_none(), "another business's webhook is not found");
}

#[tokio::test]
async fn delete_removes_history() {
    let Some(schema) = TestSchema::create("delete_removes_history").await else {
        return;
    };
    let store = open(&schema).await;
    let mut signals = listening(&open(&schema).await).await;
    let business = Uuid::new_v4();
    let webhook = add_webhook(&store, business, &["booking.created"], true).await;
    let kept = add_webhook(&store, business, &["booking.created"], true).await;
    let accepted = store
        .accept_event(EventSpec::created(business).build())
        .await
        .expect("accepting");
    for job in &accepted.jobs {
        store
            .record_attempt(failed_attempt(job, "worker-a", Some(now_micros())))
            .await
            .expect("recording");
    }

    let deleted = store
        .delete_webhook(Uuid::new_v4(), webhook.id)
        .await
        .expect("deleting");
    assert!(!deleted, "another business cannot delete it");
    let deleted = store
        .delete_webhook(business, webhook.id)
        .await
        .expect("deleting");
    assert!(deleted);
    assert!(
        store
            .get_webhook(business, webhook.id)
            .await
            .expect("reading")
            .is_none()
    );
    assert_eq!(
        count_rows(&schema, "deliveries").await,
        1,
        "the other webhook's delivery stays"
    );
    assert_eq!(
        count_rows(&schema, "attempts").await,
        1,
        "the other webhook's attempt stays"
    );
    let remaining = store
        .list_webhooks(business)
        .await
        .expect("listing")
        .into_iter()
        .map(|webhook| webhook.id)
        .collect::<Vec<_>>();
    assert_eq!(remaining, [kept.id]);
    let webhook_id = webhook.id;
    expect_signal(
        &mut signals,
        |signal| {
            *signal
                == StoreSignal::WebhookChanged {
                    webhook_id,
                    active: false,
                }
        },
        "deletion",
    )
    .await;
}

#[tokio::test]
async fn history_pages_across_equal_timestamps() {
    let Some(schema) = TestSchema::create("history_pages_across_equal_timestamps").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    let webhook = add_webhook(
        &store,
        business,
        &["booking.created", "booking.updated"],
        true,
    )
    .await;
    let mut expected = Vec::new();
    for _ in 0..9 {
        let accepted = store
            .accept_event(EventSpec::created(business).build())
            .await
            .expect("accepting");
        let id = accepted.jobs[0].delivery_id;
        // A delivery's creation time is the millisecond in its v7 id, so a
        // burst of deliveries shares it.
        expected.push((((id.as_u128() >> 80) as i64) * 1000, id));
    }
    expected.sort_by(|a, b| b.cmp(a));

    let page_size = 2;
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_deliveries(DeliveryQuery {
                business_id: business,
                webhook_id: webhook.id,
                status: None,
                event: None,
                limit: page_size + 1,
                after,
            })
            .await
            .expect("listing")
            .expect("the webhook exists");
        let has_more = page.len() > page_size;
        let page: Vec<_> = page.into_iter().take(page_size).collect();
        seen.extend(
            page.iter()
                .map(|delivery| (delivery.created_at, delivery.id)),
        );
        if !has_more {
            break;
        }
        let last = page.last().expect("a full page");
        after = Some((last.created_at, last.id));
    }
    assert_eq!(
        seen, expected,
        "pages neither skip nor repeat, newest first"
    );

    let filtered = store
        .list_deliveries(DeliveryQuery {
            business_id: business,
            webhook_id: webhook.id,
            status: Some("pending".to_owned()),
            event: Some("booking.updated".to_owned()),
            limit: 50,
            after: None,
        })
        .await
        .expect("listing")
        .expect("the webhook exists");
    assert!(filtered.is_empty(), "no booking.updated deliveries");
    let filtered = store
        .list_deliveries(DeliveryQuery {
            business_id: business,
            webhook_id: webhook.id,
            status: Some("pending".to_owned()),
            event: Some("booking.created".to_owned()),
            limit: 4,
            after: Some(expected[2]),
        })
        .await
        .expect("listing")
        .expect("the webhook exists");
    let ids: Vec<_> = filtered.iter().map(|delivery| delivery.id).collect();
    let wanted: Vec<_> = expected[3..7].iter().map(|(_, id)| *id).collect();
    assert_eq!(ids, wanted, "filters combine with the cursor");

    let other_business = store
        .list_deliveries(DeliveryQuery {
            business_id: Uuid::new_v4(),
            webhook_id: webhook.id,
            status: None,
            event: None,
            limit: 5,
            after: None,
        })
        .await
        .expect("listing");
    assert!(
        other_business.is_none(),
        "another business sees no such webhook"
    );
}

#[tokio::test]
async fn unleased_work_wakes_other_processes() {
    let Some(schema) = TestSchema::create("unleased_work_wakes_other_processes").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    let webhook = add_webhook(&store, business, &["booking.created"], true).await;
    let mut signals = listening(&open(&schema).await).await;
    store
        .accept_event(EventSpec::created(business).build())
        .await
        .expect("accepting");
    expect_signal(
        &mut signals,
        |signal| *signal == StoreSignal::Due,
        "due after accept",
    )
    .await;

    let now = now_micros();
    let job = store
        .claim_due(claim("worker-a", now, now + 60_000_000, 1))
        .await
        .expect("claiming")
        .pop()
        .expect("due");
    store
        .record_attempt(failed_attempt(&job, "worker-a", None))
        .await
        .expect("recording the last failure");
    let outcome = store
        .recover(Recovery {
            business_id: business,
            webhook_id: webhook.id,
            since: now - 60_000_000,
            until: now_micros() + 1,
            dry_run: false,
            now: now_micros(),
        })
        .await
        .expect("recovering");
    assert_eq!(outcome, RecoveryOutcome::Requeued(1));
    expect_signal(
        &mut signals,
        |signal| *signal == StoreSignal::Due,
        "due after recover",
    )
    .await;
}

#[tokio::test]
async fn recover_requeues_failed_deliveries() {
    let Some(schema) = TestSchema::create("recover_requeues_failed_deliveries").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    let webhook = add_webhook(&store, business, &["booking.created"], true).await;
    let accepted = store
        .accept_event(EventSpec::created(business).build())
        .await
        .expect("accepting");
    let delivery_id = accepted.jobs[0].delivery_id;
    store
        .record_attempt(failed_attempt(&accepted.jobs[0], "worker-a", None))
        .await
        .expect("recording the last failure");
    assert_eq!(schedule(&schema, delivery_id).await.0, "failed");

    let recovery = |dry_run| Recovery {
        business_id: business,
        webhook_id: webhook.id,
        since: 0,
        until: i64::MAX,
        dry_run,
        now: 42,
    };
    let outcome = store.recover(recovery(true)).await.expect("dry run");
    assert_eq!(outcome, RecoveryOutcome::Requeued(1));
    assert_eq!(
        schedule(&schema, delivery_id).await.0,
        "failed",
        "a dry run changes nothing"
    );
    let outcome = store.recover(recovery(false)).await.expect("recovering");
    assert_eq!(outcome, RecoveryOutcome::Requeued(1));
    assert_eq!(
        schedule(&schema, delivery_id).await,
        ("pending".to_owned(), Some(42), None)
    );
    let jobs = store
        .claim_due(claim("worker-a", 42, 1_000, 10))
        .await
        .expect("claiming");
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].auto_attempts, 0,
        "recovery restarts the retry schedule"
    );

    let missing = Recovery {
        webhook_id: Uuid::new_v4(),
        ..recovery(false)
    };
    assert_eq!(
        store.recover(missing).await.expect("recovering"),
        RecoveryOutcome::WebhookNotFound
    );
    store
        .update_webhook(WebhookChange {
            business_id: business,
            id: webhook.id,
            url: webhook.url.clone(),
            events: webhook.events.clone(),
            is_active: false,
            updated_at: now_micros(),
        })
        .await
        .expect("deactivating");
    assert_eq!(
        store.recover(recovery(false)).await.expect("recovering"),
        RecoveryOutcome::WebhookInactive
    );
}

#[tokio::test]
async fn test_pings_and_manual_attempts() {
    let Some(schema) = TestSchema::create("test_pings_and_manual_attempts").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    let webhook = add_webhook(&store, business, &["booking.created"], true).await;
    let ping = store
        .create_test_delivery(citapro_webhooks::store::TestDelivery {
            business_id: business,
            webhook_id: webhook.id,
            payload: b"{\"event\":\"webhook.ping\"}".to_vec(),
            now: now_micros(),
        })
        .await
        .expect("creating a ping")
        .expect("the webhook exists");
    assert_eq!(ping.trigger, Trigger::Test);
    assert_eq!(ping.event, "webhook.ping");
    assert_eq!(&ping.payload[..], b"{\"event\":\"webhook.ping\"}");
    let now = now_micros();
    let jobs = store
        .claim_due(claim("worker-a", now, now + 1, 10))
        .await
        .expect("claiming");
    assert!(jobs.is_empty(), "test pings are never claimed by workers");

    let accepted = store
        .accept_event(EventSpec::created(business).build())
        .await
        .expect("accepting");
    let delivery = &accepted.jobs[0];
    let manual = store
        .manual_job(business, webhook.id, delivery.delivery_id)
        .await
        .expect("reading")
        .expect("the delivery exists");
    assert_eq!(manual.trigger, Trigger::Manual);
    assert_eq!(
        manual.payload, delivery.payload,
        "a redelivery sends the same body"
    );
    let foreign = store
        .manual_job(Uuid::new_v4(), webhook.id, delivery.delivery_id)
        .await
        .expect("reading");
    assert!(foreign.is_none(), "another business cannot redeliver it");
}

#[tokio::test]
async fn purge_removes_finished_history() {
    let Some(schema) = TestSchema::create("purge_removes_finished_history").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    add_webhook(&store, business, &["booking.created"], true).await;
    // Rows are purged by their UUID v7 ids, which carry the real clock, so
    // the cutoff falls between two real moments.
    let finished = store
        .accept_event(EventSpec::created(business).build())
        .await
        .expect("accepting");
    store
        .record_attempt(succeeded_attempt(&finished.jobs[0], "worker-a"))
        .await
        .expect("recording");
    store
        .accept_event(EventSpec::created(business).build())
        .await
        .expect("accepting");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cutoff = now_micros();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .accept_event(EventSpec::created(business).build())
        .await
        .expect("accepting");

    let removed = store.purge_history(cutoff, 100).await.expect("purging");
    assert_eq!(removed, 2, "one finished delivery and its event");
    assert_eq!(
        count_rows(&schema, "deliveries").await,
        2,
        "pending and new deliveries stay"
    );
    assert_eq!(count_rows(&schema, "attempts").await, 0);
    assert_eq!(count_rows(&schema, "events").await, 2);
    assert_eq!(store.purge_history(cutoff, 100).await.expect("purging"), 0);
}

#[tokio::test]
async fn webhook_limit_holds_under_concurrency() {
    let Some(schema) = TestSchema::create("webhook_limit_holds_under_concurrency").await else {
        return;
    };
    let store = open(&schema).await;
    let other_process = open(&schema).await;
    let business = Uuid::new_v4();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..12 {
        let store = if index % 2 == 0 {
            store.clone()
        } else {
            other_process.clone()
        };
        tasks.spawn(async move {
            store
                .create_webhook(new_webhook(business, &["booking.created"], true), 5)
                .await
        });
    }
    let mut created = 0;
    let mut rejected = 0;
    while let Some(outcome) = tasks.join_next().await {
        match outcome.expect("create task") {
            Ok(()) => created += 1,
            Err(StoreError::WebhookLimit(5)) => rejected += 1,
            Err(error) => panic!("unexpected error: {error}"),
        }
    }
    assert_eq!(created, 5, "exactly the limit is created");
    assert_eq!(rejected, 7);
    assert_eq!(
        store.list_webhooks(business).await.expect("listing").len(),
        5
    );
}

#[tokio::test]
async fn concurrent_starts_migrate_once() {
    let Some(schema) = TestSchema::create("concurrent_starts_migrate_once").await else {
        return;
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let url = schema.url.clone();
        tasks.spawn(async move { Store::open(&url).await.map(|_| ()) });
    }
    while let Some(outcome) = tasks.join_next().await {
        outcome
            .expect("open task")
            .unwrap_or_else(|error| panic!("opening failed: {error:#}"));
    }
    let versions: Vec<i64> = schema
        .client()
        .await
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .expect("reading schema_migrations")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3], "each migration is applied once");
    assert!(
        Store::open(&schema.url).await.is_ok(),
        "opening a migrated schema again works"
    );
}

/// Makes a UUID v7 of the given millisecond.
fn v7_at(millis: u64) -> Uuid {
    Uuid::new_v7(uuid::Timestamp::from_unix_time(
        millis / 1000,
        (millis % 1000) as u32 * 1_000_000,
        0,
        0,
    ))
}

#[tokio::test]
async fn migration_keys_history_by_webhook_and_id() {
    let Some(schema) = TestSchema::create("migration_keys_history_by_webhook_and_id").await else {
        return;
    };
    // The schema as the first two migrations left it, with deliveries whose
    // creation time is not the time in their id.
    let client = schema.client().await;
    client
        .batch_execute(concat!(
            include_str!("../../src/store/sql/postgres_v1.sql"),
            include_str!("../../src/store/sql/postgres_v2.sql"),
            "CREATE TABLE schema_migrations (
                 version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL);
             INSERT INTO schema_migrations VALUES (1, 0), (2, 0);"
        ))
        .await
        .expect("applying the first two migrations");
    let business = Uuid::new_v4();
    let webhook = new_webhook(business, &["booking.created"], true);
    let webhook_text = webhook.id.to_string();
    client
        .execute(
            "INSERT INTO webhooks VALUES ($1, $2, $3, 'booking.created', TRUE, $4, 0, 0)",
            &[
                &webhook_text,
                &business.to_string(),
                &webhook.url,
                &webhook.secret,
            ],
        )
        .await
        .expect("storing a webhook");
    let event = Uuid::now_v7().to_string();
    client
        .execute(
            "INSERT INTO events VALUES ($1, $2, 'booking.created', 'a', '{}', 0)",
            &[&event, &business.to_string()],
        )
        .await
        .expect("storing an event");
    let base = now_micros() as u64 / 1000 - 60_000;
    let ids: Vec<Uuid> = [0, 7, 3].iter().map(|ms| v7_at(base + ms)).collect();
    for (index, id) in ids.iter().enumerate() {
        let due_at = (index == 0).then_some(0i64);
        let status = if index == 0 { "pending" } else { "succeeded" };
        client
            .execute(
                "INSERT INTO deliveries (id, webhook_id, event_id, event, aggregate_id, status,
                     created_at, due_at)
                 VALUES ($1, $2, $3, 'booking.created', 'a', $4, 5, $5)",
                &[&id.to_string(), &webhook_text, &event, &status, &due_at],
            )
            .await
            .expect("storing a delivery");
    }

    let store = open(&schema).await;
    let listed = store
        .list_deliveries(DeliveryQuery {
            business_id: business,
            webhook_id: webhook.id,
            status: None,
            event: None,
            limit: 10,
            after: None,
        })
        .await
        .expect("listing")
        .expect("the webhook exists");
    let listed: Vec<(i64, Uuid)> = listed.iter().map(|d| (d.created_at, d.id)).collect();
    let mut expected: Vec<(i64, Uuid)> = ids
        .iter()
        .map(|id| (((id.as_u128() >> 80) as i64) * 1000, *id))
        .collect();
    expected.sort_by(|a, b| b.cmp(a));
    assert_eq!(
        listed, expected,
        "creation times come from the ids, newest first"
    );

    // The migrated pending delivery is claimed and its attempt recorded
    // through the new primary key.
    let now = now_micros();
    let jobs = store
        .claim_due(claim("worker-a", now, now + 60_000_000, 10))
        .await
        .expect("claiming");
    assert_eq!(jobs.len(), 1, "the pending delivery is due");
    assert_eq!(jobs[0].delivery_id, ids[0]);
    store
        .record_attempts(Arc::from([succeeded_attempt(&jobs[0], "worker-a")]))
        .await
        .expect("recording");
    assert_eq!(
        schedule(&schema, ids[0]).await,
        ("succeeded".to_owned(), None, None)
    );
    let key: Vec<String> = client
        .query(
            "SELECT a.attname FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = 'deliveries'::regclass AND i.indisprimary
             ORDER BY array_position(i.indkey, a.attnum)",
            &[],
        )
        .await
        .expect("reading the primary key")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(key, ["webhook_id", "id"]);
    // Joins with webhooks.id compare in its collation, which must be the
    // key's for the key to serve them. The other keys written per event
    // compare bytes too.
    for (table, column) in [
        ("webhooks", "id"),
        ("deliveries", "webhook_id"),
        ("deliveries", "id"),
        ("deliveries", "event_id"),
        ("events", "id"),
        ("attempts", "delivery_id"),
        ("aggregate_states", "business_id"),
        ("aggregate_states", "entity"),
        ("aggregate_states", "aggregate_id"),
    ] {
        let collation: String = client
            .query_one(
                "SELECT c.collname::TEXT FROM pg_attribute a
                 JOIN pg_collation c ON c.oid = a.attcollation
                 WHERE a.attrelid = $1::TEXT::regclass AND a.attname = $2",
                &[&table, &column],
            )
            .await
            .expect("reading a collation")
            .get(0);
        assert_eq!(collation, "C", "collation of {table}.{column}");
    }
}

#[tokio::test]
async fn passwords_stay_out_of_errors() {
    let error = Store::open("postgres://app:hunter2@127.0.0.1:1/test?connect_timeout=2")
        .await
        .err()
        .expect("nothing listens on port 1");
    let message = format!("{error:#}");
    assert!(!message.contains("hunter2"), "{message}");
    assert!(message.contains("REDACTED"), "{message}");
}

#[tokio::test]
async fn listener_reconnects_after_connection_loss() {
    let Some(schema) = TestSchema::create("listener_reconnects_after_connection_loss").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    add_webhook(&store, business, &["booking.created"], true).await;
    let mut signals = listening(&open(&schema).await).await;

    let admin = schema.client().await;
    let listening_backends = "SELECT pid FROM pg_stat_activity
         WHERE application_name = $1 AND query LIKE 'LISTEN%'";
    let before: Vec<i32> = admin
        .query(listening_backends, &[&schema.name])
        .await
        .expect("finding the listener's backend")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(before.len(), 1, "one listening connection");
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&before[0]])
        .await
        .expect("ending the listener's connection");

    // The listener announces due work after it reconnects, because
    // notifications sent while it was away are lost.
    expect_signal(
        &mut signals,
        |signal| *signal == StoreSignal::Due,
        "reconnect",
    )
    .await;
    let after: Vec<i32> = admin
        .query(listening_backends, &[&schema.name])
        .await
        .expect("finding the listener's backend")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        after.len(),
        1,
        "one listening connection after the reconnect"
    );
    assert_ne!(after[0], before[0], "the listener uses a new connection");

    while signals.try_recv().is_ok() {}
    store
        .accept_event(EventSpec::created(business).build())
        .await
        .expect("accepting");
    expect_signal(
        &mut signals,
        |signal| *signal == StoreSignal::Due,
        "due after reconnect",
    )
    .await;
}

/// A batch of attempts given up while its transaction is open, here while
/// it waits for a row lock, must leave no transaction open on a pooled
/// connection. Such a connection would hold the lock, and the next user of
/// the pool would run its statements inside the abandoned transaction.
#[tokio::test]
async fn abandoned_attempt_batch_leaves_no_open_transaction() {
    let Some(schema) =
        TestSchema::create("abandoned_attempt_batch_leaves_no_open_transaction").await
    else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    add_webhook(&store, business, &["booking.created"], true).await;
    let (job, _) = &accept_and_claim(&store, business).await;
    let delivery_id = job.delivery_id.to_string();

    let holder = schema.client().await;
    holder.batch_execute("BEGIN").await.expect("BEGIN");
    holder
        .query_one(
            "SELECT id FROM deliveries WHERE id = $1 FOR UPDATE",
            &[&delivery_id],
        )
        .await
        .expect("locking the delivery");
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        store.record_attempts(Arc::new([succeeded_attempt(job, "worker-a")])),
    )
    .await;
    assert!(abandoned.is_err(), "the batch waits for the row lock");
    holder.batch_execute("COMMIT").await.expect("COMMIT");

    // The abandoned batch's connection ends, and its lock with it.
    let checker = schema.client().await;
    wait_for("the delivery's row lock to be free", || async {
        checker.batch_execute("BEGIN").await.expect("BEGIN");
        let locked = checker
            .query_opt(
                "SELECT id FROM deliveries WHERE id = $1 FOR UPDATE NOWAIT",
                &[&delivery_id],
            )
            .await
            .is_err();
        checker.batch_execute("ROLLBACK").await.expect("ROLLBACK");
        (!locked).then_some(())
    })
    .await;
    let open_transactions: i64 = checker
        .query_one(
            "SELECT COUNT(*) FROM pg_stat_activity
             WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
            &[&schema.name],
        )
        .await
        .expect("reading pg_stat_activity")
        .get(0);
    assert_eq!(
        open_transactions, 0,
        "no connection of the store is left in a transaction"
    );
    assert_eq!(
        count_rows(&schema, "attempts").await,
        0,
        "nothing of the batch is stored"
    );

    store
        .record_attempts(Arc::new([succeeded_attempt(job, "worker-a")]))
        .await
        .expect("recording the attempt again");
    let (status, due_at, leased_by) = schedule(&schema, job.delivery_id).await;
    assert_eq!(
        (status.as_str(), due_at, leased_by),
        ("succeeded", None, None)
    );
    assert_eq!(count_rows(&schema, "attempts").await, 1);
}

#[tokio::test]
async fn unrecorded_skips_stored_attempts() {
    let Some(schema) = TestSchema::create("unrecorded_skips_stored_attempts").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    add_webhook(&store, business, &["booking.created"], true).await;
    let (job, _) = accept_and_claim(&store, business).await;
    let recorded = succeeded_attempt(&job, "worker-a");
    store
        .record_attempts(Arc::new([recorded.clone()]))
        .await
        .expect("recording");

    let later = AttemptRecord {
        started_at: recorded.started_at + 1,
        ..recorded.clone()
    };
    let other = AttemptRecord {
        delivery_id: Uuid::now_v7(),
        ..recorded.clone()
    };
    let unrecorded = store
        .unrecorded(vec![recorded, later.clone(), other.clone()])
        .await
        .expect("reading attempts");
    let keys: Vec<(Uuid, i64)> = unrecorded
        .iter()
        .map(|attempt| (attempt.delivery_id, attempt.started_at))
        .collect();
    assert_eq!(
        keys,
        [
            (later.delivery_id, later.started_at),
            (other.delivery_id, other.started_at)
        ]
    );
}

/// A batch whose `COMMIT` succeeded on the server but whose reply was lost
/// is written again, and each of its events then finds itself stored. The
/// caller gets the stored event and its deliveries, not an error.
#[tokio::test]
async fn committed_event_written_again_is_accepted() {
    let Some(schema) = TestSchema::create("committed_event_written_again_is_accepted").await else {
        return;
    };
    let store = open(&schema).await;
    let business = Uuid::new_v4();
    add_webhook(&store, business, &["booking.created"], true).await;
    add_webhook(&store, business, &["booking.created"], true).await;
    let lease = Lease {
        owner: "worker-a".to_owned(),
        until: now_micros() + 60_000_000,
    };
    let event = EventSpec {
        lease: Some(lease),
        ..EventSpec::created(business)
    }
    .build();

    let first = store.accept_event(event.clone()).await.expect("accepting");
    let again = store
        .accept_event(event)
        .await
        .expect("the stored event, not an error");
    assert_eq!(again.event_id, first.event_id);
    let first_ids: HashSet<Uuid> = first.jobs.iter().map(|job| job.delivery_id).collect();
    let again_ids: HashSet<Uuid> = again.jobs.iter().map(|job| job.delivery_id).collect();
    assert_eq!(first_ids.len(), 2);
    assert_eq!(
        again_ids, first_ids,
        "the stored deliveries come back as jobs"
    );
    assert_eq!(count_rows(&schema, "events").await, 1);
    assert_eq!(count_rows(&schema, "deliveries").await, 2);
}
