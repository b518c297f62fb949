//! One HTTP attempt of one delivery: sign, POST, read a bounded response.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http::header::{
    ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT,
};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use url::Url;

use super::retry::parse_retry_after;
use crate::domain::destination::{DestinationPolicy, check_address, check_host};
use crate::domain::signature::{sign_body, sign_standard};
use crate::store::cipher::{SecretCipher, open_secret};
use crate::store::{ErrorKind, Job};

type BoxError = Box<dyn StdError + Send + Sync>;

/// The addresses a name resolves to, or why it does not resolve.
pub type Resolving = Pin<Box<dyn Future<Output = Result<Vec<SocketAddr>, BoxError>> + Send>>;

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

/// Resolves destination names and, unless private targets are allowed,
/// rejects any name with a non-public address.
///
/// The client connects to the addresses returned here, so the address that was
/// checked is the address that is reached; TLS still uses the hostname.
#[derive(Clone)]
pub struct CheckedResolver {
    lookup: Arc<dyn Lookup>,
    check: bool,
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
            Ok(addresses)
        })
    }
}

impl CheckedResolver {
    pub fn new(lookup: Arc<dyn Lookup>, check: bool) -> CheckedResolver {
        CheckedResolver { lookup, check }
    }
}

/// A destination that the address policy rejects.
#[derive(Debug, thiserror::Error)]
#[error("destination not allowed: {0}")]
pub struct DestinationBlocked(String);

impl tower_service::Service<Name> for CheckedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let lookup = self.lookup.clone();
        let check = self.check;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addresses = lookup.lookup(host.clone()).await?;
            if addresses.is_empty() {
                return Err(format!("no address found for {host}").into());
            }
            if check {
                for address in &addresses {
                    check_address(address.ip()).map_err(DestinationBlocked)?;
                }
            }
            Ok(addresses.into_iter())
        })
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector<CheckedResolver>>, Full<Bytes>>;

/// Sends delivery attempts over a shared pool of keep-alive connections.
#[derive(Clone)]
pub struct Sender {
    client: HttpClient,
    policy: DestinationPolicy,
    timeout: Duration,
    /// Decrypts stored secrets, when they are stored encrypted.
    cipher: Option<Arc<SecretCipher>>,
    /// Request URIs by webhook URL, so each URL is parsed once.
    destinations: Arc<Mutex<HashMap<String, Destination>>>,
}

/// A webhook URL read for sending: its request URI, or why no request is made.
type Destination = Result<Uri, ErrorKind>;

