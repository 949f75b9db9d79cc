//! Benchmark 8, rollback time (issue 14): how soon after a newly promoted generation dies,
//! or starts failing its health check, new connections reach the previous generation
//! again, inside the watch window (`promote --watch 60s`: the previous generation stands
//! by, still listening).
//!
//! Each repetition: A active, a fresh B promoted with the window (and, for the check,
//! `--check http:/healthz`, which B passes), loadgen's steady load on B, then at T0 either
//! SIGKILL to B's process group (death) or SIGSTOP to it (a hung server: the kernel still
//! completes the check's handshake, nobody answers its request, so it times out). The
//! figures, all from T0: the first connection started after T0 that A answered, the moment
//! from which every new connection was answered by A (both from loadgen's log of every
//! attempt, CLOCK_MONOTONIC start and who answered), and handoffd's `traffic rolled back`
//! event (its log polled every millisecond). Death and failing check run in namespaces of
//! their own, the same number of times, side by side in one run.

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use serde_json::Value;

use super::env::{Ctx, Daemon, Env, pause};
use super::measure::{Stats, monotonic_ns, ns_to_ms};
use super::report::Row;
use super::{Outcome, fmt_ms};

/// The watch window of every promote: longer than any repetition.
const WATCH: &str = "60s";
/// The check B is promoted with (and re-checked with in the window).
const CHECK: &str = "http:/healthz";
/// Concurrent clients of the steady load.
const CLIENTS: &str = "8";
/// A client gives up on an attempt after this long and starts the next one, so that a hung
/// B holds no client for long.
const ATTEMPT_TIMEOUT_MS: &str = "100";
/// The goal of issue 14 (point 4): traffic back within 100 ms of the death.
const GOAL_DEATH_MS: f64 = 100.0;
/// The interval of handoffd's watch-window checks.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The longest a watch-window check may take: the service's check timeout (5 s by default),
/// capped at twice the interval.
const CHECK_TIMEOUT_MS: f64 = 2000.0;
/// How long one step may take.
const STEP: Duration = Duration::from_secs(10);
/// The load on B before T0, and on A after the rollback was logged.
const BEFORE: Duration = Duration::from_millis(150);
const AFTER: Duration = Duration::from_millis(150);
/// How often handoffd's log is read while waiting for the rollback.
const LOG_POLL: Duration = Duration::from_millis(1);

/// How B is made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// SIGKILL to its processes.
    Death,
    /// SIGSTOP to its processes: its watch-window check times out.
    Check,
}

impl Failure {
    fn tag(self) -> &'static str {
        match self {
            Self::Death => "death",
            Self::Check => "check",
        }
    }

    fn signal(self) -> Signal {
        match self {
            Self::Death => Signal::SIGKILL,
            Self::Check => Signal::SIGSTOP,
        }
    }
}

/// One repetition, in milliseconds after T0.
#[derive(Debug, Clone)]
struct Rep {
    /// The first connection started after T0 that A answered.
    first_a: f64,
    /// From then on every connection started was answered by A.
    settled: f64,
    /// handoffd's `traffic rolled back` event read from its log.
    flip: f64,
    /// Connections started after T0 that failed, and all started after T0.
    failed: u64,
    after: u64,
    /// The event's reason.
    reason: String,
}

pub fn run(ctx: &Ctx) -> Result<Outcome> {
    let reps = ctx.pick(20, 3);
    let death = scenario(ctx, Failure::Death, reps)?;
    let check = scenario(ctx, Failure::Check, reps)?;
    Ok(Outcome {
        rows: rows(&death, &check),
        details: details(&death, &check, reps),
    })
}

/// `reps` repetitions of one failure, with one daemon and one A in a namespace of their own.
fn scenario(ctx: &Ctx, failure: Failure, reps: usize) -> Result<Vec<Rep>> {
    let mut env = Env::new(ctx, &format!("rollback-{}", failure.tag()))?;
    let addr: SocketAddr = "127.0.0.1:8400".parse()?;
    let listen = addr.to_string();
    let daemon = env.daemon(&format!("rb-{}", failure.tag()), &[&listen], &[])?;
    let mut args = vec![
        "--listen",
        listen.as_str(),
        "--workers",
        "2",
        "--mode",
        "per-worker",
    ];
    if failure == Failure::Check {
        args.extend(["--http-status", "200"]);
    }
    let a = env.testsrv("A", &args)?;
    daemon.promote(a.pid, None)?;
    let mut events = EventTail::open(daemon.log_path())?;
    let mut out = Vec::with_capacity(reps);
    for i in 0..reps {
        // A check failure waits for the next check: T0 is spread evenly over the interval.
        let offset = match failure {
            Failure::Death => Duration::ZERO,
            Failure::Check => CHECK_INTERVAL.mul_f64(i as f64 / reps as f64),
        };
        let rep = one(
            &mut env,
            &daemon,
            &mut events,
            (failure, addr),
            &args,
            (i, offset),
        )
        .with_context(|| {
            // A standby that went away leaves nothing to roll back to: say so.
            format!(
                "{} {} (A's last lines: {})",
                failure.tag(),
                i + 1,
                a.stderr.tail()
            )
        })?;
        out.push(rep);
    }
    Ok(out)
}

