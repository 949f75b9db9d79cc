//! Benchmark 9, cost of the weight decision (issue 14): the steering program's own run time
//! per connection, from the kernel's BPF statistics, with a plain record (A active) and with
//! a 10 % canary (B promoted with `--weight 10` over A), on the same reuseport group, daemon
//! and servers.
//!
//! Each round starts a fresh B; even rounds measure without the canary, then promote B with
//! the weight and measure with it, then roll the canary back (`handoffctl rollback`, which
//! retires B); odd rounds measure with the canary first and without it after the rollback,
//! so that a drift of the machine weighs on both sides. Each measure is one loadgen run of a fixed number
//! of connections.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use nix::sys::signal::Signal;

use super::Outcome;
use super::env::{Ctx, Daemon, Env};
use super::measure::{BpfStats, PROG_SK_REUSEPORT, ProgStats, Stats};
use super::report::Row;

/// The canary's share, in percent.
const WEIGHT: &str = "10";
/// Concurrent clients of every run.
const CLIENTS: &str = "4";

/// One loadgen run's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// The program's nanoseconds per run.
    ns: f64,
    /// Program runs counted.
    runs: u64,
    /// The share of connections B answered.
    share_b: f64,
}

pub fn run(ctx: &Ctx) -> Result<Outcome> {
    let rounds = ctx.pick(8, 1);
    let conns: u64 = ctx.pick(20_000, 2_000);
    let mut env = Env::new(ctx, "weight")?;
    let addr: SocketAddr = "127.0.0.1:8500".parse()?;
    let listen = addr.to_string();
    let daemon = env.daemon("weight", &[&listen], &[])?;
    let args = [
        "--listen",
        listen.as_str(),
        "--workers",
        "2",
        "--mode",
        "per-worker",
    ];
    let a = env.testsrv("A", &args)?;
    daemon.promote(a.pid, None)?;
    // Warms the path (the program's JIT image, the servers' stacks) outside the statistics.
    let warm = (conns / 4).to_string();
    env.run_load(
        addr,
        &["--concurrency", CLIENTS, "--count", &warm],
        Duration::from_secs(120),
    )?;
    let stats = BpfStats::enable()?;
    let (mut plain, mut canary) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let b = env.testsrv(&format!("B{round}"), &args)?;
        let canary_first = round % 2 == 1;
        if !canary_first {
            plain.push(measure(&mut env, &daemon, addr, conns, &b.name)?);
        }
        daemon.promote_with(b.pid, &["--weight", WEIGHT])?;
        canary.push(measure(&mut env, &daemon, addr, conns, &b.name)?);
        daemon.ctl_ok(&["rollback"])?;
        retire(&mut env, b.pid)?;
        if canary_first {
            plain.push(measure(&mut env, &daemon, addr, conns, &b.name)?);
        }
    }
    drop(stats);
    Ok(outcome(&plain, &canary, rounds, conns))
}

/// Waits for the aborted canary `pid` to exit: it has no connection left, so handoffd
/// retires it at once; SIGTERM from here if it has not after a while.
fn retire(env: &mut Env, pid: u32) -> Result<()> {
    if env
        .wait_exit(pid, Instant::now() + Duration::from_secs(5))
        .is_ok()
    {
        return Ok(());
    }
    env.kill(pid, Signal::SIGTERM)?;
    env.wait_exit(pid, Instant::now() + Duration::from_secs(10))?;
    Ok(())
}

/// One loadgen run of `conns` connections with the statistics on; `b`: the canary's name.
fn measure(env: &mut Env, daemon: &Daemon, addr: SocketAddr, conns: u64, b: &str) -> Result<Run> {
    let before = ProgStats::of(daemon.pid, PROG_SK_REUSEPORT)?;
    let report = env.run_load(
        addr,
        &["--concurrency", CLIENTS, "--count", &conns.to_string()],
        Duration::from_secs(120),
    )?;
    let ran = ProgStats::of(daemon.pid, PROG_SK_REUSEPORT)?.since(before);
    if report.failed > 0 || report.ok == 0 {
        bail!(
            "loadgen against {addr}: {} of {} failed ({})",
            report.failed,
            report.attempts,
            report.kinds
        );
    }
    let Some(ns) = ran.per_run() else {
        bail!("the steering program ran no time in {conns} connections");
    };
    let share_b = report.by_name.get(b).copied().unwrap_or(0) as f64 / report.ok as f64;
    Ok(Run {
        ns,
        runs: ran.run_cnt,
        share_b,
    })
}

fn outcome(plain: &[Run], canary: &[Run], rounds: usize, conns: u64) -> Outcome {
    let ns = |runs: &[Run]| runs.iter().map(|r| r.ns).collect::<Vec<_>>();
    let (p, c) = (ns(plain), ns(canary));
    let ratios: Vec<f64> = p.iter().zip(&c).map(|(p, c)| c / p).collect();
    let none = Stats {
        n: 0,
        min: f64::NAN,
        p50: f64::NAN,
        p99: f64::NAN,
        max: f64::NAN,
    };
    let (ps, cs) = (Stats::of(&p).unwrap_or(none), Stats::of(&c).unwrap_or(none));
    let rs = Stats::of(&ratios).unwrap_or(none);
    let spread = (ps.max - ps.min) / ps.p50 * 100.0;
    let shares: Vec<String> = canary
        .iter()
        .map(|r| format!("{:.1} %", r.share_b * 100.0))
        .collect();
    let rows = vec![
        Row::new(
            "steering program, run time per connection, no canary (kernel BPF stats)",
            format!("median {:.0} ns · min {:.0} ns ({rounds} runs of {conns})", ps.p50, ps.min),
            Some(ps.p50),
        )
        .baseline(format!("runs spread {spread:.0} % of their median")),
        Row::new(
            format!("steering program, run time per connection, {WEIGHT} % canary"),
            format!("median {:.0} ns · min {:.0} ns ({rounds} runs of {conns})", cs.p50, cs.min),
            Some(cs.p50),
        )
        .baseline(format!("no canary: median {:.0} ns · min {:.0} ns", ps.p50, ps.min)),
        Row::new(
            "weight decision: canary / no canary, per connection",
            format!(
                "{:.3} (median of {} per-round ratios; range {:.3}–{:.3}); difference of medians {:+.1} ns",
                rs.p50,
                rs.n,
                rs.min,
                rs.max,
                cs.p50 - ps.p50
            ),
            Some(rs.p50),
        )
        .baseline("the same group, daemon and servers, alternated"),
    ];
    let list = |runs: &[Run]| {
        runs.iter()
            .map(|r| format!("{:.1}", r.ns))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let counted: u64 = plain.iter().chain(canary).map(|r| r.runs).sum();
    let details = vec![
        format!(
            "One testsrv A (2 workers, a listener each) active; each round a fresh B (the same \
             layout) promoted with `--weight {WEIGHT}` and rolled back, alternating which side \
             is measured first. Each measure is loadgen, {CLIENTS} clients, {conns} connections, \
             with `BPF_ENABLE_STATS` on (the kernel times every program run; it adds two clock \
             reads to each, on both sides alike); run time and count are the steering \
             program's, from handoffd's fdinfo. The count includes the daemon's steering \
             probes (about one a second), negligible here: {counted} runs counted in all."
        ),
        format!(
            "- no canary, ns per run: {}\n- {WEIGHT} % canary, ns per run: {}\n- per-round \
             ratios (canary / none): {}\n- share B answered under the canary: {}",
            list(plain),
            list(canary),
            ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            shares.join(", ")
        ),
    ];
    Outcome { rows, details }
}
