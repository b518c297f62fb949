//! Redirects are never followed, even to another loopback receiver while
//! private targets are allowed.

use std::time::Duration;

use crate::helpers::{Reply, TestReceiver};
use crate::service::{Service, Settings, attempt};

#[tokio::test]
async fn internal_redirect_not_followed() {
    let service = Service::start(Settings::default()).await;
    let business = service.create_business().await;
    let internal = TestReceiver::start().await;
    let internal_port = internal
        .url
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .expect("the receiver URL has a port")
        .to_owned();
    let location = format!("http://127.0.0.1:{internal_port}/");

    // 307 and 308 keep the method and body, so a client that followed them
    // would repeat the signed POST at the new address.
    let mut webhooks = Vec::new();
    let mut redirecting = Vec::new();
    for status in [302u16, 307, 308] {
        let receiver = TestReceiver::start_with(Reply::Redirect {
            status,
            location: location.clone(),
        })
        .await;
        let webhook = service
            .create_webhook(&business, &receiver.url, &["client.created"])
            .await;
        webhooks.push((status, webhook));
        redirecting.push(receiver);
    }

    service.send_client_created(&business).await;

    for (status, webhook) in &webhooks {
        let delivery = service.wait_for_attempts(&business, &webhook.id, 1).await;
        let first = attempt(&delivery, 0);
        assert_eq!(first["statusCode"], *status, "attempt: {first}");
        assert_eq!(first["errorKind"], "http_status", "attempt: {first}");
    }
    for receiver in &redirecting {
        assert_eq!(
            receiver.request_count(),
            1,
            "one request to {}",
            receiver.url
        );
    }
    internal
        .assert_count_stays(0, Duration::from_secs(1), "the Location target")
        .await;
}
