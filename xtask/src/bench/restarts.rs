//! Benchmark 4, restarts under load: failed connections during 50 restarts with handoff,
//! with a naive overlap (start the new generation, then stop the old one) and with the
//! naive overlap plus `net.ipv4.tcp_migrate_req=1`; then the worst latency when each new
//! generation needs a warm-up before it can serve.
//!
//! Same load, same server, same schedule in every mode, each in a fresh network namespace:
//! start the new generation (testsrv, 2 workers with a listener each), wait for its ready
//! line (and for its warm-up to end), then switch: handoff promotes it (the daemon drains
//! the old one and sends it SIGTERM when empty); the naive modes send SIGTERM to the old
//! one at once. Every server stops gracefully on SIGTERM (`--drain-on-term`: close the
//! listeners, finish the accepted connections, exit), so what differs between the modes is
//! only what happens to connections queued on a closing listener, and where the kernel
//! sends new ones.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::Signal;

use super::Outcome;
use super::env::{Ctx, Env, LoadReport, pause};
use super::report::Row;

/// The three ways to restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Handoff,
    Naive,
    Migrate,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Handoff, Mode::Naive, Mode::Migrate];

    fn label(self) -> &'static str {
        match self {
            Mode::Handoff => "handoff",
            Mode::Naive => "naive overlap",
            Mode::Migrate => "naive + tcp_migrate_req=1",
        }
    }
}

/// The load of every run: concurrent clients, each one connection at a time.
const LOAD: [&str; 6] = [
    "--concurrency",
    "32",
    "--duration-ms",
    "600000",
    "--timeout-ms",
    "5000",
];

/// How long an old generation may take to be gone after the switch.
const EXIT_LIMIT: Duration = Duration::from_secs(15);

/// What one run of restarts under load gave.
struct RunResult {
    report: LoadReport,
    restarts: usize,
}

pub fn run(ctx: &Ctx) -> Result<Outcome> {
    let restarts = ctx.pick(50, 3);
    let warm_restarts = ctx.pick(5, 1);
    let warmup_ms: u64 = ctx.pick(1000, 300);
    let gap = ctx.pick(Duration::from_millis(100), Duration::from_millis(50));
    let mut rows = Vec::new();
    let mut details = vec![format!(
        "loadgen with {} clients, one connection per attempt (connect, read the answer, close), \
         {} ms timeout, runs through each series; between restarts {} ms of steady load. \
         Failures: every attempt that did not get its answer (reset, refused, EOF, timeout).",
        LOAD[1],
        LOAD[5],
        gap.as_millis()
    )];

    let steady = steady_run(ctx)?;
    details.push(format!(
        "- steady load without restarts ({} ms): {} connections, {} failed, worst latency {} ms",
        steady.elapsed_ms, steady.attempts, steady.failed, steady.max_latency_ms
    ));

    let mut by_mode = Vec::new();
    for mode in Mode::ALL {
        let r = series(ctx, mode, restarts, 0, gap)?;
        details.push(describe(mode, &r, None));
        by_mode.push((mode, r));
    }
    rows.extend(failed_rows(&by_mode));

    let mut warm = Vec::new();
    for mode in Mode::ALL {
        let r = series(ctx, mode, warm_restarts, warmup_ms, gap)?;
        details.push(describe(mode, &r, Some(warmup_ms)));
        warm.push((mode, r));
    }
    for (mode, r) in &warm {
        let row = Row::new(
            format!(
                "worst latency, {} restarts with a {warmup_ms} ms warm-up: {}",
                r.restarts,
                mode.label()
            ),
            format!(
                "{} ms ({} failed of {})",
                r.report.max_latency_ms, r.report.failed, r.report.attempts
            ),
            Some(r.report.max_latency_ms as f64),
        )
        .baseline(format!(
            "steady load, no restart: {} ms",
            steady.max_latency_ms
        ));
        rows.push(if *mode == Mode::Handoff {
            row.goal(
                format!("< the warm-up ({warmup_ms} ms)"),
                r.report.max_latency_ms < warmup_ms,
            )
        } else {
            row
        });
    }
    Ok(Outcome { rows, details })
}

