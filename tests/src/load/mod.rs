//! `loadgen`: many concurrent clients, every outcome counted.
//!
//! An attempt connects, reads the `NAME PID` line within the timeout (counted from the start
//! of the connect), keeps the connection open for the hold time and closes it. It succeeds
//! only if all of that worked; otherwise it fails with one [`FailureKind`]. No retries.
//!
//! With `--http` an attempt is one HTTP/1.1 request instead (`GET /`), and a connection
//! carries `--requests-per-connection` of them (keep-alive; the last one says
//! `Connection: close`). The answer's status must be 200; the first line of its body is the
//! generation name and its `X-Pid` header, if any, the pid. Like an HTTP client pool, a
//! client that finds its idle keep-alive connection closed by the server *before* it sends
//! the next request opens a new connection, and that is no failure (counted in
//! [`LoadReport::reopened`]); once the request is sent, anything short of a full 200
//! response within the timeout is one. [`LoadReport::keepalive_race`] counts the requests
//! hit by the keep-alive race: sent on a reused connection that the server closed or reset
//! before any byte of the answer (the server closed it as idle while the request was on its
//! way, e.g. nginx told to quit). HTTP clients retry exactly those (RFC 9112 §9.3.1: the
//! connection closed prematurely, the method idempotent). By default loadgen does not
//! retry: each is a failure. With `--retry-keepalive-race` it retries each such request
//! once, on a new connection, within the same timeout, and the retry's outcome is the
//! attempt's; no other failure is ever retried.
//!
//! # Layout
//!
//! - this file: [`LoadConfig`] (the command line), [`run`] and the client threads.
//! - `report`: [`LoadReport`], [`Failures`] and [`FailureKind`].
//! - `log`: the `--log` file ([`read_log`]) and its clock ([`monotonic_ns`]).
//! - `line`: the `testsrv` line protocol ([`connect_once`], [`hold`], [`parse_answer`]).
//! - `http`: `--http` attempts on kept-alive connections ([`http_once`]).
//! - `http_response`: HTTP/1.x response parsing ([`parse_head`], [`parse_response`]).

mod http;
mod http_response;
mod line;
mod log;
mod report;

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::{ArgGroup, Parser};

pub use self::http::http_once;
pub use self::http_response::{HttpHead, HttpResponse, parse_head, parse_response};
pub use self::line::{connect_once, hold, parse_answer};
pub use self::log::{LogEntry, monotonic_ns, read_log};
pub use self::report::{FailureKind, Failures, LoadReport};

use self::http::{HttpConn, http_attempt};
use self::line::attempt;
use crate::sys;

/// Most attempts one run may make.
pub const MAX_COUNT: u64 = 10_000_000;
/// Longest run, in milliseconds.
pub const MAX_DURATION_MS: u64 = 600_000;
/// Most client threads.
pub const MAX_CONCURRENCY: u32 = 10_000;

/// Most requests one `--http` connection may carry.
pub const MAX_REQUESTS_PER_CONNECTION: u32 = 1_000_000;

/// How often a held connection checks the stop flag.
const HOLD_SLICE: Duration = Duration::from_millis(50);
/// Stack of a client thread.
const CLIENT_STACK: usize = 256 * 1024;

/// Command line of `loadgen`; also the configuration of [`run`].
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "loadgen",
    about = "Load client for handoff tests: prints one JSON report",
    group(ArgGroup::new("bound").required(true).multiple(true).args(["count", "duration_ms"]))
)]
pub struct LoadConfig {
    /// Address to connect to; IPv6 as [::1]:PORT.
    #[arg(long, value_name = "ADDR:PORT")]
    pub connect: SocketAddr,
    /// Client threads, each making one attempt at a time.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CONCURRENCY)))]
    pub concurrency: u32,
    /// Stop after this many attempts in total.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT))]
    pub count: Option<u64>,
    /// Stop starting attempts after this many milliseconds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION_MS))]
    pub duration_ms: Option<u64>,
    /// Keep each connection open this long after the answer, in milliseconds. With `--http`:
    /// pause this long after each response (think time, the connection idle and open).
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u64,
    /// Deadline for connect plus answer, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION_MS))]
    pub timeout_ms: u64,
    /// Write one line `START_NS OUTCOME` per attempt to this file.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Speak HTTP/1.1: each attempt is a `GET /` answered by 200 with the generation name as
    /// the first line of the body (and the pid in an `X-Pid` header, if any).
    #[arg(long)]
    pub http: bool,
    /// With `--http`: requests per connection; more than 1 keeps connections alive between
    /// requests, and the last request of a connection says `Connection: close`.
    #[arg(
        long,
        default_value_t = 1,
        requires = "http",
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_REQUESTS_PER_CONNECTION))
    )]
    pub requests_per_connection: u32,
    /// With `--http`: retry a request once, on a new connection, when it was sent on a reused
    /// keep-alive connection and the server closed or reset it before any byte of the answer
    /// (the keep-alive race, as HTTP clients do per RFC 9112 §9.3.1). Every such request is
    /// counted in `keepalive_race` all the same.
    #[arg(long, requires = "http")]
    pub retry_keepalive_race: bool,
}

