//! `testsrv`: a stand-in service generation.
//!
//! Every accepted connection gets one line `NAME PID\n` (PID: the process that accepted it),
//! then the server reads until the client closes, so the client decides how long a connection
//! lives. With `--workers N` a master forks N workers like nginx does; the listener layout
//! follows `--mode`. With `--no-accept` it listens but never accepts: connections complete
//! the handshake and stay queued in the accept queue (for tests of what happens to them when
//! the listener closes).
//!
//! For benchmarks: `--log-close` stamps every close of an accepted connection; `--warmup-ms`
//! listens at once but accepts only later (a generation warming up); `--hold` keeps
//! connections without a thread each (100 k of them would exceed `pid_max` as threads) until
//! SIGUSR1 closes them all; `--drain-on-term` makes SIGTERM a graceful stop (close the
//! listeners, finish the accepted connections, exit), as nginx's QUIT or Go's `Shutdown`.
//!
//! For release tests: `--http-status CODE` answers HTTP (`HTTP/1.1 CODE`, `X-Pid: PID`,
//! body `NAME\n`, `Connection: close`) after reading the request head, so that the load
//! client's `--http` and health checks can talk to it; `--notify-ready` sends `READY=1` to
//! `$NOTIFY_SOCKET` once it accepts (after any `--warmup-ms`); `--log-accept` logs every
//! accepted connection with its peer address.
//!
//! Lines on stderr, each `KIND NAME key=value...`, for tests to wait on:
//! `term NAME pid=PID ns=NS` (SIGTERM arrived, CLOCK_MONOTONIC; ` ignored` with --ignore-term), `worker-exit NAME pid=PID status=STATUS`,
//! `respawn NAME old=PID new=PID`, `close NAME pid=PID ns=NS` (`--log-close`: NS just before
//! the close), `closed NAME pid=PID count=N first_ns=NS last_ns=NS` (`--hold`, after SIGUSR1:
//! NS just before the first and the last close), `accept NAME pid=PID peer=IP:PORT`
//! (`--log-accept`), `notify NAME pid=PID ns=NS` (`--notify-ready`: NS just before the
//! send) or `notify-failed NAME pid=PID error=ERROR`.
//!
//! # Layout
//!
//! - `config`: the command line ([`ServerConfig`], [`Mode`]).
//! - `serve`: listeners, accepting threads, the connections they serve, and the signals a
//!   process that accepts waits for.
//! - `master`: a master with `--workers`, forking, supervising and stopping its workers.
//! - `http`: the `--http-status` answer and the request head read before it.
//! - `notify`: `--notify-ready`.
//! - `tests`: unit tests (command line, ready line, real `testsrv` processes on loopback);
//!   `release_tests`: those of `--http-status`, `--log-accept` and `--notify-ready`.

mod config;
mod http;
mod master;
mod notify;
#[cfg(test)]
mod release_tests;
mod serve;
#[cfg(test)]
mod tests;

use std::io::{self, Write};
use std::net::SocketAddr;

pub use config::{MAX_WORKERS, Mode, ServerConfig};
use master::Master;
use serve::{bind_all, start_acceptors, wait_for_term};

use crate::sys;

/// Why the test server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be created.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address from `--listen`.
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// A worker died or failed before it reported readiness.
    #[error("worker {pid} exited before it was ready (its error is above)")]
    WorkerNotReady {
        /// The worker's pid.
        pid: i32,
    },
    /// `--notify-ready` without `$NOTIFY_SOCKET`.
    #[error("--notify-ready needs $NOTIFY_SOCKET (the socket to send READY=1 to)")]
    NoNotifySocket,
    /// Any other system call failed.
    #[error("{what} failed")]
    Sys {
        /// The operation.
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn sys_err(what: &'static str) -> impl FnOnce(io::Error) -> ServerError {
    move |source| ServerError::Sys { what, source }
}

/// The line the master prints on stdout once every listener of every process listens.
pub fn format_ready(master: u32, workers: &[u32]) -> String {
    let list: Vec<String> = workers.iter().map(u32::to_string).collect();
    format!("ready pid={master} workers={}", list.join(","))
}

/// Parses a [`format_ready`] line into the master pid and the worker pids.
pub fn parse_ready(line: &str) -> Option<(u32, Vec<u32>)> {
    let rest = line.trim_end().strip_prefix("ready pid=")?;
    let (master, workers) = rest.split_once(" workers=")?;
    let workers = match workers {
        "" => Vec::new(),
        list => list
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?,
    };
    Some((master.parse().ok()?, workers))
}

/// Runs the server until SIGTERM or SIGINT. Forks when `cfg.workers > 0`, so it must be called
/// from a single-threaded process (the `testsrv` binary); it refuses otherwise. Worker
/// processes never return from it.
pub fn run(cfg: &ServerConfig) -> Result<(), ServerError> {
    if let Err(e) = sys::raise_nofile_limit() {
        eprintln!(
            "testsrv {}: cannot raise the open file limit: {e}",
            cfg.name
        );
    }
    sys::block_handled_signals().map_err(sys_err("blocking signals"))?;
    let notify = notify::notify_socket(cfg)?;
    if cfg.workers == 0 {
        let listeners = bind_all(cfg)?;
        start_acceptors(cfg, &listeners)?;
        print_ready(std::process::id(), &[]);
        notify_ready(cfg, notify.as_ref());
        wait_for_term(cfg, &listeners);
        return Ok(());
    }
    let mut master = Master::start(cfg)?;
    let pids: Vec<u32> = master
        .workers
        .iter()
        .flatten()
        .map(|p| p.as_raw().unsigned_abs())
        .collect();
    print_ready(std::process::id(), &pids);
    notify_ready(cfg, notify.as_ref());
    master.supervise()
}

/// `--notify-ready`: `READY=1` once accepting has begun, i.e. `--warmup-ms` after every
/// process listens (each accepting thread waits that long after it started, before its
/// process reported readiness). Signals meanwhile stay pending (they are blocked) and are
/// taken afterwards.
fn notify_ready(cfg: &ServerConfig, socket: Option<&std::ffi::OsString>) {
    if let Some(socket) = socket {
        std::thread::sleep(std::time::Duration::from_millis(cfg.warmup_ms));
        notify::send_ready(cfg, socket);
    }
}

fn print_ready(master: u32, workers: &[u32]) {
    let mut out = io::stdout().lock();
    // Nobody may be reading stdout (e.g. a demo in the background); serving matters more.
    let _ = writeln!(out, "{}", format_ready(master, workers)).and_then(|()| out.flush());
}