/// The failed connections of each mode's series, handoff's against the other two.
fn failed_rows(by_mode: &[(Mode, RunResult)]) -> Vec<Row> {
    let mut rows = Vec::new();
    for (mode, r) in by_mode {
        let row = Row::new(
            format!(
                "failed connections, {} restarts: {}",
                r.restarts,
                mode.label()
            ),
            format!("{} of {}", r.report.failed, r.report.attempts),
            Some(r.report.failed as f64),
        );
        rows.push(if *mode == Mode::Handoff {
            row.baseline(format!(
                "naive overlap: {} · tcp_migrate_req=1: {} (same load)",
                by_mode[1].1.report.failed, by_mode[2].1.report.failed
            ))
            .goal("0", r.report.failed == 0)
        } else {
            row.baseline("the handoff row, same load")
        });
    }
    rows
}

fn describe(mode: Mode, r: &RunResult, warmup_ms: Option<u64>) -> String {
    let by_name = r.report.by_name.len();
    format!(
        "- {}{}: {} restarts, {} connections over {} ms ({} generations answered), {} failed{}, \
         worst latency {} ms",
        mode.label(),
        warmup_ms.map_or(String::new(), |w| format!(", {w} ms warm-up")),
        r.restarts,
        r.report.attempts,
        r.report.elapsed_ms,
        by_name,
        r.report.failed,
        if r.report.kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.report.kinds)
        },
        r.report.max_latency_ms
    )
}

/// The same load against one generation that is never restarted.
fn steady_run(ctx: &Ctx) -> Result<LoadReport> {
    let mut env = Env::new(ctx, "steady")?;
    let addr: SocketAddr = "127.0.0.1:8400".parse()?;
    let listen = addr.to_string();
    env.testsrv(
        "s",
        &[
            "--listen",
            &listen,
            "--workers",
            "2",
            "--mode",
            "per-worker",
        ],
    )?;
    let load = env.loadgen(addr, &LOAD)?;
    pause(ctx.pick(Duration::from_secs(3), Duration::from_secs(1)))?;
    env.stop_load(load)
}

/// `restarts` restarts of a server under load, in `mode`, each new generation warming up
/// for `warmup_ms` before it may serve.
fn series(
    ctx: &Ctx,
    mode: Mode,
    restarts: usize,
    warmup_ms: u64,
    gap: Duration,
) -> Result<RunResult> {
    let label = format!(
        "{}{}",
        mode_name(mode),
        if warmup_ms > 0 { "-warm" } else { "" }
    );
    let mut env = Env::new(ctx, &label)?;
    env.ns.sysctl(
        "net.ipv4.tcp_migrate_req",
        if mode == Mode::Migrate { "1" } else { "0" },
    )?;
    let addr: SocketAddr = "127.0.0.1:8401".parse()?;
    let listen = addr.to_string();
    let daemon = match mode {
        Mode::Handoff => Some(env.daemon(&label, &[&listen], &[])?),
        Mode::Naive | Mode::Migrate => None,
    };
    let warmup_arg = warmup_ms.to_string();
    let mut args = vec![
        "--listen",
        listen.as_str(),
        "--workers",
        "2",
        "--mode",
        "per-worker",
        "--drain-on-term",
    ];
    let mut old = env.testsrv("g0", &args)?;
    if let Some(d) = &daemon {
        d.promote(old.pid, None)?;
    }
    args.extend(["--warmup-ms", &warmup_arg]);
    let load = env.loadgen(addr, &LOAD)?;
    pause(Duration::from_millis(500))?;
    for i in 1..=restarts {
        let new = env.testsrv(&format!("g{i}"), &args)?;
        pause(Duration::from_millis(warmup_ms))?;
        match &daemon {
            Some(d) => {
                d.promote(new.pid, None)?;
            }
            None => env.kill(old.pid, Signal::SIGTERM)?,
        }
        env.wait_exit(old.pid, Instant::now() + EXIT_LIMIT)?;
        old = new;
        pause(gap)?;
    }
    pause(Duration::from_millis(300))?;
    let report = env.stop_load(load)?;
    Ok(RunResult { report, restarts })
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Handoff => "handoff",
        Mode::Naive => "naive",
        Mode::Migrate => "migrate",
    }
}
