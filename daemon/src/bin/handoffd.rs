//! handoffd: steers new connections of each service to its newest promoted generation,
//! and retires older generations when their last connection closes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use handoff::config::{self, DEFAULT_STATE_DIR, Overrides, Paths, Sig};
use handoff::generation::{Ctx, ServiceConfig};
use handoff::logging;
use handoff::{
    cleanup, config_file, control, daemon::Daemon, metrics, notify, pins, state, supervise,
};
use tokio::signal::unix::{SignalKind, signal};

/// Zero-downtime restarts for any Linux network service, steered in the kernel.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// An address of the service (repeat for IPv4 and IPv6), e.g. 0.0.0.0:8080 or [::]:8080.
    #[arg(long = "listen", value_name = "ADDR:PORT", required_unless_present_any = ["cleanup", "config"])]
    listen: Vec<SocketAddr>,
    /// The service's name [default: default]; with --cleanup, the one service to clean up.
    #[arg(long)]
    service: Option<String>,
    /// A TOML file of services (see dist/handoffd.toml); SIGHUP reloads it. Flags override
    /// its service when it has exactly one.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The control socket [default: STATE_DIR/handoffd.sock].
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Where the daemon keeps its lock, control socket and generation table.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Signal sent to a generation when it starts draining (e.g. SIGQUIT for nginx,
    /// SIGTERM for a Go server that shuts down gracefully) [default: none].
    #[arg(long, value_name = "SIG")]
    drain_signal: Option<Sig>,
    /// Signal sent to a drained generation once its last connection has closed
    /// [default: SIGTERM].
    #[arg(long, value_name = "SIG")]
    retire_signal: Option<Sig>,
    /// Send the retire signal anyway after this long (e.g. 90s, 5m) [default: 300s].
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration)]
    drain_timeout: Option<Duration>,
    /// SIGKILL every member still alive this long after the retire signal [default: never].
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration)]
    kill_after: Option<Duration>,
    /// The uid the service's processes run as when it is not the promoted process's own
    /// (a name or a number): descendants of that uid are members, and may be the ones
    /// holding the listeners. Like `user` in a service's table of --config.
    #[arg(long, value_name = "NAME|UID", value_parser = config::resolve_user)]
    user: Option<u32>,
    /// Where to serve Prometheus metrics (`/metrics`), or `off`.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "127.0.0.1:9464")]
    metrics_addr: metrics::MetricsAddr,
    /// Remove what a stopped daemon left (pins, state, socket) and exit.
    #[arg(long, conflicts_with_all = ["listen", "config"])]
    cleanup: bool,
    /// The root of the host's cgroup v2 hierarchy, where the drain programs attach, if
    /// not the mounted one: in a Kubernetes pod (which cannot ask for the host's cgroup
    /// namespace), a hostPath mount of it. Refused unless it is the real root.
    #[arg(long, value_name = "PATH")]
    cgroup_root: Option<PathBuf>,
    /// Log format. Text has no colour unless stderr is a terminal (and NO_COLOR is
    /// unset); under journald each line is prefixed with its priority.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A refusal at start is one line: the error and its causes (`what: why`), with its
