//! The service under test: credentials from its command line, one `serve`
//! process per phase, webhook registration and peak memory.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use reqwest::StatusCode;
use reqwest::header::AUTHORIZATION;
use uuid::Uuid;

/// Maximum time a stopped service gets to finish its attempts and exit
/// before it is killed. The service itself waits up to its request timeout
/// plus 5 s for attempts under way.
const STOP_GRACE: Duration = Duration::from_secs(60);
/// Pages of 250 deliveries read from one listing at most (25 million deliveries).
const MAX_LISTING_PAGES: usize = 100_000;

/// The product binary, optionally started under a wrapper such as a profiler.
#[derive(Clone)]
pub struct ServiceBinary {
    pub path: PathBuf,
    /// Program and arguments placed before the binary's path.
    pub wrapper: Vec<String>,
}

impl ServiceBinary {
    /// Checks that the binary runs and is citapro-webhooks.
    pub fn check(&self) -> anyhow::Result<()> {
        let output = std::process::Command::new(&self.path)
            .arg("--version")
            .output()
            .with_context(|| {
                format!(
                    "running {}; build it first with `cargo build --release` in the \
                     product's folder, or pass --bin-path",
                    self.path.display()
                )
            })?;
        let version = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !version.starts_with("citapro-webhooks ") {
            bail!(
                "{} --version exited with {} and printed {:?}, which is not a \
                 citapro-webhooks version; rebuild it with `cargo build --release` in the \
                 product's folder",
                self.path.display(),
                output.status,
                version.trim()
            );
        }
        Ok(())
    }

    /// Runs an admin command and returns the first line of its standard output.
    pub fn first_output_line(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = std::process::Command::new(&self.path)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} {}", self.path.display(), args[..2].join(" ")))?;
        if !output.status.success() {
            bail!(
                "`citapro-webhooks {}` exited with {}: {}",
                args[..2].join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        match stdout.lines().next().map(str::trim) {
            Some(line) if !line.is_empty() => Ok(line.to_owned()),
            _ => bail!(
                "`citapro-webhooks {}` printed nothing on standard output; expected the new \
                 key on the first line",
                args[..2].join(" ")
            ),
        }
    }

    /// Creates the database and its tables with `migrate`, which the key
    /// commands need before `serve` has run.
    pub fn migrate(&self, database_url: &str) -> anyhow::Result<()> {
        let output = std::process::Command::new(&self.path)
            .args(["migrate", "--database-url", database_url])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} migrate", self.path.display()))?;
        if !output.status.success() {
            bail!(
                "`citapro-webhooks migrate` exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Creates an API key for `business` with `api-key create`.
    pub fn create_api_key(&self, business: Uuid, database_url: &str) -> anyhow::Result<String> {
        let business = business.to_string();
        self.first_output_line(&[
            "api-key",
            "create",
            "--business",
            &business,
            "--database-url",
            database_url,
        ])
    }

    /// Creates a producer token named `bench` with `producer-token create`.
    pub fn create_producer_token(&self, database_url: &str) -> anyhow::Result<String> {
        self.first_output_line(&[
            "producer-token",
            "create",
            "--name",
            "bench",
            "--database-url",
            database_url,
        ])
    }
}

/// A running `citapro-webhooks serve`.
pub struct ServiceProcess {
    child: tokio::process::Child,
    pid: u32,
    pub base_url: String,
    pub log_path: PathBuf,
}

impl ServiceProcess {
    /// Starts `serve` on 127.0.0.1:`port` with the switches that allow a
    /// plain-HTTP receiver on loopback, plus `extra_args`. Its standard
    /// output and error go to `log_path`.
    pub fn start(
        binary: &ServiceBinary,
        database_url: &str,
        port: u16,
        extra_args: &[String],
        work_dir: &Path,
        log_path: PathBuf,
    ) -> anyhow::Result<ServiceProcess> {
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let listen = format!("127.0.0.1:{port}");
        let mut command = match binary.wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = tokio::process::Command::new(program);
                command.args(wrapper_args).arg(&binary.path);
                command
            }
            None => tokio::process::Command::new(&binary.path),
        };
        command
            .args(["serve", "--listen", &listen, "--database-url", database_url])
            .args(["--allow-http", "--allow-private-targets"])
            .args(extra_args)
            .current_dir(work_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {} serve", binary.path.display()))?;
        let pid = child
            .id()
            .context("the service exited before its process id was read")?;
        Ok(ServiceProcess {
            child,
            pid,
            base_url: format!("http://{listen}"),
            log_path,
        })
    }

    /// Waits until the API responds to HTTP requests.
    pub async fn wait_ready(
        &mut self,
        client: &reqwest::Client,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/v1/webhooks", self.base_url);
        loop {
            self.check_running()?;
            if client.get(&url).send().await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the service did not respond on {} within {} s; its log {} ends with:\n{}",
                    self.base_url,
                    timeout.as_secs(),
                    self.log_path.display(),
                    log_tail(&self.log_path)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the service exited with {status}; its log {} ends with:\n{}",
                self.log_path.display(),
                log_tail(&self.log_path)
            );
        }
        Ok(())
    }

    /// Reads the peak resident set size (`VmHWM`) in KiB.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{path} has no VmHWM line"))
    }

    /// Sends SIGTERM and waits for a graceful exit, and kills the process if
    /// it takes longer than [`STOP_GRACE`].
    pub async fn stop(mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let signalled = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !signalled.success() {
            bail!("kill -TERM {} failed with {signalled}", self.pid);
        }
        match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.child.kill().await?;
                bail!(
                    "the service did not exit within {} s of SIGTERM and was killed",
                    STOP_GRACE.as_secs()
                )
            }
        }
    }
}

