//! Crash safety of the real binary: `kill -9` while a retry waits or while an
//! attempt is in flight, then a restart on the same database.
//!
//! On SQLite the restarted process takes back every lease at start-up. On
//! PostgreSQL it leaves leases alone, so a delivery that was in flight at
//! the kill is sent again only when its lease ends.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use serde_json::json;
use uuid::Uuid;

use crate::backend::{TestDatabase, fresh_database};
use crate::helpers::{
    ApiClient, DEADLINE, Reply, SERVICE_BINARY, TestBusiness, TestReceiver, event_body, hmac_hex,
    ms,
};

/// A `citapro-webhooks serve` process, killed when dropped.
struct ServeProcess {
    child: Child,
    base_url: String,
}

/// Settings of a `serve` process that the crash tests vary.
struct ServeSettings {
    database: TestDatabase,
    producer_token: String,
    retry_schedule: &'static str,
    request_timeout: &'static str,
    /// `--lease-margin`: how long a lease outlasts the request timeout.
    lease_margin: &'static str,
}

impl ServeProcess {
    /// Starts `serve` on a free loopback port and waits for its
    /// `listening address=...` log line.
    async fn start(settings: &ServeSettings) -> ServeProcess {
        let mut command = Command::new(SERVICE_BINARY);
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--database-url", &settings.database.url])
            .args(["--producer-token", &settings.producer_token])
            .args(["--retry-schedule", settings.retry_schedule])
            .args(["--request-timeout", settings.request_timeout])
            .args(["--lease-margin", settings.lease_margin])
            .args(["--allow-http", "--allow-private-targets"])
            .env("RUST_LOG", "info")
            .env_remove("CITAPRO_LOG_FORMAT")
            .env_remove("CITAPRO_ROLE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("starting citapro-webhooks serve");
        let stderr = child.stderr.take().expect("serve stderr is piped");

        let log = Arc::new(Mutex::new(Vec::new()));
        let (address_sender, address_receiver) = mpsc::channel();
        let log_writer = log.clone();
        // Reads stderr to the end, so the process never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(address) = listening_address(&line) {
                    let _ = address_sender.send(address);
                }
                log_writer.lock().expect("log lock").push(line);
            }
        });

        let address = tokio::task::spawn_blocking(move || address_receiver.recv_timeout(DEADLINE))
            .await
            .expect("joining the wait for the address");
        let mut process = ServeProcess {
            child,
            base_url: String::new(),
        };
        match address {
            Ok(address) => process.base_url = format!("http://{address}"),
            Err(_) => {
                process.kill_hard();
                let log = log.lock().expect("log lock").join("\n");
                panic!("serve logged no listening address within {DEADLINE:?}. Its log:\n{log}");
            }
        }
        process
    }

    fn api(&self, settings: &ServeSettings) -> ApiClient {
        ApiClient::new(
            self.base_url.clone(),
            settings.database.url.clone(),
            settings.producer_token.clone(),
        )
    }

    /// Sends SIGTERM and waits for the process to exit on its own.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill -TERM");
        assert!(status.success(), "kill -TERM failed");
        let started = Instant::now();
        loop {
            if let Some(exit) = self.child.try_wait().expect("polling serve") {
                return exit;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "serve did not exit within {DEADLINE:?} of SIGTERM"
            );
            tokio::time::sleep(ms(20)).await;
        }
    }

    /// Sends SIGKILL and reaps the process.
    fn kill_hard(&mut self) {
        self.child.kill().expect("sending SIGKILL to serve");
        self.child.wait().expect("reaping serve");
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

/// Waits until the webhook's delivery history shows `count` recorded attempts.
async fn wait_for_recorded_attempts(
    api: &ApiClient,
    business: &TestBusiness,
    webhook_id: &str,
    count: u64,
) {
    let started = Instant::now();
    loop {
        let response = api
            .get(&format!("/v1/webhooks/{webhook_id}/deliveries"), business)
            .await;
        assert_eq!(
            response.status,
            200,
            "listing deliveries: {}",
            response.text()
        );
        let recorded: u64 = response.json()["data"]
            .as_array()
            .expect("the delivery list has data")
            .iter()
            .map(|delivery| delivery["attemptCount"].as_u64().unwrap_or(0))
            .sum();
        if recorded >= count {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{recorded} of {count} attempts recorded within {DEADLINE:?}"
        );
        tokio::time::sleep(ms(10)).await;
    }
}

async fn settings(
    dir: &tempfile::TempDir,
    retry_schedule: &'static str,
    request_timeout: &'static str,
) -> ServeSettings {
    ServeSettings {
        database: fresh_database(dir.path()).await,
        producer_token: format!("crash-producer-{}", Uuid::new_v4()),
        retry_schedule,
        request_timeout,
        lease_margin: "30s",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_retries_survive_kill() {
    let dir = tempfile::tempdir().expect("creating a temporary folder");
    // The first retry waits long enough for the kill and the restart to
    // happen before it falls due.
    let settings = settings(&dir, "1500ms,300ms", "5s").await;
    let receiver = TestReceiver::start_with(Reply::Status(500)).await;
    let mut first_process = ServeProcess::start(&settings).await;
    let api = first_process.api(&settings);
    let business = api.create_business().await;
    let webhook = api
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;
    let aggregate = Uuid::new_v4();
    api.accept_event(&event_body(
        "client.created",
        business.id,
        aggregate,
        r#"{"firstname":"Zoë"}"#,
        None,
    ))
    .await;
    receiver.wait_for_requests(1).await;
    wait_for_recorded_attempts(&api, &business, &webhook.id, 1).await;

    first_process.kill_hard();
    let killed_at = Instant::now();
    assert_eq!(
        receiver.request_count(),
        1,
        "the first retry came before the kill"
    );
    let _second_process = ServeProcess::start(&settings).await;

    let attempts = receiver.wait_for_requests(3).await;
    receiver
        .assert_count_stays(3, ms(1500), "attempts after the schedule ends")
        .await;
    let first = &attempts[0];
    assert_eq!(first.json()["aggregate_id"], json!(aggregate.to_string()));
    for (number, attempt) in attempts.iter().enumerate().skip(1) {
        let context = format!("attempt {} after the restart", number + 1);
        assert!(
            attempt.arrived_at > killed_at,
            "{context}: arrived after the kill"
        );
        assert_eq!(
            attempt.delivery_id(),
            first.delivery_id(),
            "{context}: delivery id"
        );
        assert_eq!(attempt.body, first.body, "{context}: body bytes");
        assert_eq!(
            attempt.header("x-citapro-signature"),
            hmac_hex(&webhook.secret, &attempt.body),
            "{context}: signature"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_attempt_survives_kill() {
    let dir = tempfile::tempdir().expect("creating a temporary folder");
    // The hanging attempt is in flight at the kill, which follows its
    // arrival at once. On PostgreSQL its lease ends 6 s (request timeout
    // plus margin) after the attempt starts, and the restarted process
    // sends it again then.
    let mut settings = settings(&dir, "10s", "5s").await;
    settings.lease_margin = "1s";
    let receiver = TestReceiver::start_with(Reply::Status(200)).await;
    receiver.queue_replies([Reply::Hang]);
    let mut first_process = ServeProcess::start(&settings).await;
    let api = first_process.api(&settings);
    let business = api.create_business().await;
    let webhook = api
        .create_webhook(&business, &receiver.url, &["client.created"])
        .await;
    let aggregate = Uuid::new_v4();
    api.accept_event(&event_body(
        "client.created",
        business.id,
        aggregate,
        r#"{"firstname":"Zoë"}"#,
        None,
    ))
    .await;
    let hanging = receiver.wait_for_requests(1).await.remove(0);

    first_process.kill_hard();
    let killed_at = Instant::now();
    let _second_process = ServeProcess::start(&settings).await;

    let attempts = receiver.wait_for_requests(2).await;
    let redelivered = &attempts[1];
    assert!(redelivered.arrived_at > killed_at, "arrived after the kill");
    assert_eq!(
        redelivered.delivery_id(),
        hanging.delivery_id(),
        "delivery id"
    );
    assert_eq!(redelivered.body, hanging.body, "body bytes");
    assert_eq!(
        redelivered.json()["aggregate_id"],
        json!(aggregate.to_string())
    );
    assert_eq!(
        redelivered.header("x-citapro-signature"),
        hmac_hex(&webhook.secret, &redelivered.body)
    );
    receiver
        .assert_count_stays(2, ms(1000), "attempts after the 200")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_burst_loses_nothing() {
    let dir = tempfile::tempdir().expect("creating a temporary folder");
    let settings = settings(&dir, "1s", "5s").await;
    // A short pause keeps attempts in flight when the signal arrives.
    let receiver = TestReceiver::start_with(Reply::Delayed {
        status: 204,
        delay: ms(100),
    })
    .await;
    let mut first_process = ServeProcess::start(&settings).await;
    let api = first_process.api(&settings);
    let business = api.create_business().await;
    api.create_webhook(&business, &receiver.url, &["client.created"])
        .await;

    let accepted = Arc::new(Mutex::new(Vec::<Uuid>::new()));
    let mut producers = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let api = api.clone();
        let accepted = accepted.clone();
        producers.spawn(async move {
            for _ in 0..20 {
                let aggregate = Uuid::new_v4();
                let body = event_body(
                    "client.created",
                    business.id,
                    aggregate,
                    r#"{"firstname":"Zoë"}"#,
                    None,
                );
                match api.try_send_event(&body).await {
                    Some(202) => accepted.lock().expect("accepted lock").push(aggregate),
                    Some(_) => {}
                    // The server has stopped taking connections.
                    None => return,
                }
            }
        });
    }
    let started = Instant::now();
    while accepted.lock().expect("accepted lock").len() < 100 {
        assert!(started.elapsed() < DEADLINE, "the burst did not start");
        tokio::time::sleep(ms(5)).await;
    }
    let exit = first_process.terminate().await;
    assert!(exit.success(), "serve exits cleanly on SIGTERM: {exit:?}");
    while producers.join_next().await.is_some() {}

    let accepted = accepted.lock().expect("accepted lock").clone();
    let _second_process = ServeProcess::start(&settings).await;
    let requests = receiver.wait_for_requests(accepted.len()).await;
    receiver
        .assert_count_stays(accepted.len(), ms(1500), "deliveries after the restart")
        .await;

    let mut delivery_ids: Vec<&str> = requests.iter().map(|r| r.delivery_id()).collect();
    delivery_ids.sort_unstable();
    delivery_ids.dedup();
    assert_eq!(
        delivery_ids.len(),
        accepted.len(),
        "each delivery arrived once"
    );
    let mut received: Vec<String> = requests
        .iter()
        .map(|r| {
            r.json()["aggregate_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    received.sort_unstable();
    let mut expected: Vec<String> = accepted.iter().map(Uuid::to_string).collect();
    expected.sort_unstable();
    assert_eq!(received, expected, "every accepted event was delivered");
}

#[test]
fn listening_address_parses_log_line() {
    let line = "2026-03-05T14:30:00.000000Z  INFO citapro_webhooks::app: listening address=127.0.0.1:41234 role=All";

    assert_eq!(listening_address(line).as_deref(), Some("127.0.0.1:41234"));
    assert_eq!(listening_address("INFO stopped"), None);
}