impl LoadConfig {
    /// A configuration with the command-line defaults and no bound: give `count` or
    /// `duration_ms`, or stop the run with the flag passed to [`run`].
    pub fn new(connect: SocketAddr, concurrency: u32) -> Self {
        LoadConfig {
            connect,
            concurrency,
            count: None,
            duration_ms: None,
            hold_ms: 0,
            timeout_ms: 2000,
            log: None,
            http: false,
            requests_per_connection: 1,
            retry_keepalive_race: false,
        }
    }
}

/// One successful attempt.
struct Answer {
    name: String,
    /// `None`: an HTTP answer without `X-Pid`.
    pid: Option<u32>,
    latency: Duration,
}

/// Runs the load until `cfg.count` attempts, `cfg.duration_ms` or `stop` (checked before each
/// attempt and during holds), whichever comes first.
///
/// # Panics
///
/// If the `cfg.log` file cannot be written; [`try_run`] returns that error instead.
pub fn run(cfg: &LoadConfig, stop: Option<&AtomicBool>) -> LoadReport {
    try_run(cfg, stop).unwrap_or_else(|e| panic!("loadgen log {:?}: {e}", cfg.log))
}

/// [`run`], returning an error if the `cfg.log` file cannot be created or written. Raises the
/// soft open file limit to the hard one so high concurrency fits.
pub fn try_run(cfg: &LoadConfig, stop: Option<&AtomicBool>) -> io::Result<LoadReport> {
    let log = match &cfg.log {
        Some(path) => Some(Mutex::new(BufWriter::new(File::create(path)?))),
        None => None,
    };
    // A lower limit only makes attempts fail with "connect", which the report shows.
    let _ = sys::raise_nofile_limit();
    let started = Instant::now();
    let run = Run {
        cfg,
        stop,
        halt: AtomicBool::new(false),
        deadline: cfg
            .duration_ms
            .map(|ms| started + Duration::from_millis(ms.min(MAX_DURATION_MS))),
        count: cfg.count.map(|c| c.min(MAX_COUNT)),
        issued: AtomicU64::new(0),
        log,
        log_error: Mutex::new(None),
    };
    let mut report = LoadReport::default();
    let spawn_error = thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut spawn_error = None;
        for _ in 0..cfg.concurrency.clamp(1, MAX_CONCURRENCY) {
            let spawned = thread::Builder::new()
                .name("loadgen".to_owned())
                .stack_size(CLIENT_STACK)
                .spawn_scoped(scope, || run.client());
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    run.halt.store(true, Ordering::Relaxed);
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        for handle in handles {
            match handle.join() {
                Ok(part) => report.merge(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        spawn_error
    });
    report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if let Some(e) = spawn_error {
        return Err(io::Error::new(
            e.kind(),
            format!("starting client threads: {e}"),
        ));
    }
    if let Some(e) = run
        .log_error
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        return Err(e);
    }
    if let Some(log) = run.log {
        log.into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .flush()?;
    }
    Ok(report)
}

/// State shared by the client threads of one run.
struct Run<'a> {
    /// Address, timeout and hold of every attempt.
    cfg: &'a LoadConfig,
    /// The caller's stop flag.
    stop: Option<&'a AtomicBool>,
    /// Set when the run must end early (a thread could not start, the log failed).
    halt: AtomicBool,
    /// No attempt starts after this instant (`--duration-ms`).
    deadline: Option<Instant>,
    /// `--count`, capped at [`MAX_COUNT`].
    count: Option<u64>,
    /// Attempts started by all threads, to stop at exactly `count`.
    issued: AtomicU64,
    /// The `--log` file, shared by all threads; lines are in completion order.
    log: Option<Mutex<BufWriter<File>>>,
    /// The first error writing the log; it ends the run and is returned by [`try_run`].
    log_error: Mutex<Option<io::Error>>,
}

