//! Benchmark 2, promote latency: `handoffctl promote PID` from its start to its exit (it
//! returns once a probe has seen the kernel steer to the new generation), for a server of 1
//! and of 16 worker processes.
//!
//! Each promote is of a fresh testsrv, as in a real restart; the generation it replaces has
//! no connection, so it drains at once, gets its retire signal and exits before the next
//! one starts. The very first promote of a service also loads and attaches the program: it
//! is shown apart and is the baseline of the row.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::env::{Ctx, Env};
use super::measure::{Stats, ms};
use super::report::Row;
use super::{Outcome, fmt_ms};

/// The p99 to stay under, in milliseconds.
const GOAL_P99_MS: f64 = 5.0;

pub fn run(ctx: &Ctx) -> Result<Outcome> {
    let promotes = ctx.pick(100, 5);
    let mut rows = Vec::new();
    let mut details = vec![format!(
        "{promotes} promotes per server size, each of a new testsrv (`--mode per-worker`: each \
         worker has its own listener, as nginx with `reuseport`) replacing the active one, \
         timed around the `handoffctl promote` process: its start, the daemon's discovery of \
         the process tree and its listeners (BPF iterators over the candidate's processes), \
         the map writes, the flip, the probe, the drain signal to the replaced generation, \
         the state write and the reply. The replaced generation's tag pass runs just after \
         the reply. \"inside handoffd\" is the daemon's own measure of each promote (`took_ms` \
         of its `promoted` event): the same steps without the client, the socket round \
         trip and the state write. The baseline, just before each promote, is a `handoffctl promote` of the \
         active pid, which the daemon refuses at once (already active): the cost of starting \
         the client process and one round trip, which no work in the daemon can remove."
    )];
    for workers in [1u32, 16] {
        let (row, detail) = one_size(ctx, workers, promotes)?;
        rows.push(row);
        details.push(detail);
    }
    Ok(Outcome { rows, details })
}

/// Times `promotes` promotes of testsrv with `workers` worker processes, in a namespace of their
/// own; the row of the table and the line of the details.
fn one_size(ctx: &Ctx, workers: u32, promotes: usize) -> Result<(Row, String)> {
    // A namespace per daemon: each serves metrics on the same default address.
    let mut env = Env::new(ctx, &format!("promote{workers}"))?;
    let addr = "127.0.0.1:8200".to_owned();
    let daemon = env.daemon(&format!("promote{workers}"), &[&addr], &[])?;
    let workers_arg = workers.to_string();
    let args = [
        "--listen",
        addr.as_str(),
        "--workers",
        &workers_arg,
        "--mode",
        "per-worker",
    ];
    let mut active = env.testsrv("p0", &args)?;
    let first = ms(daemon.promote(active.pid, None)?);
    let mut times = Vec::with_capacity(promotes);
    let mut floor = Vec::with_capacity(promotes);
    for i in 1..=promotes {
        let next = env.testsrv(&format!("p{i}"), &args)?;
        floor.push(ms(daemon.refused_promote(active.pid)?));
        times.push(ms(daemon.promote(next.pid, None)?));
        // Drained at once (no connection): the daemon's retire signal ends it.
        env.wait_exit(active.pid, Instant::now() + Duration::from_secs(10))?;
        active = next;
    }
    // handoffd's own measure of each (the first, which loads the program, left out).
    let inside: Vec<f64> = daemon
        .events("promoted")?
        .iter()
        .skip(1)
        .filter_map(|f| f["took_ms"].as_f64())
        .collect();
    let s = Stats::of(&times).expect("at least one promote");
    let f = Stats::of(&floor).expect("at least one refused promote");
    let inside = Stats::of(&inside).map_or("not logged".to_owned(), |i| {
        format!("p50 {} · p99 {}", fmt_ms(i.p50), fmt_ms(i.p99))
    });
    let row = Row::new(
            format!(
                "promote latency, {workers} worker process{}",
                if workers == 1 { "" } else { "es" }
            ),
            format!(
                "p50 {} · p99 {} ({} promotes); inside handoffd: {inside}",
                fmt_ms(s.p50),
                fmt_ms(s.p99),
                s.n
            ),
            Some(s.p99),
        )
        .baseline(format!(
            "refused promote (client + round trip): p50 {} · p99 {}; first promote (loads the program): {}",
            fmt_ms(f.p50),
            fmt_ms(f.p99),
            fmt_ms(first)
        ))
        .goal(format!("p99 < {GOAL_P99_MS} ms"), s.p99 < GOAL_P99_MS);
    let detail = format!(
        "- {workers} worker{}: min {} · p50 {} · p99 {} · max {}",
        if workers == 1 { "" } else { "s" },
        fmt_ms(s.min),
        fmt_ms(s.p50),
        fmt_ms(s.p99),
        fmt_ms(s.max)
    );
    Ok((row, detail))
}
