//! Bearer authentication and the isolation of one business from another.

use serde_json::json;
use uuid::Uuid;

use crate::helpers::{
    ServiceOptions, TestBusiness, TestReceiver, TestService, assert_problem,
    create_api_key_with_binary, event_body,
};

const HOOK_URL: &str = "http://127.0.0.1:9/hooks";

#[tokio::test]
async fn missing_api_key_is_401() {
    let service = TestService::start(ServiceOptions::default()).await;

    let list = service
        .call(reqwest::Method::GET, "/v1/webhooks", None, None)
        .await;
    assert_problem(&list, 401, "GET without a key");
    assert_eq!(
        list.headers
            .get("www-authenticate")
            .and_then(|value| value.to_str().ok()),
        Some("Bearer"),
        "401 names the Bearer scheme"
    );

    let create = service
        .call(
            reqwest::Method::POST,
            "/v1/webhooks",
            None,
            Some(
                json!({"url": HOOK_URL, "events": ["booking.created"]})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await;
    assert_problem(&create, 401, "POST without a key");
}

#[tokio::test]
async fn wrong_api_key_is_401() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let impostor = TestBusiness {
        id: business.id,
        api_key: format!("{}x", business.api_key),
    };

    let list = service.get("/v1/webhooks", &impostor).await;
    assert_problem(&list, 401, "GET with an altered key");

    let basic = service
        .call_with_authorization(
            reqwest::Method::GET,
            "/v1/webhooks",
            Some(&format!("Basic {}", business.api_key)),
            None,
        )
        .await;
    assert_problem(&basic, 401, "a valid key under the Basic scheme");
}

#[tokio::test]
async fn new_api_key_works_without_restart() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business_id = Uuid::new_v4();
    let unknown = TestBusiness {
        id: business_id,
        api_key: "cpk_unknown".to_owned(),
    };
    assert_problem(
        &service.get("/v1/webhooks", &unknown).await,
        401,
        "before the key exists",
    );

    let api_key = create_api_key_with_binary(&service.database_url, business_id).await;
    let business = TestBusiness {
        id: business_id,
        api_key,
    };

    let response = service.get("/v1/webhooks", &business).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json(), json!({"data": []}));
}

#[tokio::test]
async fn other_business_webhook_is_404() {
    let service = TestService::start(ServiceOptions::default()).await;
    let owner = service.create_business().await;
    let other = service.create_business().await;
    let created = service
        .create_webhook(&owner, HOOK_URL, &["booking.created"])
        .await;
    let path = format!("/v1/webhooks/{}", created.id);

    assert_problem(
        &service.get(&path, &other).await,
        404,
        "GET by another business",
    );
    let replaced = service
        .put_json(
            &path,
            &other,
            &json!({"url": "http://127.0.0.1:9/stolen", "events": ["client.created"], "isActive": false}),
        )
        .await;
    assert_problem(&replaced, 404, "PUT by another business");
    assert_problem(
        &service.delete(&path, &other).await,
        404,
        "DELETE by another business",
    );

    let others_list = service.get("/v1/webhooks", &other).await.json();
    assert_eq!(
        others_list["data"],
        json!([]),
        "the other business lists nothing"
    );
    let owners_view = service.get(&path, &owner).await;
    assert_eq!(owners_view.status, 200, "the owner still sees the webhook");
    let mut expected = created.body.clone();
    expected.as_object_mut().unwrap().remove("secret");
    assert_eq!(
        owners_view.json(),
        expected,
        "the other business changed nothing"
    );
}

#[tokio::test]
async fn events_reach_only_their_business() {
    let service = TestService::start(ServiceOptions::default()).await;
    let first = service.create_business().await;
    let second = service.create_business().await;
    let first_receiver = TestReceiver::start().await;
    let second_receiver = TestReceiver::start().await;
    service
        .create_webhook(&first, &first_receiver.url, &["client.created"])
        .await;
    service
        .create_webhook(&second, &second_receiver.url, &["client.created"])
        .await;

    let aggregate = Uuid::new_v4();
    let accepted = service
        .accept_event(&event_body(
            "client.created",
            second.id,
            aggregate,
            r#"{"firstname":"Ana"}"#,
            None,
        ))
        .await;
    assert_eq!(accepted["deliveries"], json!(1));

    let received = second_receiver.wait_for_requests(1).await;
    assert_eq!(
        received[0].json()["aggregate_id"],
        json!(aggregate.to_string())
    );
    assert_eq!(
        first_receiver.request_count(),
        0,
        "the other business got the event"
    );
}

#[tokio::test]
async fn business_key_on_events_is_401() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let body = event_body(
        "client.created",
        business.id,
        Uuid::new_v4(),
        r#"{"firstname":"Ana"}"#,
        None,
    );

    let with_business_key = service
        .call(
            reqwest::Method::POST,
            "/v1/events",
            Some(&business.api_key),
            Some(body.clone().into_bytes()),
        )
        .await;
    assert_problem(&with_business_key, 401, "a business API key");

    let without_token = service
        .call(
            reqwest::Method::POST,
            "/v1/events",
            None,
            Some(body.clone().into_bytes()),
        )
        .await;
    assert_problem(&without_token, 401, "no token");

    let wrong_token = service
        .call(
            reqwest::Method::POST,
            "/v1/events",
            Some("cpt_wrong"),
            Some(body.into_bytes()),
        )
        .await;
    assert_problem(&wrong_token, 401, "an unknown producer token");
}

#[tokio::test]
async fn producer_token_cannot_manage_webhooks() {
    let service = TestService::start(ServiceOptions::default()).await;

    let response = service
        .call(
            reqwest::Method::GET,
            "/v1/webhooks",
            Some(&service.producer_token),
            None,
        )
        .await;

    assert_problem(&response, 401, "the producer token on /v1/webhooks");
}
