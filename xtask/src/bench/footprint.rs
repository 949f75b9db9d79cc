//! Benchmark 5, footprint: the daemon's resident memory with 1 and with 50 services, and
//! its CPU time while idle, with a draining generation and without.
//!
//! Two daemons side by side, each in its own namespace: one steers a service whose old
//! generation drains (one connection held open, drain timeout far away), the other a
//! service with only its active generation. Their CPU time (the process CPU clock) and
//! wake-ups are read before and after the same idle window. The 50 services come from a
//! `--config` file, each with a promoted one-process testsrv.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::env::{Ctx, Daemon, Env, connect, pause, service_name};
use super::measure::{Wakeups, cpu_ns, rss_kib};
use super::report::Row;
use super::{Outcome, SETTLE};

/// Resident memory to stay under, in MB (10^6 bytes).
const GOAL_MB: f64 = 20.0;
/// "≈ 0" idle CPU: under this share of one core.
const GOAL_IDLE_PERCENT: f64 = 0.1;
/// Services of the larger daemon.
const SERVICES: u16 = 50;

pub fn run(ctx: &Ctx) -> Result<Outcome> {
    let window = ctx.pick(Duration::from_secs(60), Duration::from_secs(2));
    let mut rows = Vec::new();
    let mut details = Vec::new();

    // One service: steering, one generation draining.
    let mut draining_env = Env::new(ctx, "idle-drain")?;
    let (draining, _held) = with_draining(&mut draining_env)?;
    // One service: steering, nothing draining.
    let mut idle_env = Env::new(ctx, "idle")?;
    let addr = "127.0.0.1:8500";
    let idle = idle_env.daemon("idle", &[addr], &[])?;
    let srv = idle_env.testsrv(
        "C",
        &["--listen", addr, "--workers", "2", "--mode", "per-worker"],
    )?;
    idle.promote(srv.pid, None)?;
    pause(SETTLE)?;
    let (rss_draining, rss_idle) = (mb(rss_kib(draining.pid)?), mb(rss_kib(idle.pid)?));
    let rss_one = rss_draining.max(rss_idle);
    rows.push(
        Row::new(
            "daemon RSS, 1 service",
            format!("{rss_one:.1} MB"),
            Some(rss_one),
        )
        .baseline(format!(
            "draining one generation: {rss_draining:.1} MB · steering only: {rss_idle:.1} MB"
        ))
        .goal(format!("< {GOAL_MB} MB"), rss_one < GOAL_MB),
    );

    rows.push(fifty_services(ctx, rss_one, &mut details)?);

    rows.extend(idle_cpu(&draining, &idle, window)?);
    let secs = window.as_secs_f64();
    details.insert(
        0,
        format!(
            "RSS is VmRSS after the promotes (metrics endpoint on, the default). Idle CPU is the \
             daemon's CPU time (its process CPU clock, every thread) over one \
             {secs:.0} s window in which nothing else happens to either daemon; wake-ups are \
             context switches. The draining generation keeps one connection open with a drain \
             timeout of an hour."
        ),
    );
    Ok(Outcome { rows, details })
}

