//! Benchmark 1, cost on the connection path: the steering program's own run time per
//! decision (the kernel's BPF statistics), and the connection rate through the program
//! against the plain kernel hash.
//!
//! One testsrv (two workers, a listener each) listens on two ports: handoffd steers the
//! first, nobody the second (the kernel's hash over the same two workers). The same loadgen
//! runs against one port, then the other, in ABBA order so that a drift of the machine
//! cancels out; each pair gives a ratio. The statistics are switched on for a separate run
//! only, since they cost a clock read per program run.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, bail};

use super::env::{Ctx, Daemon, Env, LoadReport};
use super::measure::{BpfStats, PROG_CGROUP_SOCK, PROG_SK_REUSEPORT, ProgStats, Stats};
use super::report::Row;
use super::{Outcome, SETTLE};

/// Concurrent clients of every run.
const CONCURRENCY: &str = "16";
/// The ratio to reach.
const GOAL: f64 = 0.99;

pub fn run(ctx: &Ctx) -> Result<Outcome> {
    let pairs = ctx.pick(8, 1);
    let run_ms = ctx.pick(3000, 1000);
    let mut env = Env::new(ctx, "path")?;
    let steered: SocketAddr = "127.0.0.1:8100".parse()?;
    let plain: SocketAddr = "127.0.0.1:8101".parse()?;
    let daemon = env.daemon("path", &[&steered.to_string()], &[])?;
    let srv = env.testsrv(
        "P",
        &[
            "--listen",
            &steered.to_string(),
            "--listen",
            &plain.to_string(),
            "--workers",
            "2",
            "--mode",
            "per-worker",
        ],
    )?;
    daemon.promote(srv.pid, None)?;

    // Warm both paths (page cache, thread stacks, the program's JIT image) once.
    load(&mut env, steered, 500)?;
    load(&mut env, plain, 500)?;
    let m = measure(&mut env, &daemon, [steered, plain], pairs, run_ms)?;
    Ok(Outcome {
        rows: rows(&m),
        details: details(&m),
    })
}

/// One loadgen run of `ms` against `addr`; an error when an attempt failed or none succeeded.
fn load(env: &mut Env, addr: SocketAddr, ms: u64) -> Result<LoadReport> {
    let report = env.run_load(
        addr,
        &[
            "--concurrency",
            CONCURRENCY,
            "--duration-ms",
            &ms.to_string(),
        ],
        Duration::from_millis(ms) + Duration::from_secs(30),
    )?;
    if report.failed > 0 || report.ok == 0 {
        bail!(
            "loadgen against {addr}: {} of {} failed ({})",
            report.failed,
            report.attempts,
            report.kinds
        );
    }
    Ok(report)
}

/// What the runs measured, and the figures the rows and the details are made of.
struct Measured {
    pairs: usize,
    run_ms: u64,
    steered: SocketAddr,
    plain: SocketAddr,
    with: Vec<f64>,
    without: Vec<f64>,
    ratios: Vec<f64>,
    ratio: Stats,
    mean: f64,
    half: f64,
    plain_rate: Stats,
    with_rate: Stats,
    noise: f64,
    counted: LoadReport,
    steer: ProgStats,
    release: ProgStats,
    per_decision: Option<f64>,
    per_connection_us: f64,
}

