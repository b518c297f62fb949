//! Delivery history and operator actions: listing with cursors, one
//! delivery with its attempts, redelivery, test pings, recovery, retention,
//! and isolation between businesses on every path.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    CreatedWebhook, Reply, ServiceOptions, TestBusiness, TestReceiver, TestService, assert_problem,
    event_body, hmac_hex, ms,
};

async fn send_events(service: &TestService, business: &TestBusiness, count: usize) {
    for index in 0..count {
        service
            .accept_event(&event_body(
                "client.created",
                business.id,
                Uuid::new_v4(),
                &format!(r#"{{"firstname":"Ana {index}"}}"#),
                None,
            ))
            .await;
    }
}

async fn list(service: &TestService, business: &TestBusiness, webhook: &str, query: &str) -> Value {
    let response = service
        .get(
            &format!("/v1/webhooks/{webhook}/deliveries{query}"),
            business,
        )
        .await;
    assert_eq!(response.status, 200, "listing {query}: {}", response.text());
    response.json()
}

/// Reads one delivery with its attempts, which must be found.
async fn detail(service: &TestService, business: &TestBusiness, webhook: &str, id: &str) -> Value {
    let response = service
        .get(&format!("/v1/webhooks/{webhook}/deliveries/{id}"), business)
        .await;
    assert_eq!(
        response.status,
        200,
        "reading delivery {id}: {}",
        response.text()
    );
    response.json()
}

/// Waits until every delivery of the webhook has left `pending`.
async fn wait_until_settled(
    service: &TestService,
    business: &TestBusiness,
    webhook: &str,
) -> Value {
    for _ in 0..300 {
        let page = list(service, business, webhook, "?limit=250").await;
        let data = page["data"].as_array().expect("data is an array");
        if !data.is_empty() && data.iter().all(|d| d["status"] != "pending") {
            return page;
        }
        tokio::time::sleep(ms(20)).await;
    }
    panic!("deliveries of webhook {webhook} stayed pending");
}

async fn setup(reply: Reply) -> (TestService, TestBusiness, TestReceiver, CreatedWebhook) {
    let service = TestService::start(ServiceOptions::with_retry_schedule(vec![])).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start_with(reply).await;
    let webhook = service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;
    (service, business, receiver, webhook)
}

#[tokio::test]
async fn pages_never_skip_or_repeat() {
    let (service, business, receiver, webhook) = setup(Reply::Status(204)).await;
    send_events(&service, &business, 23).await;
    receiver.wait_for_requests(23).await;
    wait_until_settled(&service, &business, &webhook.id).await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(cursor) => format!("?limit=5&cursor={cursor}"),
            None => "?limit=5".to_owned(),
        };
        let page = list(&service, &business, &webhook.id, &query).await;
        let data = page["data"].as_array().expect("data is an array");
        assert!(data.len() <= 5, "page size");
        seen.extend(data.iter().cloned());
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 23, "every delivery listed");
    let ids: HashSet<&str> = seen.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 23, "no delivery listed twice");
    let keys: Vec<(String, String)> = seen
        .iter()
        .map(|d| {
            (
                d["createdAt"].as_str().unwrap().to_owned(),
                d["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(keys, sorted, "newest first, ties by id");
    let first = &seen[0];
    for key in [
        "id",
        "webhookId",
        "eventId",
        "event",
        "aggregateId",
        "status",
        "attemptCount",
        "createdAt",
        "lastAttemptAt",
        "nextAttemptAt",
        "lastStatusCode",
    ] {
        assert!(first.get(key).is_some(), "delivery has {key}: {first}");
    }
    assert_eq!(first["status"], "succeeded");
    assert_eq!(first["lastStatusCode"], 204);
}

#[tokio::test]
async fn pages_hold_across_equal_timestamps() {
    let (service, business, receiver, webhook) = setup(Reply::Status(204)).await;
    send_events(&service, &business, 12).await;
    receiver.wait_for_requests(12).await;
    wait_until_settled(&service, &business, &webhook.id).await;
    // Give every delivery the same creation time, as a burst within one
    // clock tick would.
    let Some(path) = service.database_url.strip_prefix("sqlite://") else {
        // The PostgreSQL store's own tests page across equal times.
        eprintln!("pages_hold_across_equal_timestamps runs on SQLite only");
        return;
    };
    let connection = rusqlite::Connection::open(path).expect("opening the test database");
    connection
        .execute("UPDATE deliveries SET created_at = 1772721000000000", [])
        .expect("setting equal creation times");

    let mut ids = Vec::new();
    let mut cursor = String::new();
    loop {
        let query = if cursor.is_empty() {
            "?limit=5".to_owned()
        } else {
            format!("?limit=5&cursor={cursor}")
        };
        let page = list(&service, &business, &webhook.id, &query).await;
        for delivery in page["data"].as_array().unwrap() {
            ids.push(delivery["id"].as_str().unwrap().to_owned());
        }
        match page["nextCursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), 12, "every delivery listed");
    assert_eq!(unique.len(), 12, "no delivery listed twice");
    let mut descending = ids.clone();
    descending.sort();
    descending.reverse();
    assert_eq!(ids, descending, "ties broken by id");
}

#[tokio::test]
async fn filters_and_cursor_errors() {
    let (service, business, receiver, webhook) = setup(Reply::Status(500)).await;
    send_events(&service, &business, 3).await;
    receiver.wait_for_requests(3).await;
    wait_until_settled(&service, &business, &webhook.id).await;

    let failed = list(&service, &business, &webhook.id, "?status=failed").await;
    assert_eq!(failed["data"].as_array().unwrap().len(), 3);
    let succeeded = list(&service, &business, &webhook.id, "?status=succeeded").await;
    assert_eq!(succeeded["data"].as_array().unwrap().len(), 0);
    let by_event = list(&service, &business, &webhook.id, "?event=booking.created").await;
    assert_eq!(by_event["data"].as_array().unwrap().len(), 0);

    for query in [
        "?status=lost",
        "?event=nope",
        "?limit=0",
        "?limit=251",
        "?limit=x",
    ] {
        let response = service
            .get(
                &format!("/v1/webhooks/{}/deliveries{query}", webhook.id),
                &business,
            )
            .await;
        assert_problem(&response, 422, query);
    }
    for cursor in ["abc", "%%%", "bm90LWEtY3Vyc29y"] {
        let response = service
            .get(
                &format!("/v1/webhooks/{}/deliveries?cursor={cursor}", webhook.id),
                &business,
            )
            .await;
        assert_problem(&response, 400, cursor);
    }

    // A cursor of another webhook's listing is rejected.
    let other_receiver = TestReceiver::start().await;
    let other = service
        .create_webhook(&business, &other_receiver.url, &["client.created"])
        .await;
    let page = list(&service, &business, &webhook.id, "?limit=1").await;
    let cursor = page["nextCursor"].as_str().expect("a second page exists");
    let response = service
        .get(
            &format!("/v1/webhooks/{}/deliveries?cursor={cursor}", other.id),
            &business,
        )
        .await;
    assert_problem(&response, 400, "foreign cursor");
}

#[tokio::test]
async fn delivery_shows_payload_and_attempts() {
    let (service, business, receiver, webhook) = setup(Reply::Status(500)).await;
    receiver.queue_replies([Reply::Status(500)]);
    send_events(&service, &business, 1).await;
    let received = receiver.wait_for_requests(1).await;
    let page = wait_until_settled(&service, &business, &webhook.id).await;
    let id = page["data"][0]["id"].as_str().unwrap();

    let delivery = detail(&service, &business, &webhook.id, id).await;
    assert_eq!(
        delivery["payload"].as_str().unwrap().as_bytes(),
        &received[0].body[..],
        "payload is the exact body sent"
    );
    let attempts = delivery["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    let attempt = &attempts[0];
    assert_eq!(attempt["number"], 1);
    assert_eq!(attempt["trigger"], "automatic");
    assert_eq!(attempt["statusCode"], 500);
    assert_eq!(attempt["errorKind"], "http_status");
    assert!(attempt["durationMs"].is_i64());
    assert!(attempt["startedAt"].is_string());
    assert!(attempt["responseBody"].is_string());
}

/// A response body with NUL is stored with U+FFFD in its place, because
/// PostgreSQL text cannot contain NUL.
#[tokio::test]
async fn response_body_nul_is_replaced() {
    let reply = Reply::Body {
        status: 200,
        body: b"ok\0nul\xff",
    };
    let (service, business, receiver, webhook) = setup(reply).await;
    send_events(&service, &business, 1).await;
    receiver.wait_for_requests(1).await;
    let page = wait_until_settled(&service, &business, &webhook.id).await;
    assert_eq!(page["data"][0]["status"], "succeeded");
    let id = page["data"][0]["id"].as_str().unwrap();

    let attempts = detail(&service, &business, &webhook.id, id).await["attempts"].clone();
    assert_eq!(attempts.as_array().unwrap().len(), 1);
    assert_eq!(attempts[0]["responseBody"], "ok\u{FFFD}nul\u{FFFD}");
}

#[tokio::test]
async fn redelivery_turns_failed_into_succeeded() {
    let (service, business, receiver, webhook) = setup(Reply::Status(500)).await;
    send_events(&service, &business, 1).await;
    let first = receiver.wait_for_requests(1).await.remove(0);
    let page = wait_until_settled(&service, &business, &webhook.id).await;
    let id = page["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(page["data"][0]["status"], "failed");

    receiver.reply_with(Reply::Status(200));
    let path = format!("/v1/webhooks/{}/deliveries/{id}/redeliver", webhook.id);
    let response = service.post_json(&path, &business, &json!({})).await;
    assert_eq!(response.status, 202, "{}", response.text());
    let again = receiver.wait_for_requests(2).await.remove(1);
    assert_eq!(again.delivery_id(), first.delivery_id(), "same delivery id");
    assert_eq!(again.body, first.body, "same body");
    assert_eq!(
        again.header("x-citapro-signature"),
        hmac_hex(&webhook.secret, &again.body)
    );

    let mut detail = Value::Null;
    for _ in 0..200 {
        detail = service
            .get(
                &format!("/v1/webhooks/{}/deliveries/{id}", webhook.id),
                &business,
            )
            .await
            .json();
        if detail["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(ms(20)).await;
    }
    assert_eq!(detail["status"], "succeeded");
    let attempts = detail["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[1]["trigger"], "manual");
    assert_eq!(attempts[1]["number"], 2);

    // A succeeded delivery can be sent again too.
    let response = service.post_json(&path, &business, &json!({})).await;
    assert_eq!(response.status, 202);
    receiver.wait_for_requests(3).await;
}

#[tokio::test]
async fn test_ping_reports_outcome() {
    let (service, business, receiver, webhook) = setup(Reply::Status(500)).await;
    let path = format!("/v1/webhooks/{}/test", webhook.id);
    let response = service.post_json(&path, &business, &json!({})).await;
    assert_eq!(response.status, 200, "{}", response.text());
    let attempt = response.json();
    assert_eq!(attempt["trigger"], "test");
    assert_eq!(attempt["statusCode"], 500);
    assert_eq!(attempt["errorKind"], "http_status");
    let ping = receiver.wait_for_requests(1).await.remove(0);
    assert_eq!(ping.header("x-citapro-event"), "webhook.ping");
    assert_eq!(ping.json()["event"], "webhook.ping");
    assert_eq!(
        ping.header("x-citapro-signature"),
        hmac_hex(&webhook.secret, &ping.body)
    );
    assert!(!ping.header("webhook-signature").is_empty());

    let page = list(&service, &business, &webhook.id, "").await;
    let delivery = &page["data"][0];
    assert_eq!(delivery["event"], "webhook.ping");
    assert_eq!(delivery["status"], "failed");
    receiver
        .assert_count_stays(1, ms(500), "a test ping is never retried")
        .await;
}

#[tokio::test]
async fn test_ping_to_hanging_endpoint_times_out() {
    let service = TestService::start(ServiceOptions {
        request_timeout: ms(800),
        ..ServiceOptions::default()
    })
    .await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start_with(Reply::Hang).await;
    let webhook = service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;
    let started = std::time::Instant::now();
    let response = service
        .post_json(
            &format!("/v1/webhooks/{}/test", webhook.id),
            &business,
            &json!({}),
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["errorKind"], "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the request timeout"
    );
}

#[tokio::test]
async fn recover_requeues_failed_deliveries() {
    let (service, business, receiver, webhook) = setup(Reply::Status(500)).await;
    send_events(&service, &business, 3).await;
    receiver.wait_for_requests(3).await;
    wait_until_settled(&service, &business, &webhook.id).await;

    let path = format!("/v1/webhooks/{}/recover", webhook.id);
    let window = json!({"since": "2020-01-01T00:00:00Z", "dryRun": true});
    let response = service.post_json(&path, &business, &window).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["deliveries"], 3);
    receiver
        .assert_count_stays(3, ms(300), "a dry run sends nothing")
        .await;

    let empty = json!({"since": "2020-01-01T00:00:00Z", "until": "2020-01-02T00:00:00Z"});
    let response = service.post_json(&path, &business, &empty).await;
    assert_eq!(
        response.json()["deliveries"],
        0,
        "window before every delivery"
    );

    receiver.reply_with(Reply::Status(204));
    let response = service
        .post_json(&path, &business, &json!({"since": "2020-01-01T00:00:00Z"}))
        .await;
    assert_eq!(response.json()["deliveries"], 3);
    receiver.wait_for_requests(6).await;
    let page = wait_until_settled(&service, &business, &webhook.id).await;
    for delivery in page["data"].as_array().unwrap() {
        assert_eq!(delivery["status"], "succeeded");
    }

    for invalid in [
        json!({}),
        json!({"since": "yesterday"}),
        json!({"since": "2020-01-01T00:00:00Z", "dryRun": "yes"}),
        json!({"since": "2021-01-01T00:00:00Z", "until": "2020-01-01T00:00:00Z"}),
        json!({"since": "2020-01-01T00:00:00Z", "extra": 1}),
    ] {
        let response = service.post_json(&path, &business, &invalid).await;
        assert_problem(&response, 422, &invalid.to_string());
    }
}

#[tokio::test]
async fn retention_purges_old_history() {
    let service = TestService::start(ServiceOptions {
        history_retention: Duration::from_secs(1),
        ..ServiceOptions::default()
    })
    .await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start_with(Reply::Status(204)).await;
    let webhook = service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;
    send_events(&service, &business, 2).await;
    receiver.wait_for_requests(2).await;
    wait_until_settled(&service, &business, &webhook.id).await;
    for _ in 0..150 {
        let page = list(&service, &business, &webhook.id, "").await;
        if page["data"].as_array().unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(ms(20)).await;
    }
    panic!("history older than the retention period was not purged");
}

#[tokio::test]
async fn history_is_isolated_per_business() {
    let (service, owner, receiver, webhook) = setup(Reply::Status(500)).await;
    send_events(&service, &owner, 1).await;
    receiver.wait_for_requests(1).await;
    let page = wait_until_settled(&service, &owner, &webhook.id).await;
    let delivery = page["data"][0]["id"].as_str().unwrap().to_owned();
    let stranger = service.create_business().await;
    let base = format!("/v1/webhooks/{}", webhook.id);

    let response = service.get(&format!("{base}/deliveries"), &stranger).await;
    assert_problem(&response, 404, "list");
    let response = service
        .get(&format!("{base}/deliveries/{delivery}"), &stranger)
        .await;
    assert_problem(&response, 404, "get");
    let response = service
        .post_json(
            &format!("{base}/deliveries/{delivery}/redeliver"),
            &stranger,
            &json!({}),
        )
        .await;
    assert_problem(&response, 404, "redeliver");
    let response = service
        .post_json(&format!("{base}/test"), &stranger, &json!({}))
        .await;
    assert_problem(&response, 404, "test");
    let response = service
        .post_json(
            &format!("{base}/recover"),
            &stranger,
            &json!({"since": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_problem(&response, 404, "recover");
    receiver
        .assert_count_stays(1, ms(300), "a stranger's calls send nothing")
        .await;

    let missing = Uuid::new_v4();
    let response = service
        .get(&format!("{base}/deliveries/{missing}"), &owner)
        .await;
    assert_problem(&response, 404, "unknown delivery");
}
