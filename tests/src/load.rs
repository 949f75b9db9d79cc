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
//! response within the timeout is one. Among those, [`LoadReport::keepalive_race`] counts
//! the requests lost to the keep-alive race: sent on a reused connection that the server
//! closed or reset before answering (the server closed it as idle while the request was on
//! its way, e.g. nginx told to quit). HTTP clients retry such requests on a new connection
//! (RFC 9112 §9.3.1); loadgen does not retry, it counts them.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::{ArgGroup, Parser};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};
use nix::time::{ClockId, clock_gettime};
use serde::{Deserialize, Serialize};

use crate::sys;

/// Most attempts one run may make.
pub const MAX_COUNT: u64 = 10_000_000;
/// Longest run, in milliseconds.
pub const MAX_DURATION_MS: u64 = 600_000;
/// Most client threads.
pub const MAX_CONCURRENCY: u32 = 10_000;

/// Most requests one `--http` connection may carry.
pub const MAX_REQUESTS_PER_CONNECTION: u32 = 1_000_000;

/// Longest answer line accepted; the server's is `NAME PID`.
const MAX_LINE: usize = 256;
/// Longest HTTP response head (status line and headers) accepted.
const MAX_HTTP_HEAD: usize = 16 * 1024;
/// Longest HTTP response body accepted.
const MAX_HTTP_BODY: u64 = 64 * 1024;
/// Deadline of [`hold`] for connect plus answer.
const HOLD_TIMEOUT: Duration = Duration::from_secs(5);
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
        }
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureKind {
    /// Connect failed other than by refusal or reset (also any other socket error).
    Connect,
    /// ECONNREFUSED: nothing listened.
    Refused,
    /// ECONNRESET at any point, e.g. a listener closed with the connection in its queue.
    Reset,
    /// EOF before a full, well-formed answer line, or during the hold.
    Eof,
    /// No answer within the timeout.
    Timeout,
    /// `--http`: a full response whose status was not 200.
    Status,
}

impl FailureKind {
    /// Every kind, in report order.
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Connect,
        FailureKind::Refused,
        FailureKind::Reset,
        FailureKind::Eof,
        FailureKind::Timeout,
        FailureKind::Status,
    ];

    /// The lowercase name used in the report and the log.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Refused => "refused",
            FailureKind::Reset => "reset",
            FailureKind::Eof => "eof",
            FailureKind::Timeout => "timeout",
            FailureKind::Status => "status",
        }
    }

    fn of(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => FailureKind::Refused,
            // EPIPE: a write after the peer reset the connection.
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => FailureKind::Reset,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => FailureKind::Timeout,
            _ => FailureKind::Connect,
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailureKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        FailureKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown failure kind {s:?}"))
    }
}

/// Failed attempts by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    /// See [`FailureKind::Connect`].
    pub connect: u64,
    /// See [`FailureKind::Refused`].
    pub refused: u64,
    /// See [`FailureKind::Reset`].
    pub reset: u64,
    /// See [`FailureKind::Eof`].
    pub eof: u64,
    /// See [`FailureKind::Timeout`].
    pub timeout: u64,
    /// See [`FailureKind::Status`]; absent from reports older than `--http`.
    #[serde(default)]
    pub status: u64,
}

impl Failures {
    /// All failed attempts.
    pub fn total(&self) -> u64 {
        self.connect + self.refused + self.reset + self.eof + self.timeout + self.status
    }

    /// Failed attempts of one kind.
    pub fn of_kind(&self, kind: FailureKind) -> u64 {
        match kind {
            FailureKind::Connect => self.connect,
            FailureKind::Refused => self.refused,
            FailureKind::Reset => self.reset,
            FailureKind::Eof => self.eof,
            FailureKind::Timeout => self.timeout,
            FailureKind::Status => self.status,
        }
    }

    fn slot(&mut self, kind: FailureKind) -> &mut u64 {
        match kind {
            FailureKind::Connect => &mut self.connect,
            FailureKind::Refused => &mut self.refused,
            FailureKind::Reset => &mut self.reset,
            FailureKind::Eof => &mut self.eof,
            FailureKind::Timeout => &mut self.timeout,
            FailureKind::Status => &mut self.status,
        }
    }
}

