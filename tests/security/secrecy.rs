//! Secrets stay out of the logs. The real binary runs with every log level
//! on. After a webhook is created, an attempt fails, a retry succeeds and a
//! test ping is sent, the whole log is searched for each secret.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use uuid::Uuid;

use crate::helpers::{
    ApiClient, DEADLINE, Reply, SERVICE_BINARY, TestReceiver, event_body, fresh_database_url, ms,
};

/// The query string of the registered webhook URL, which carries a token.
const URL_TOKEN: &str = "abc123";

/// A `citapro-webhooks serve` process whose stderr is collected line by line.
struct ServeProcess {
    child: Child,
    base_url: String,
    log_reader: Option<JoinHandle<Vec<String>>>,
}

impl ServeProcess {
    /// Starts `serve` on a free loopback port with `RUST_LOG=trace` and waits
    /// for its `listening address=...` log line.
    async fn start(database_url: &str, producer_token: &str) -> ServeProcess {
        let mut child = Command::new(SERVICE_BINARY)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--database-url", database_url])
            .args(["--retry-schedule", "100ms"])
            .args(["--request-timeout", "5s"])
            .args(["--allow-http", "--allow-private-targets"])
            .env("CITAPRO_PRODUCER_TOKEN", producer_token)
            .env("RUST_LOG", "trace")
            .env_remove("CITAPRO_LOG_FORMAT")
            .env_remove("CITAPRO_ROLE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting citapro-webhooks serve");
        let stdout = child.stdout.take().expect("serve stdout is piped");
        let stderr = child.stderr.take().expect("serve stderr is piped");

        let (address_sender, address_receiver) = mpsc::channel();
        // Reads both streams to the end, so the process never blocks on a full pipe.
        let stdout_reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        let log_reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(address) = listening_address(&line) {
                    let _ = address_sender.send(address);
                }
                lines.push(line);
            }
            lines.extend(stdout_reader.join().unwrap_or_default());
            lines
        });

        let address = tokio::task::spawn_blocking(move || address_receiver.recv_timeout(DEADLINE))
            .await
            .expect("joining the wait for the address")
            .unwrap_or_else(|_| panic!("serve logged no listening address within {DEADLINE:?}"));
        ServeProcess {
            child,
            base_url: format!("http://{address}"),
            log_reader: Some(log_reader),
        }
    }

    /// Sends SIGTERM, waits for the process to exit and returns every line it wrote.
    async fn stop(mut self) -> String {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill -TERM");
        assert!(status.success(), "kill -TERM failed");
        let started = Instant::now();
        while self.child.try_wait().expect("polling serve").is_none() {
            assert!(
                started.elapsed() < DEADLINE,
                "serve did not exit within {DEADLINE:?} of SIGTERM"
            );
            tokio::time::sleep(ms(20)).await;
        }
        let reader = self.log_reader.take().expect("the log is read once");
        tokio::task::spawn_blocking(move || reader.join().expect("the log reader finished"))
            .await
            .expect("joining the log reader")
            .join("\n")
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Extracts `HOST:PORT` from a log line such as `... listening address=127.0.0.1:8080 role=All`.
fn listening_address(line: &str) -> Option<String> {
    let (_, rest) = line.split_once("listening address=")?;
    let address = rest.split_whitespace().next()?;
    Some(address.to_owned())
}

/// Asserts that `log` does not contain `secret`, naming the secret's kind.
fn assert_absent(log: &str, secret: &str, kind: &str) {
    assert!(!secret.is_empty(), "the {kind} to look for is empty");
    let line = log.lines().find(|line| line.contains(secret));
    assert!(line.is_none(), "the log contains the {kind}: {line:?}");
}

#[tokio::test]
async fn secrets_absent_from_logs() {
    let dir = tempfile::tempdir().expect("creating a temporary folder for the database");
    let database_url = fresh_database_url(dir.path()).await;
    let producer_token = format!("test-producer-{}", Uuid::new_v4().simple());
    let process = ServeProcess::start(&database_url, &producer_token).await;
    let api = ApiClient::new(
        process.base_url.clone(),
        database_url.clone(),
        producer_token.clone(),
    );
    let business = api.create_business().await;
    let receiver = TestReceiver::start().await;
    receiver.queue_replies([Reply::Status(500)]);
    let url = format!("{}?token={URL_TOKEN}", receiver.url);

    let webhook = api
        .create_webhook(&business, &url, &["client.created"])
        .await;
    api.accept_event(&event_body(
        "client.created",
        business.id,
        Uuid::new_v4(),
        r#"{"firstname":"Ana"}"#,
        None,
    ))
    .await;
    let requests = receiver.wait_for_requests(2).await;
    let ping = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/webhooks/{}/test", webhook.id),
            Some(&business.api_key),
            None,
        )
        .await;
    assert_eq!(ping.status, 200, "test ping: {}", ping.text());
    let listing = api
        .get(
            &format!("/v1/webhooks/{}/deliveries", webhook.id),
            &business,
        )
        .await;
    assert_eq!(listing.status, 200, "listing: {}", listing.text());
    let requests = receiver.wait_for_requests(requests.len() + 1).await;
    let log = process.stop().await;

    assert!(
        log.contains(&webhook.id),
        "the log names the webhook, so it was captured"
    );
    assert!(
        log.contains("attempt failed"),
        "the log records the failed attempt"
    );
    assert_absent(&log, &webhook.secret, "webhook secret");
    assert_absent(&log, &business.api_key, "API key");
    assert_absent(&log, &producer_token, "producer token");
    assert_absent(&log, &format!("token={URL_TOKEN}"), "URL query string");
    assert_absent(&log, URL_TOKEN, "URL token");
    for request in &requests {
        let signature = request.header("x-citapro-signature");
        assert_absent(&log, signature, "X-CitaPro-Signature value");
        let standard = request.header("webhook-signature");
        let encoded = standard.trim_start_matches("v1,");
        assert_absent(&log, encoded, "webhook-signature value");
    }
}
