//! Receivers written on raw TCP, for responses that a well-behaved HTTP
//! server never sends: no response, trickled headers or body, a body that
//! never ends. Each records when every request arrived and when its
//! connection closed, and how many requests were in flight at once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::helpers::DEADLINE;

/// Size of each body piece that the receivers write.
const PIECE: usize = 64 * 1024;
/// Request heads longer than this are rejected, so a broken client cannot fill memory.
const MAX_HEAD: usize = 64 * 1024;
/// Content-Length of the `200` responses whose body never completes.
const UNFINISHED_LENGTH: u64 = 1_000_000;
/// Interval between the bytes that [`Behaviour::TrickleHead`] and [`Behaviour::Trickle`] send.
pub const TRICKLE_INTERVAL: Duration = Duration::from_millis(200);

/// What a raw receiver does after it has read a request.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Sends nothing and keeps the connection open until the client closes it.
    Silent,
    /// Sends the status line, then one header byte every [`TRICKLE_INTERVAL`],
    /// so the headers never end.
    TrickleHead,
    /// Sends headers with this status, then one body byte every
    /// [`TRICKLE_INTERVAL`], forever.
    Trickle(u16),
    /// Sends `200` headers and the first bytes of the body, then nothing more.
    Stall,
    /// Sends `200` with a body of this many `a` bytes, streamed in 64 KiB pieces.
    Sized(u64),
    /// Sends `200` with a chunked body of `a` bytes that never ends.
    Endless,
    /// Sends nothing, then closes the connection after this long. The
    /// in-flight count drops before the close, so the client can never
    /// start its next request before the count drops.
    HoldThenClose(Duration),
    /// Sends `204` without closing, as if the connection could be reused,
    /// then closes the connection after this long without reading more.
    AnswerThenClose(Duration),
}

/// One request and the life of its connection.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub arrived_at: Instant,
    pub closed_at: Option<Instant>,
}

#[derive(Default)]
struct Stats {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    body_bytes_sent: AtomicU64,
    exchanges: Mutex<Vec<Exchange>>,
}

impl Stats {
    fn request_arrived(&self) -> usize {
        let now_in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight
            .fetch_max(now_in_flight, Ordering::SeqCst);
        let mut exchanges = self.exchanges.lock().expect("receiver state lock");
        exchanges.push(Exchange {
            arrived_at: Instant::now(),
            closed_at: None,
        });
        exchanges.len() - 1
    }

    fn request_ended(&self, index: usize) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut exchanges = self.exchanges.lock().expect("receiver state lock");
        exchanges[index].closed_at = Some(Instant::now());
    }
}

/// A TCP server on `127.0.0.1` that reads each request and then acts as its
/// [`Behaviour`] specifies.
pub struct RawReceiver {
    /// The URL to register as a webhook.
    pub url: String,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl RawReceiver {
    pub async fn start(behaviour: Behaviour) -> RawReceiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port for a raw receiver");
        let address = listener.local_addr().expect("reading the receiver address");
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(accept_loop(listener, behaviour, stats.clone()));
        RawReceiver {
            url: format!("http://{address}/hooks"),
            stats,
            task,
        }
    }

    pub fn request_count(&self) -> usize {
        self.exchanges().len()
    }

