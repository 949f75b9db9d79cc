//! The daemon's start-up once its arguments are parsed, and its life until shutdown: the
//! one entry point that `handoffd` and the tests call, so both start the same daemon.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::signal::unix::{SignalKind, signal};

use crate::config::ServiceConfig;
use crate::config::file::{self as config_file, ConfigFileError};
use crate::config::{ConfigError, Overrides, Paths};
use crate::kernel::host::HostError;
use crate::kernel::loader::features::CheckError;
use crate::kernel::loader::{DrainProgram, GuardProgram, LoaderError};
use crate::logging::one_line;
use crate::persist::pins;
use crate::persist::pins::PinsError;
use crate::persist::state;
use crate::persist::state::{SavedState, StateError};
use crate::runtime::control::{self, ControlError};
use crate::runtime::daemon::{ConfigSource, Daemon};
use crate::runtime::notify;
use crate::runtime::service::Ctx;
use crate::runtime::supervise;

/// What the daemon is started with (`handoffd`'s flags, but for logging and `--cleanup`).
#[derive(Debug, Clone)]
pub struct Options {
    /// The state directory and the control socket.
    pub paths: Paths,
    /// `--config`: the file of services, read again on SIGHUP and `handoffctl reload`.
    pub config_file: Option<PathBuf>,
    /// The flags that make or override the services.
    pub overrides: Overrides,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// `--cgroup-root`: the host's cgroup v2 root, if not the mounted one.
    pub cgroup_root: Option<PathBuf>,
}