/// One repetition: B promoted with the watch window, loaded, failed at T0; A must take the
/// traffic back.
fn one(
    env: &mut Env,
    daemon: &Daemon,
    events: &mut EventTail,
    (failure, addr): (Failure, SocketAddr),
    args: &[&str],
    (i, offset): (usize, Duration),
) -> Result<Rep> {
    let b = env.testsrv(&format!("B{i}"), args)?;
    let mut options = vec!["--watch", WATCH];
    if failure == Failure::Check {
        options.extend(["--check", CHECK]);
    }
    daemon.promote_with(b.pid, &options)?;
    let (log, _) = env.file("attempts", "log")?;
    let log_arg = log.to_string_lossy().into_owned();
    let mut load_args = vec![
        "--concurrency",
        CLIENTS,
        "--duration-ms",
        "60000",
        "--timeout-ms",
        ATTEMPT_TIMEOUT_MS,
        "--log",
        &log_arg,
    ];
    if failure == Failure::Check {
        load_args.push("--http");
    }
    let load = env.loadgen(addr, &load_args)?;
    pause(BEFORE + offset)?;
    let t0 = monotonic_ns();
    env.kill_group(b.pid, failure.signal())?;
    let (seen, event) = events.wait("traffic rolled back", Instant::now() + STEP)?;
    pause(AFTER)?;
    env.stop_load(load)?;
    if failure == Failure::Check {
        env.kill_group(b.pid, Signal::SIGKILL)?;
    }
    env.wait_exit(b.pid, Instant::now() + STEP)?;
    let attempts = read_attempts(&log)?;
    let reason = event["reason"].as_str().unwrap_or("none").to_owned();
    figures(&attempts, t0, seen, &b.name, reason)
}

/// The figures of a repetition from loadgen's attempts (start ns, who answered or `!kind`).
fn figures(attempts: &[(u64, String)], t0: u64, seen: u64, b: &str, reason: String) -> Result<Rep> {
    if !attempts.iter().any(|(s, o)| *s < t0 && o == b) {
        bail!("no connection reached {b} before it was made to fail");
    }
    let after: Vec<&(u64, String)> = attempts.iter().filter(|(s, _)| *s >= t0).collect();
    let on_a = |s: &u64| {
        after
            .iter()
            .filter(|(_, o)| o == "A")
            .map(|(t, _)| *t)
            .find(|t| t >= s)
    };
    let first_a = on_a(&t0).context("no connection started after the failure reached A")?;
    let last_other = after
        .iter()
        .filter(|(_, o)| o != "A")
        .map(|(t, _)| *t)
        .max();
    let settled = match last_other {
        Some(last) => on_a(&(last + 1)).context("a connection failed or reached B last")?,
        None => first_a,
    };
    Ok(Rep {
        first_a: ns_to_ms(t0, first_a),
        settled: ns_to_ms(t0, settled),
        flip: ns_to_ms(t0, seen),
        failed: after.iter().filter(|(_, o)| o.starts_with('!')).count() as u64,
        after: after.len() as u64,
        reason,
    })
}

/// loadgen's `--log`: `START_NS OUTCOME` lines, sorted by start.
fn read_attempts(path: &Path) -> Result<Vec<(u64, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let parsed = line
            .split_once(' ')
            .and_then(|(s, o)| Some((s.parse().ok()?, o.to_owned())));
        out.push(parsed.with_context(|| format!("bad line {line:?} in {}", path.display()))?);
    }
    out.sort();
    Ok(out)
}

/// handoffd's JSON log, read as it grows.
struct EventTail {
    file: File,
    /// Bytes read after the last complete line.
    partial: Vec<u8>,
}

impl EventTail {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self {
            file,
            partial: Vec::new(),
        })
    }

    /// Waits for the next event with `message` after those read so far; returns when it
    /// was read (CLOCK_MONOTONIC ns) and its fields.
    fn wait(&mut self, message: &str, deadline: Instant) -> Result<(u64, Value)> {
        loop {
            let mut fresh = Vec::new();
            self.file
                .read_to_end(&mut fresh)
                .context("cannot read handoffd's log")?;
            let read_at = monotonic_ns();
            self.partial.extend(fresh);
            while let Some(end) = self.partial.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=end).collect();
                let Ok(mut event) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                let fields = event["fields"].take();
                if fields["message"] == message {
                    return Ok((read_at, fields));
                }
            }
            if Instant::now() >= deadline {
                bail!("handoffd logged no {message:?}");
            }
            pause(LOG_POLL)?;
        }
    }
}