/// The result of a run; `loadgen` prints it as one JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Attempts made: `ok + failures.total()`.
    pub attempts: u64,
    /// Attempts answered (and held) without error.
    pub ok: u64,
    /// Failed attempts by kind.
    pub failures: Failures,
    /// Successful attempts by generation name.
    pub by_name: BTreeMap<String, u64>,
    /// Successful attempts by the pid that accepted (with `--http`: by `X-Pid` header, when
    /// the server sends one).
    pub by_pid: BTreeMap<u32, u64>,
    /// Wall time of the run.
    pub elapsed_ms: u64,
    /// Slowest connect-to-answer time of a successful attempt (with `--http`: of a request,
    /// counted from the connect on a new connection, from the write on a kept-alive one).
    pub max_latency_ms: u64,
    /// `--http`: kept-alive connections the server had closed before the next request was
    /// sent on them; the client opened a new one (not a failure).
    #[serde(default)]
    pub reopened: u64,
    /// `--http`: failed requests (counted in `failures` too, as `reset` or `eof`) that were
    /// sent on a reused keep-alive connection which the server closed or reset before any
    /// byte of the answer: the keep-alive race (see the module documentation).
    #[serde(default)]
    pub keepalive_race: u64,
}

impl LoadReport {
    fn record(&mut self, outcome: &Result<Answer, FailureKind>) {
        self.attempts += 1;
        match outcome {
            Ok(answer) => {
                self.ok += 1;
                *self.by_name.entry(answer.name.clone()).or_default() += 1;
                if let Some(pid) = answer.pid {
                    *self.by_pid.entry(pid).or_default() += 1;
                }
                let ms = u64::try_from(answer.latency.as_millis()).unwrap_or(u64::MAX);
                self.max_latency_ms = self.max_latency_ms.max(ms);
            }
            Err(kind) => *self.failures.slot(*kind) += 1,
        }
    }

    fn merge(&mut self, other: LoadReport) {
        self.attempts += other.attempts;
        self.ok += other.ok;
        for kind in FailureKind::ALL {
            *self.failures.slot(kind) += other.failures.of_kind(kind);
        }
        for (name, n) in other.by_name {
            *self.by_name.entry(name).or_default() += n;
        }
        for (pid, n) in other.by_pid {
            *self.by_pid.entry(pid).or_default() += n;
        }
        self.max_latency_ms = self.max_latency_ms.max(other.max_latency_ms);
        self.reopened += other.reopened;
        self.keepalive_race += other.keepalive_race;
    }
}

/// One successful attempt.
struct Answer {
    name: String,
    /// `None`: an HTTP answer without `X-Pid`.
    pid: Option<u32>,
    latency: Duration,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the `--log` start times.
pub fn monotonic_ns() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC exists on every Linux kernel");
    // Monotonic time is non-negative and fits u64 nanoseconds for 584 years of uptime.
    (now.tv_sec() as u64) * 1_000_000_000 + now.tv_nsec() as u64
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

/// One attempt: connect, answer, hold, close.
fn attempt(
    addr: SocketAddr,
    timeout: Duration,
    hold: Duration,
    stopped: &dyn Fn() -> bool,
) -> Result<Answer, FailureKind> {
    let started = Instant::now();
    let (stream, name, pid) = exchange(addr, started + timeout)?;
    let latency = started.elapsed();
    if !hold.is_zero() {
        hold_open(&stream, Instant::now() + hold, stopped)?;
    }
    Ok(Answer {
        name,
        pid: Some(pid),
        latency,
    })
}

/// Connects and reads the answer line, both before `deadline`.
fn exchange(addr: SocketAddr, deadline: Instant) -> Result<(TcpStream, String, u32), FailureKind> {
    let stream =
        TcpStream::connect_timeout(&addr, remaining(deadline)?).map_err(|e| FailureKind::of(&e))?;
    let line = read_line(&stream, deadline)?;
    let (name, pid) = parse_answer(&line).ok_or(FailureKind::Eof)?;
    Ok((stream, name.to_owned(), pid))
}

fn remaining(deadline: Instant) -> Result<Duration, FailureKind> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(FailureKind::Timeout)
    } else {
        Ok(left)
    }
}

fn read_line(mut stream: &TcpStream, deadline: Instant) -> Result<String, FailureKind> {
    let mut line = Vec::with_capacity(64);
    let mut chunk = [0u8; 128];
    loop {
        stream
            .set_read_timeout(Some(remaining(deadline)?))
            .map_err(|e| FailureKind::of(&e))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(FailureKind::Eof),
            Ok(n) => {
                line.extend_from_slice(&chunk[..n]);
                if let Some(end) = line.iter().position(|&b| b == b'\n') {
                    line.truncate(end);
                    return String::from_utf8(line).map_err(|_| FailureKind::Eof);
                }
                if line.len() > MAX_LINE {
                    return Err(FailureKind::Eof);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FailureKind::of(&e)),
        }
    }
}

/// Keeps the connection open until `until` (or the stop flag), reading so that a server
/// closing or resetting it early is noticed.
fn hold_open(
    mut stream: &TcpStream,
    until: Instant,
    stopped: &dyn Fn() -> bool,
) -> Result<(), FailureKind> {
    let mut chunk = [0u8; 128];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stopped() {
            return Ok(());
        }
        stream
            .set_read_timeout(Some(left.min(HOLD_SLICE)))
            .map_err(|e| FailureKind::of(&e))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(FailureKind::Eof),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(FailureKind::of(&e)),
        }
    }
}