/// Why the daemon did not start (each stops it before it is ready, and what it made is
/// removed).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The config file is unreadable or invalid.
    #[error(transparent)]
    ConfigFile(#[from] ConfigFileError),
    /// The services (file and flags together) are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The kernel lacks what handoffd needs (its error on one line, as it is logged).
    #[error("{}", one_line(.0))]
    Kernel(CheckError),
    /// handoffd does not run on the host (pid namespace, cgroup root, bpffs).
    #[error(transparent)]
    Host(#[from] HostError),
    /// The state directory or the control socket could not be taken.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The bpffs could not be mounted.
    #[error(transparent)]
    Pins(#[from] PinsError),
    /// The saved generation table could not be read.
    #[error(transparent)]
    State(#[from] StateError),
    /// The async runtime did not start.
    #[error("starting the tokio runtime")]
    Runtime(#[source] std::io::Error),
    /// The drain programs could not be attached to the cgroup root.
    #[error("attaching the drain accounting programs")]
    Attach(#[source] LoaderError),
    /// The drain programs' ring buffers were already taken.
    #[error("the drain ring buffer")]
    NoEvents,
    /// A signal handler could not be installed.
    #[error("installing the {signal} handler")]
    Signal {
        /// The signal's name.
        signal: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metrics thread did not start.
    #[error("starting the metrics thread")]
    Metrics(#[source] std::io::Error),
}

/// Starts the daemon and runs it until `shutdown`'s future completes; the kernel keeps
/// steering after it returns. `shutdown` is called in the daemon's runtime before the
/// daemon says it is ready, so that a signal handler it installs (see [`on_signal`])
/// catches a signal sent once it is.
pub fn run<S, F>(options: Options, shutdown: S) -> Result<(), RunError>
where
    S: FnOnce() -> Result<F, RunError>,
    F: Future<Output = ()>,
{
    let services = load_services(&options)?;
    let cgroup_root = options.cgroup_root.as_deref();
    // Before the state directory is taken: a kernel that cannot run handoffd is told so
    // in one line (nothing is logged before it at the default level), and the refused
    // start has touched nothing. The drain programs are loaded here and attached once
    // the directory is ours.
    let whole_host =
        crate::kernel::force_whole_host(std::env::var_os("HANDOFF_FORCE_WHOLE_HOST").as_deref());
    let program = crate::kernel::loader::features::check(whole_host, cgroup_root)
        .map_err(RunError::Kernel)?;
    // The kernel programs see the host: in a container's pid namespace, cgroup namespace
    // or bpffs they would work on the wrong pids, cgroup or pins. One line, nothing made.
    let checked = crate::kernel::host::check_host(cgroup_root)?;
    if let Some(why) = checked.bpffs_unverified {
        tracing::info!(
            "{} could not be compared with the host's ({why}); using it",
            pins::BPFFS
        );
    }
    program.log_modes();
    match crate::sys::raise_nofile_limit() {
        Ok((before, now)) => tracing::info!(before, now, "open file limit (RLIMIT_NOFILE)"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    // From here a failed start removes what it made (see `Start`).
    let mut start = control::Start::lock(&options.paths)?;
    pins::ensure_bpffs()?;
    let state_file = state::file(&options.paths.state_dir);
    let saved = state::load(&state_file)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let begun = Begun {
        services,
        program,
        saved,
        state_file,
    };
    rt.block_on(serve(options, &mut start, begun, shutdown))
}

/// A future that completes on SIGTERM or SIGINT, the handlers installed now: `handoffd`'s
/// shutdown.
pub fn on_signal() -> Result<impl Future<Output = ()>, RunError> {
    let installing = |signal| move |source| RunError::Signal { signal, source };
    let mut term = signal(SignalKind::terminate()).map_err(installing("SIGTERM"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(installing("SIGINT"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// What the start-up has made before the runtime runs.
struct Begun {
    /// The services to run.
    services: Vec<ServiceConfig>,
    /// The drain programs, loaded, not yet attached.
    program: DrainProgram,
    /// What a previous daemon steered.
    saved: SavedState,
    /// Where the generation table is saved.
    state_file: PathBuf,
}

/// The services to run: the config file's, if any, with the flags applied.
fn load_services(options: &Options) -> Result<Vec<ServiceConfig>, RunError> {
    let file = options
        .config_file
        .as_deref()
        .map(config_file::load)
        .transpose()?;
    Ok(options.overrides.apply(file)?)
}

/// The daemon in its runtime: its tasks, ready, then the control socket until shutdown.
async fn serve<S, F>(
    options: Options,
    start: &mut control::Start,
    begun: Begun,
    shutdown: S,
) -> Result<(), RunError>
where
    S: FnOnce() -> Result<F, RunError>,
    F: Future<Output = ()>,
{
    let Begun {
        services,
        mut program,
        saved,
        state_file,
    } = begun;
    let listener = start.bind()?;
    program.attach().map_err(RunError::Attach)?;
    let events = program.take_events().ok_or(RunError::NoEvents)?;
    let (watch_tx, watch_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut ctx = Ctx::new(program, Some(watch_tx));
    ctx.guard = guard(options.cgroup_root.as_deref());
    let shutdown = shutdown()?;
    let configs = services.clone();
    let daemon = Arc::new(Mutex::new(Daemon::new(
        services,
        ctx,
        saved,
        Some(state_file),
    )));
    // What SIGHUP and `handoffctl reload` read again.
    let config = Arc::new(ConfigSource::new(options.config_file, options.overrides));
    let mut tasks = vec![
        tokio::spawn(supervise::supervise(Arc::clone(&daemon), events, watch_rx)).abort_handle(),
        tokio::spawn(reload_on_hup(Arc::clone(&daemon), Arc::clone(&config))).abort_handle(),
    ];
    tasks.extend(crate::runtime::readiness::spawn_all(&configs, &daemon));
    if let Some(addr) = options.metrics_addr {
        // Its own threads; an address taken now is retried there, steering goes on.
        crate::runtime::scrape::spawn(addr, Arc::clone(&daemon)).map_err(RunError::Metrics)?;
    }
    let shutdown = async move {
        shutdown.await;
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
    let path = options.paths.control_socket;
    tracing::info!(control = %path.display(), "handoffd ready: {summary}; {kernel}");
    control::serve(listener, path, daemon, config, shutdown).await;
    for task in tasks {
        task.abort();
    }
    Ok(())
}

/// The guard of the groups' programs, if it loads.
fn guard(cgroup_root: Option<&std::path::Path>) -> Option<GuardProgram> {
    // Tests set this to model a guard the kernel does not run (a 32-bit setsockopt),
    // so that they can watch the probes restore steering.
    if std::env::var_os("HANDOFF_TEST_NO_GUARD").is_some() {
        tracing::warn!(
            "HANDOFF_TEST_NO_GUARD is set: the guard of the groups' programs is not loaded, steering is checked by probes only"
        );
        return None;
    }
    // In the initial pid namespace (checked at start), where the guard knows handoffd by
    // its pid.
    match GuardProgram::load(cgroup_root) {
        Ok(guard) => Some(guard),
        Err(e) => {
            tracing::warn!(error = %one_line(&e), "the guard of the groups' programs is not loaded (needs Linux >= 5.14 with cgroup/setsockopt and SO_NETNS_COOKIE): steering is checked by probes only");
            None
        }
    }
}

/// Reloads the config file on SIGHUP, as `handoffctl reload` does (one code path:
/// [`crate::runtime::daemon::reload`]); a bad file is refused and the running one stays.
async fn reload_on_hup(
    daemon: Arc<Mutex<Daemon>>,
    config: Arc<ConfigSource>,
) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    while hup.recv().await.is_some() {
        let daemon = Arc::clone(&daemon);
        let config = Arc::clone(&config);
        // The outcome is logged by `reload`; the signal has no one to answer.
        let _ =
            tokio::task::spawn_blocking(move || crate::runtime::daemon::reload(&daemon, &config))
                .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_config_refuses_the_start_before_anything_is_made() {
        let dir = std::env::temp_dir().join(format!("handoff-run-{}", std::process::id()));
        let options = Options {
            paths: Paths::new(dir.join("state"), None),
            config_file: Some(dir.join("missing.toml")),
            overrides: Overrides::default(),
            metrics_addr: None,
            cgroup_root: None,
        };
        let shutdown =
            || -> Result<std::future::Ready<()>, RunError> { panic!("the daemon started") };
        let err = run(options, shutdown).expect_err("a missing config file");
        assert!(
            matches!(err, RunError::ConfigFile(ConfigFileError::Read { .. })),
            "{err:?}"
        );
        assert!(!dir.exists(), "the refused start made {}", dir.display());
    }
}
