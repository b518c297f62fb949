//! The command line: `serve` and the administration commands.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::config::{self, DEFAULT_DATABASE_URL, DEFAULT_RETRY_SCHEDULE, Role, ServiceConfig};
use crate::domain::destination::DestinationPolicy;

#[derive(Debug, Parser)]
#[command(
    name = "citapro-webhooks",
    version,
    about = "Signed webhook delivery for CitaPro"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API and the delivery workers.
    Serve(ServeArgs),
    /// Manage business API keys.
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
    /// Manage producer tokens.
    #[command(subcommand)]
    ProducerToken(ProducerTokenCommand),
    /// Apply database migrations and exit.
    Migrate(DatabaseArgs),
    /// Encrypt every stored webhook secret with the current encryption key.
    EncryptSecrets {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        encryption: EncryptionArgs,
    },
    /// Run a local receiver that verifies and prints each delivery.
    Listen {
        /// Port on 127.0.0.1 to listen on.
        #[arg(long, default_value_t = 9000)]
        port: u16,
        /// The webhook's secret, to check signatures.
        #[arg(long, env = "CITAPRO_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// HTTP status returned for every delivery.
        #[arg(long, default_value_t = 204)]
        status: u16,
    },
    /// Send a realistic sample event to a running server.
    Trigger {
        /// Event name, such as booking.updated.
        event: String,
        /// The business the event belongs to.
        #[arg(long, default_value = "550e8400-e29b-41d4-a716-446655440005")]
        business: Uuid,
        /// Base URL of the server.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        server: String,
        /// Producer token of the server.
        #[arg(long, env = "CITAPRO_PRODUCER_TOKEN", hide_env_values = true)]
        producer_token: String,
    },
    /// Check a delivery signature over a body; exits 0 when valid, 1 when not, 2 on errors.
    Verify {
        /// The webhook's secret.
        #[arg(long, env = "CITAPRO_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        /// The X-CitaPro-Signature value.
        #[arg(long)]
        signature: String,
        /// File with the exact body; standard input when absent.
        file: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// Database URL: sqlite://PATH or postgres://USER@HOST/DB.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

/// Keys that webhook secrets are encrypted with at rest.
#[derive(Debug, Args)]
pub struct EncryptionArgs {
    /// 64 hex characters; webhook secrets are stored encrypted with this key.
    #[arg(long, env = "CITAPRO_ENCRYPTION_KEY", hide_env_values = true)]
    pub encryption_key: Option<String>,
    /// Comma-separated older keys, still accepted to decrypt during a rotation.
    #[arg(
        long,
        env = "CITAPRO_PREVIOUS_ENCRYPTION_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub previous_encryption_keys: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create an API key for a business and print it once.
    Create {
        /// The business the key acts for.
        #[arg(long)]
        business: Uuid,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProducerTokenCommand {
    /// Create a producer token and print it once.
    Create {
        /// A label naming the producer that uses the token.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, env = "CITAPRO_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// A producer token accepted beside the stored ones.
    #[arg(long, env = "CITAPRO_PRODUCER_TOKEN", hide_env_values = true)]
    pub producer_token: Option<String>,
    /// Waits before each retry, comma-separated (units ms, s, m, h); empty for no retries.
    #[arg(long, env = "CITAPRO_RETRY_SCHEDULE", default_value = DEFAULT_RETRY_SCHEDULE,
          value_parser = config::parse_schedule)]
    pub retry_schedule: std::vec::Vec<Duration>,
    /// Deadline of one delivery attempt, connect to last response byte.
    #[arg(long, env = "CITAPRO_REQUEST_TIMEOUT", default_value = "10s",
          value_parser = config::parse_request_timeout)]
    pub request_timeout: Duration,
    /// How long a delivery lease outlasts the request timeout (tests only;
    /// hidden). A shorter margin makes another process take over a crashed
    /// holder's deliveries sooner, but a holder whose database round trips
    /// take longer than the margin may then overlap with the new holder.
    #[arg(long, env = "CITAPRO_LEASE_MARGIN", default_value = "30s", hide = true,
          value_parser = config::parse_duration)]
    pub lease_margin: Duration,
    /// Accept plain http webhook URLs (local development and tests only).
    #[arg(long, env = "CITAPRO_ALLOW_HTTP")]
    pub allow_http: bool,
    /// Accept loopback and private destinations (local development and tests only).
    #[arg(long, env = "CITAPRO_ALLOW_PRIVATE_TARGETS")]
    pub allow_private_targets: bool,
    /// Which parts to run in this process.
    #[arg(long, env = "CITAPRO_ROLE", value_enum, default_value = "all")]
    pub role: Role,
    /// Requests in flight to one endpoint at most.
    #[arg(long, env = "CITAPRO_ENDPOINT_CONCURRENCY", default_value_t = 10)]
    pub endpoint_concurrency: usize,
    /// How long finished deliveries and their attempts are kept (units s, m, h, d).
    #[arg(long, env = "CITAPRO_HISTORY_RETENTION", default_value = "30d",
          value_parser = config::parse_duration)]
    pub history_retention: Duration,
    /// PEM file of CA certificates trusted beside the system roots.
    #[arg(long, env = "CITAPRO_EXTRA_CA_FILE")]
    pub extra_ca_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub encryption: EncryptionArgs,
    /// Log format.
    #[arg(long, env = "CITAPRO_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl ServeArgs {
    pub fn service_config(&self) -> ServiceConfig {
        let mut config = ServiceConfig::new(self.database.database_url.clone());
        config.producer_token = self.producer_token.clone();
        config.retry_schedule = self.retry_schedule.clone();
        config.request_timeout = self.request_timeout;
        config.lease_margin = self.lease_margin;
        config.destinations = DestinationPolicy {
            allow_http: self.allow_http,
            allow_private_targets: self.allow_private_targets,
        };
        config.role = self.role;
        config.endpoint_concurrency = self.endpoint_concurrency;
        config.history_retention = self.history_retention;
        config.extra_ca_file = self.extra_ca_file.clone();
        config.encryption_key = self.encryption.encryption_key.clone();
        config.previous_encryption_keys = self.encryption.previous_encryption_keys.clone();
        config
    }
}
