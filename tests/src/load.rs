//! `loadgen`: many concurrent clients, one new connection per request, every outcome counted.
//!
//! An attempt connects, reads the `NAME PID` line within the timeout (counted from the start
//! of the connect), keeps the connection open for the hold time and closes it. It succeeds
//! only if all of that worked; otherwise it fails with one [`FailureKind`]. No retries.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::{ArgGroup, Parser};
use nix::time::{ClockId, clock_gettime};
use serde::{Deserialize, Serialize};

use crate::sys;

/// Most attempts one run may make.
pub const MAX_COUNT: u64 = 10_000_000;
/// Longest run, in milliseconds.
pub const MAX_DURATION_MS: u64 = 600_000;
/// Most client threads.
pub const MAX_CONCURRENCY: u32 = 10_000;

/// Longest answer line accepted; the server's is `NAME PID`.
const MAX_LINE: usize = 256;
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
    /// Keep each connection open this long after the answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u64,
    /// Deadline for connect plus answer, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION_MS))]
    pub timeout_ms: u64,
    /// Write one line `START_NS OUTCOME` per attempt to this file.
    #[arg(long)]
    pub log: Option<PathBuf>,
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
}

impl FailureKind {
    /// Every kind, in report order.
    pub const ALL: [FailureKind; 5] = [
        FailureKind::Connect,
        FailureKind::Refused,
        FailureKind::Reset,
        FailureKind::Eof,
        FailureKind::Timeout,
    ];

    /// The lowercase name used in the report and the log.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Refused => "refused",
            FailureKind::Reset => "reset",
            FailureKind::Eof => "eof",
            FailureKind::Timeout => "timeout",
        }
    }

    fn of(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => FailureKind::Refused,
            io::ErrorKind::ConnectionReset => FailureKind::Reset,
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
}

impl Failures {
    /// All failed attempts.
    pub fn total(&self) -> u64 {
        self.connect + self.refused + self.reset + self.eof + self.timeout
    }

    /// Failed attempts of one kind.
    pub fn of_kind(&self, kind: FailureKind) -> u64 {
        match kind {
            FailureKind::Connect => self.connect,
            FailureKind::Refused => self.refused,
            FailureKind::Reset => self.reset,
            FailureKind::Eof => self.eof,
            FailureKind::Timeout => self.timeout,
        }
    }

    fn slot(&mut self, kind: FailureKind) -> &mut u64 {
        match kind {
            FailureKind::Connect => &mut self.connect,
            FailureKind::Refused => &mut self.refused,
            FailureKind::Reset => &mut self.reset,
            FailureKind::Eof => &mut self.eof,
            FailureKind::Timeout => &mut self.timeout,
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
    /// Successful attempts by the pid that accepted.
    pub by_pid: BTreeMap<u32, u64>,
    /// Wall time of the run.
    pub elapsed_ms: u64,
    /// Slowest connect-to-answer time of a successful attempt.
    pub max_latency_ms: u64,
}

impl LoadReport {
    fn record(&mut self, outcome: &Result<Answer, FailureKind>) {
        self.attempts += 1;
        match outcome {
            Ok(answer) => {
                self.ok += 1;
                *self.by_name.entry(answer.name.clone()).or_default() += 1;
                *self.by_pid.entry(answer.pid).or_default() += 1;
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
    }
}

/// One successful attempt.
struct Answer {
    name: String,
    pid: u32,
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
            let outcome = attempt(self.cfg.connect, timeout, hold, &|| self.stopped());
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
    Ok(Answer { name, pid, latency })
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
            FailureKind::Connect => io::ErrorKind::Other,
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
    }

    #[test]
    fn errors_are_classified() {
        let kind = |k| FailureKind::of(&io::Error::from(k));
        assert_eq!(kind(io::ErrorKind::ConnectionRefused), FailureKind::Refused);
        assert_eq!(kind(io::ErrorKind::ConnectionReset), FailureKind::Reset);
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
            pid: 42,
            latency: Duration::from_millis(3),
        }));
        report.record(&Err(FailureKind::Reset));
        let json: serde_json::Value = serde_json::to_value(&report).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "attempts": 2, "ok": 1,
                "failures": {"connect": 0, "refused": 0, "reset": 1, "eof": 0, "timeout": 0},
                "by_name": {"A": 1}, "by_pid": {"42": 1}, "elapsed_ms": 0, "max_latency_ms": 3
            })
        );
        let back: LoadReport = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, report);
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