    /// Returns the largest number of requests that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.stats.max_in_flight.load(Ordering::SeqCst)
    }

    /// Returns how many body bytes the receiver managed to write in all.
    pub fn body_bytes_sent(&self) -> u64 {
        self.stats.body_bytes_sent.load(Ordering::SeqCst)
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.stats
            .exchanges
            .lock()
            .expect("receiver state lock")
            .clone()
    }

    /// Waits until at least `count` requests arrived.
    pub async fn wait_for_requests(&self, count: usize) {
        let started = Instant::now();
        loop {
            let received = self.request_count();
            if received >= count {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "raw receiver {} got {received} of {count} expected requests within {DEADLINE:?}",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the connection of the first request is closed and returns
    /// that exchange.
    pub async fn wait_for_first_close(&self) -> Exchange {
        let started = Instant::now();
        loop {
            if let Some(exchange) = self.exchanges().first()
                && exchange.closed_at.is_some()
            {
                return exchange.clone();
            }
            assert!(
                started.elapsed() < DEADLINE,
                "the first connection to {} was not closed within {DEADLINE:?}",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for RawReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, behaviour: Behaviour, stats: Arc<Stats>) {
    // Connection tasks end with the test's runtime, like the accept loop.
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(serve_connection(stream, behaviour, stats.clone()));
    }
}

async fn serve_connection(stream: TcpStream, behaviour: Behaviour, stats: Arc<Stats>) {
    let (mut reader, mut writer) = stream.into_split();
    let mut buffer = Vec::new();
    let Ok(true) = read_request(&mut reader, &mut buffer).await else {
        return;
    };
    let index = stats.request_arrived();
    if let Behaviour::HoldThenClose(hold) = behaviour {
        tokio::time::sleep(hold).await;
        stats.request_ended(index);
        drop(writer);
        drop(reader);
        return;
    }
    if let Behaviour::AnswerThenClose(after) = behaviour {
        let _ = writer.write_all(b"HTTP/1.1 204 \r\n\r\n").await;
        tokio::time::sleep(after).await;
        stats.request_ended(index);
        return;
    }
    // The client closing its side ends every behaviour.
    let closed = wait_for_close(reader);
    tokio::pin!(closed);
    let writing = respond(&mut writer, behaviour, &stats);
    tokio::select! {
        () = &mut closed => {}
        () = writing => closed.await,
    }
    stats.request_ended(index);
}

/// Writes the response of a behaviour. Returns when the behaviour has
/// nothing more to write or a write fails.
async fn respond(writer: &mut OwnedWriteHalf, behaviour: Behaviour, stats: &Stats) {
    let piece = vec![b'a'; PIECE];
    match behaviour {
        Behaviour::Silent | Behaviour::HoldThenClose(_) | Behaviour::AnswerThenClose(_) => {}
        Behaviour::TrickleHead => {
            if writer
                .write_all(b"HTTP/1.1 200 OK\r\nx-slow: ")
                .await
                .is_err()
            {
                return;
            }
            loop {
                tokio::time::sleep(TRICKLE_INTERVAL).await;
                if writer.write_all(b"a").await.is_err() {
                    return;
                }
            }
        }
        Behaviour::Trickle(status) => {
            if write_head(writer, status, UNFINISHED_LENGTH).await.is_err() {
                return;
            }
            loop {
                tokio::time::sleep(TRICKLE_INTERVAL).await;
                if writer.write_all(b"a").await.is_err() {
                    return;
                }
                stats.body_bytes_sent.fetch_add(1, Ordering::SeqCst);
            }
        }
        Behaviour::Stall => {
            if write_head(writer, 200, UNFINISHED_LENGTH).await.is_err() {
                return;
            }
            if writer.write_all(b"partial body").await.is_ok() {
                stats.body_bytes_sent.fetch_add(12, Ordering::SeqCst);
            }
        }
        Behaviour::Sized(length) => {
            if write_head(writer, 200, length).await.is_err() {
                return;
            }
            let mut remaining = length;
            while remaining > 0 {
                let size = remaining.min(PIECE as u64) as usize;
                if writer.write_all(&piece[..size]).await.is_err() {
                    return;
                }
                stats
                    .body_bytes_sent
                    .fetch_add(size as u64, Ordering::SeqCst);
                remaining -= size as u64;
            }
        }
        Behaviour::Endless => {
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
            if writer.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk_size = format!("{PIECE:x}\r\n");
            loop {
                let written = async {
                    writer.write_all(chunk_size.as_bytes()).await?;
                    writer.write_all(&piece).await?;
                    writer.write_all(b"\r\n").await
                };
                if written.await.is_err() {
                    return;
                }
                stats
                    .body_bytes_sent
                    .fetch_add(PIECE as u64, Ordering::SeqCst);
            }
        }
    }
}

/// Writes a response head without a reason phrase, which HTTP/1.1 allows.
async fn write_head(
    writer: &mut OwnedWriteHalf,
    status: u16,
    content_length: u64,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} \r\ncontent-type: text/plain\r\ncontent-length: {content_length}\r\n\r\n"
    );
    writer.write_all(head.as_bytes()).await
}

/// Reads until the client closes the connection or it fails.
async fn wait_for_close(mut reader: OwnedReadHalf) {
    let mut sink = [0u8; 4096];
    while let Ok(read) = reader.read(&mut sink).await {
        if read == 0 {
            return;
        }
    }
}

/// Reads and discards one request with a `Content-Length` body. Bytes read
/// past its end stay in `buffer` for the next request on the connection.
/// Returns false when the connection closes before a request starts.
pub async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let head_end = loop {
        if let Some(position) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break position + 4;
        }
        if buffer.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head over 64 KiB"));
        }
        if !read_more(reader, buffer).await? {
            return Ok(false);
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let content_length: usize = head
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + content_length {
        if !read_more(reader, buffer).await? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection closed inside a request body",
            ));
        }
    }
    buffer.drain(..head_end + content_length);
    Ok(true)
}

/// Appends what the reader returns to `buffer`. Returns false at the end of the stream.
async fn read_more<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let mut piece = [0u8; 8192];
    let read = reader.read(&mut piece).await?;
    buffer.extend_from_slice(&piece[..read]);
    Ok(read > 0)
}
