//! Bearer authentication: business API keys and producer tokens.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use uuid::Uuid;

use super::{ApiError, AppState};
use crate::domain::credentials::hash_credential;

/// Keys or tokens remembered at most, before the memory is cleared. Keys
/// cannot be revoked yet, so a remembered key stays valid.
const API_KEY_CACHE_LIMIT: usize = 10_000;

/// The business whose API key authenticated the request.
pub struct Business(pub Uuid);

/// Proof that the request carries a valid producer token.
pub struct Producer;

fn bearer_token(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl FromRequestParts<AppState> for Business {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(parts).ok_or_else(ApiError::unauthorized)?;
        let hash = hash_credential(token);
        if let Some(business) = state
            .inner
            .api_keys
            .lock()
            .expect("key cache lock")
            .get(&hash)
        {
            return Ok(Business(*business));
        }
        let business = state
            .store()
            .find_api_key(hash.clone())
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        let mut cache = state.inner.api_keys.lock().expect("key cache lock");
        if cache.len() >= API_KEY_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(hash, business);
        Ok(Business(business))
    }
}

impl FromRequestParts<AppState> for Producer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(parts).ok_or_else(ApiError::unauthorized)?;
        let hash = hash_credential(token);
        if state.inner.configured_producer_token.as_deref() == Some(hash.as_str()) {
            return Ok(Producer);
        }
        let known = state
            .inner
            .producer_tokens
            .lock()
            .expect("token cache lock")
            .contains(&hash);
        if known {
            return Ok(Producer);
        }
        if !state.store().producer_token_exists(hash.clone()).await? {
            return Err(ApiError::unauthorized());
        }
        let mut cache = state
            .inner
            .producer_tokens
            .lock()
            .expect("token cache lock");
        if cache.len() >= API_KEY_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(hash);
        Ok(Producer)
    }
}
