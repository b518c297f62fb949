//! What operators read: health, readiness and Prometheus metrics.

use citapro_webhooks::config::Role;
use uuid::Uuid;

use crate::helpers::{
    Reply, ServiceOptions, TestReceiver, TestService, assert_problem, event_body,
};

#[tokio::test]
async fn health_and_readiness_answer_ok() {
    let service = TestService::start(ServiceOptions::default()).await;
    for path in ["/healthz", "/readyz"] {
        let response = service.call(reqwest::Method::GET, path, None, None).await;
        assert_eq!(response.status, 200, "{path}");
        assert_eq!(response.json()["status"], "ok", "{path}");
    }
}

#[tokio::test]
async fn metrics_count_events_and_attempts() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start_with(Reply::Status(503)).await;
    service
        .create_webhook(&business, &receiver.url, &["person.deleted"])
        .await;
    service
        .accept_event(&event_body(
            "person.deleted",
            business.id,
            Uuid::new_v4(),
            r#"{"firstName":"Ana"}"#,
            None,
        ))
        .await;
    receiver.wait_for_requests(1).await;

    // Attempts are recorded just after the receiver answers.
    let mut text = String::new();
    for _ in 0..50 {
        let response = service
            .call(reqwest::Method::GET, "/metrics", None, None)
            .await;
        assert_eq!(response.status, 200);
        assert!(response.content_type().starts_with("text/plain"));
        text = response.text();
        if text.contains(r#"status_class="5xx""#) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        text.contains(r#"citapro_events_accepted_total{event="person.deleted"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"citapro_attempts_total{status_class="5xx",error_kind="http_status",trigger="automatic"}"#),
        "{text}"
    );
    assert!(text.contains("citapro_deliveries_scheduled "), "{text}");
    assert!(
        text.contains("citapro_store_operation_duration_seconds"),
        "{text}"
    );
}

#[tokio::test]
async fn worker_serves_only_operations_routes() {
    let service = TestService::start(ServiceOptions {
        role: Role::Worker,
        ..ServiceOptions::default()
    })
    .await;
    for path in ["/healthz", "/readyz"] {
        let response = service.call(reqwest::Method::GET, path, None, None).await;
        assert_eq!(response.status, 200, "{path}");
        assert_eq!(response.json()["status"], "ok", "{path}");
    }
    let metrics = service
        .call(reqwest::Method::GET, "/metrics", None, None)
        .await;
    assert_eq!(metrics.status, 200, "/metrics");
    assert!(
        metrics.content_type().starts_with("text/plain"),
        "/metrics content type {}",
        metrics.content_type()
    );
    assert!(
        metrics.text().contains("citapro_deliveries_due "),
        "{}",
        metrics.text()
    );

    let business = service.create_business().await;
    let api_routes = [
        (reqwest::Method::GET, "/v1/webhooks"),
        (reqwest::Method::POST, "/v1/webhooks"),
        (reqwest::Method::POST, "/v1/events"),
        (reqwest::Method::GET, "/openapi.json"),
    ];
    for (method, path) in api_routes {
        let response = service
            .call(
                method.clone(),
                path,
                Some(&business.api_key),
                Some(b"{}".to_vec()),
            )
            .await;
        assert_problem(&response, 404, &format!("{method} {path} on a worker"));
    }
    let response = service
        .call(reqwest::Method::POST, "/healthz", None, None)
        .await;
    assert_problem(&response, 405, "POST /healthz on a worker");
}

#[test]
fn key_commands_require_existing_database() {
    let dir = tempfile::tempdir().expect("creating a temporary folder");
    let missing = dir.path().join("missing").join("webhooks.db");
    let database_url = format!("sqlite://{}", missing.display());
    for args in [
        vec![
            "api-key",
            "create",
            "--business",
            "550e8400-e29b-41d4-a716-446655440005",
        ],
        vec!["producer-token", "create", "--name", "typo"],
    ] {
        let output = std::process::Command::new(crate::helpers::SERVICE_BINARY)
            .args(&args)
            .args(["--database-url", &database_url])
            .output()
            .expect("running the command line");
        assert!(!output.status.success(), "{args:?} must fail");
        assert!(output.stdout.is_empty(), "{args:?} printed no key");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("does not exist"), "{args:?}: {stderr}");
    }
    assert!(!missing.exists(), "no database file was created");
}