/// Parses a server answer `NAME PID` (without the newline).
pub fn parse_answer(line: &str) -> Option<(&str, u32)> {
    let (name, pid) = line.split_once(' ')?;
    if name.is_empty() {
        return None;
    }
    Some((name, pid.parse().ok()?))
}

/// One connection: connect, read the answer, close. For tests counting the answers of
/// sequential connections.
pub fn connect_once(addr: SocketAddr, timeout: Duration) -> Result<(String, u32), FailureKind> {
    exchange(addr, Instant::now() + timeout).map(|(_, name, pid)| (name, pid))
}

/// Connects and reads the answer within 5 s, returning the still open connection: it stays
/// established until the stream is dropped.
pub fn hold(addr: SocketAddr) -> io::Result<(TcpStream, String, u32)> {
    let (stream, name, pid) = exchange(addr, Instant::now() + HOLD_TIMEOUT).map_err(|kind| {
        let io_kind = match kind {
            FailureKind::Refused => io::ErrorKind::ConnectionRefused,
            FailureKind::Reset => io::ErrorKind::ConnectionReset,
            FailureKind::Timeout => io::ErrorKind::TimedOut,
            FailureKind::Eof => io::ErrorKind::UnexpectedEof,
            FailureKind::Connect | FailureKind::Status => io::ErrorKind::Other,
        };
        io::Error::new(
            io_kind,
            format!("holding a connection to {addr} failed: {kind}"),
        )
    })?;
    // Later reads by the caller block, as on any fresh stream.
    stream.set_read_timeout(None)?;
    Ok((stream, name, pid))
}

/// A kept-alive `--http` connection and the requests it has carried.
struct HttpConn {
    stream: TcpStream,
    sent: u32,
}

/// One `--http` attempt: one request on the client's kept-alive connection, or on a new one
/// when there is none or the server closed it while idle (counted in `report.reopened`;
/// a request lost to the keep-alive race is counted in `report.keepalive_race`). The
/// connection is kept for the next attempt only after a full 200 response, when neither side
/// asked to close it.
fn http_attempt(
    conn: &mut Option<HttpConn>,
    addr: SocketAddr,
    timeout: Duration,
    per_connection: u32,
    report: &mut LoadReport,
) -> Result<Answer, FailureKind> {
    let started = Instant::now();
    let deadline = started + timeout;
    if conn.as_ref().is_some_and(|c| closed_by_peer(&c.stream)) {
        // What a browser or an HTTP client pool does with a pooled connection found closed:
        // use a new one. No request was sent on it, so nothing was lost.
        *conn = None;
        report.reopened += 1;
    }
    let mut c = match conn.take() {
        Some(c) => c,
        None => HttpConn {
            stream: connect(addr, deadline)?,
            sent: 0,
        },
    };
    let reused = c.sent > 0;
    c.sent += 1;
    let last = c.sent >= per_connection;
    let head = http_exchange(&c.stream, last, deadline).map_err(|(kind, answered)| {
        if reused && !answered && matches!(kind, FailureKind::Reset | FailureKind::Eof) {
            report.keepalive_race += 1;
        }
        kind
    })?;
    let latency = started.elapsed();
    if head.status != 200 {
        return Err(FailureKind::Status);
    }
    let name = first_line(&head.body).ok_or(FailureKind::Eof)?;
    if !last && !head.close && !head.extra {
        *conn = Some(c);
    }
    Ok(Answer {
        name,
        pid: head.pid,
        latency,
    })
}

/// Connects before `deadline`, with Nagle off (requests are one small write each).
fn connect(addr: SocketAddr, deadline: Instant) -> Result<TcpStream, FailureKind> {
    let stream =
        TcpStream::connect_timeout(&addr, remaining(deadline)?).map_err(|e| FailureKind::of(&e))?;
    stream.set_nodelay(true).map_err(|e| FailureKind::of(&e))?;
    Ok(stream)
}

/// Whether the server has closed (or reset, or unexpectedly written to) an idle connection:
/// a non-blocking peek that finds anything but "no data yet".
fn closed_by_peer(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    !matches!(
        recv(
            stream.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        ),
        Err(Errno::EAGAIN)
    )
}

/// The request of [`http_attempt`]: `Connection: close` on the last one of a connection.
fn http_request(last: bool) -> &'static [u8] {
    if last {
        b"GET / HTTP/1.1\r\nHost: handoff\r\nConnection: close\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: handoff\r\nConnection: keep-alive\r\n\r\n"
    }
}