impl Run<'_> {
    fn stopped(&self) -> bool {
        self.halt.load(Ordering::Relaxed) || self.stop.is_some_and(|s| s.load(Ordering::Relaxed))
    }

    fn client(&self) -> LoadReport {
        let mut part = LoadReport::default();
        let timeout = Duration::from_millis(self.cfg.timeout_ms.max(1));
        let hold = Duration::from_millis(self.cfg.hold_ms);
        // `--http`: the kept-alive connection of this client, if any.
        let mut conn: Option<HttpConn> = None;
        loop {
            if self.stopped() || self.deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            if self
                .count
                .is_some_and(|c| self.issued.fetch_add(1, Ordering::Relaxed) >= c)
            {
                break;
            }
            let start_ns = monotonic_ns();
            let outcome = if self.cfg.http {
                let outcome = http_attempt(
                    &mut conn,
                    self.cfg.connect,
                    timeout,
                    self.cfg.requests_per_connection,
                    self.cfg.retry_keepalive_race,
                    &mut part,
                );
                if outcome.is_ok() && !hold.is_zero() {
                    pause(hold, &|| self.stopped());
                }
                outcome
            } else {
                attempt(self.cfg.connect, timeout, hold, &|| self.stopped())
            };
            part.record(&outcome);
            if let Some(log) = &self.log {
                let outcome = match &outcome {
                    Ok(answer) => answer.name.as_str(),
                    Err(kind) => &format!("!{kind}"),
                };
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = writeln!(log, "{start_ns} {outcome}") {
                    self.halt.store(true, Ordering::Relaxed);
                    *self.log_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            }
        }
        part
    }
}

fn remaining(deadline: Instant) -> Result<Duration, FailureKind> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(FailureKind::Timeout)
    } else {
        Ok(left)
    }
}

/// Sleeps `pause`, ending early when `stopped()`.
fn pause(pause: Duration, stopped: &dyn Fn() -> bool) {
    let until = Instant::now() + pause;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stopped() {
            return;
        }
        thread::sleep(left.min(HOLD_SLICE));
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::free_port;

    #[test]
    fn cli_is_consistent() {
        LoadConfig::command().debug_assert();
    }

    #[test]
    fn cli_needs_a_bound_and_respects_caps() {
        let base = ["loadgen", "--connect", "127.0.0.1:1", "--concurrency", "2"];
        let parse = |extra: &[&str]| LoadConfig::try_parse_from(base.iter().chain(extra));
        assert!(parse(&[]).is_err(), "a run without bound");
        let cfg = parse(&["--count", "5"]).expect("count alone");
        assert_eq!(
            (cfg.count, cfg.duration_ms, cfg.hold_ms, cfg.timeout_ms),
            (Some(5), None, 0, 2000)
        );
        let cfg = parse(&["--count", "5", "--duration-ms", "9", "--log", "/tmp/x"]).expect("both");
        assert_eq!(
            (cfg.duration_ms, cfg.log),
            (Some(9), Some(PathBuf::from("/tmp/x")))
        );
        assert!(parse(&["--count", "10000000"]).is_ok());
        assert!(parse(&["--count", "10000001"]).is_err());
        assert!(parse(&["--duration-ms", "600001"]).is_err());
        assert!(parse(&["--count", "0"]).is_err());
        let zero = [
            "loadgen",
            "--connect",
            "127.0.0.1:1",
            "--concurrency",
            "0",
            "--count",
            "1",
        ];
        assert!(LoadConfig::try_parse_from(zero).is_err());

        let cfg = parse(&["--count", "5"]).expect("count alone");
        assert_eq!((cfg.http, cfg.requests_per_connection), (false, 1));
        let cfg = parse(&["--count", "5", "--http"]).expect("http");
        assert_eq!((cfg.http, cfg.requests_per_connection), (true, 1));
        let cfg = parse(&["--count", "5", "--http", "--requests-per-connection", "20"])
            .expect("keep-alive");
        assert_eq!((cfg.http, cfg.requests_per_connection), (true, 20));
        assert!(
            parse(&["--count", "5", "--requests-per-connection", "20"]).is_err(),
            "requests per connection without --http"
        );
        assert!(parse(&["--count", "5", "--http", "--requests-per-connection", "0"]).is_err());
        assert!(
            !parse(&["--count", "5", "--http"])
                .expect("http")
                .retry_keepalive_race
        );
        let cfg = parse(&["--count", "5", "--http", "--retry-keepalive-race"]).expect("retry");
        assert!(cfg.retry_keepalive_race);
        assert!(
            parse(&["--count", "5", "--retry-keepalive-race"]).is_err(),
            "retry without --http"
        );
        assert!(
            parse(&[
                "--count",
                "5",
                "--http",
                "--requests-per-connection",
                "1000001"
            ])
            .is_err()
        );
    }

    /// A loopback address on a port that was free a moment ago: nothing listens there yet.
    pub(super) fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], free_port()))
    }
}
