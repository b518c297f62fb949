//! Keep-alive HTTP/1 connections, each polled by the attempt that uses it.
//!
//! A pooled client runs every connection in a task of its own, so a request
//! and its response each wake another task. Here the attempt's own task
//! drives the connection while it waits for the response, and hands the
//! connection back to an idle list when the response has been read. An idle
//! connection is polled again only when it is taken, which is when a
//! connection that the receiver closed is found and dropped.

use std::collections::{HashMap, VecDeque};
use std::error::Error as StdError;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http::uri::{Authority, Scheme};
use http_body_util::Full;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use super::sender::CheckedResolver;

type BoxError = Box<dyn StdError + Send + Sync>;
pub(super) type Connector = HttpsConnector<HttpConnector<CheckedResolver>>;
type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;
type Body = Full<Bytes>;

/// How long an unused connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often connections idle for longer than `IDLE_TIMEOUT` are closed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(15);

/// The scheme and authority that a connection was opened to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Origin {
    scheme: Scheme,
    authority: Authority,
}

impl Origin {
    /// Returns the origin of an absolute URI, or `None` for a relative one.
    pub fn of(uri: &Uri) -> Option<Origin> {
        Some(Origin {
            scheme: uri.scheme()?.clone(),
            authority: uri.authority()?.clone(),
        })
    }
}

/// One HTTP/1 connection and the handle that sends requests on it.
pub(super) struct Link {
    sender: SendRequest<Body>,
    connection: Pin<Box<Connection<Stream, Body>>>,
    /// False once the connection future has ended: closed or failed.
    open: bool,
    /// True when the connection served a request before.
    reused: bool,
}

impl Link {
    pub fn reused(&self) -> bool {
        self.reused
    }

    pub fn sender(&mut self) -> &mut SendRequest<Body> {
        &mut self.sender
    }

    /// Polls `future` to its end while driving this connection, so reading
    /// and writing happen in the caller's task.
    pub async fn drive<F: Future>(&mut self, future: F) -> F::Output {
        let mut future = pin!(future);
        poll_fn(|cx| {
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready(output);
            }
            self.poll_connection(cx);
            future.as_mut().poll(cx)
        })
        .await
    }

    fn poll_connection(&mut self, cx: &mut Context<'_>) {
        if self.open && self.connection.as_mut().poll(cx).is_ready() {
            self.open = false;
        }
    }

    /// Polls the connection once, outside any task, and returns whether it
    /// can take a request now. The poll reads an end of stream that the
    /// receiver sent, and moves a finished exchange to the idle state.
    fn ready(&mut self) -> bool {
        self.poll_connection(&mut Context::from_waker(Waker::noop()));
        self.open && self.sender.is_ready()
    }
}

struct Idle {
    link: Link,
    since: Instant,
}

/// Opens connections and keeps the idle ones by origin.
pub(super) struct Connections {
    connector: Connector,
    idle: Mutex<HashMap<Origin, VecDeque<Idle>>>,
    max_idle_per_origin: usize,
}

impl Connections {
    /// Keeps up to `max_idle_per_origin` idle connections to each origin.
    /// Inside a Tokio runtime, a task closes connections left idle too long.
    pub fn new(connector: Connector, max_idle_per_origin: usize) -> Arc<Connections> {
        let connections = Arc::new(Connections {
            connector,
            idle: Mutex::default(),
            max_idle_per_origin: max_idle_per_origin.max(1),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&connections)));
        }
        connections
    }

    /// Takes the most recently used idle connection to `origin` that can
    /// take a request, closing the ones that cannot.
    pub fn take(&self, origin: &Origin) -> Option<Link> {
        loop {
            let Idle { mut link, since } = {
                let mut idle = self.idle.lock().expect("idle connections lock");
                idle.get_mut(origin)?.pop_back()?
            };
            if since.elapsed() < IDLE_TIMEOUT && link.ready() {
                link.reused = true;
                return Some(link);
            }
        }
    }

    /// Opens a new connection to the origin of `uri`.
    pub async fn connect(&self, uri: &Uri) -> Result<Link, BoxError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx)).await?;
        let stream = connector.call(uri.clone()).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(stream).await?;
        let mut link = Link {
            sender,
            connection: Box::pin(connection),
            open: true,
            reused: false,
        };
        if !link.ready() {
            return Err("the new connection closed before its first request".into());
        }
        Ok(link)
    }

    /// Keeps `link` for the next request to `origin`, if it can take one
    /// and there is room.
    pub fn put(&self, origin: Origin, mut link: Link) {
        if !link.ready() {
            return;
        }
        let mut idle = self.idle.lock().expect("idle connections lock");
        let list = idle.entry(origin).or_default();
        if list.len() < self.max_idle_per_origin {
            list.push_back(Idle {
                link,
                since: Instant::now(),
            });
        }
    }

    /// Removes the connections idle longer than `IDLE_TIMEOUT`.
    fn close_expired(&self) {
        let mut expired = Vec::new();
        {
            let mut idle = self.idle.lock().expect("idle connections lock");
            idle.retain(|_, list| {
                // The oldest connections are at the front.
                while list
                    .front()
                    .is_some_and(|entry| entry.since.elapsed() >= IDLE_TIMEOUT)
                {
                    expired.extend(list.pop_front());
                }
                !list.is_empty()
            });
        }
        // Closing sockets happens after the lock is released.
        drop(expired);
    }
}

/// Closes expired idle connections until the connections are dropped.
async fn sweep(connections: Weak<Connections>) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(connections) = connections.upgrade() else {
            return;
        };
        connections.close_expired();
    }
}
