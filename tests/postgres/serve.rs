//! Several real `serve` processes on one PostgreSQL schema.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::support::{
    Receiver, Reply, ServeOptions, ServeProcess, TestSchema, create_api_key, create_webhook,
    http_client, send_event, wait_for,
};

/// Sends `count` events, spread over the APIs in `base_urls`, a few at a time.
async fn send_events(base_urls: &[&str], producer_token: &str, business: Uuid, count: usize) {
    let permits = Arc::new(Semaphore::new(8));
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..count {
        let base_url = base_urls[index % base_urls.len()].to_owned();
        let producer_token = producer_token.to_owned();
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore open");
            send_event(&base_url, &producer_token, business).await
        });
    }
    while let Some(outcome) = tasks.join_next().await {
        outcome.expect("event task");
    }
}

/// Reads every delivery id with its status and attempt count.
async fn deliveries(schema: &TestSchema) -> HashMap<String, (String, i64)> {
    schema
        .client()
        .await
        .query("SELECT id, status, attempt_count FROM deliveries", &[])
        .await
        .expect("reading deliveries")
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect()
}

/// Waits until every delivery of the schema has `status`, and returns them.
async fn wait_until_all(
    schema: &TestSchema,
    expected: usize,
    status: &str,
) -> HashMap<String, (String, i64)> {
    wait_for(&format!("{expected} deliveries {status}"), || async {
        let rows = deliveries(schema).await;
        let done = rows.len() == expected && rows.values().all(|(state, _)| state == status);
        done.then_some(rows)
    })
    .await
}

