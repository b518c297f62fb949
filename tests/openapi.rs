//! The OpenAPI document: the committed copy in `docs/openapi.json` equals the
//! one generated from the code, the server serves it, and it describes every
//! error as problem+json.
//!
//! After changing the API, regenerate the committed copy with
//! `CITAPRO_UPDATE_OPENAPI=1 cargo test --test openapi`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use citapro_webhooks::api::{openapi_document, openapi_json};
use citapro_webhooks::app::{RunOptions, run};
use citapro_webhooks::config::ServiceConfig;
use citapro_webhooks::domain::destination::MAX_URL_LENGTH;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const COMMITTED_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");

/// Returns the generated document as a JSON value.
fn generated_document() -> Value {
    serde_json::from_str(&openapi_json()).expect("the generated document is JSON")
}

/// Returns every operation of the document as (method, path, operation).
fn operations(document: &Value) -> Vec<(String, String, Value)> {
    let paths = document["paths"].as_object().expect("paths is an object");
    let mut found = Vec::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is an object");
        for (method, operation) in item {
            found.push((method.clone(), path.clone(), operation.clone()));
        }
    }
    found
}

/// Follows a `$ref` to `#/components/responses/…`, or returns the response itself.
fn resolve_response<'a>(document: &'a Value, response: &'a Value) -> &'a Value {
    match response["$ref"].as_str() {
        Some(reference) => {
            let name = reference
                .strip_prefix("#/components/responses/")
                .unwrap_or_else(|| panic!("unexpected response reference {reference}"));
            &document["components"]["responses"][name]
        }
        None => response,
    }
}

#[test]
fn openapi_file_matches_code() {
    let generated = openapi_json();
    if std::env::var_os("CITAPRO_UPDATE_OPENAPI").is_some() {
        std::fs::write(COMMITTED_PATH, &generated).expect("docs/openapi.json is writable");
        return;
    }
    let committed = std::fs::read_to_string(Path::new(COMMITTED_PATH)).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json differs from the document generated from the code; \
         regenerate it with `CITAPRO_UPDATE_OPENAPI=1 cargo test --test openapi` \
         and commit the result"
    );
}

/// Collects every `$ref` in `value`.
fn references(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            for (key, item) in object {
                match (key.as_str(), item) {
                    ("$ref", Value::String(reference)) => found.push(reference.clone()),
                    _ => references(item, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| references(item, found)),
        _ => {}
    }
}

#[test]
fn openapi_references_resolve() {
    let document = generated_document();
    let mut found = Vec::new();
    references(&document, &mut found);
    assert!(!found.is_empty());
    for reference in found {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{reference} is not a local reference"));
        assert!(
            document.pointer(pointer).is_some(),
            "{reference} names nothing in the document"
        );
    }
}

#[test]
fn openapi_version_is_3_1() {
    let document = generated_document();
    assert_eq!(document["openapi"], "3.1.0");
}

#[test]
fn openapi_describes_every_route() {
    let document = generated_document();
    let mut found: Vec<String> = operations(&document)
        .into_iter()
        .map(|(method, path, _)| format!("{} {path}", method.to_uppercase()))
        .collect();
    found.sort();
    let mut expected = vec![
        "GET /v1/webhooks",
        "POST /v1/webhooks",
        "GET /v1/webhooks/{id}",
        "PUT /v1/webhooks/{id}",
        "DELETE /v1/webhooks/{id}",
        "GET /v1/webhooks/{id}/deliveries",
        "GET /v1/webhooks/{id}/deliveries/{delivery_id}",
        "POST /v1/webhooks/{id}/deliveries/{delivery_id}/redeliver",
        "POST /v1/webhooks/{id}/test",
        "POST /v1/webhooks/{id}/recover",
        "POST /v1/events",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /openapi.json",
    ];
    expected.sort();
    assert_eq!(found, expected);
}

#[test]
fn openapi_errors_are_problem_json() {
    let document = generated_document();
    for (method, path, operation) in operations(&document) {
        let responses = operation["responses"]
            .as_object()
            .expect("responses is an object");
        for (status, response) in responses {
            if !status.starts_with('4') && !status.starts_with('5') {
                continue;
            }
            let content = resolve_response(&document, response)["content"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path} {status} has no content"));
            let types: Vec<&String> = content.keys().collect();
            assert_eq!(
                types,
                ["application/problem+json"],
                "{method} {path} {status}"
            );
        }
    }
}

#[test]
fn openapi_bodies_reject_unknown_fields() {
    let document = generated_document();
    let mut bodies = 0;
    for (method, path, operation) in operations(&document) {
        let Some(body) = operation.get("requestBody") else {
            continue;
        };
        bodies += 1;
        let reference = body["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path} has no body schema reference"));
        let name = reference.trim_start_matches("#/components/schemas/");
        let schema = &document["components"]["schemas"][name];
        assert_eq!(
            schema["additionalProperties"],
            Value::Bool(false),
            "{method} {path} body {name}"
        );
        let statuses = operation["responses"].as_object().expect("responses");
        for status in ["400", "413", "422"] {
            assert!(
                statuses.contains_key(status),
                "{method} {path} reads a body but does not list {status}"
            );
        }
    }
    assert_eq!(
        bodies, 4,
        "bodies of POST and PUT webhooks, recover, events"
    );
}

