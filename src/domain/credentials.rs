//! Webhook secrets, business API keys and producer tokens.
//!
//! Each is 32 bytes from the operating system's random source. Secrets are
//! 64 lowercase hex characters, used as a string key. API keys and producer
//! tokens carry a prefix that names their kind, and only their SHA-256 hash
//! is stored: they are random enough that a slow password hash adds nothing.

use sha2::{Digest, Sha256};

/// The prefix of business API keys.
pub const API_KEY_PREFIX: &str = "cpk_";
/// The prefix of producer tokens.
pub const PRODUCER_TOKEN_PREFIX: &str = "cpt_";

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system random source is available");
    hex::encode(bytes)
}

/// Generates a webhook signing secret.
pub fn generate_secret() -> String {
    random_hex()
}

/// Generates a business API key.
pub fn generate_api_key() -> String {
    format!("{API_KEY_PREFIX}{}", random_hex())
}

/// Generates a producer token.
pub fn generate_producer_token() -> String {
    format!("{PRODUCER_TOKEN_PREFIX}{}", random_hex())
}

/// Hashes a key or token for storage and lookup.
pub fn hash_credential(credential: &str) -> String {
    hex::encode(Sha256::digest(credential.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_64_lowercase_hex() {
        let secret = generate_secret();
        assert_eq!(secret.len(), 64);
        assert!(
            secret
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(generate_api_key(), generate_api_key());
    }

    #[test]
    fn hash_hides_the_credential() {
        let key = generate_api_key();
        let hash = hash_credential(&key);
        assert_eq!(hash.len(), 64);
        assert!(!hash.contains(&key[API_KEY_PREFIX.len()..]));
    }
}
