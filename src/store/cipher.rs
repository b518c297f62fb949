//! Encryption of webhook secrets at rest, with AES-256-GCM.
//!
//! A stored secret is either plain text (no encryption key configured) or
//! `enc:v1:<key id>:<base64 of nonce and ciphertext>`, where the key id is
//! the first 8 hex characters of the key's SHA-256. Secrets are encrypted
//! with the current key and decrypted with whichever configured key matches,
//! so a key is rotated by adding the new one, re-encrypting, then dropping
//! the old one.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

const PREFIX: &str = "enc:v1:";
const NONCE_LENGTH: usize = 12;

struct Key {
    id: String,
    cipher: Aes256Gcm,
}

/// The configured encryption keys: the current one and any previous ones.
pub struct SecretCipher {
    current: Key,
    previous: Vec<Key>,
}

impl std::fmt::Debug for SecretCipher {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SecretCipher")
            .field("current", &self.current.id)
            .finish_non_exhaustive()
    }
}

fn parse_key(hex_key: &str) -> anyhow::Result<Key> {
    let bytes = hex::decode(hex_key.trim())
        .ok()
        .filter(|bytes| bytes.len() == 32)
        .ok_or_else(|| {
            anyhow::anyhow!("an encryption key must be 64 hex characters (32 random bytes)")
        })?;
    let id = hex::encode(&Sha256::digest(&bytes)[..4]);
    let cipher = Aes256Gcm::new_from_slice(&bytes).expect("the key is 32 bytes");
    Ok(Key { id, cipher })
}

impl SecretCipher {
    /// Builds a cipher from hex keys: the current key and the ones it replaced.
    pub fn new(current: &str, previous: &[String]) -> anyhow::Result<SecretCipher> {
        Ok(SecretCipher {
            current: parse_key(current)?,
            previous: previous
                .iter()
                .filter(|key| !key.trim().is_empty())
                .map(|key| parse_key(key))
                .collect::<anyhow::Result<_>>()?,
        })
    }

    /// Encrypts a secret with the current key.
    pub fn encrypt(&self, secret: &str) -> String {
        let mut nonce = [0u8; NONCE_LENGTH];
        getrandom::fill(&mut nonce).expect("the operating system random source is available");
        let ciphertext = self
            .current
            .cipher
            .encrypt(Nonce::from_slice(&nonce), secret.as_bytes())
            .expect("AES-GCM encryption of a short secret cannot fail");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        format!("{PREFIX}{}:{}", self.current.id, STANDARD.encode(sealed))
    }

    /// Tells whether a stored value is already encrypted with the current key.
    pub fn is_current(&self, stored: &str) -> bool {
        stored
            .strip_prefix(PREFIX)
            .is_some_and(|rest| rest.starts_with(&format!("{}:", self.current.id)))
    }

    /// Decrypts a stored secret; plain text passes through.
    pub fn decrypt(&self, stored: &str) -> anyhow::Result<String> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_owned());
        };
        let (key_id, sealed) = rest
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("an encrypted secret is malformed"))?;
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|key| key.id == key_id)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "a webhook secret is encrypted with key {key_id}, which is not configured; \
                     pass it in --previous-encryption-keys"
                )
            })?;
        let sealed = STANDARD.decode(sealed)?;
        if sealed.len() < NONCE_LENGTH {
            anyhow::bail!("an encrypted secret is too short");
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LENGTH);
        let plain = key
            .cipher
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .map_err(|_| anyhow::anyhow!("an encrypted secret failed authentication"))?;
        Ok(String::from_utf8(plain)?)
    }
}

/// Tells whether a stored secret is encrypted.
pub fn is_encrypted(stored: &str) -> bool {
    stored.starts_with(PREFIX)
}

/// Decrypts a stored secret when a cipher is configured.
pub fn open_secret(cipher: Option<&SecretCipher>, stored: &str) -> anyhow::Result<String> {
    match cipher {
        Some(cipher) => cipher.decrypt(stored),
        None if stored.starts_with(PREFIX) => anyhow::bail!(
            "webhook secrets are encrypted, but no encryption key is configured; \
             set CITAPRO_ENCRYPTION_KEY"
        ),
        None => Ok(stored.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const KEY_B: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

    #[test]
    fn encrypted_secret_round_trips() {
        let cipher = SecretCipher::new(KEY_A, &[]).unwrap();
        let sealed = cipher.encrypt("my-secret");
        assert!(sealed.starts_with(PREFIX));
        assert!(!sealed.contains("my-secret"));
        assert_eq!(cipher.decrypt(&sealed).unwrap(), "my-secret");
    }

    #[test]
    fn rotation_reads_previous_key() {
        let old = SecretCipher::new(KEY_A, &[]).unwrap();
        let sealed = old.encrypt("s");
        let rotated = SecretCipher::new(KEY_B, &[KEY_A.to_owned()]).unwrap();
        assert_eq!(rotated.decrypt(&sealed).unwrap(), "s");
        assert!(!rotated.is_current(&sealed));
        assert!(rotated.is_current(&rotated.encrypt("s")));
    }

    #[test]
    fn unknown_key_and_tampering_fail() {
        let sealed = SecretCipher::new(KEY_A, &[]).unwrap().encrypt("s");
        assert!(
            SecretCipher::new(KEY_B, &[])
                .unwrap()
                .decrypt(&sealed)
                .is_err()
        );
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(
            SecretCipher::new(KEY_A, &[])
                .unwrap()
                .decrypt(&tampered)
                .is_err()
        );
    }

    #[test]
    fn plain_secrets_pass_through() {
        let cipher = SecretCipher::new(KEY_A, &[]).unwrap();
        assert_eq!(cipher.decrypt("plain").unwrap(), "plain");
        assert_eq!(open_secret(None, "plain").unwrap(), "plain");
        assert!(open_secret(None, &cipher.encrypt("s")).is_err());
    }

    #[test]
    fn keys_must_be_32_bytes() {
        assert!(SecretCipher::new("abcd", &[]).is_err());
    }
}