/// `min · p50 · max` of one figure of every repetition.
fn spread(reps: &[Rep], figure: fn(&Rep) -> f64) -> (Stats, String) {
    let values: Vec<f64> = reps.iter().map(figure).collect();
    let s = Stats::of(&values).unwrap_or(Stats {
        n: 0,
        min: f64::NAN,
        p50: f64::NAN,
        p99: f64::NAN,
        max: f64::NAN,
    });
    let text = format!("{} · {} · {}", fmt_ms(s.min), fmt_ms(s.p50), fmt_ms(s.max));
    (s, text)
}

fn rows(death: &[Rep], check: &[Rep]) -> Vec<Row> {
    let (settled, settled_text) = spread(death, |r| r.settled);
    let (_, first_text) = spread(death, |r| r.first_a);
    let (_, flip_text) = spread(death, |r| r.flip);
    let mut rows = vec![
        Row::new(
            "new generation killed (SIGKILL) in its watch window → every new connection on the old one",
            format!("min · p50 · max {settled_text} ({} kills); first answered by the old one: {first_text}", death.len()),
            Some(settled.max),
        )
        .baseline(format!("handoffd's rollback logged: {flip_text}"))
        .goal(format!("≤ {GOAL_DEATH_MS} ms"), settled.max <= GOAL_DEATH_MS),
    ];
    let budget = CHECK_INTERVAL.as_secs_f64() * 1000.0 + CHECK_TIMEOUT_MS;
    let measure = "new generation hung (SIGSTOP), failing its check in the window → every new connection on the old one";
    let (settled, settled_text) = spread(check, |r| r.settled);
    let (_, flip_text) = spread(check, |r| r.flip);
    rows.push(
        Row::new(
            measure,
            format!("min · p50 · max {settled_text} ({} hangs)", check.len()),
            Some(settled.max),
        )
        .baseline(format!(
            "handoffd's rollback logged: {flip_text}; by design at most the check \
             interval + the check timeout ({}), plus the passing check before it",
            fmt_ms(budget)
        )),
    );
    rows
}

fn details(death: &[Rep], check: &[Rep], reps: usize) -> Vec<String> {
    let mut out = vec![format!(
        "{reps} repetitions of each failure, each with a fresh B (2 workers, a listener each) \
         promoted with `--watch {WATCH}` over A (the same layout), which stands by; loadgen \
         ({CLIENTS} clients, one connection per attempt, {ATTEMPT_TIMEOUT_MS} ms per attempt) \
         loads B for {} ms (for the check, plus i/{reps} of the check interval in repetition \
         i, so that the failure falls evenly over the check cycle), then B's process group \
         gets SIGKILL (death) or SIGSTOP (hung: its check, `--check {CHECK}` at the promote \
         and again {} ms after each check ends while the window is open, connects but is \
         never answered and times out after {}: the service's default 5 s check timeout, \
         capped at twice the interval; a promote's `--check-timeout` applies to its own \
         check only). All times from that signal (T0); \"every new connection on A from\" is \
         the start of the first connection A answered after the last one started after T0 \
         that failed or reached B. After a hang, loadgen's clients stay stuck on B's accept \
         queue until their {ATTEMPT_TIMEOUT_MS} ms attempt timeout, so the first answer \
         from A can trail the rollback by up to that much; after a death the kernel resets \
         B's queued connections at once. After a death the steering program itself sends \
         new connections to A as soon as the kernel has closed B's listeners (its record \
         falls back to the previous generation when the active one has no listener left), \
         before handoffd's flip; a hung B keeps its listeners, so only the flip helps.",
        BEFORE.as_millis(),
        CHECK_INTERVAL.as_millis(),
        fmt_ms(CHECK_TIMEOUT_MS)
    )];
    let column = |reps: &[Rep], figure: fn(&Rep) -> f64| spread(reps, figure).1;
    let failed = |reps: &[Rep]| {
        let failed: u64 = reps.iter().map(|x| x.failed).sum();
        let after: u64 = reps.iter().map(|x| x.after).sum();
        format!("{failed} of {after}")
    };
    let reasons = |reps: &[Rep]| {
        let mut seen: Vec<&str> = reps.iter().map(|x| x.reason.as_str()).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.join(", ")
    };
    let d = death;
    out.push(format!(
        "\n| after T0, min · p50 · max | death (SIGKILL) | failing check (hung, SIGSTOP) |\n\
         |---|---|---|\n\
         | first new connection answered by A | {} | {} |\n\
         | every new connection on A from | {} | {} |\n\
         | handoffd's `traffic rolled back` read from its log | {} | {} |\n\
         | connections started after T0 that failed (all repetitions) | {} | {} |\n\
         | reason logged | {} | {} |\n",
        column(d, |r| r.first_a),
        column(check, |r| r.first_a),
        column(d, |r| r.settled),
        column(check, |r| r.settled),
        column(d, |r| r.flip),
        column(check, |r| r.flip),
        failed(d),
        failed(check),
        reasons(d),
        reasons(check),
    ));
    out
}
