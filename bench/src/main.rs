//! Benchmarks of citapro-webhooks on one machine: throughput, latency,
//! memory and the loopback ceiling, one JSON line per measured run.
//!
//! Run it from the product's folder after `cargo build --release`:
//! `cargo run --release --manifest-path bench/Cargo.toml -- --scenario fanout10`.

mod backlog;
mod driver;
mod metrics;
mod postgres;
mod receiver;
mod report;
mod scenarios;
mod service;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

use service::ServiceBinary;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Full speed, 10 webhooks per event (default 2 000 events).
    Fanout10,
    /// Full speed, 1 webhook per event (default 20 000 events).
    Fanout1,
    /// 1 000 events/s for 10 s, 1 webhook per event, for latency.
    Steady1000,
    /// Queue deliveries while the receiver is down, then measure the drain.
    Backlog,
    /// One of 10 endpoints never responds, and the other 9 are measured.
    Hanging,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatabaseKind {
    /// A SQLite file in a fresh temporary folder.
    Sqlite,
    /// A fresh schema on the PostgreSQL server of --postgres-url.
    Postgres,
}

impl DatabaseKind {
    pub fn name(self) -> &'static str {
        match self {
            DatabaseKind::Sqlite => "sqlite",
            DatabaseKind::Postgres => "postgres",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BacklogMode {
    /// Every delivery fails once while the receiver refuses connections (no
    /// retries); then a fresh process drains them after `recover` makes them
    /// all due at once. Measures the drain rate.
    Requeued,
    /// The receiver refuses connections until every first attempt has failed
    /// and listens before the one retry falls due. Measures retry punctuality.
    Retried,
}

#[derive(Debug, Parser)]
#[command(
    name = "citapro-webhooks-bench",
    about = "Measure citapro-webhooks on this machine: deliveries/s, latency, memory"
)]
pub struct Args {
    /// Scenario to run.
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// The product's release binary [default: target/release/citapro-webhooks
    /// in the folder above this crate].
    #[arg(long)]
    pub bin_path: Option<PathBuf>,
    /// Database of the service.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub database: DatabaseKind,
    /// PostgreSQL server and database for --database postgres. The bench
    /// creates and drops its own schema there.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres_url: String,
    /// Events to send [default: set by the scenario].
    #[arg(long)]
    pub events: Option<u64>,
    /// Stop sending events after this many seconds, even if some remain.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Webhooks registered for the business, 1 to 100 [default: set by the scenario].
    #[arg(long)]
    pub fanout: Option<usize>,
    /// Producer requests in flight at once (the cap on requests in flight with --rate).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Events per second, instead of as fast as --concurrency allows
    /// [default: 1000 for steady1000].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Size of each producer request body in bytes, reached by padding an
    /// untracked field (bodies have a minimum of about 550 bytes).
    #[arg(long, default_value_t = 1024)]
    pub body_bytes: usize,
    /// Deliveries that the backlog scenario queues, besides its 10 000-delivery
    /// comparison run [default: 100 000].
    #[arg(long)]
    pub backlog: Option<u64>,
    /// Queue 1 000 000 deliveries in the backlog scenario.
    #[arg(long)]
    pub large: bool,
    /// Method of the backlog scenario.
    #[arg(long, value_enum, default_value = "requeued")]
    pub backlog_mode: BacklogMode,
    /// Retry delay in seconds that the service gets in backlog mode
    /// `retried`; accepting the events and failing every first attempt must
    /// take less than this.
    #[arg(long, default_value_t = 30)]
    pub backlog_retry_delay: u64,
    /// Seconds to wait for every delivery after the last event was sent.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Requests of the ceiling measurement, at most the run's deliveries.
    #[arg(long, default_value_t = 20_000)]
    pub ceiling_requests: u64,
    /// Replace this run's rows in the results table of the docs page.
    #[arg(long)]
    pub update_docs: bool,
    /// The docs page with the results table [default: docs/benchmarks.md in
    /// the folder above this crate].
    #[arg(long)]
    pub docs_path: Option<PathBuf>,
    /// Start the service under this command, split on spaces, such as
    /// "valgrind --tool=callgrind --callgrind-out-file=/tmp/callgrind.out".
    #[arg(long)]
    pub service_wrapper: Option<String>,
    /// Keep the temporary folder with databases and service logs.
    #[arg(long)]
    pub keep_temp: bool,
}