fn count_per_delivery(requests: &[crate::support::Received]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for request in requests {
        *counts.entry(request.delivery_id.clone()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn two_instances_deliver_each_once() {
    let Some(schema) = TestSchema::create("two_instances_deliver_each_once").await else {
        return;
    };
    let token = format!("producer-{}", Uuid::new_v4());
    let options = ServeOptions::new(&token);
    let first = ServeProcess::start("instance A", "all", &schema, &options).await;
    let second = ServeProcess::start("instance B", "all", &schema, &options).await;
    let receiver =
        Receiver::start(|_, _| Reply::DelayedStatus(Duration::from_millis(10), 204)).await;
    let business = Uuid::new_v4();
    let api_key = create_api_key(&schema, business).await;
    for endpoint in ["a", "b"] {
        let url = format!("{}?endpoint={endpoint}", receiver.url);
        create_webhook(first.api(), &api_key, &url, &["booking.created"]).await;
    }

    let events = 150;
    send_events(&[first.api(), second.api()], &token, business, events).await;
    let stored = wait_until_all(&schema, events * 2, "succeeded").await;
    // Leave time for a duplicate to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let requests = receiver.requests();
    let counts = count_per_delivery(&requests);
    assert_eq!(requests.len(), events * 2, "one request per delivery");
    let repeated: Vec<_> = counts.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        repeated.is_empty(),
        "deliveries sent more than once: {repeated:?}"
    );
    let received: HashSet<&String> = counts.keys().collect();
    let expected: HashSet<&String> = stored.keys().collect();
    assert_eq!(
        received, expected,
        "the receiver got exactly the stored deliveries"
    );
    assert!(
        stored.values().all(|(_, attempts)| *attempts == 1),
        "every delivery needed one attempt"
    );
    assert_eq!(
        receiver.overlaps(),
        Vec::<String>::new(),
        "no delivery was in flight twice"
    );
}

#[tokio::test]
async fn retries_are_claimed_once_across_instances() {
    let Some(schema) = TestSchema::create("retries_are_claimed_once_across_instances").await else {
        return;
    };
    let token = format!("producer-{}", Uuid::new_v4());
    let mut options = ServeOptions::new(&token);
    options.retry_schedule = "100ms,100ms".to_owned();
    let first = ServeProcess::start("instance A", "all", &schema, &options).await;
    let second = ServeProcess::start("instance B", "all", &schema, &options).await;
    // The first request of each delivery fails, so every retry is left to
    // whichever instance's poller claims it first.
    let receiver = Receiver::start(|_, earlier| match earlier {
        0 => Reply::Status(503),
        _ => Reply::DelayedStatus(Duration::from_millis(5), 204),
    })
    .await;
    let business = Uuid::new_v4();
    let api_key = create_api_key(&schema, business).await;
    create_webhook(first.api(), &api_key, &receiver.url, &["booking.created"]).await;

    let events = 80;
    send_events(&[first.api(), second.api()], &token, business, events).await;
    let stored = wait_until_all(&schema, events, "succeeded").await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let requests = receiver.requests();
    let counts = count_per_delivery(&requests);
    assert_eq!(
        requests.len(),
        events * 2,
        "one failure and one success each"
    );
    let wrong: Vec<_> = counts.iter().filter(|(_, count)| **count != 2).collect();
    assert!(
        wrong.is_empty(),
        "deliveries not sent exactly twice: {wrong:?}"
    );
    assert!(
        stored.values().all(|(_, attempts)| *attempts == 2),
        "every delivery recorded two attempts"
    );
    assert_eq!(
        receiver.overlaps(),
        Vec::<String>::new(),
        "no delivery was in flight twice"
    );
}

#[tokio::test]
async fn api_and_worker_roles_split_the_work() {
    let Some(schema) = TestSchema::create("api_and_worker_roles_split_the_work").await else {
        return;
    };
    let token = format!("producer-{}", Uuid::new_v4());
    let options = ServeOptions::new(&token);
    let api = ServeProcess::start("api instance", "api", &schema, &options).await;
    assert!(api.worker.is_none(), "an api instance runs no workers");
    let receiver = Receiver::start(|_, _| Reply::Status(204)).await;
    let business = Uuid::new_v4();
    let api_key = create_api_key(&schema, business).await;
    create_webhook(api.api(), &api_key, &receiver.url, &["booking.created"]).await;

    let accepted = send_event(api.api(), &token, business).await;
    assert_eq!(accepted["deliveries"], 1);
    let client = schema.client().await;
    let row = client
        .query_one(
            "SELECT d.leased_by, d.due_at, e.created_at
             FROM deliveries d JOIN events e ON e.id = d.event_id",
            &[],
        )
        .await
        .expect("reading the delivery");
    let (leased_by, due_at, accepted_at): (Option<String>, Option<i64>, i64) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(leased_by, None, "an api instance leases nothing");
    assert_eq!(due_at, Some(accepted_at), "the delivery is due at once");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        receiver.requests().is_empty(),
        "nothing sends without a worker"
    );

    let worker = ServeProcess::start("worker instance", "worker", &schema, &options).await;
    assert!(worker.worker.is_some(), "a worker instance runs workers");
    receiver.wait_for_requests(1).await;
    let http = http_client();
    for (path, expected) in [("/readyz", 200), ("/v1/webhooks", 404), ("/v1/events", 404)] {
        let response = http
            .get(format!("{}{path}", worker.base_url))
            .send()
            .await
            .unwrap_or_else(|error| panic!("GET {path} on the worker: {error}"));
        assert_eq!(response.status(), expected, "GET {path} on the worker");
    }

    // Each event is accepted by the api instance and sent by the worker.
    let mut slowest = Duration::ZERO;
    for sent in 1..=5 {
        let started = Instant::now();
        send_event(api.api(), &token, business).await;
        let requests = receiver.wait_for_requests(1 + sent).await;
        let latency = requests[sent].arrived_at.duration_since(started);
        slowest = slowest.max(latency);
    }
    eprintln!("api to worker: slowest of 5 deliveries took {slowest:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "a delivery took {slowest:?} from the api instance to the receiver"
    );
    assert_eq!(receiver.overlaps(), Vec::<String>::new());
}

#[tokio::test]
async fn killed_instance_work_is_taken_over() {
    let Some(schema) = TestSchema::create("killed_instance_work_is_taken_over").await else {
        return;
    };
    let token = format!("producer-{}", Uuid::new_v4());
    let mut options = ServeOptions::new(&token);
    options.request_timeout = "2s".to_owned();
    options.lease_margin = "1s".to_owned();
    options.retry_schedule = "200ms,200ms,200ms,200ms".to_owned();
    let lease = Duration::from_secs(3);
    let mut instances = vec![
        ServeProcess::start("instance A", "all", &schema, &options).await,
        ServeProcess::start("instance B", "all", &schema, &options).await,
    ];
    // Two quick failures, then an attempt that hangs until its sender dies.
    let receiver = Receiver::start(|_, earlier| match earlier {
        0 | 1 => Reply::Status(500),
        2 => Reply::Hang,
        _ => Reply::Status(204),
    })
    .await;
    let business = Uuid::new_v4();
    let api_key = create_api_key(&schema, business).await;
    create_webhook(
        instances[0].api(),
        &api_key,
        &receiver.url,
        &["booking.created"],
    )
    .await;
    send_event(instances[0].api(), &token, business).await;

    let requests = receiver.wait_for_requests(3).await;
    let delivery_id = requests[2].delivery_id.clone();
    let client = schema.client().await;
    let holder: Option<String> = client
        .query_one(
            "SELECT leased_by FROM deliveries WHERE id = $1",
            &[&delivery_id],
        )
        .await
        .expect("reading the lease")
        .get(0);
    let holder = holder.expect("the hanging attempt holds a lease");
    let index = instances
        .iter()
        .position(|instance| instance.worker.as_deref() == Some(holder.as_str()))
        .unwrap_or_else(|| panic!("no instance is the lease holder {holder}"));
    let mut victim = instances.remove(index);
    victim.kill();
    let survivor = &instances[0];

    let requests = receiver.wait_for_requests(4).await;
    let takeover = &requests[3];
    let waited = takeover.arrived_at.duration_since(requests[2].arrived_at);
    eprintln!(
        "{} took over after {waited:?} (lease {lease:?}) from {}",
        survivor.label, victim.label
    );
    assert!(
        waited >= lease - Duration::from_millis(500),
        "the delivery was taken over after {waited:?}, before its {lease:?} lease ended"
    );
    assert!(
        waited < lease + Duration::from_secs(5),
        "the takeover took {waited:?}"
    );
    for request in &requests {
        assert_eq!(
            request.delivery_id, delivery_id,
            "the same delivery id on every attempt"
        );
        assert_eq!(
            request.body, requests[0].body,
            "the same body on every attempt"
        );
    }

    wait_for("the delivery to succeed", || async {
        let status: String = client
            .query_one(
                "SELECT status FROM deliveries WHERE id = $1",
                &[&delivery_id],
            )
            .await
            .expect("reading the status")
            .get(0);
        (status == "succeeded").then_some(())
    })
    .await;
    let row = client
        .query_one(
            "SELECT attempt_count, auto_attempts, leased_by FROM deliveries WHERE id = $1",
            &[&delivery_id],
        )
        .await
        .expect("reading the delivery");
    let (attempt_count, auto_attempts, leased_by): (i64, i64, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(attempt_count, 3, "the killed attempt was never recorded");
    assert_eq!(auto_attempts, 3, "the retry counter continued");
    assert_eq!(leased_by, None);
    let attempts: Vec<(i64, String, Option<i32>)> = client
        .query(
            "SELECT number, trigger, status_code FROM attempts WHERE delivery_id = $1
             ORDER BY number",
            &[&delivery_id],
        )
        .await
        .expect("reading attempts")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let automatic = "automatic".to_owned();
    assert_eq!(
        attempts,
        [
            (1, automatic.clone(), Some(500)),
            (2, automatic.clone(), Some(500)),
            (3, automatic, Some(204)),
        ]
    );
}

/// A batch of attempts that the database rejects once is recorded again at
/// once, not left for the lease to run out, which would send its
/// deliveries a second time.
#[tokio::test]
async fn failed_attempt_batch_is_recorded_again() {
    let Some(schema) = TestSchema::create("failed_attempt_batch_is_recorded_again").await else {
        return;
    };
    let token = format!("producer-{}", Uuid::new_v4());
    let service = ServeProcess::start("instance", "all", &schema, &ServeOptions::new(&token)).await;
    let receiver = Receiver::start(|_, _| Reply::Status(204)).await;
    let business = Uuid::new_v4();
    let api_key = create_api_key(&schema, business).await;
    create_webhook(service.api(), &api_key, &receiver.url, &["booking.created"]).await;
    // The first statement that inserts attempts fails. A sequence is not
    // rolled back with it, so every later one succeeds.
    schema
        .client()
        .await
        .batch_execute(
            "CREATE SEQUENCE record_failures;
             CREATE FUNCTION fail_first_record() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF nextval('record_failures') = 1 THEN
                     RAISE EXCEPTION 'injected failure';
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER fail_first_record BEFORE INSERT ON attempts
                 FOR EACH STATEMENT EXECUTE FUNCTION fail_first_record();",
        )
        .await
        .expect("creating the failing trigger");

    let events = 5;
    send_events(&[service.api()], &token, business, events).await;
    // The lease lasts 30 s, beyond the wait, so only a new try gets here.
    let stored = wait_until_all(&schema, events, "succeeded").await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let failures: i64 = schema
        .client()
        .await
        .query_one("SELECT last_value FROM record_failures", &[])
        .await
        .expect("reading the sequence")
        .get(0);
    assert!(failures > 1, "the first insert failed and others followed");
    let requests = receiver.requests();
    assert_eq!(requests.len(), events, "one request per delivery");
    assert!(
        stored.values().all(|(_, attempts)| *attempts == 1),
        "every delivery has one attempt: {stored:?}"
    );
    let attempts: i64 = schema
        .client()
        .await
        .query_one("SELECT COUNT(*) FROM attempts", &[])
        .await
        .expect("counting attempts")
        .get(0);
    assert_eq!(attempts, events as i64);
}