/// Webhook URLs whose parsed form is kept. The map is emptied when full.
const MAX_DESTINATIONS: usize = 10_000;

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
        let lookup = lookup.unwrap_or_else(|| Arc::new(SystemLookup));
        let resolver = CheckedResolver::new(lookup, !policy.allow_private_targets);
        let mut http = HttpConnector::new_with_resolver(resolver);
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_root_certificates(trusted_roots(extra_ca_file)?)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(max_in_flight.max(1))
            .build(https);
        Ok(Sender {
            client,
            policy,
            timeout,
            cipher: None,
            destinations: Arc::default(),
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
        let mut outcome = match self.destination(&job.url) {
            Ok(uri) => self.post(job, uri, &secret, deadline).await,
            Err(kind) => failure(kind),
        };
        outcome.started_at_micros = started_at_micros;
        outcome.duration_ms = started.elapsed().as_millis() as i64;
        outcome
    }

    /// Returns the request URI of a webhook URL, parsed on first use.
    ///
    /// The URL is read by the WHATWG URL rules (IDNA host, percent-encoding,
    /// dot segments), as at registration. The stored text may hold characters
    /// that an HTTP request line cannot carry as they are.
    fn destination(&self, url: &str) -> Destination {
        let cached = self
            .destinations
            .lock()
            .expect("destination cache lock")
            .get(url)
            .cloned();
        if let Some(destination) = cached {
            return destination;
        }
        let destination = self.parse_destination(url);
        let mut destinations = self.destinations.lock().expect("destination cache lock");
        if destinations.len() >= MAX_DESTINATIONS {
            destinations.clear();
        }
        destinations.insert(url.to_owned(), destination.clone());
        destination
    }

    fn parse_destination(&self, url: &str) -> Destination {
        // Stored URLs passed this parser at registration, so only the HTTP
        // library's stricter `Uri` could reject one, as a connection failure.
        let parsed = Url::parse(url).map_err(|_| ErrorKind::Connect)?;
        // A host that is an IP literal skips name resolution, so the
        // address policy is checked here.
        if !self.policy.allow_private_targets {
            let host = parsed.host().ok_or(ErrorKind::Connect)?;
            check_host(&host).map_err(|_| ErrorKind::DestinationNotAllowed)?;
        }
        Uri::try_from(parsed.as_str()).map_err(|_| ErrorKind::Connect)
    }

    /// Sends the request and reads the response until `deadline`. Headers
    /// that have not arrived by then make the attempt a timeout. After that
    /// the deadline only cuts the body short, because the status line alone
    /// decides the outcome.
    async fn post(
        &self,
        job: &Job,
        uri: Uri,
        secret: &str,
        deadline: tokio::time::Instant,
    ) -> AttemptOutcome {
        let mut request = Request::new(Full::new(job.payload.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = delivery_headers(job, secret);
        let response = match tokio::time::timeout_at(deadline, self.client.request(request)).await {
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

        let mut body = response.into_body();
        let mut kept = Vec::new();
        let mut read = 0usize;
        while read < MAX_RESPONSE_READ {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    let Ok(chunk) = frame.into_data() else {
                        continue;
                    };
                    read += chunk.len();
                    let room = MAX_RESPONSE_STORED.saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                // The status line alone decides the outcome; a body that ends
                // badly or late is only cut short.
                Ok(None) | Ok(Some(Err(_))) | Err(_) => break,
            }
        }
        let success = (200..300).contains(&status);
        AttemptOutcome {
            started_at_micros: 0,
            duration_ms: 0,
            status_code: Some(status),
            error_kind: (!success).then_some(ErrorKind::HttpStatus),
            response_body: Some(response_text(&kept)),
            retry_after: if status == 429 { retry_after } else { None },
        }
    }
}

/// Converts the kept start of a response body to the text that is stored.
/// Invalid UTF-8 and NUL characters become U+FFFD, because a PostgreSQL
/// `TEXT` value cannot contain NUL.
fn response_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text.into_owned()
    }
}

/// Collects the system's trusted roots and the PEM certificates of `extra_ca_file`.
fn trusted_roots(extra_ca_file: Option<&Path>) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped. A system with none still
    // reaches receivers whose certificates the extra CA signed.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the CA file {}", path.display()))?;
        let certificates = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing the CA file {}", path.display()))?;
        if certificates.is_empty() {
            anyhow::bail!("the CA file {} contains no PEM certificate", path.display());
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .with_context(|| format!("adding a certificate of {}", path.display()))?;
        }
    }
    Ok(roots)
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

    let mut headers = HeaderMap::with_capacity(10);
    let mut put = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(HeaderName::from_static(name), value);
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
    headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
    headers
}

/// Maps a client error to the error kind recorded with the attempt.
fn classify(error: &hyper_util::client::legacy::Error) -> ErrorKind {
    let mut source: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(cause) = source {
        if cause.is::<DestinationBlocked>() {
            return ErrorKind::DestinationNotAllowed;
        }
        if cause.is::<rustls::Error>() {
            return ErrorKind::Tls;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            // tokio-rustls reports a certificate error as an I/O error (kind
            // InvalidData) wrapping the rustls error, and `io::Error::source`
            // skips wrapped errors, so unwrap them one by one.
            let mut wrapped = io.get_ref();
            while let Some(inner) = wrapped {
                if inner.is::<rustls::Error>() {
                    return ErrorKind::Tls;
                }
                if inner.is::<DestinationBlocked>() {
                    return ErrorKind::DestinationNotAllowed;
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
