//! One HTTP attempt of one delivery: sign, POST, read a bounded response.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER, USER_AGENT};
use url::Url;

use super::retry::parse_retry_after;
use crate::domain::destination::{DestinationPolicy, check_address, check_host};
use crate::domain::signature::{sign_body, sign_standard};
use crate::store::cipher::{SecretCipher, open_secret};
use crate::store::{ErrorKind, Job};

/// Response bytes read at most; the rest is never read.
pub const MAX_RESPONSE_READ: usize = 64 * 1024;
/// Response bytes kept in the attempt history.
pub const MAX_RESPONSE_STORED: usize = 4 * 1024;

/// The outcome of one attempt.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    pub started_at_micros: i64,
    pub duration_ms: i64,
    pub status_code: Option<u16>,
    pub error_kind: Option<ErrorKind>,
    pub response_body: Option<String>,
    pub retry_after: Option<Duration>,
}

impl AttemptOutcome {
    pub fn succeeded(&self) -> bool {
        self.error_kind.is_none()
            && self
                .status_code
                .is_some_and(|code| (200..300).contains(&code))
    }
}

/// Resolves destination names and rejects any name with a non-public address.
///
/// The client connects to the addresses returned here, so the address that was
/// checked is the address that is reached; TLS still uses the hostname.
#[derive(Clone)]
pub struct CheckedResolver {
    lookup: Arc<dyn Lookup>,
}

/// Looks up the addresses of a host name.
pub trait Lookup: Send + Sync + 'static {
    fn lookup(&self, host: String) -> Resolving;
}

