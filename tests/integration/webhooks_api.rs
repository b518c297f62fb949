//! `/v1/webhooks`: registration, listing, reading, replacing, deleting and
//! input validation.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::helpers::{
    ServiceOptions, TestBusiness, TestService, assert_invalid_field, assert_problem,
};

const HOOK_URL: &str = "http://127.0.0.1:9/hooks";

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("{value} is not an object"))
        .keys()
        .cloned()
        .collect()
}

fn key_set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

fn assert_utc_time(value: &Value, field: &str) {
    let text = value[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {value}"));
    let parsed = OffsetDateTime::parse(text, &Rfc3339)
        .unwrap_or_else(|error| panic!("{field} {text:?} is not RFC 3339: {error}"));
    assert!(parsed.offset().is_utc(), "{field} {text:?} is not in UTC");
}

async fn service_and_business() -> (TestService, TestBusiness) {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    (service, business)
}

#[tokio::test]
async fn create_returns_201_with_secret() {
    let (service, business) = service_and_business().await;

    let response = service
        .post_json(
            "/v1/webhooks",
            &business,
            &json!({"url": HOOK_URL, "events": ["booking.created", "client.updated"]}),
        )
        .await;

    assert_eq!(response.status, 201, "{}", response.text());
    let body = response.json();
    assert_eq!(
        keys(&body),
        key_set(&[
            "id",
            "url",
            "events",
            "isActive",
            "createdAt",
            "updatedAt",
            "secret"
        ])
    );
    assert!(
        uuid::Uuid::parse_str(body["id"].as_str().unwrap_or("")).is_ok(),
        "id is a UUID: {body}"
    );
    assert_eq!(body["url"], json!(HOOK_URL));
    assert_eq!(body["events"], json!(["booking.created", "client.updated"]));
    assert_eq!(body["isActive"], json!(true));
    assert_utc_time(&body, "createdAt");
    assert_utc_time(&body, "updatedAt");
    let secret = body["secret"].as_str().expect("secret is a string");
    assert_eq!(secret.len(), 64, "secret length");
    assert!(
        secret
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "secret {secret:?} is lowercase hex"
    );
}

#[tokio::test]
async fn secrets_differ_between_webhooks() {
    let (service, business) = service_and_business().await;

    let first = service
        .create_webhook(&business, HOOK_URL, &["booking.created"])
        .await;
    let second = service
        .create_webhook(&business, HOOK_URL, &["booking.created"])
        .await;

    assert_ne!(first.secret, second.secret);
    assert_ne!(first.id, second.id);
}

#[tokio::test]
async fn duplicate_events_are_removed() {
    let (service, business) = service_and_business().await;

    let created = service
        .create_webhook(
            &business,
            HOOK_URL,
            &[
                "booking.created",
                "client.updated",
                "booking.created",
                "client.updated",
            ],
        )
        .await;
    assert_eq!(
        created.body["events"],
        json!(["booking.created", "client.updated"])
    );

    service
        .update_webhook(
            &business,
            &created.id,
            HOOK_URL,
            &["person.updated", "person.updated"],
            true,
        )
        .await;
    let read = service
        .get(&format!("/v1/webhooks/{}", created.id), &business)
        .await
        .json();
    assert_eq!(read["events"], json!(["person.updated"]));
}

#[tokio::test]
async fn list_is_newest_first_without_secrets() {
    let (service, business) = service_and_business().await;
    let older = service
        .create_webhook(&business, "http://127.0.0.1:9/older", &["booking.created"])
        .await;
    let newer = service
        .create_webhook(&business, "http://127.0.0.1:9/newer", &["client.created"])
        .await;

    let response = service.get("/v1/webhooks", &business).await;

    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_eq!(keys(&body), key_set(&["data"]));
    let data = body["data"].as_array().expect("data is an array");
    assert_eq!(data.len(), 2, "listed webhooks: {body}");
    assert_eq!(data[0]["id"], json!(newer.id), "newest first");
    assert_eq!(data[1]["id"], json!(older.id), "oldest last");
    for webhook in data {
        assert_eq!(
            keys(webhook),
            key_set(&["id", "url", "events", "isActive", "createdAt", "updatedAt"]),
            "listed webhook {webhook}"
        );
    }
    assert!(
        !response.text().contains(&newer.secret),
        "the list contains a secret"
    );
}

#[tokio::test]
async fn get_returns_webhook_without_secret() {
    let (service, business) = service_and_business().await;
    let created = service
        .create_webhook(&business, HOOK_URL, &["booking.updated"])
        .await;

    let response = service
        .get(&format!("/v1/webhooks/{}", created.id), &business)
        .await;

    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_eq!(
        keys(&body),
        key_set(&["id", "url", "events", "isActive", "createdAt", "updatedAt"])
    );
    let mut expected = created.body.clone();
    expected
        .as_object_mut()
        .expect("created webhook is an object")
        .remove("secret");
    assert_eq!(
        body, expected,
        "GET returns what the 201 returned, less the secret"
    );
    assert!(!response.text().contains(&created.secret));
}

#[tokio::test]
async fn put_replaces_settings() {
    let (service, business) = service_and_business().await;
    let created = service
        .create_webhook(&business, HOOK_URL, &["booking.created"])
        .await;
    let path = format!("/v1/webhooks/{}", created.id);

    let response = service
        .put_json(
            &path,
            &business,
            &json!({
                "url": "http://127.0.0.1:9/replaced",
                "events": ["client.deleted", "time_block.updated"],
                "isActive": false
            }),
        )
        .await;

    assert_eq!(response.status, 204, "{}", response.text());
    assert!(response.body.is_empty(), "204 has no body");
    let read = service.get(&path, &business).await.json();
    assert_eq!(read["url"], json!("http://127.0.0.1:9/replaced"));
    assert_eq!(
        read["events"],
        json!(["client.deleted", "time_block.updated"])
    );
    assert_eq!(read["isActive"], json!(false));
    assert_eq!(read["createdAt"], created.body["createdAt"]);
    let created_at = OffsetDateTime::parse(read["createdAt"].as_str().unwrap(), &Rfc3339).unwrap();
    let updated_at = OffsetDateTime::parse(read["updatedAt"].as_str().unwrap(), &Rfc3339).unwrap();
    assert!(
        updated_at >= created_at,
        "updatedAt before createdAt: {read}"
    );
}

#[tokio::test]
async fn delete_returns_204_then_404() {
    let (service, business) = service_and_business().await;
    let created = service
        .create_webhook(&business, HOOK_URL, &["booking.created"])
        .await;
    let path = format!("/v1/webhooks/{}", created.id);

    let deleted = service.delete(&path, &business).await;
    assert_eq!(deleted.status, 204, "{}", deleted.text());

    let read = service.get(&path, &business).await;
    assert_problem(&read, 404, "GET after DELETE");
    let deleted_again = service.delete(&path, &business).await;
    assert_problem(&deleted_again, 404, "second DELETE");
    let replaced = service
        .put_json(
            &path,
            &business,
            &json!({"url": HOOK_URL, "events": ["booking.created"], "isActive": true}),
        )
        .await;
    assert_problem(&replaced, 404, "PUT after DELETE");
    let list = service.get("/v1/webhooks", &business).await.json();
    assert_eq!(list["data"], json!([]));
}

#[tokio::test]
async fn malformed_webhook_id_is_404() {
    let (service, business) = service_and_business().await;

    let response = service.get("/v1/webhooks/not-a-uuid", &business).await;

    assert_problem(&response, 404, "GET of a malformed id");
}

#[tokio::test]
async fn invalid_urls_are_rejected_with_422() {
    let (service, business) = service_and_business().await;
    let too_long = format!("http://127.0.0.1:9/{}", "a".repeat(2048));
    let cases = [
        ("not absolute", "127.0.0.1:9/hooks".to_owned()),
        ("relative path", "/hooks".to_owned()),
        ("leading space", " http://127.0.0.1:9/hooks".to_owned()),
        ("trailing space", "http://127.0.0.1:9/hooks ".to_owned()),
        ("trailing newline", "http://127.0.0.1:9/hooks\n".to_owned()),
        ("inner space", "http://127.0.0.1:9/ho oks".to_owned()),
        ("inner tab", "http://127.0.0.1:9/ho\toks".to_owned()),
        ("user info", "http://user:pass@127.0.0.1:9/hooks".to_owned()),
        ("user name only", "http://user@127.0.0.1:9/hooks".to_owned()),
        ("fragment", "http://127.0.0.1:9/hooks#part".to_owned()),
        ("over 2048 characters", too_long),
        ("ftp scheme", "ftp://127.0.0.1:9/hooks".to_owned()),
        ("empty", String::new()),
    ];

    for (case, url) in cases {
        let response = service
            .post_json(
                "/v1/webhooks",
                &business,
                &json!({"url": url, "events": ["booking.created"]}),
            )
            .await;
        assert_invalid_field(&response, "url", case);
    }

    let list = service.get("/v1/webhooks", &business).await.json();
    assert_eq!(list["data"], json!([]), "no invalid webhook was stored");
}

#[tokio::test]
async fn url_of_2048_characters_is_accepted() {
    let (service, business) = service_and_business().await;
    let prefix = "http://127.0.0.1:9/";
    let url = format!("{prefix}{}", "a".repeat(2048 - prefix.len()));
    assert_eq!(url.len(), 2048);

    let created = service
        .create_webhook(&business, &url, &["booking.created"])
        .await;

    assert_eq!(created.body["url"], json!(url));
}

#[tokio::test]
async fn invalid_events_are_rejected_with_422() {
    let (service, business) = service_and_business().await;
    let cases = [
        ("empty array", json!([]), "events"),
        ("missing", Value::Null, "events"),
        ("not an array", json!("booking.created"), "events"),
        ("unknown name", json!(["booking.exploded"]), "events[0]"),
        (
            "unknown after known",
            json!(["booking.created", "webhook.ping"]),
            "events[1]",
        ),
        ("wrong case", json!(["Booking.Created"]), "events[0]"),
        ("number", json!([7]), "events[0]"),
    ];

    for (case, events, field) in cases {
        let mut body = json!({"url": HOOK_URL});
        if !events.is_null() {
            body["events"] = events;
        }
        let response = service.post_json("/v1/webhooks", &business, &body).await;
        assert_invalid_field(&response, field, case);
    }
}

#[tokio::test]
async fn unknown_field_is_rejected_with_422() {
    let (service, business) = service_and_business().await;

    let response = service
        .post_json(
            "/v1/webhooks",
            &business,
            &json!({"url": HOOK_URL, "events": ["booking.created"], "description": "x"}),
        )
        .await;

    assert_invalid_field(&response, "description", "unknown field on POST");
}

#[tokio::test]
async fn problem_names_every_bad_field() {
    let (service, business) = service_and_business().await;

    let response = service
        .post_json(
            "/v1/webhooks",
            &business,
            &json!({"url": "ftp://127.0.0.1/", "events": [], "secret": "mine"}),
        )
        .await;

    assert_invalid_field(&response, "url", "bad url beside other errors");
    assert_invalid_field(&response, "events", "empty events beside other errors");
    assert_invalid_field(&response, "secret", "unknown field beside other errors");
}

#[tokio::test]
async fn put_requires_every_field() {
    let (service, business) = service_and_business().await;
    let created = service
        .create_webhook(&business, HOOK_URL, &["booking.created"])
        .await;
    let path = format!("/v1/webhooks/{}", created.id);
    let cases = [
        (
            "missing isActive",
            json!({"url": HOOK_URL, "events": ["booking.created"]}),
            "isActive",
        ),
        (
            "isActive not a boolean",
            json!({"url": HOOK_URL, "events": ["booking.created"], "isActive": "false"}),
            "isActive",
        ),
        (
            "missing url",
            json!({"events": ["booking.created"], "isActive": true}),
            "url",
        ),
        (
            "missing events",
            json!({"url": HOOK_URL, "isActive": true}),
            "events",
        ),
        (
            "unknown field",
            json!({"url": HOOK_URL, "events": ["booking.created"], "isActive": true, "x": 1}),
            "x",
        ),
    ];

    for (case, body, field) in cases {
        let response = service.put_json(&path, &business, &body).await;
        assert_invalid_field(&response, field, case);
    }

    let read = service.get(&path, &business).await.json();
    assert_eq!(read, {
        let mut expected = created.body.clone();
        expected.as_object_mut().unwrap().remove("secret");
        expected
    });
}

#[tokio::test]
async fn malformed_json_is_400() {
    let (service, business) = service_and_business().await;
    let created = service
        .create_webhook(&business, HOOK_URL, &["booking.created"])
        .await;

    let posted = service
        .call(
            reqwest::Method::POST,
            "/v1/webhooks",
            Some(&business.api_key),
            Some(br#"{"url": "http://127.0.0.1:9/", "events": ["#.to_vec()),
        )
        .await;
    assert_problem(&posted, 400, "truncated JSON on POST");

    let put = service
        .call(
            reqwest::Method::PUT,
            &format!("/v1/webhooks/{}", created.id),
            Some(&business.api_key),
            Some(b"{url: 'x'}".to_vec()),
        )
        .await;
    assert_problem(&put, 400, "invalid JSON on PUT");
}

#[tokio::test]
async fn non_object_body_is_422() {
    let (service, business) = service_and_business().await;

    let response = service
        .post_json("/v1/webhooks", &business, &json!(["booking.created"]))
        .await;

    assert_problem(&response, 422, "array body");
}

#[tokio::test]
async fn oversized_body_is_413() {
    let (service, business) = service_and_business().await;
    let body = json!({
        "url": HOOK_URL,
        "events": ["booking.created"],
        "padding": "x".repeat(100 * 1024),
    });

    let response = service.post_json("/v1/webhooks", &business, &body).await;

    assert_problem(&response, 413, "100 KiB body");
}