/// The idle CPU rows: each daemon's CPU time and wake-ups over `window`, each against the other.
fn idle_cpu(draining: &Daemon, idle: &Daemon, window: Duration) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let before = [
        (cpu_ns(draining.pid)?, Wakeups::of(draining.pid)?),
        (cpu_ns(idle.pid)?, Wakeups::of(idle.pid)?),
    ];
    pause(window)?;
    let after = [
        (cpu_ns(draining.pid)?, Wakeups::of(draining.pid)?),
        (cpu_ns(idle.pid)?, Wakeups::of(idle.pid)?),
    ];
    let secs = window.as_secs_f64();
    let mut idle_rows = Vec::new();
    for (i, what) in ["with a draining generation", "without (steering only)"]
        .iter()
        .enumerate()
    {
        let cpu_ms = after[i].0.saturating_sub(before[i].0) as f64 / 1e6;
        let percent = cpu_ms / 10.0 / secs;
        let wakes = after[i].1.since(&before[i].1);
        idle_rows.push((what, cpu_ms, percent, wakes));
    }
    for (i, (what, cpu_ms, percent, wakes)) in idle_rows.iter().enumerate() {
        let other = &idle_rows[1 - i];
        rows.push(
            Row::new(
                format!("idle CPU over {secs:.0} s, {what}"),
                format!("{cpu_ms:.2} ms ({percent:.4} % of a core, {wakes} wake-ups)"),
                Some(*percent),
            )
            .baseline(format!(
                "{}: {:.2} ms, {} wake-ups",
                other.0, other.1, other.3
            ))
            .goal(
                format!("≈ 0 (< {GOAL_IDLE_PERCENT} %)"),
                *percent < GOAL_IDLE_PERCENT,
            ),
        );
    }
    Ok(rows)
}

/// A daemon whose first generation drains with one connection held; returns the connection.
fn with_draining(env: &mut Env) -> Result<(Daemon, std::net::TcpStream)> {
    let addr: SocketAddr = "127.0.0.1:8501".parse()?;
    let listen = addr.to_string();
    let daemon = env.daemon("idledrain", &[&listen], &["--drain-timeout", "3600s"])?;
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
    let (held, _) = env.ns.enter(|| connect(addr))??;
    let b = env.testsrv("B", &args)?;
    daemon.promote(b.pid, None)?;
    let counted = daemon.connections(a.pid)?;
    if counted != 1 {
        bail!("the draining generation counts {counted} connections, not 1");
    }
    Ok((daemon, held))
}

/// The 50-service row: measured once handoffd takes `--config`, pending before.
fn fifty_services(ctx: &Ctx, rss_one: f64, details: &mut Vec<String>) -> Result<Row> {
    let measure = format!("daemon RSS, {SERVICES} services");
    let goal = format!("< {GOAL_MB} MB");
    let help = Command::new(ctx.bin.join("handoffd"))
        .arg("--help")
        .output()
        .context("cannot run handoffd --help")?;
    if !String::from_utf8_lossy(&help.stdout).contains("--config") {
        details.push(format!(
            "- {SERVICES} services: pending until handoffd has `--config FILE`; the benchmark \
             detects it (`handoffd --help`) and then measures it with no change."
        ));
        return Ok(Row::pending(measure, "handoffd has no --config yet", goal));
    }
    let mut env = Env::new(ctx, "fifty")?;
    let mut toml = String::new();
    let port = |i: u16| 9000 + i;
    let names: Vec<String> = (1..=SERVICES)
        .map(|i| service_name(&format!("s{i}")))
        .collect();
    for (i, name) in (1..=SERVICES).zip(&names) {
        let _ = writeln!(
            toml,
            "[[service]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:{}\"]\n",
            port(i)
        );
    }
    let (path, _) = env.file("services", "toml")?;
    std::fs::write(&path, toml).with_context(|| format!("cannot write {}", path.display()))?;
    let daemon = env.daemon_with_config(&path)?;
    let empty = mb(rss_kib(daemon.pid)?);
    for (i, name) in (1..=SERVICES).zip(&names) {
        let listen = format!("127.0.0.1:{}", port(i));
        let srv = env.testsrv(&format!("s{i}"), &["--listen", &listen])?;
        daemon.promote(srv.pid, Some(name))?;
    }
    pause(SETTLE)?;
    let rss = mb(rss_kib(daemon.pid)?);
    details.push(format!(
        "- {SERVICES} services from a `--config` file: {empty:.1} MB before any promote, \
         {rss:.1} MB with a promoted generation in each (a program and map set per service)"
    ));
    Ok(Row::new(measure, format!("{rss:.1} MB"), Some(rss))
        .baseline(format!("1 service: {rss_one:.1} MB"))
        .goal(goal, rss < GOAL_MB))
}

/// KiB to MB (10^6 bytes).
fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}
