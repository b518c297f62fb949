//! Delivery signatures.
//!
//! `X-CitaPro-Signature` is the lowercase hex HMAC-SHA256 of the exact body
//! bytes, keyed with the UTF-8 bytes of the endpoint's secret string. The
//! Standard Webhooks `webhook-signature` header signs `{id}.{timestamp}.{body}`
//! with the same key and encodes it as `v1,<base64>`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &str) -> HmacSha256 {
    HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length")
}

/// Signs a body for the `X-CitaPro-Signature` header.
pub fn sign_body(secret: &str, body: &[u8]) -> String {
    let mut mac = mac(secret);
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Signs a delivery for the Standard Webhooks `webhook-signature` header.
pub fn sign_standard(secret: &str, delivery_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = mac(secret);
    mac.update(delivery_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Checks a hex signature against a body in constant time.
pub fn verify_body(secret: &str, body: &[u8], signature_hex: &str) -> bool {
    let Ok(expected) = hex::decode(signature_hex.trim()) else {
        return false;
    };
    let mut mac = mac(secret);
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_signature_matches_rfc4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            sign_body("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verify_accepts_own_signature_only() {
        let body = "{\"note\":\"café 😀\"}".as_bytes();
        let signature = sign_body("secret", body);
        assert!(verify_body("secret", body, &signature));
        assert!(!verify_body("other", body, &signature));
        assert!(!verify_body("secret", b"{}", &signature));
    }

    #[test]
    fn standard_signature_has_v1_prefix() {
        let signature = sign_standard("secret", "id", 1, b"{}");
        assert!(signature.starts_with("v1,"));
        assert_eq!(signature.len(), 3 + 44);
    }

    /// Cases computed by examples/receivers/generate_test_vectors.py with
    /// Python's hmac module, independent of this code.
    const TEST_VECTORS: &str = include_str!("../../docs/signature-test-vectors.json");

    #[test]
    fn signatures_match_published_test_vectors() {
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(TEST_VECTORS).expect("test vectors are a JSON array");
        assert!(!cases.is_empty(), "the test vector file has no cases");
        for case in &cases {
            let field = |key: &str| {
                case[key]
                    .as_str()
                    .unwrap_or_else(|| panic!("test vector field {key:?} is not a string: {case}"))
            };
            let name = field("name");
            let secret = field("secret");
            let body = field("body").as_bytes();
            let delivery_id = field("deliveryId");
            let timestamp = case["timestamp"]
                .as_i64()
                .unwrap_or_else(|| panic!("test vector {name:?} has no integer timestamp"));

            assert_eq!(
                sign_body(secret, body),
                field("signature"),
                "X-CitaPro-Signature of case {name:?}"
            );
            assert_eq!(
                sign_standard(secret, delivery_id, timestamp, body),
                field("standardSignature"),
                "webhook-signature of case {name:?}"
            );
            assert!(
                verify_body(secret, body, field("signature")),
                "verify_body rejects case {name:?}"
            );
        }
    }
}