#[test]
fn openapi_secures_business_and_producer_calls() {
    let document = generated_document();
    for (method, path, operation) in operations(&document) {
        let expected = if path == "/v1/events" {
            Some("producerToken")
        } else if path.starts_with("/v1/") {
            Some("businessApiKey")
        } else {
            None
        };
        let scheme = operation["security"][0]
            .as_object()
            .and_then(|requirement| requirement.keys().next().cloned());
        assert_eq!(scheme.as_deref(), expected, "{method} {path}");
        if expected.is_some() {
            assert!(
                operation["responses"].get("401").is_some(),
                "{method} {path} lists no 401"
            );
        }
    }
    let schemes = &document["components"]["securitySchemes"];
    for name in ["businessApiKey", "producerToken"] {
        assert_eq!(schemes[name]["type"], "http", "{name}");
        assert_eq!(schemes[name]["scheme"], "bearer", "{name}");
    }
}

#[test]
fn openapi_lists_fifteen_subscribable_events() {
    let document = generated_document();
    let names = document["components"]["schemas"]["EventName"]["enum"]
        .as_array()
        .expect("EventName is an enum");
    assert_eq!(names.len(), 15);
}

/// A service on a loopback port with a fresh SQLite database.
struct TestService {
    base_url: String,
    database_url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl TestService {
    async fn start() -> TestService {
        let dir = tempfile::tempdir().expect("temporary directory");
        let database_url = format!("sqlite://{}", dir.path().join("webhooks.db").display());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            ServiceConfig::new(database_url.clone()),
            listener,
            shutdown.clone(),
            RunOptions::default(),
        ));
        let service = TestService {
            base_url: format!("http://{address}"),
            database_url,
            shutdown,
            task,
            _dir: dir,
        };
        service.wait_until_ready().await;
        service
    }

    async fn wait_until_ready(&self) {
        let client = reqwest::Client::new();
        let url = format!("{}/healthz", self.base_url);
        let started = Instant::now();
        while client.get(&url).send().await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "the service did not answer within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Creates an API key with the command line, as an operator would.
    fn create_api_key(&self) -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_citapro-webhooks"))
            .args(["api-key", "create", "--business"])
            .arg(Uuid::new_v4().to_string())
            .args(["--database-url", &self.database_url])
            .output()
            .expect("the command line runs");
        assert!(output.status.success(), "api-key create failed: {output:?}");
        let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
        stdout.lines().next().expect("a key line").to_owned()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("service task")
            .expect("service stops cleanly");
    }
}

#[test]
fn openapi_url_limit_matches_validation() {
    let document = generated_document();
    for name in ["CreateWebhookRequest", "UpdateWebhookRequest"] {
        let url = &document["components"]["schemas"][name]["properties"]["url"];
        assert_eq!(url["maxLength"], MAX_URL_LENGTH, "{name}");
    }
}

#[tokio::test]
async fn openapi_served_without_auth() {
    let service = TestService::start().await;
    let response = reqwest::get(format!("{}/openapi.json", service.base_url))
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE].clone();
    assert_eq!(content_type, "application/json");
    let body = response.text().await.expect("body");
    let served: Value = serde_json::from_str(&body).expect("served document is JSON");
    let generated = serde_json::to_value(openapi_document()).expect("document serializes");
    assert_eq!(served, generated);
    service.stop().await;
}

/// The document promises problem+json for every error, so a path segment
/// that axum cannot decode must not fall back to axum's plain-text `400`.
#[tokio::test]
async fn non_utf8_path_id_is_problem_404() {
    let service = TestService::start().await;
    let key = service.create_api_key();
    let client = reqwest::Client::new();
    for path in [
        "/v1/webhooks/%FF",
        "/v1/webhooks/%FF/deliveries",
        "/v1/webhooks/%FF/deliveries/%FE",
    ] {
        let response = client
            .get(format!("{}{path}", service.base_url))
            .bearer_auth(&key)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 404, "{path}");
        let content_type = response.headers()[reqwest::header::CONTENT_TYPE].clone();
        assert_eq!(content_type, "application/problem+json", "{path}");
        let text = response.text().await.expect("body");
        let body: Value = serde_json::from_str(&text).expect("problem body is JSON");
        assert_eq!(body["status"], 404, "{path}");
    }
    service.stop().await;
}
