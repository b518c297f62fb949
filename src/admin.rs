//! Administration commands that work on the database directly.
//!
//! Each new key is printed alone as the first line of standard output and is
//! never shown again; only its hash is stored. A running `serve` looks keys up
//! in the database, so a new key works at once.

use uuid::Uuid;

use crate::domain::credentials::{generate_api_key, generate_producer_token, hash_credential};
use crate::store::{Store, redact_url, sqlite_path};

/// Opens the database of a running or migrated service. A key written to a
/// SQLite file that does not exist yet would work on no server, so a
/// missing file is an error here instead of a new empty database.
async fn open_existing(database_url: &str) -> anyhow::Result<Store> {
    if let Some(path) = sqlite_path(database_url)
        && !std::path::Path::new(&path).exists()
    {
        anyhow::bail!(
            "the database file {path} does not exist; check --database-url, or create it \
             with `citapro-webhooks migrate` or by starting `serve`"
        );
    }
    Store::open(database_url).await
}

pub async fn create_api_key(database_url: &str, business: Uuid) -> anyhow::Result<()> {
    let store = open_existing(database_url).await?;
    let key = generate_api_key();
    store
        .insert_api_key(business, hash_credential(&key))
        .await?;
    println!("{key}");
    eprintln!("API key for business {business} created. It is shown only once; store it safely.");
    Ok(())
}

/// The maximum length of a producer token label, in characters.
const MAX_TOKEN_NAME: usize = 200;

pub async fn create_producer_token(database_url: &str, name: String) -> anyhow::Result<()> {
    let length = name.trim().chars().count();
    if length == 0 || length > MAX_TOKEN_NAME {
        anyhow::bail!(
            "invalid --name {name:?}: a label of 1 to {MAX_TOKEN_NAME} characters is required"
        );
    }
    let store = open_existing(database_url).await?;
    let token = generate_producer_token();
    store
        .insert_producer_token(name.clone(), hash_credential(&token))
        .await?;
    println!("{token}");
    eprintln!("Producer token {name:?} created. It is shown only once; store it safely.");
    Ok(())
}

pub async fn migrate(database_url: &str) -> anyhow::Result<()> {
    Store::open(database_url).await?;
    eprintln!("database {} is up to date", redact_url(database_url));
    Ok(())
}

/// Encrypts every stored webhook secret with the current key, decrypting old
/// values with the current or a previous key. Safe to run again: secrets
/// already encrypted with the current key are left alone.
pub async fn encrypt_secrets(
    database_url: &str,
    encryption_key: Option<&str>,
    previous_keys: &[String],
) -> anyhow::Result<()> {
    let cipher = crate::config::secret_cipher(encryption_key, previous_keys)?
        .ok_or_else(|| anyhow::anyhow!("set --encryption-key or CITAPRO_ENCRYPTION_KEY"))?;
    let store = open_existing(database_url).await?;
    let mut encrypted = 0usize;
    for (id, stored) in store.webhook_secrets().await? {
        if cipher.is_current(&stored) {
            continue;
        }
        let plain = cipher
            .decrypt(&stored)
            .map_err(|error| anyhow::anyhow!("webhook {id}: {error}"))?;
        if store
            .replace_webhook_secret(id, stored, cipher.encrypt(&plain))
            .await?
        {
            encrypted += 1;
        }
    }
    eprintln!("{encrypted} webhook secrets encrypted with the current key");
    Ok(())
}