/// Returns the product's folder, which contains this crate.
fn product_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the bench crate lies inside the product's folder")
        .to_path_buf()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(error) = run(args).await {
        eprintln!("bench failed: {error:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    validate(&args)?;
    let binary = ServiceBinary {
        path: args
            .bin_path
            .clone()
            .unwrap_or_else(|| product_dir().join("target/release/citapro-webhooks")),
        wrapper: args
            .service_wrapper
            .as_deref()
            .map(|wrapper| wrapper.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
    };
    binary.check()?;

    let work_dir = std::env::temp_dir().join(format!(
        "citapro-bench-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    eprintln!(
        "bench: databases and service logs in {}",
        work_dir.display()
    );

    let bench = scenarios::Bench::new(args, binary, work_dir.clone(), machine())?;
    let outcome = bench.run().await;
    let keep_temp = bench.args.keep_temp || outcome.is_err();
    if keep_temp {
        eprintln!("bench: kept {}", work_dir.display());
    } else if let Err(error) = std::fs::remove_dir_all(&work_dir) {
        eprintln!("bench: removing {} failed: {error}", work_dir.display());
    }
    let records = outcome?;

    if bench.args.update_docs {
        let path = bench
            .args
            .docs_path
            .clone()
            .unwrap_or_else(|| product_dir().join("docs/benchmarks.md"));
        report::update_docs(&path, &records)?;
        eprintln!("bench: updated {}", path.display());
    }
    Ok(())
}

fn validate(args: &Args) -> anyhow::Result<()> {
    if let Some(fanout) = args.fanout
        && !(1..=100).contains(&fanout)
    {
        bail!("invalid --fanout {fanout}: a business has 1 to 100 webhooks");
    }
    if args.scenario == Scenario::Hanging && args.fanout == Some(1) {
        bail!(
            "invalid --fanout 1 for hanging: it needs one hanging and at least one other endpoint"
        );
    }
    if args.concurrency == 0 {
        bail!("invalid --concurrency 0: at least 1 request must be in flight");
    }
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        bail!("invalid --rate {rate}: expected events per second above 0");
    }
    if let Some(duration) = args.duration
        && !(duration.is_finite() && duration > 0.0)
    {
        bail!("invalid --duration {duration}: expected seconds above 0");
    }
    if args.events == Some(0) || args.backlog == Some(0) {
        bail!("invalid --events or --backlog 0: send at least 1");
    }
    if args.body_bytes > 1024 * 1024 - 1024 {
        bail!(
            "invalid --body-bytes {}: the service takes event bodies up to 1 MiB",
            args.body_bytes
        );
    }
    Ok(())
}

/// Describes this machine for the record: CPUs, memory, the load average
/// and how busy the CPUs were just before the run, which shows whether
/// other work was running.
fn machine() -> Value {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        });
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        });
    let load_average = std::fs::read_to_string("/proc/loadavg").ok().map(|text| {
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    });
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": cpu_model,
        "memory_gib": memory_kib.map(|kib| (kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0),
        "load_average_at_start": load_average,
        "cpu_busy_before_start_percent": cpu_busy_percent(Duration::from_secs(1)),
    })
}

/// Measures the share of CPU time that all processes used during `window`,
/// from the first line of /proc/stat. Returns `None` where it is missing.
fn cpu_busy_percent(window: Duration) -> Option<f64> {
    let before = cpu_times()?;
    std::thread::sleep(window);
    let after = cpu_times()?;
    let total = after.0.checked_sub(before.0)?;
    let idle = after.1.checked_sub(before.1)?;
    if total == 0 {
        return None;
    }
    Some(((total - idle) as f64 / total as f64 * 1000.0).round() / 10.0)
}

/// Returns the total and the idle (idle plus iowait) CPU ticks so far.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|field| field.parse().ok())
        .collect();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((ticks.iter().sum(), idle))
}

/// Maximum time for the service to respond to its first request.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