/// Registers `count` webhooks for `booking.updated` that point at
/// `http://127.0.0.1:<receiver_port>/k<i>`, and returns their ids.
pub async fn register_webhooks(
    client: &reqwest::Client,
    base_url: &str,
    api_key: &str,
    receiver_port: u16,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(count);
    for index in 0..count {
        let body = serde_json::json!({
            "url": format!("http://127.0.0.1:{receiver_port}/k{index}"),
            "events": ["booking.updated"],
        });
        let response = client
            .post(format!("{base_url}/v1/webhooks"))
            .header(AUTHORIZATION, format!("Bearer {api_key}"))
            .json(&body)
            .send()
            .await
            .context("registering a webhook")?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if status != StatusCode::CREATED {
            bail!("POST /v1/webhooks returned {status} for webhook {index}: {text}");
        }
        let created: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("the 201 of POST /v1/webhooks is not JSON: {text}"))?;
        match created["id"].as_str() {
            Some(id) => ids.push(id.to_owned()),
            None => bail!("the 201 of POST /v1/webhooks has no id: {text}"),
        }
    }
    Ok(ids)
}

/// Calls `POST /v1/webhooks/{id}/recover` for deliveries created since
/// `since` (RFC 3339) and returns the count it reports. With `dry_run` the
/// service only counts the failed and cancelled deliveries.
pub async fn recover(
    client: &reqwest::Client,
    base_url: &str,
    api_key: &str,
    webhook_id: &str,
    since: &str,
    dry_run: bool,
) -> anyhow::Result<u64> {
    let response = client
        .post(format!("{base_url}/v1/webhooks/{webhook_id}/recover"))
        .header(AUTHORIZATION, format!("Bearer {api_key}"))
        .json(&serde_json::json!({ "since": since, "dryRun": dry_run }))
        .send()
        .await
        .with_context(|| format!("recovering the deliveries of webhook {webhook_id}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if status != StatusCode::OK {
        bail!("POST /v1/webhooks/{webhook_id}/recover returned {status}: {text}");
    }
    let result: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("the 200 of recover is not JSON: {text}"))?;
    result["deliveries"]
        .as_u64()
        .with_context(|| format!("the 200 of recover has no deliveries count: {text}"))
}

/// A pending delivery as the delivery listing shows it.
pub struct PendingDelivery {
    pub id: u128,
    pub attempt_count: u64,
    /// `nextAttemptAt`, with millisecond precision.
    pub next_attempt_at: Option<SystemTime>,
}

/// Lists a webhook's pending deliveries with `GET
/// /v1/webhooks/{id}/deliveries`, page by page.
pub async fn pending_deliveries(
    client: &reqwest::Client,
    base_url: &str,
    api_key: &str,
    webhook_id: &str,
) -> anyhow::Result<Vec<PendingDelivery>> {
    let mut found = Vec::new();
    let mut cursor = String::new();
    for _ in 0..MAX_LISTING_PAGES {
        let response = client
            .get(format!("{base_url}/v1/webhooks/{webhook_id}/deliveries"))
            .header(AUTHORIZATION, format!("Bearer {api_key}"))
            .query(&[("status", "pending"), ("limit", "250"), ("cursor", &cursor)])
            .send()
            .await
            .with_context(|| format!("listing the deliveries of webhook {webhook_id}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if status != StatusCode::OK {
            bail!("GET /v1/webhooks/{webhook_id}/deliveries returned {status}: {text}");
        }
        let page: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("the delivery listing is not JSON: {text}"))?;
        for delivery in page["data"].as_array().into_iter().flatten() {
            let id = delivery["id"]
                .as_str()
                .and_then(|id| Uuid::try_parse(id).ok())
                .with_context(|| format!("a listed delivery has no valid id: {delivery}"))?;
            let next_attempt_at = match delivery["nextAttemptAt"].as_str() {
                Some(text) => Some(parse_rfc3339(text)?),
                None => None,
            };
            found.push(PendingDelivery {
                id: id.as_u128(),
                attempt_count: delivery["attemptCount"].as_u64().unwrap_or_default(),
                next_attempt_at,
            });
        }
        match page["nextCursor"].as_str() {
            Some(next) if !next.is_empty() => cursor = next.to_owned(),
            _ => return Ok(found),
        }
    }
    bail!("the delivery listing of webhook {webhook_id} has more than {MAX_LISTING_PAGES} pages")
}

fn parse_rfc3339(text: &str) -> anyhow::Result<SystemTime> {
    let time = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("invalid RFC 3339 time {text:?}"))?;
    let since_epoch = Duration::from_nanos(time.unix_timestamp_nanos().max(0) as u64);
    Ok(SystemTime::UNIX_EPOCH + since_epoch)
}

/// Reads `citapro_attempts_total` from `GET /metrics`, summed over its
/// labels, which is the number of attempts this process has made since it started.
pub async fn attempts_total(client: &reqwest::Client, base_url: &str) -> anyhow::Result<u64> {
    let response = client
        .get(format!("{base_url}/metrics"))
        .send()
        .await
        .context("reading the service's metrics")?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if status != StatusCode::OK {
        bail!("GET /metrics returned {status}");
    }
    let mut total = 0.0;
    let mut found = false;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("citapro_attempts_total") else {
            continue;
        };
        let value = rest.rsplit(' ').next().unwrap_or_default();
        total += value
            .parse::<f64>()
            .with_context(|| format!("invalid metric line {line:?}"))?;
        found = true;
    }
    if !found && !text.contains("citapro_attempts") {
        bail!("GET /metrics has no citapro_attempts_total counter");
    }
    Ok(total as u64)
}

/// Returns the last lines of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