/// priority (error) under journald, like every line of the log.
fn main() -> std::process::ExitCode {
    handoff::compact_malloc();
    let target = logging::Target::detect();
    let args = match Args::try_parse() {
        Ok(args) => args,
        // Usage errors too carry their priority in the journal; --help and --version
        // (stdout) are clap's as they are.
        Err(e) if target.journald && e.use_stderr() => {
            logging::write_stderr(target, 3, &e.render().to_string());
            return std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
        Err(e) => e.exit(),
    };
    match run(args, target) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            logging::write_stderr(target, 3, &format!("Error: {e:#}\n"));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args, target: logging::Target) -> anyhow::Result<()> {
    // aya's own warnings (e.g. an object's BTF the kernel would not take, which it works
    // around) are not the operator's business unless asked for: handoffd states what it
    // lacks itself, and a refused start prints its one line alone.
    logging::init(
        target,
        matches!(args.log_format, LogFormat::Json),
        "info,aya=error,aya_obj=error",
    );
    let paths = Paths::new(args.state_dir.clone(), args.control_socket.clone());
    if args.cleanup {
        return Ok(cleanup::run(&paths, args.service.as_deref())?);
    }
    let overrides = Overrides {
        listen: args.listen.clone(),
        service: args.service.clone(),
        drain_signal: args.drain_signal,
        retire_signal: args.retire_signal,
        drain_timeout: args.drain_timeout,
        kill_after: args.kill_after,
        user: args.user,
    };
    let services = load_services(args.config.as_deref(), &overrides)?;
    // Before the state directory is taken: a kernel that cannot run handoffd is told so
    // in one line (nothing is logged before it at the default level), and the refused
    // start has touched nothing. The drain programs are loaded here and attached once
    // the directory is ours.
    let whole_host =
        handoff::kernel::force_whole_host(std::env::var_os("HANDOFF_FORCE_WHOLE_HOST").as_deref());
    let cgroup_root = args.cgroup_root.as_deref();
    let mut program = handoff::loader::features::check(whole_host, cgroup_root)
        .map_err(|e| anyhow::anyhow!(handoff::daemon::one_line(&e)))?;
    // The kernel programs see the host: in a container's pid namespace, cgroup namespace
    // or bpffs they would work on the wrong pids, cgroup or pins. One line, nothing made.
    let checked = handoff::host::check_host(cgroup_root)?;
    if let Some(why) = checked.bpffs_unverified {
        tracing::info!(
            "{} could not be compared with the host's ({why}); using it",
            handoff::pins::BPFFS
        );
    }
    program.log_modes();
    match handoff::raise_nofile_limit() {
        Ok((before, now)) => tracing::info!(before, now, "open file limit (RLIMIT_NOFILE)"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    // From here a failed start removes what it made (see `Start`).
    let mut start = control::Start::lock(&paths)?;
    pins::ensure_bpffs()?;
    let state_file = state::file(&paths.state_dir);
    let saved = state::load(&state_file)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let listener = start.bind()?;
        program.attach().context("attaching the drain accounting programs")?;
        let events = program.take_events().context("the drain ring buffer")?;
        let (watch_tx, watch_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut ctx = Ctx::new(program, Some(watch_tx));
        // Tests set this to model a guard the kernel does not run (a 32-bit setsockopt),
        // so that they can watch the probes restore steering.
        ctx.guard = if std::env::var_os("HANDOFF_TEST_NO_GUARD").is_some() {
            tracing::warn!("HANDOFF_TEST_NO_GUARD is set: the guard of the groups' programs is not loaded, steering is checked by probes only");
            None
        } else {
            // In the initial pid namespace (checked at start), where the guard knows
            // handoffd by its pid.
            match handoff::loader::GuardProgram::load(cgroup_root) {
                Ok(guard) => Some(guard),
                Err(e) => {
                    tracing::warn!(error = %handoff::daemon::one_line(&e), "the guard of the groups' programs is not loaded (needs Linux >= 5.14 with cgroup/setsockopt and SO_NETNS_COOKIE): steering is checked by probes only");
                    None
                }
            }
        };
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let daemon = Arc::new(Mutex::new(Daemon::new(services, ctx, saved, Some(state_file))));
        // What SIGHUP and `handoffctl reload` read again.
        let config = Arc::new(handoff::daemon::ConfigSource::new(args.config.clone(), overrides));
        let tasks = vec![
            tokio::spawn(supervise::supervise(Arc::clone(&daemon), events, watch_rx)).abort_handle(),
            tokio::spawn(reload_on_hup(Arc::clone(&daemon), Arc::clone(&config))).abort_handle(),
        ];
        if let Some(addr) = args.metrics_addr.0 {
            // Its own threads; an address taken now is retried there, steering goes on.
            metrics::serve::spawn(addr, Arc::clone(&daemon))
                .context("starting the metrics thread")?;
        }
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("stopping; the kernel keeps steering as it was");
        };
        let (summary, kernel) = {
            let d = Daemon::lock(&daemon);
            (d.summary(), d.kernel_status())
        };
        start.ready();
        if let Err(e) = notify::notify(&format!("READY=1\nSTATUS={summary}")) {
            tracing::warn!(error = %e, "notifying systemd failed");
        }
        tracing::info!(control = %paths.control_socket.display(), "handoffd ready: {summary}; {kernel}");
        control::serve(listener, paths.control_socket.clone(), daemon, config, shutdown).await;
        for task in tasks {
            task.abort();
        }
        anyhow::Ok(())
    })
}

/// The services to run: the config file's, if any, with the flags applied.
fn load_services(
    config: Option<&Path>,
    overrides: &Overrides,
) -> anyhow::Result<Vec<ServiceConfig>> {
    let file = config.map(config_file::load).transpose()?;
    Ok(overrides.apply(file)?)
}

/// Reloads the config file on SIGHUP, as `handoffctl reload` does (one code path:
/// [`handoff::daemon::reload`]); a bad file is refused and the running one stays.
async fn reload_on_hup(
    daemon: Arc<Mutex<Daemon>>,
    config: Arc<handoff::daemon::ConfigSource>,
) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    while hup.recv().await.is_some() {
        let daemon = Arc::clone(&daemon);
        let config = Arc::clone(&config);
        // The outcome is logged by `reload`; the signal has no one to answer.
        let _ =
            tokio::task::spawn_blocking(move || handoff::daemon::reload(&daemon, &config)).await;
    }
    Ok(())
}