/// Sends one request and reads its full response, both before `deadline`. A response that
/// is not 200 is returned as soon as its head is read (its body does not matter). A failure
/// comes with whether any byte of the answer had arrived.
fn http_exchange(
    mut stream: &TcpStream,
    last: bool,
    deadline: Instant,
) -> Result<HttpResponse, (FailureKind, bool)> {
    let mut buf = Vec::with_capacity(512);
    let fail = |buf: &Vec<u8>, kind| (kind, !buf.is_empty());
    let io_fail = |buf: &Vec<u8>, e: io::Error| (FailureKind::of(&e), !buf.is_empty());
    let left = |buf: &Vec<u8>| remaining(deadline).map_err(|kind| fail(buf, kind));
    stream
        .set_write_timeout(Some(left(&buf)?))
        .map_err(|e| io_fail(&buf, e))?;
    stream
        .write_all(http_request(last))
        .map_err(|e| io_fail(&buf, e))?;
    let mut chunk = [0u8; 4096];
    loop {
        stream
            .set_read_timeout(Some(left(&buf)?))
            .map_err(|e| io_fail(&buf, e))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(fail(&buf, FailureKind::Eof)),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                match parse_head(&buf) {
                    Err(_) => return Err(fail(&buf, FailureKind::Eof)),
                    Ok(None) => {}
                    Ok(Some(head)) if head.status != 200 => {
                        return Ok(HttpResponse::from_head(head, Vec::new(), false));
                    }
                    Ok(Some(_)) => match parse_response(&buf) {
                        Err(_) => return Err(fail(&buf, FailureKind::Eof)),
                        Ok(None) => {}
                        Ok(Some(response)) => return Ok(response),
                    },
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_fail(&buf, e)),
        }
    }
}

/// The first line of a body (without `\n` or `\r\n`), if it is non-empty UTF-8.
fn first_line(body: &[u8]) -> Option<String> {
    let line = body.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = std::str::from_utf8(line).ok()?;
    (!line.is_empty()).then(|| line.to_owned())
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

/// The status line and headers of an HTTP/1.x response, as [`parse_head`] reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpHead {
    /// The status code.
    pub status: u16,
    /// `Content-Length`, if given.
    pub content_length: Option<u64>,
    /// The connection ends after this response: `Connection: close`, or HTTP/1.0 without
    /// `Connection: keep-alive`.
    pub close: bool,
    /// The `X-Pid` header, if given and a number.
    pub pid: Option<u32>,
    /// Bytes of the head, the blank line included: the body starts here.
    pub len: usize,
}

/// A full HTTP/1.x response, as [`parse_response`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
    /// See [`HttpHead::close`].
    pub close: bool,
    /// See [`HttpHead::pid`].
    pub pid: Option<u32>,
    /// Bytes followed the response in the buffer: nothing may follow (no pipelining here), so
    /// the connection is not used again.
    pub extra: bool,
}

impl HttpResponse {
    fn from_head(head: HttpHead, body: Vec<u8>, extra: bool) -> Self {
        HttpResponse {
            status: head.status,
            body,
            close: head.close,
            pid: head.pid,
            extra,
        }
    }
}

/// Parses the head of an HTTP/1.0 or 1.1 response at the start of `buf`: `Ok(None)` while it
/// is incomplete, an error if it is malformed, too long, or uses `Transfer-Encoding` (not
/// supported: the servers of these tests send `Content-Length`).
pub fn parse_head(buf: &[u8]) -> Result<Option<HttpHead>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HTTP_HEAD {
            return Err(format!("no end of head in {} bytes", buf.len()));
        }
        return Ok(None);
    };
    if end > MAX_HTTP_HEAD {
        return Err(format!("a head of {end} bytes"));
    }
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| "a head that is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(format!("bad status line {status_line:?}")),
    };
    let code = parts.next().unwrap_or_default();
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad status code in {status_line:?}"));
    }
    let status: u16 = code.parse().map_err(|_| "bad status code")?;
    let mut head = HttpHead {
        status,
        content_length: None,
        close: http10,
        pid: None,
        len: end + 4,
    };
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(format!("bad header name in {line:?}"));
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            if head.content_length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length headers".to_owned());
            }
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("Transfer-Encoding {value:?} is not supported"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    head.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                    head.close = false;
                }
            }
        } else if name.eq_ignore_ascii_case("x-pid") {
            head.pid = value.parse().ok();
        }
    }
    Ok(Some(head))
}

