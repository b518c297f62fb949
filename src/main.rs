use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use citapro_webhooks::cli::{ApiKeyCommand, Cli, Command, LogFormat, ProducerTokenCommand};
use citapro_webhooks::{admin, app, devtools};

/// mimalloc keeps per-thread free lists and returns memory to the system
/// sooner than the C library's allocator under many threads. It is built
/// without transparent huge pages, which would keep whole 2 MiB pages
/// resident for a few live objects.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Threads for blocking work (SQLite reads) at most. Each thread can hold
/// a malloc arena of its own, so an unbounded pool grows memory under load.
const MAX_BLOCKING_THREADS: usize = 16;

fn main() -> std::process::ExitCode {
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run()));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The cause chain on one line, without a backtrace even when RUST_BACKTRACE is set.
            eprintln!("Error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Serve(args) => args.log_format,
        _ => LogFormat::Text,
    };
    init_logging(log_format);

    match cli.command {
        Command::Serve(args) => {
            let shutdown = CancellationToken::new();
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("binding --listen {} failed", args.listen))?;
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            app::run(
                args.service_config(),
                listener,
                shutdown,
                Default::default(),
            )
            .await
        }
        Command::ApiKey(ApiKeyCommand::Create { business, database }) => {
            admin::create_api_key(&database.database_url, business).await
        }
        Command::ProducerToken(ProducerTokenCommand::Create { name, database }) => {
            admin::create_producer_token(&database.database_url, name).await
        }
        Command::Migrate(database) => admin::migrate(&database.database_url).await,
        Command::EncryptSecrets {
            database,
            encryption,
        } => {
            admin::encrypt_secrets(
                &database.database_url,
                encryption.encryption_key.as_deref(),
                &encryption.previous_encryption_keys,
            )
            .await
        }
        Command::Listen {
            port,
            secret,
            status,
        } => devtools::listen(port, secret, status).await,
        Command::Trigger {
            event,
            business,
            server,
            producer_token,
        } => devtools::trigger(&event, business, &server, &producer_token).await,
        Command::Verify {
            secret,
            signature,
            file,
        } => {
            // Exit status 2 separates an unreadable body from a forged one.
            match devtools::verify(&secret, &signature, file) {
                Ok(true) => {
                    println!("valid");
                    Ok(())
                }
                Ok(false) => {
                    println!("invalid");
                    std::process::exit(1);
                }
                Err(error) => {
                    eprintln!("Error: {error:#}");
                    std::process::exit(2);
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down");
    shutdown.cancel();
}
