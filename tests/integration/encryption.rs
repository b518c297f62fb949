//! Webhook secrets encrypted at rest: what the database holds, what the
//! receiver verifies, and the commands that change keys.

use std::process::Command;

use citapro_webhooks::store::Store;
use citapro_webhooks::store::cipher::SecretCipher;
use uuid::Uuid;

use crate::helpers::{
    SERVICE_BINARY, ServiceOptions, TestReceiver, TestService, event_body, hmac_hex,
};

const KEY: &str = "3f1e2d4c5b6a79880716253443526170f1e2d3c4b5a69788796a5b4c3d2e1f00";
const OTHER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// Reads a webhook's secret in the form that the database stores it.
async fn stored_secret(database_url: &str, webhook_id: &str) -> String {
    let store = Store::open(database_url)
        .await
        .expect("opening the test database");
    let secrets = store
        .webhook_secrets()
        .await
        .expect("reading the stored secrets");
    secrets
        .into_iter()
        .find(|(id, _)| id.to_string() == webhook_id)
        .map(|(_, secret)| secret)
        .unwrap_or_else(|| panic!("webhook {webhook_id} has no stored secret"))
}

#[tokio::test]
async fn stored_secret_is_encrypted() {
    let service = TestService::start(ServiceOptions {
        encryption_key: Some(KEY.to_owned()),
        ..ServiceOptions::default()
    })
    .await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    let webhook = service
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;

    let stored = stored_secret(&service.database_url, &webhook.id).await;
    assert!(stored.starts_with("enc:v1:"), "stored form {stored}");
    assert!(!stored.contains(&webhook.secret));
    let cipher = SecretCipher::new(KEY, &[]).expect("the test key is valid");
    assert_eq!(cipher.decrypt(&stored).unwrap(), webhook.secret);

    service
        .accept_event(&event_body(
            "client.created",
            business.id,
            Uuid::new_v4(),
            r#"{"firstname":"Inés"}"#,
            None,
        ))
        .await;
    let requests = receiver.wait_for_requests(1).await;
    assert_eq!(
        requests[0].header("x-citapro-signature"),
        hmac_hex(&webhook.secret, &requests[0].body),
        "the delivery is signed with the plain secret"
    );
}

#[tokio::test]
async fn encrypt_secrets_converts_plain_secrets() {
    let service = TestService::start(ServiceOptions::default()).await;
    let business = service.create_business().await;
    let webhook = service
        .create_webhook(&business, "http://127.0.0.1:9/hooks", &["client.created"])
        .await;
    assert_eq!(
        stored_secret(&service.database_url, &webhook.id).await,
        webhook.secret
    );

    let output = Command::new(SERVICE_BINARY)
        .args(["encrypt-secrets", "--database-url", &service.database_url])
        .env("CITAPRO_ENCRYPTION_KEY", KEY)
        .output()
        .expect("running encrypt-secrets");
    assert!(output.status.success(), "{output:?}");

    let stored = stored_secret(&service.database_url, &webhook.id).await;
    assert!(stored.starts_with("enc:v1:"), "stored form {stored}");
    let cipher = SecretCipher::new(KEY, &[]).expect("the test key is valid");
    assert_eq!(cipher.decrypt(&stored).unwrap(), webhook.secret);

    let rotated = Command::new(SERVICE_BINARY)
        .args(["encrypt-secrets", "--database-url", &service.database_url])
        .env("CITAPRO_ENCRYPTION_KEY", OTHER_KEY)
        .env("CITAPRO_PREVIOUS_ENCRYPTION_KEYS", KEY)
        .output()
        .expect("running encrypt-secrets with a new key");
    assert!(rotated.status.success(), "{rotated:?}");
    let stored = stored_secret(&service.database_url, &webhook.id).await;
    let new_cipher = SecretCipher::new(OTHER_KEY, &[]).expect("the test key is valid");
    assert_eq!(new_cipher.decrypt(&stored).unwrap(), webhook.secret);
}

#[tokio::test]
async fn serve_rejects_unknown_key() {
    let service = TestService::start(ServiceOptions {
        encryption_key: Some(KEY.to_owned()),
        ..ServiceOptions::default()
    })
    .await;
    let business = service.create_business().await;
    service
        .create_webhook(&business, "http://127.0.0.1:9/hooks", &["client.created"])
        .await;

    let output = Command::new(SERVICE_BINARY)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--database-url", &service.database_url])
        .env("CITAPRO_ENCRYPTION_KEY", OTHER_KEY)
        .output()
        .expect("running serve with another key");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot be decrypted"), "{stderr}");
    assert!(
        !stderr.contains(KEY) && !stderr.contains(OTHER_KEY),
        "{stderr}"
    );
}
