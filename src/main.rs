//! The `ensync-server` binary: arguments, logging, and the server until
//! Ctrl-C or SIGTERM.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ensync_server::{server, Config};
use tokio::net::TcpListener;
use tracing::{error, info};

/// Publishing and replaying allocate small buffers on several threads at
/// once, where glibc's allocator spent a fifth of the server's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// EnSync protocol server with a durable, replayable event log.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TCP address for the EnSync protocol [default: 127.0.0.1:7070]
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP/WebSocket address [default: 127.0.0.1:7071]
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Directory of the event log [default: ./data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML config file; flags override its values
    #[arg(long)]
    config: Option<PathBuf>,
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("Ctrl-C received"),
        () = term => info!("SIGTERM received"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => match Config::from_file(path) {
            Ok(config) => config,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        },
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(http_listen) = args.http_listen {
        config.http_listen = http_listen;
    }
    if let Some(data_dir) = args.data_dir {
        config.data_dir = data_dir;
    }
    let listener = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            error!("cannot listen on {} (listen): {e}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let http = match TcpListener::bind(config.http_listen).await {
        Ok(listener) => listener,
        Err(e) => {
            error!("cannot listen on {} (http_listen): {e}", config.http_listen);
            return ExitCode::FAILURE;
        }
    };
    info!(listen = %config.listen, http_listen = %config.http_listen, "ensync-server listening (TCP; HTTP and WebSocket at /message)");
    let listeners = server::Listeners {
        tcp: listener,
        http: Some(http),
    };
    match server::run(listeners, config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