/// Parses a full HTTP/1.x response at the start of `buf`: `Ok(None)` while incomplete.
/// Without `Content-Length` the body is empty for 1xx, 204 and 304 and an error otherwise
/// (reading to the end of the connection is not supported).
pub fn parse_response(buf: &[u8]) -> Result<Option<HttpResponse>, String> {
    let Some(head) = parse_head(buf)? else {
        return Ok(None);
    };
    let length = match head.content_length {
        Some(n) => n,
        None if head.status < 200 || head.status == 204 || head.status == 304 => 0,
        None => return Err(format!("status {} without Content-Length", head.status)),
    };
    if length > MAX_HTTP_BODY {
        return Err(format!("a body of {length} bytes"));
    }
    // At most MAX_HTTP_BODY (64 KiB): fits usize.
    let end = head.len + length as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let body = buf[head.len..end].to_vec();
    let extra = buf.len() > end;
    Ok(Some(HttpResponse::from_head(head, body, extra)))
}

/// One `--http` request on a new connection (`Connection: close`): the generation name and
/// the `X-Pid` header. For tests polling an HTTP server.
pub fn http_once(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(String, Option<u32>), FailureKind> {
    let mut conn = None;
    let mut report = LoadReport::default();
    http_attempt(&mut conn, addr, timeout, 1, &mut report).map(|a| (a.name, a.pid))
}

/// One line of a `--log` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// CLOCK_MONOTONIC nanoseconds when the attempt started (see [`monotonic_ns`]).
    pub start_ns: u64,
    /// The generation name that answered, or why the attempt failed.
    pub outcome: Result<String, FailureKind>,
}

impl FromStr for LogEntry {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, String> {
        let (start, outcome) = line
            .split_once(' ')
            .ok_or_else(|| format!("bad log line {line:?}"))?;
        let start_ns = start
            .parse()
            .map_err(|e| format!("bad start in {line:?}: {e}"))?;
        let outcome = match outcome.strip_prefix('!') {
            Some(kind) => Err(kind.parse()?),
            None => Ok(outcome.to_owned()),
        };
        Ok(LogEntry { start_ns, outcome })
    }
}

