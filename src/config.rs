//! Runtime settings of the service and the parsing of their text forms.

use std::time::Duration;

use crate::domain::destination::DestinationPolicy;

/// The parts of the service that a `serve` process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The HTTP API only: accepted events wait for a worker.
    Api,
    /// Delivery workers only.
    Worker,
    /// Both, in one process.
    All,
}

impl Role {
    pub fn runs_api(self) -> bool {
        matches!(self, Role::Api | Role::All)
    }

    pub fn runs_workers(self) -> bool {
        matches!(self, Role::Worker | Role::All)
    }
}

/// Settings of one `serve` process.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub database_url: String,
    /// A producer token accepted beside the stored ones.
    pub producer_token: Option<String>,
    /// Waits before each retry; one attempt plus one retry per entry.
    pub retry_schedule: Vec<Duration>,
    /// Deadline of one delivery attempt, from connect to the end of the response.
    pub request_timeout: Duration,
    /// How long a delivery lease outlasts the request deadline. Another
    /// process takes over a crashed holder's delivery once the lease ends.
    pub lease_margin: Duration,
    pub destinations: DestinationPolicy,
    pub role: Role,
    /// Requests in flight to one endpoint at most.
    pub endpoint_concurrency: usize,
    /// Requests in flight across all endpoints at most.
    pub max_in_flight: usize,
    /// How long finished deliveries and their attempts are kept.
    pub history_retention: Duration,
    /// PEM certificates trusted beside the system roots, for private endpoints.
    pub extra_ca_file: Option<std::path::PathBuf>,
    /// Hex key that webhook secrets are encrypted with at rest.
    pub encryption_key: Option<String>,
    /// Older hex keys, still accepted to decrypt secrets during a rotation.
    pub previous_encryption_keys: Vec<String>,
}

impl ServiceConfig {
    /// Returns settings with the documented defaults for a database URL.
    pub fn new(database_url: impl Into<String>) -> ServiceConfig {
        ServiceConfig {
            database_url: database_url.into(),
            producer_token: None,
            retry_schedule: parse_schedule(DEFAULT_RETRY_SCHEDULE)
                .expect("default schedule parses"),
            request_timeout: Duration::from_secs(10),
            lease_margin: crate::delivery::DEFAULT_LEASE_MARGIN,
            destinations: DestinationPolicy::default(),
            role: Role::All,
            endpoint_concurrency: 10,
            max_in_flight: 1024,
            history_retention: Duration::from_secs(30 * 86_400),
            extra_ca_file: None,
            encryption_key: None,
            previous_encryption_keys: Vec::new(),
        }
    }
}

pub const DEFAULT_RETRY_SCHEDULE: &str = "10s,60s,5m";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://citapro-webhooks.db";

const MAX_DURATION_SECONDS: f64 = 86_400.0 * 3650.0;

/// Builds the secret cipher from the configured keys, if a key is set.
pub fn secret_cipher(
    encryption_key: Option<&str>,
    previous_keys: &[String],
) -> anyhow::Result<Option<std::sync::Arc<crate::store::cipher::SecretCipher>>> {
    match encryption_key.filter(|key| !key.trim().is_empty()) {
        Some(key) => Ok(Some(std::sync::Arc::new(
            crate::store::cipher::SecretCipher::new(key, previous_keys)?,
        ))),
        None if previous_keys.iter().any(|key| !key.trim().is_empty()) => {
            anyhow::bail!("previous encryption keys are set without a current --encryption-key")
        }
        None => Ok(None),
    }
}

/// Parses a duration such as `250ms`, `10s`, `5m`, `1h` or `30d`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("invalid duration {text:?}: expected a number with ms, s, m, h or d")
    })?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        _ => return Err(format!("invalid duration {text:?}: unknown unit {unit:?}")),
    };
    if !seconds.is_finite() || seconds > MAX_DURATION_SECONDS {
        return Err(format!("invalid duration {text:?}: at most 3650 days"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses the request timeout: a duration of at least 100 ms.
pub fn parse_request_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    if timeout < Duration::from_millis(100) {
        return Err(format!("invalid request timeout {text:?}: at least 100ms"));
    }
    Ok(timeout)
}

/// Parses a comma-separated retry schedule such as `10s,60s,5m`. An empty
/// string means no retries.
pub fn parse_schedule(text: &str) -> Result<Vec<Duration>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let schedule = text
        .split(',')
        .map(parse_duration)
        .collect::<Result<Vec<_>, _>>()?;
    if schedule.len() > 20 {
        return Err(format!(
            "invalid retry schedule {text:?}: at most 20 retries"
        ));
    }
    Ok(schedule)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedule_is_ten_sixty_three_hundred() {
        let schedule = parse_schedule(DEFAULT_RETRY_SCHEDULE).unwrap();
        assert_eq!(
            schedule,
            [
                Duration::from_secs(10),
                Duration::from_secs(60),
                Duration::from_secs(300)
            ]
        );
    }

    #[test]
    fn durations_accept_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("").is_err());
    }
}
