//! Benchmark 3, drain detection: from the test server's close() of the last connection of a
//! draining generation to the retire signal arriving in that server, both stamped in the
//! server with CLOCK_MONOTONIC (`testsrv --log-close`, and its `term` line).
//!
//! Each round: a connection to the active generation, a new generation promoted (the old one
//! drains with that one connection), the client closes, the server reads EOF and closes its
//! end, the kernel's countdown reaches zero, the daemon confirms and sends SIGTERM. The
//! baseline is the floor any detection pays: a signal's delivery alone, from this process's
//! kill() to the same handler (a `--ignore-term` server logs each SIGTERM and lives on).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use super::env::{Ctx, Env, Server, connect, field};
use super::measure::{Stats, monotonic_ns, ns_to_ms};
use super::report::Row;
use super::{Outcome, fmt_ms};

/// The p99 to stay under, in milliseconds.
const GOAL_P99_MS: f64 = 50.0;
/// How long one step of a round may take.
const STEP: Duration = Duration::from_secs(10);

pub fn run(ctx: &Ctx) -> Result<Outcome> {
    let drains = ctx.pick(100, 5);
    let mut env = Env::new(ctx, "drain")?;
    let addr: SocketAddr = "127.0.0.1:8300".parse()?;
    let listen = addr.to_string();
    let daemon = env.daemon("drain", &[&listen], &[])?;
    let args = ["--listen", listen.as_str(), "--log-close"];
    let mut active = env.testsrv("d0", &args)?;
    daemon.promote(active.pid, None)?;
    let mut latencies = Vec::with_capacity(drains);
    // Round 0 warms up and is not counted.
    for round in 0..=drains {
        let (stream, name) = env.ns.enter(|| connect(addr))??;
        if name != active.name {
            bail!(
                "the connection went to {name}, not to the active {}",
                active.name
            );
        }
        let next = env.testsrv(&format!("d{}", round + 1), &args)?;
        daemon.promote(next.pid, None)?;
        drop(stream);
        let deadline = Instant::now() + STEP;
        let close = active.wait_line(
            &format!("close {} pid={} ", active.name, active.pid),
            deadline,
        )?;
        let closed = field(&close, "ns=").with_context(|| format!("no ns= in {close:?}"))?;
        let retired = active.wait_term(deadline)?;
        if round > 0 {
            latencies.push(ns_to_ms(closed, retired));
        }
        env.wait_exit(active.pid, deadline)?;
        active = next;
    }
    let floor = signal_floor(&mut env, ctx.pick(100, 5))?;
    let s = Stats::of(&latencies).expect("at least one drain");
    let f = Stats::of(&floor).expect("at least one signal");
    let rows = vec![
        Row::new(
            "last close() → retire signal in the server",
            format!(
                "p50 {} · p99 {} ({} drains)",
                fmt_ms(s.p50),
                fmt_ms(s.p99),
                s.n
            ),
            Some(s.p99),
        )
        .baseline(format!(
            "signal delivery alone: p50 {} · p99 {}",
            fmt_ms(f.p50),
            fmt_ms(f.p99)
        ))
        .goal(format!("p99 ≤ {GOAL_P99_MS} ms"), s.p99 <= GOAL_P99_MS),
    ];
    let details = vec![
        format!(
            "{drains} drains of a one-process testsrv holding one connection, after one \
             uncounted round. The server stamps CLOCK_MONOTONIC just before its close() and \
             again when SIGTERM reaches its handler (a thread in sigwait)."
        ),
        format!(
            "- close → retire: min {} · p50 {} · p99 {} · max {}\n- signal delivery alone \
             ({} signals from this process's kill() to the handler's stamp): min {} · p50 {} · \
             p99 {} · max {}",
            fmt_ms(s.min),
            fmt_ms(s.p50),
            fmt_ms(s.p99),
            fmt_ms(s.max),
            f.n,
            fmt_ms(f.min),
            fmt_ms(f.p50),
            fmt_ms(f.p99),
            fmt_ms(f.max)
        ),
    ];
    Ok(Outcome { rows, details })
}

/// `count` SIGTERMs to an `--ignore-term` server: milliseconds from kill() to its stamp.
fn signal_floor(env: &mut Env, count: usize) -> Result<Vec<f64>> {
    let srv: Server = env.testsrv("floor", &["--listen", "127.0.0.1:8301", "--ignore-term"])?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let sent = monotonic_ns();
        env.kill(srv.pid, Signal::SIGTERM)?;
        // The i-th `term` line answers the i-th signal (each is taken before the next is sent).
        let lines = srv.stderr.wait_n(
            &format!("signal {i} to reach the server"),
            Instant::now() + STEP,
            i + 1,
            |l| l.starts_with("term floor "),
        )?;
        let stamped =
            field(&lines[i], "ns=").with_context(|| format!("no ns= in {:?}", lines[i]))?;
        out.push(ns_to_ms(sent, stamped));
    }
    Ok(out)
}
