//! handoffd: steers new connections of each service to its newest promoted generation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use handoff::config::{self, DEFAULT_STATE_DIR, Paths};
use handoff::{control, daemon::Daemon};
use tokio::signal::unix::{SignalKind, signal};

/// Zero-downtime restarts for any Linux network service, steered in the kernel.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// An address of the service (repeat for IPv4 and IPv6), e.g. 0.0.0.0:8080 or [::]:8080.
    #[arg(
        long = "listen",
        value_name = "ADDR:PORT",
        required_unless_present = "cleanup"
    )]
    listen: Vec<SocketAddr>,
    /// The service's name.
    #[arg(long, default_value = "default")]
    service: String,
    /// The control socket [default: STATE_DIR/handoffd.sock].
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Where the daemon keeps its lock, control socket and state.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Remove the state of a stopped daemon and exit.
    #[arg(long, conflicts_with = "listen")]
    cleanup: bool,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let paths = Paths::new(args.state_dir.clone(), args.control_socket.clone());
    if args.cleanup {
        return cleanup(&paths);
    }
    let service = config::service(&args.service, &args.listen)?;
    let _lock = control::lock_state_dir(&paths)?;
    let listener = {
        let rt = runtime()?;
        let _guard = rt.enter();
        let l = control::bind(&paths.control_socket)?;
        drop(_guard);
        (rt, l)
    };
    let (rt, listener) = listener;
    let daemon = Arc::new(Mutex::new(Daemon::new(vec![service])));
    tracing::info!(service = %args.service, listen = ?args.listen, control = %paths.control_socket.display(), "handoffd ready");
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("stopping; the kernel keeps steering as it was");
        };
        control::serve(listener, paths.control_socket.clone(), daemon, shutdown).await;
        anyhow::Ok(())
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// Removes what a stopped daemon left in its state directory.
fn cleanup(paths: &Paths) -> anyhow::Result<()> {
    let _lock = control::lock_state_dir(paths)?;
    for path in [&paths.control_socket, &paths.lock_file()] {
        match std::fs::remove_file(path) {
            Ok(()) => println!("removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(())
}