/// The operating system's resolver.
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: String) -> Resolving {
        Box::pin(async move {
            let addresses: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            Ok(Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

impl CheckedResolver {
    pub fn new(lookup: Arc<dyn Lookup>) -> CheckedResolver {
        CheckedResolver { lookup }
    }
}

/// A destination that the address policy rejects.
#[derive(Debug, thiserror::Error)]
#[error("destination not allowed: {0}")]
pub struct DestinationBlocked(String);

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let lookup = self.lookup.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addresses: Vec<SocketAddr> = lookup.lookup(host.clone()).await?.collect();
            if addresses.is_empty() {
                return Err(format!("no address found for {host}").into());
            }
            for address in &addresses {
                check_address(address.ip()).map_err(DestinationBlocked)?;
            }
            Ok(Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

/// Sends delivery attempts over a shared pool of keep-alive connections.
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    policy: DestinationPolicy,
    timeout: Duration,
    /// Decrypts stored secrets, when they are stored encrypted.
    cipher: Option<Arc<SecretCipher>>,
}

impl Sender {
    /// Builds a sender. `lookup` replaces the system resolver (tests use it).
    /// Certificates in `extra_ca_file` (PEM) are trusted beside the system roots.
    ///
    /// Up to `max_in_flight` idle connections are kept per host: many webhooks
    /// can share one host, and a burst should not close connections that the
    /// next burst opens again.
    pub fn new(
        policy: DestinationPolicy,
        timeout: Duration,
        max_in_flight: usize,
        lookup: Option<Arc<dyn Lookup>>,
        extra_ca_file: Option<&Path>,
    ) -> anyhow::Result<Sender> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .http1_only()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(max_in_flight.max(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .no_proxy();
        if let Some(path) = extra_ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading the CA file {}", path.display()))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("parsing the CA file {}", path.display()))?;
            if certificates.is_empty() {
                anyhow::bail!("the CA file {} contains no PEM certificate", path.display());
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        if !policy.allow_private_targets {
            let lookup = lookup.unwrap_or_else(|| Arc::new(SystemLookup));
            builder = builder.dns_resolver(Arc::new(CheckedResolver::new(lookup)));
        }
        Ok(Sender {
            client: builder.build()?,
            policy,
            timeout,
            cipher: None,
        })
    }

    /// Decrypts secrets with `cipher` before signing.
    pub fn with_cipher(mut self, cipher: Option<Arc<SecretCipher>>) -> Sender {
        self.cipher = cipher;
        self
    }

    /// Makes one attempt of a job and returns its outcome. Never fails: every
    /// error becomes an outcome with its error kind.
    pub async fn attempt(&self, job: &Job) -> AttemptOutcome {
        let started_at_micros = crate::domain::clock::now_micros();
        let started = Instant::now();
        let secret = match open_secret(self.cipher.as_deref(), &job.secret) {
            Ok(secret) => secret,
            Err(error) => {
                // NOTE: start-up checks that every stored secret decrypts, so
                // this happens only when instances run with different keys.
                // The attempt is recorded as a connection failure and retried.
                tracing::error!(
                    error = %format!("{error:#}"),
                    webhook.id = %job.webhook_id,
                    delivery.id = %job.delivery_id,
                    "decrypting the webhook secret failed; check the encryption keys"
                );
                return AttemptOutcome {
                    started_at_micros,
                    ..failure(ErrorKind::Connect)
                };
            }
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut outcome = match self.destination_error(&job.url) {
            Some(kind) => failure(kind),
            None => self.post(job, &secret, deadline).await,
        };
        outcome.started_at_micros = started_at_micros;
        outcome.duration_ms = started.elapsed().as_millis() as i64;
        outcome
    }

    /// Checks a URL whose host is an IP literal, which skips name resolution.
    fn destination_error(&self, url: &str) -> Option<ErrorKind> {
        if self.policy.allow_private_targets {
            return None;
        }
        let parsed = Url::parse(url).ok()?;
        let host = parsed.host()?;
        check_host(&host)
            .err()
            .map(|_| ErrorKind::DestinationNotAllowed)
    }

    /// Sends the request and reads the response until `deadline`. Headers
    /// that have not arrived by then make the attempt a timeout. After that
    /// the deadline only cuts the body short, because the status line alone
    /// decides the outcome.
    async fn post(
        &self,
        job: &Job,
        secret: &str,
        deadline: tokio::time::Instant,
    ) -> AttemptOutcome {
        let headers = delivery_headers(job, secret);
        let request = self
            .client
            .post(job.url.as_str())
            .headers(headers)
            .body(job.payload.clone());
        let mut response = match tokio::time::timeout_at(deadline, request.send()).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return failure(classify(&error)),
            Err(_) => return failure(ErrorKind::Timeout),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| parse_retry_after(value, SystemTime::now()));

        let mut kept = Vec::new();
        let mut read = 0usize;
        while read < MAX_RESPONSE_READ {
            match tokio::time::timeout_at(deadline, response.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    read += chunk.len();
                    let room = MAX_RESPONSE_STORED.saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                // The status line alone decides the outcome; a body that ends
                // badly or late is only cut short.
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
            }
        }
        let success = (200..300).contains(&status);
        AttemptOutcome {
            started_at_micros: 0,
            duration_ms: 0,
            status_code: Some(status),
            error_kind: (!success).then_some(ErrorKind::HttpStatus),
            response_body: Some(String::from_utf8_lossy(&kept).into_owned()),
            retry_after: if status == 429 { retry_after } else { None },
        }
    }
}

fn failure(kind: ErrorKind) -> AttemptOutcome {
    AttemptOutcome {
        started_at_micros: 0,
        duration_ms: 0,
        status_code: None,
        error_kind: Some(kind),
        response_body: None,
        retry_after: None,
    }
}

/// Builds the documented headers of one attempt, signed at send time with
/// the webhook's plain-text secret.
pub fn delivery_headers(job: &Job, secret: &str) -> HeaderMap {
    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or_default();
    let delivery_id = job.delivery_id.to_string();
    let signature = sign_body(secret, &job.payload);
    let standard = sign_standard(secret, &delivery_id, timestamp, &job.payload);

    let mut headers = HeaderMap::with_capacity(9);
    let mut put = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    put("x-citapro-event", job.event.clone());
    put("x-citapro-signature", signature);
    put("x-citapro-delivery-id", delivery_id.clone());
    put("x-citapro-timestamp", timestamp.to_string());
    put("webhook-id", delivery_id);
    put("webhook-timestamp", timestamp.to_string());
    put("webhook-signature", standard);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("CitaPro-Webhooks/", env!("CARGO_PKG_VERSION"))),
    );
    headers
}

/// Maps a client error to the error kind recorded with the attempt.
fn classify(error: &reqwest::Error) -> ErrorKind {
    if error.is_timeout() {
        return ErrorKind::Timeout;
    }
    let mut source: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(cause) = source {
        if cause.is::<DestinationBlocked>() {
            return ErrorKind::DestinationNotAllowed;
        }
        if cause.is::<rustls::Error>() {
            return ErrorKind::Tls;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            // With reqwest 0.12 and tokio-rustls 0.26, a certificate error
            // arrives as an I/O error (kind Other) wrapping an I/O error (kind
            // InvalidData) wrapping the rustls error. `io::Error::source`
            // skips wrapped errors, so unwrap them one by one.
            let mut wrapped = io.get_ref();
            while let Some(inner) = wrapped {
                if inner.is::<rustls::Error>() {
                    return ErrorKind::Tls;
                }
                wrapped = inner
                    .downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::get_ref);
            }
            if io.kind() == std::io::ErrorKind::TimedOut {
                return ErrorKind::Timeout;
            }
        }
        source = cause.source();
    }
    ErrorKind::Connect
}