/// The ABBA pairs of runs, then one steered run with the kernel's BPF statistics on.
fn measure(
    env: &mut Env,
    daemon: &Daemon,
    [steered, plain]: [SocketAddr; 2],
    pairs: usize,
    run_ms: u64,
) -> Result<Measured> {
    let (mut with, mut without, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pairs {
        let order = if i % 2 == 0 {
            [steered, plain]
        } else {
            [plain, steered]
        };
        let mut rates = [0.0; 2];
        for addr in order {
            let rate = load(env, addr, run_ms)?.rate();
            rates[usize::from(addr == plain)] = rate;
            super::env::pause(SETTLE)?;
        }
        with.push(rates[0]);
        without.push(rates[1]);
        ratios.push(rates[0] / rates[1]);
    }
    let ratio = Stats::of(&ratios).expect("at least one pair");
    let (mean, half) = mean_ci95(&ratios);
    let plain_rate = Stats::of(&without).expect("at least one pair");
    let with_rate = Stats::of(&with).expect("at least one pair");
    let noise = (plain_rate.max - plain_rate.min) / plain_rate.p50 * 100.0;

    // The program's own cost, from the kernel's statistics over one more steered run.
    let stats = BpfStats::enable()?;
    let steer0 = ProgStats::of(daemon.pid, PROG_SK_REUSEPORT)?;
    let release0 = ProgStats::of(daemon.pid, PROG_CGROUP_SOCK)?;
    let counted = load(env, steered, run_ms)?;
    let steer = ProgStats::of(daemon.pid, PROG_SK_REUSEPORT)?.since(steer0);
    let release = ProgStats::of(daemon.pid, PROG_CGROUP_SOCK)?.since(release0);
    drop(stats);
    let per_decision = steer.per_run();
    let per_connection_us = 1e6 / plain_rate.p50;

    Ok(Measured {
        pairs,
        run_ms,
        steered,
        plain,
        with,
        without,
        ratios,
        ratio,
        mean,
        half,
        plain_rate,
        with_rate,
        noise,
        counted,
        steer,
        release,
        per_decision,
        per_connection_us,
    })
}

/// The three rows: the program's run time, the rate ratio, the drain countdown's run time.
fn rows(m: &Measured) -> Vec<Row> {
    let Measured {
        pairs,
        ratio,
        mean,
        half,
        plain_rate,
        noise,
        steer,
        release,
        per_decision,
        per_connection_us,
        ..
    } = *m;
    vec![
        Row::new(
            "steering program, run time per decision (kernel BPF stats)",
            per_decision.map_or("no run counted".into(), |ns| {
                format!("{ns:.0} ns ({} decisions)", steer.run_cnt)
            }),
            per_decision,
        )
        .baseline(format!(
            "a whole connection on the plain hash: {per_connection_us:.0} µs"
        )),
        {
            let row = Row::new(
                "connection rate, program attached / plain kernel hash",
                format!(
                    "{mean:.3} ± {half:.3} (mean of {pairs} ABBA pair{}, 95 % CI; range \
                     {:.3}–{:.3}); \
                     from the program's run time: {}",
                    if pairs == 1 { "" } else { "s" },
                    ratio.min,
                    ratio.max,
                    per_decision.map_or("-".into(), |ns| format!(
                        "{:.4}",
                        1.0 - ns / 1000.0 / per_connection_us
                    ))
                ),
                Some(mean),
            )
            .baseline(format!(
                "plain hash, same server and client: {:.0} conn/s (runs spread {noise:.0} %)",
                plain_rate.p50
            ));
            let goal = format!("≥ {GOAL}");
            if mean - half >= GOAL {
                row.goal(goal, true)
            } else if mean + half < GOAL {
                row.goal(goal, false)
            } else {
                row.goal_within_noise(goal)
            }
        },
        Row::new(
            "drain countdown (cgroup/sock_release), run time per socket release",
            release.per_run().map_or("no run counted".into(), |ns| {
                format!("{ns:.0} ns ({} releases)", release.run_cnt)
            }),
            release.per_run(),
        )
        .baseline(format!(
            "a whole connection: {per_connection_us:.0} µs (it runs for every socket closed on \
             the host, drained or not)"
        )),
    ]
}

/// The details: how the runs went, each run's figures, and how to read the ratio.
fn details(m: &Measured) -> Vec<String> {
    let Measured {
        run_ms,
        steered,
        plain,
        mean,
        half,
        plain_rate,
        with_rate,
        noise,
        per_decision,
        per_connection_us,
        ..
    } = *m;
    let (with, without, ratios, counted) = (&m.with, &m.without, &m.ratios, &m.counted);
    vec![
        format!(
            "One testsrv (2 workers, `--mode per-worker`) listens on {steered} (steered by \
             handoffd) and {plain} (not steered: the kernel's reuseport hash over the same two \
             workers). loadgen, {CONCURRENCY} concurrent clients, one connection per attempt, \
             {run_ms} ms per run, against one port then the other, in ABBA order, after a \
             warm-up run of each. BPF statistics (`BPF_ENABLE_STATS`) are on only for a separate \
             steered run of {} connections, since they add a clock read to every program run.",
            counted.ok
        ),
        format!(
            "- rate with the program, conn/s: {}\n- rate on the plain hash, conn/s: {}\n- ratios: {}",
            list(with, 0),
            list(without, 0),
            list(ratios, 3)
        ),
        format!(
            "- with the program: median {:.0} conn/s; plain: median {:.0} conn/s; the plain \
             runs spread over {noise:.0} % of their median. The ratio's 95 % confidence \
             interval is {:.3}–{:.3}: the goal is met when all of it is ≥ {GOAL}, missed when \
             all of it is below, and within noise otherwise. The kernel's own figure bounds \
             the cost: {} per decision against {per_connection_us:.0} µs per connection.",
            with_rate.p50,
            plain_rate.p50,
            mean - half,
            mean + half,
            per_decision.map_or("-".into(), |ns| format!("{ns:.0} ns"))
        ),
    ]
}

/// The mean of `values` and the half-width of its 95 % confidence interval (Student's t;
/// 0 for a single value).
fn mean_ci95(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    // Two-sided 97.5 % quantiles of Student's t for 1..=9 degrees of freedom, then ~normal.
    const T: [f64; 9] = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26];
    let t = T.get(n - 2).copied().unwrap_or(2.1);
    (mean, t * (var / n as f64).sqrt())
}

/// `a, b, c` with `decimals` digits.
fn list(values: &[f64], decimals: usize) -> String {
    values
        .iter()
        .map(|v| format!("{v:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_interval_of_the_mean() {
        assert_eq!(mean_ci95(&[2.0]), (2.0, 0.0));
        let (mean, half) = mean_ci95(&[1.0, 2.0, 3.0]);
        assert_eq!(mean, 2.0);
        // sd 1, n 3, t(2) 4.30: 4.30 / sqrt(3).
        assert!((half - 4.30 / 3f64.sqrt()).abs() < 1e-9, "{half}");
    }
}
