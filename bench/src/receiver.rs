//! The loopback receiver: responds to every delivery and records when it arrived.
//!
//! It runs on its own multi-thread Tokio runtime, so the load driver's tasks
//! never sit in front of an arrival in the same run queue. A request to
//! `/k<i>` is a delivery to endpoint `i`; any other path is a raw request of
//! the ceiling measurement. Each request's body is searched for the event's
//! sequence number, so raw and real requests cost the receiver the same work.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// The untracked `data` field that carries an event's sequence number.
pub const SEQUENCE_FIELD: &str = "bench_seq";
/// [`SEQUENCE_FIELD`] as it appears in compact JSON, before its value.
const NEEDLE: &[u8] = b"\"bench_seq\":";

/// Maximum time a request to the hanging endpoint is held open. The
/// service gives up after its request timeout (10 s by default) anyway.
const MAX_HANG: Duration = Duration::from_secs(120);

/// One request as the receiver saw it.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// Endpoint index from the `/k<i>` path.
    pub endpoint: Option<u16>,
    /// Sequence number read from the body.
    pub seq: Option<u64>,
    /// When the request head arrived.
    pub at: Instant,
}

/// Everything recorded about one delivery id.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryRecord {
    pub first: Arrival,
    /// When an attempt of this delivery first got a 204 response.
    pub delivered_at: Option<Instant>,
    pub arrivals: u32,
}

#[derive(Default)]
struct Log {
    deliveries: HashMap<u128, DeliveryRecord>,
    /// Arrivals of a delivery id that had already got a 204 response.
    duplicates: u64,
    /// Arrivals of a delivery id seen before, whatever the earlier response.
    repeats: u64,
    /// Requests to a `/k<i>` path without a valid `X-CitaPro-Delivery-Id`.
    missing_delivery_id: u64,
    /// Requests whose body had no sequence number.
    missing_seq: u64,
}

/// The arrivals recorded so far, moved out of the receiver.
pub struct Recording {
    pub deliveries: HashMap<u128, DeliveryRecord>,
    pub duplicates: u64,
    pub repeats: u64,
    pub missing_delivery_id: u64,
    pub missing_seq: u64,
}

struct Shared {
    /// Endpoint whose requests are held open until released.
    hanging_endpoint: Option<u16>,
    /// Deliveries that got their first 204 response, on any endpoint.
    delivered: AtomicU64,
    raw_requests: AtomicU64,
    log: Mutex<Log>,
    /// Becomes true when held requests should get their response.
    release: watch::Receiver<bool>,
}

/// A receiver bound to a loopback port, listening now or later.
pub struct Receiver {
    runtime: Runtime,
    port: u16,
    shared: Arc<Shared>,
    release: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    listening: bool,
}

impl Receiver {
    /// Picks a free loopback port without listening on it yet, so senders
    /// get "connection refused" until [`Receiver::listen`] is called.
    pub fn reserve(hanging_endpoint: Option<u16>) -> anyhow::Result<Receiver> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("receiver")
            .enable_all()
            .build()
            .context("building the receiver's runtime")?;
        let port = free_port()?;
        let (release, release_watch) = watch::channel(false);
        let (stop, _) = watch::channel(false);
        Ok(Receiver {
            runtime,
            port,
            shared: Arc::new(Shared {
                hanging_endpoint,
                delivered: AtomicU64::new(0),
                raw_requests: AtomicU64::new(0),
                log: Mutex::new(Log::default()),
                release: release_watch,
            }),
            release,
            stop,
            listening: false,
        })
    }

    /// Starts listening on the reserved port.
    pub fn listen(&mut self) -> anyhow::Result<()> {
        if self.listening {
            return Ok(());
        }
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        let listener = std::net::TcpListener::bind(address).with_context(|| {
            format!("binding the receiver to {address}, which was free a moment ago")
        })?;
        listener.set_nonblocking(true)?;
        let _runtime = self.runtime.enter();
        let listener = TcpListener::from_std(listener)?;
        let shared = self.shared.clone();
        let stop = self.stop.subscribe();
        self.runtime.spawn(accept_loop(listener, shared, stop));
        self.listening = true;
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Deliveries that got a 204 response so far.
    pub fn delivered(&self) -> u64 {
        self.shared.delivered.load(Ordering::Acquire)
    }

    /// Requests to paths other than `/k<i>` so far.
    pub fn raw_requests(&self) -> u64 {
        self.shared.raw_requests.load(Ordering::Acquire)
    }

    /// Sends the responses of requests held by the hanging endpoint, and of
    /// every later one at once.
    pub fn release_held(&self) {
        let _ = self.release.send(true);
    }

    /// Moves the recorded arrivals out, leaving an empty log.
    pub fn take_recording(&self) -> Recording {
        let log = std::mem::take(&mut *self.shared.log.lock().expect("receiver log lock"));
        self.shared.delivered.store(0, Ordering::Release);
        self.shared.raw_requests.store(0, Ordering::Release);
        Recording {
            deliveries: log.deliveries,
            duplicates: log.duplicates,
            repeats: log.repeats,
            missing_delivery_id: log.missing_delivery_id,
            missing_seq: log.missing_seq,
        }
    }

    /// Releases held requests, stops accepting connections and drops open ones
    /// without waiting for them.
    pub fn shutdown(self) {
        let _ = self.release.send(true);
        let _ = self.stop.send(true);
        self.runtime.shutdown_background();
    }
}

