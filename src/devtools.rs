//! Commands for developers of receivers: `listen`, `trigger` and `verify`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;
use uuid::Uuid;

use crate::domain::catalogue::find_event;
use crate::domain::samples::sample_request;
use crate::domain::signature::verify_body;

/// Runs a local receiver that checks each delivery's signature and prints it.
///
/// Every request is answered with `status`, so retries can be watched by
/// answering an error.
pub async fn listen(port: u16, secret: Option<String>, status: u16) -> anyhow::Result<()> {
    let status = StatusCode::from_u16(status).context("--status must be an HTTP status code")?;
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    eprintln!(
        "Listening on http://{}/ (any path); answering {status}. Press Ctrl-C to stop.",
        listener.local_addr()?
    );
    let app = Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
        let secret = secret.clone();
        async move {
            println!("{}", describe_delivery(&headers, &body, secret.as_deref()));
            status
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("-")
}

/// Formats one received delivery for the terminal.
pub fn describe_delivery(headers: &HeaderMap, body: &[u8], secret: Option<&str>) -> String {
    let signature = header(headers, "x-citapro-signature");
    let verdict = match secret {
        Some(secret) if verify_body(secret, body, signature) => "signature valid",
        Some(_) => "SIGNATURE INVALID",
        None => "signature not checked (no --secret)",
    };
    let changes = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|payload| payload.pointer("/data/changes").cloned())
        .map(|changes| format!("\n  changes: {changes}"))
        .unwrap_or_default();
    format!(
        "{event}  delivery {id}  timestamp {timestamp}  {verdict}{changes}\n  body: {body}",
        event = header(headers, "x-citapro-event"),
        id = header(headers, "x-citapro-delivery-id"),
        timestamp = header(headers, "x-citapro-timestamp"),
        body = String::from_utf8_lossy(body),
    )
}

/// Sends a sample event of the given type to a running server's producer API.
pub async fn trigger(
    event: &str,
    business: Uuid,
    server: &str,
    producer_token: &str,
) -> anyhow::Result<()> {
    let event_type = find_event(event).with_context(|| {
        format!("unknown event {event:?}; see the event list in docs/receiving-webhooks.md")
    })?;
    let body = sample_request(
        event_type,
        &business.to_string(),
        &Uuid::new_v4().to_string(),
    );
    let url = format!("{}/v1/events", server.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .post(&url)
        .bearer_auth(producer_token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .with_context(|| format!("sending the event to {url}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("the server responded with {status}: {text}");
    }
    println!("{text}");
    Ok(())
}

/// Checks a signature over a body read from a file or standard input.
pub fn verify(secret: &str, signature: &str, file: Option<PathBuf>) -> anyhow::Result<bool> {
    let body = match file {
        Some(path) => {
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?
        }
        None => {
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut body)
                .context("reading standard input")?;
            body
        }
    };
    Ok(verify_body(secret, &body, signature))
}