/// Reads a `--log` file.
pub fn read_log(path: &Path) -> io::Result<Vec<LogEntry>> {
    BufReader::new(File::open(path)?)
        .lines()
        .map(|line| {
            line?
                .parse()
                .map_err(|e: String| io::Error::new(io::ErrorKind::InvalidData, e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use clap::CommandFactory;

    use super::*;
    use crate::{Proc, free_port};

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

    #[test]
    fn http_responses_parse() {
        let ok = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 3\r\n\
                   Connection: keep-alive\r\nX-Pid: 4242\r\n\r\ng7\n";
        let response = parse_response(ok).expect("valid").expect("complete");
        assert_eq!(
            response,
            HttpResponse {
                status: 200,
                body: b"g7\n".to_vec(),
                close: false,
                pid: Some(4242),
                extra: false
            }
        );
        assert_eq!(first_line(&response.body).as_deref(), Some("g7"));
        // Every strict prefix is incomplete, not an error.
        for cut in 0..ok.len() {
            assert_eq!(parse_response(&ok[..cut]), Ok(None), "cut at {cut}");
        }
        let head = parse_head(ok).expect("valid").expect("complete");
        assert_eq!(
            (head.status, head.content_length, head.len),
            (200, Some(3), ok.len() - 3)
        );

        // Bytes after the body: the response is complete, the connection not reusable.
        let mut more = ok.to_vec();
        more.extend_from_slice(b"HTTP/1.1");
        assert!(
            parse_response(&more)
                .expect("valid")
                .expect("complete")
                .extra
        );

        let parsed = |text: &str| parse_response(text.as_bytes());
        let close = parsed("HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(close.close && close.body.is_empty() && close.pid.is_none());
        let tokens =
            parsed("HTTP/1.1 200 OK\r\nConnection: upgrade, close\r\nContent-Length: 0\r\n\r\n");
        assert!(tokens.expect("valid").expect("complete").close);
        // HTTP/1.0 closes unless it says keep-alive.
        let old = parsed("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(old.expect("valid").expect("complete").close);
        let old = parsed("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n");
        assert!(!old.expect("valid").expect("complete").close);
        // No reason phrase; a status other than 200; no body without Content-Length for 204.
        let nr = parsed("HTTP/1.1 503\r\nContent-Length: 2\r\n\r\nno");
        assert_eq!(nr.expect("valid").expect("complete").status, 503);
        let empty = parsed("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(empty.expect("valid").expect("complete").status, 204);
        // An X-Pid that is no number is ignored.
        let pid = parsed("HTTP/1.1 200 OK\r\nX-Pid: x\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(pid.expect("valid").expect("complete").pid, None);
        // The head of a non-200 answer is enough to judge it, even without a length.
        let head = parse_head(b"HTTP/1.1 500 Oops\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!((head.status, head.content_length), (500, None));

        for bad in [
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 20 OK\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 abc OK\r\n\r\n",
            "garbage\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\nbody until close",
            "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n",
        ] {
            assert!(parsed(bad).is_err(), "{bad:?} is refused");
        }
        // A head that never ends is refused once it is too long.
        let endless = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HTTP_HEAD));
        assert!(parsed(&endless).is_err());
        assert_eq!(parsed("HTTP/1.1 200 OK\r\nX: aaa"), Ok(None));

        assert_eq!(first_line(b"g1\r\nmore"), Some("g1".to_owned()));
        assert_eq!(first_line(b"g1"), Some("g1".to_owned()));
        assert_eq!(first_line(b"\ng1"), None);
        assert_eq!(first_line(b""), None);
        assert_eq!(first_line(b"\xff\n"), None);
    }

    /// What [`tiny_http_then`] does after its answers on a connection.
    #[derive(Clone, Copy)]
    enum After {
        /// Close the connection while it is idle.
        Close,
        /// Wait for the next request, read it, close without answering (the client sees EOF).
        ReadAndClose,
        /// Wait for the next request and close without reading it (the kernel resets).
        CloseUnread,
    }

    /// A minimal HTTP server on a thread: each connection gets `response` for each of up to
    /// `per_connection` requests, then is closed by the server (idle, after a response).
    /// Returns its address and the count of accepted connections.
    fn tiny_http(response: &'static str, per_connection: usize) -> (SocketAddr, Arc<AtomicU64>) {
        tiny_http_then(response, per_connection, After::Close)
    }

    /// [`tiny_http`], doing `after` once the answers are given.
    fn tiny_http_then(
        response: &'static str,
        per_connection: usize,
        after: After,
    ) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&accepted);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    for _ in 0..per_connection {
                        let end = loop {
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break end + 4;
                            }
                            match stream.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        buf.drain(..end);
                        if stream.write_all(response.as_bytes()).is_err() {
                            return;
                        }
                    }
                    match after {
                        After::Close => {}
                        After::ReadAndClose => {
                            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                                match stream.read(&mut chunk) {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                }
                            }
                        }
                        After::CloseUnread => {
                            let _ = stream.peek(&mut chunk);
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn http_cfg(addr: SocketAddr, per_connection: u32, count: u64) -> LoadConfig {
        let mut cfg = LoadConfig::new(addr, 1);
        cfg.http = true;
        cfg.requests_per_connection = per_connection;
        cfg.count = Some(count);
        cfg
    }

    const OK_200: &str =
        "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Pid: 7\r\nConnection: keep-alive\r\n\r\ngen\n";

    #[test]
    fn http_keeps_connections_alive() {
        let (addr, accepted) = tiny_http(OK_200, usize::MAX);
        assert_eq!(
            http_once(addr, Duration::from_secs(2)),
            Ok(("gen".to_owned(), Some(7)))
        );
        let report = run(&http_cfg(addr, 5, 20), None);
        assert_eq!(
            (report.ok, report.failures.total(), report.reopened),
            (20, 0, 0),
            "{report:?}"
        );
        assert_eq!(report.by_name, [("gen".to_owned(), 20)].into());
        assert_eq!(report.by_pid, [(7, 20)].into());
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1 + 4,
            "http_once, then 20 requests over connections of 5"
        );

        // One request per connection: a connection each.
        let (addr, accepted) = tiny_http(OK_200, usize::MAX);
        let report = run(&http_cfg(addr, 1, 10), None);
        assert_eq!((report.ok, report.failures.total()), (10, 0));
        assert_eq!(accepted.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn http_reopens_connections_the_server_closed_while_idle() {
        // The server closes each connection after 2 answers, without saying so: the client
        // finds it closed before its next request and opens another, failing nothing.
        let (addr, accepted) = tiny_http(OK_200, 2);
        let mut cfg = http_cfg(addr, 5, 20);
        cfg.hold_ms = 20; // time for the server's FIN to arrive before the next request
        let report = run(&cfg, None);
        assert_eq!(
            (report.ok, report.failures.total(), report.reopened),
            (20, 0, 9),
            "{report:?}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 10);

        // A server that says `Connection: close` is not asked again on that connection.
        let close = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\ngen\n";
        let (addr, accepted) = tiny_http(close, 1);
        let report = run(&http_cfg(addr, 5, 6), None);
        assert_eq!(
            (report.ok, report.failures.total(), report.reopened),
            (6, 0, 0),
            "{report:?}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 6);
        assert!(report.by_pid.is_empty(), "no X-Pid, no pid");
    }

    #[test]
    fn http_failures_are_classified() {
        let (addr, _) = tiny_http(
            "HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy",
            usize::MAX,
        );
        let report = run(&http_cfg(addr, 3, 6), None);
        assert_eq!((report.ok, report.failures.status), (0, 6), "{report:?}");
        assert_eq!(
            http_once(addr, Duration::from_secs(2)),
            Err(FailureKind::Status)
        );

        // The request was sent and the server closed without an answer.
        let (addr, _) = tiny_http("", 1);
        let report = run(&http_cfg(addr, 3, 6), None);
        assert_eq!((report.ok, report.failures.eof), (0, 6), "{report:?}");
        assert_eq!(report.keepalive_race, 0, "new connections: no race");

        // Requests sent on a reused connection which the server closes or resets instead of
        // answering: the keep-alive race, counted as such (and as failures).
        for (after, kind) in [
            (After::ReadAndClose, FailureKind::Eof),
            (After::CloseUnread, FailureKind::Reset),
        ] {
            let (addr, accepted) = tiny_http_then(OK_200, 1, after);
            let report = run(&http_cfg(addr, 5, 6), None);
            assert_eq!(
                (
                    report.ok,
                    report.failures.of_kind(kind),
                    report.failures.total()
                ),
                (3, 3, 3),
                "{kind}: {report:?}"
            );
            assert_eq!((report.keepalive_race, report.reopened), (3, 0), "{kind}");
            assert_eq!(accepted.load(Ordering::SeqCst), 3);
        }
        // On a new connection it is a plain failure.
        let (addr, _) = tiny_http_then(OK_200, 0, After::CloseUnread);
        let report = run(&http_cfg(addr, 5, 3), None);
        assert_eq!(
            (report.failures.reset, report.keepalive_race),
            (3, 0),
            "{report:?}"
        );

        // A truncated answer.
        let (addr, _) = tiny_http("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\ng", 1);
        assert_eq!(
            http_once(addr, Duration::from_secs(2)),
            Err(FailureKind::Eof)
        );
        // A 200 with an empty body names no generation.
        let (addr, _) = tiny_http("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 1);
        assert_eq!(
            http_once(addr, Duration::from_secs(2)),
            Err(FailureKind::Eof)
        );
        // No answer in time.
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = listener.local_addr().expect("address");
        assert_eq!(
            http_once(addr, Duration::from_millis(100)),
            Err(FailureKind::Timeout)
        );
        // Nothing listening.
        drop(listener);
        assert_eq!(
            http_once(addr, Duration::from_secs(1)),
            Err(FailureKind::Refused)
        );
    }

    #[test]
    fn errors_are_classified() {
        let kind = |k| FailureKind::of(&io::Error::from(k));
        assert_eq!(kind(io::ErrorKind::ConnectionRefused), FailureKind::Refused);
        assert_eq!(kind(io::ErrorKind::ConnectionReset), FailureKind::Reset);
        assert_eq!(kind(io::ErrorKind::BrokenPipe), FailureKind::Reset);
        assert_eq!(kind(io::ErrorKind::TimedOut), FailureKind::Timeout);
        assert_eq!(kind(io::ErrorKind::WouldBlock), FailureKind::Timeout);
        assert_eq!(kind(io::ErrorKind::HostUnreachable), FailureKind::Connect);
        let os = |errno| FailureKind::of(&io::Error::from_raw_os_error(errno));
        assert_eq!(os(libc::ECONNREFUSED), FailureKind::Refused);
        assert_eq!(os(libc::ECONNRESET), FailureKind::Reset);
        assert_eq!(os(libc::EADDRNOTAVAIL), FailureKind::Connect);
    }

    #[test]
    fn answers_and_log_lines_parse() {
        assert_eq!(parse_answer("A 12"), Some(("A", 12)));
        assert_eq!(parse_answer("A"), None);
        assert_eq!(parse_answer(" 12"), None);
        assert_eq!(parse_answer("A x"), None);
        let ok: LogEntry = "5 gen-b".parse().expect("ok line");
        assert_eq!(
            ok,
            LogEntry {
                start_ns: 5,
                outcome: Ok("gen-b".to_owned())
            }
        );
        for kind in FailureKind::ALL {
            let entry: LogEntry = format!("7 !{kind}").parse().expect("failure line");
            assert_eq!(entry.outcome, Err(kind));
        }
        assert!("7 !nope".parse::<LogEntry>().is_err());
        assert!("x A".parse::<LogEntry>().is_err());
    }

    #[test]
    fn report_serializes_as_documented() {
        let mut report = LoadReport::default();
        report.record(&Ok(Answer {
            name: "A".into(),
            pid: Some(42),
            latency: Duration::from_millis(3),
        }));
        report.record(&Ok(Answer {
            name: "A".into(),
            pid: None,
            latency: Duration::from_millis(1),
        }));
        report.record(&Err(FailureKind::Reset));
        report.record(&Err(FailureKind::Status));
        let json: serde_json::Value = serde_json::to_value(&report).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "attempts": 4, "ok": 2,
                "failures": {"connect": 0, "refused": 0, "reset": 1, "eof": 0, "timeout": 0, "status": 1},
                "by_name": {"A": 2}, "by_pid": {"42": 1}, "elapsed_ms": 0, "max_latency_ms": 3,
                "reopened": 0, "keepalive_race": 0
            })
        );
        let back: LoadReport = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, report);
        assert_eq!(report.failures.total(), 2);

        // A report from before `--http` (no "status", "reopened", "keepalive_race") parses.
        let old = serde_json::json!({
            "attempts": 1, "ok": 0,
            "failures": {"connect": 0, "refused": 0, "reset": 0, "eof": 1, "timeout": 0},
            "by_name": {}, "by_pid": {}, "elapsed_ms": 5, "max_latency_ms": 0
        });
        let old: LoadReport = serde_json::from_value(old).expect("an old report parses");
        assert_eq!(
            (old.failures.eof, old.failures.status, old.reopened),
            (1, 0, 0)
        );
    }

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], free_port()))
    }

    #[test]
    fn nothing_listening_is_refused() {
        assert_eq!(
            connect_once(loopback(), Duration::from_secs(1)),
            Err(FailureKind::Refused)
        );
        let mut cfg = LoadConfig::new(loopback(), 2);
        cfg.count = Some(10);
        let report = run(&cfg, None);
        assert_eq!(
            (report.attempts, report.ok, report.failures.refused),
            (10, 0, 10)
        );
    }

    #[test]
    fn slow_answers_time_out() {
        let addr = loopback();
        let _srv = Proc::spawn_testsrv(&[
            "--name",
            "slow",
            "--listen",
            &addr.to_string(),
            "--delay-ms",
            "500",
        ]);
        assert_eq!(
            connect_once(addr, Duration::from_millis(100)),
            Err(FailureKind::Timeout)
        );
        let mut cfg = LoadConfig::new(addr, 4);
        cfg.count = Some(4);
        cfg.timeout_ms = 100;
        assert_eq!(run(&cfg, None).failures.timeout, 4);
    }

    #[test]
    fn log_records_every_attempt() {
        let addr = loopback();
        let _srv = Proc::spawn_testsrv(&["--name", "logged", "--listen", &addr.to_string()]);
        let path = std::env::temp_dir().join(format!(
            "handoff-loadgen-{}-{}.log",
            std::process::id(),
            monotonic_ns()
        ));
        let mut cfg = LoadConfig::new(addr, 4);
        cfg.count = Some(40);
        cfg.log = Some(path.clone());
        let before = monotonic_ns();
        let report = run(&cfg, None);
        let after = monotonic_ns();
        let entries = read_log(&path).expect("log file");
        let _ = std::fs::remove_file(&path);
        assert_eq!((report.ok, entries.len()), (40, 40));
        for entry in entries {
            assert!((before..=after).contains(&entry.start_ns));
            assert_eq!(entry.outcome, Ok("logged".to_owned()));
        }
    }

    #[test]
    fn held_connections_stay_open_and_notice_a_dying_server() {
        let addr = loopback();
        let srv = Proc::spawn_testsrv(&["--name", "H", "--listen", &addr.to_string()]);
        let (held, name, pid) = hold(addr).expect("held connection");
        assert_eq!((name.as_str(), pid), ("H", srv.pid));
        assert_eq!(
            connect_once(addr, Duration::from_secs(2)).map(|a| a.0),
            Ok("H".to_owned())
        );
        drop(held);

        // A hold ends early with "eof" when the server dies, and with success on stop.
        let mut cfg = LoadConfig::new(addr, 4);
        cfg.count = Some(4);
        cfg.hold_ms = 10_000;
        let started = Instant::now();
        let killer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            drop(srv);
        });
        let report = run(&cfg, None);
        killer.join().expect("killer thread");
        assert_eq!((report.ok, report.failures.eof), (0, 4), "{report:?}");
        assert!(started.elapsed() < Duration::from_secs(5));

        let addr = loopback();
        let _srv = Proc::spawn_testsrv(&["--name", "S", "--listen", &addr.to_string()]);
        let stop = AtomicBool::new(false);
        let report = thread::scope(|s| {
            let load = s.spawn(|| run(&cfg_for(addr), Some(&stop)));
            thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::Relaxed);
            load.join().expect("load thread")
        });
        assert_eq!((report.ok, report.failures.total()), (4, 0), "{report:?}");
    }

    fn cfg_for(addr: SocketAddr) -> LoadConfig {
        let mut cfg = LoadConfig::new(addr, 4);
        cfg.hold_ms = 10_000;
        cfg
    }
}