/// Returns a loopback port that was free when checked.
pub fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                eprintln!("receiver: accepting a connection failed: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(shared.clone(), request));
            // Errors here are connections that the service closed, such as
            // a timed-out request to the hanging endpoint.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let at = Instant::now();
    let endpoint = endpoint_index(request.uri().path());
    let delivery_id = request
        .headers()
        .get("x-citapro-delivery-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|text| uuid::Uuid::try_parse(text).ok())
        .map(|id| id.as_u128());
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(status_response(StatusCode::BAD_REQUEST)),
    };
    let seq = find_sequence(&body);
    let hangs = endpoint.is_some() && endpoint == shared.hanging_endpoint;
    let arrival = Arrival { endpoint, seq, at };
    record(&shared, arrival, delivery_id, !hangs);

    if hangs {
        let mut release = shared.release.clone();
        let _ = tokio::time::timeout(MAX_HANG, release.wait_for(|released| *released)).await;
        return Ok(status_response(StatusCode::SERVICE_UNAVAILABLE));
    }
    Ok(status_response(StatusCode::NO_CONTENT))
}

fn record(shared: &Shared, arrival: Arrival, delivery_id: Option<u128>, succeeded: bool) {
    let mut log = shared.log.lock().expect("receiver log lock");
    if arrival.seq.is_none() {
        log.missing_seq += 1;
    }
    if arrival.endpoint.is_none() {
        shared.raw_requests.fetch_add(1, Ordering::Release);
        return;
    }
    let Some(delivery_id) = delivery_id else {
        log.missing_delivery_id += 1;
        return;
    };

    let delivered_at = succeeded.then_some(arrival.at);
    let mut first_success = succeeded;
    let mut duplicate = false;
    let mut repeat = false;
    log.deliveries
        .entry(delivery_id)
        .and_modify(|existing| {
            repeat = true;
            existing.arrivals += 1;
            if existing.delivered_at.is_some() {
                duplicate = true;
                first_success = false;
            } else {
                existing.delivered_at = delivered_at;
            }
        })
        .or_insert(DeliveryRecord {
            first: arrival,
            delivered_at,
            arrivals: 1,
        });

    log.repeats += u64::from(repeat);
    log.duplicates += u64::from(duplicate);
    if first_success {
        shared.delivered.fetch_add(1, Ordering::Release);
    }
}

fn status_response(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = status;
    response
}

/// Parses the endpoint index of a `/k<i>` path.
fn endpoint_index(path: &str) -> Option<u16> {
    path.strip_prefix("/k")?.parse().ok()
}

/// Finds `"bench_seq":<digits>` in a compact JSON body and parses the digits.
pub fn find_sequence(body: &[u8]) -> Option<u64> {
    let start = memchr::memmem::find(body, NEEDLE)? + NEEDLE.len();
    let digits = body[start..]
        .iter()
        .take_while(|byte| byte.is_ascii_digit())
        .count();
    std::str::from_utf8(&body[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_is_read_from_compact_json() {
        let body = br#"{"event":"booking.updated","data":{"bench_seq":4711,"status":"x"}}"#;
        assert_eq!(find_sequence(body), Some(4711));
    }

    #[test]
    fn needle_names_the_sequence_field() {
        assert_eq!(NEEDLE, format!("\"{SEQUENCE_FIELD}\":").as_bytes());
    }

    #[test]
    fn body_without_sequence_has_none() {
        assert_eq!(find_sequence(br#"{"data":{}}"#), None);
        assert_eq!(find_sequence(br#"{"bench_seq":"x"}"#), None);
    }

    #[test]
    fn endpoint_index_parses_k_paths_only() {
        assert_eq!(endpoint_index("/k0"), Some(0));
        assert_eq!(endpoint_index("/k12"), Some(12));
        assert_eq!(endpoint_index("/raw"), None);
        assert_eq!(endpoint_index("/k"), None);
    }
}
