//! Benchmark 6, scale of drain accounting: with 1 k, 10 k, 50 k and 100 k established
//! connections on the draining generation, the one-time cost when draining starts, the cost
//! per closed connection, and the last close → retire latency.
//!
//! In a network namespace of its own: testsrv with 8 workers (a listener each; `--hold`
//! keeps connections without a thread each) and clients (`bench-hold`, ≤ 12.5 k
//! connections per process under the 20 k fd cap, each from a loopback address of its own).
//! Per size: the clients connect to the active generation; a new generation is promoted,
//! which starts the old one's drain: the tag pass, run just after the promote's reply. Its
//! wall time is the daemon's own measure (its `drain counted` log event, against the same
//! with no connection, same daemon, same run), its CPU the daemon's from the promote to
//! that event, above the same with no connection. Then every worker of the old generation closes all its
//! connections at once (SIGUSR1), stamping the last close; the retire signal's stamp ends
//! the latency. The countdown's cost per close is the `cgroup/sock_release` program's run
//! time per run over that phase (BPF statistics on).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use super::env::pause;
use super::env::{Ctx, Daemon, Env, Server, field};
use super::measure::{
    BpfStats, PROG_CGROUP_SOCK, ProgStats, Stats, cpu_ns, ms, ns_to_ms, wait_idle,
};
use super::report::Row;
use super::{Outcome, fmt_ms};

/// Connections per client process (the VM caps a process at 20 k fds).
const PER_CLIENT: u32 = 12_500;
/// Server workers: 100 k / 8 = 12.5 k connections each.
const WORKERS: &str = "8";
/// Goal for the drain start at 100 k, in milliseconds.
const GOAL_START_MS: f64 = 150.0;
/// Goal for last close → retire at every size, in milliseconds.
const GOAL_RETIRE_MS: f64 = 50.0;
/// Longest any one step (connecting 12.5 k, closing 100 k) may take.
const STEP: Duration = Duration::from_secs(180);
/// A bind() on the service port makes the daemon look for new listeners for up to a second;
/// promotes are measured once that is over.
const RESCANS: Duration = Duration::from_millis(1100);

/// What one size gave.
struct Point {
    n: u32,
    /// Seconds the clients took to connect.
    connect_s: f64,
    /// The daemon's CPU time from the new generation's start (its bind()) until idle, ms.
    rescan_cpu_ms: f64,
    /// The promote that started the drain, ms.
    promote_ms: f64,
    /// The first tag pass of the drain, as the daemon timed it, ms.
    start_ms: f64,
    /// The daemon's CPU time from the promote to the end of that pass, ms.
    start_cpu_ms: f64,
    /// What that pass counted.
    pass_counted: u64,
    /// What `status --json` counted for the draining generation.
    counted: u64,
    /// How long that `handoffctl status --json` took, ms.
    status_ms: f64,
    /// First close → last close, over all workers, ms.
    close_ms: f64,
    /// The countdown's run time per socket release during the close phase, ns.
    release_ns: Option<f64>,
    /// Its runs during the close phase.
    releases: u64,
    /// The daemon's CPU time from the first close to the retire signal, ms.
    close_cpu_ms: f64,
    /// Last close → retire signal in the server, ms.
    retire_ms: f64,
}

pub fn run(ctx: &Ctx) -> Result<Outcome> {
    let sizes: &[u32] = ctx.pick(&[1_000, 10_000, 50_000, 100_000], &[1_000]);
    let mut env = Env::new(ctx, "scale")?;
    let addr: SocketAddr = "127.0.0.1:8600".parse()?;
    let listen = addr.to_string();
    let daemon = env.daemon("scale", &[&listen], &["--drain-timeout", "3600s"])?;
    let args = [
        "--listen",
        listen.as_str(),
        "--workers",
        WORKERS,
        "--mode",
        "per-worker",
        "--hold",
    ];
    let mut generation = 0;
    let mut start = |env: &mut Env| -> Result<Server> {
        generation += 1;
        env.testsrv(&format!("s{generation}"), &args)
    };
    let mut active = start(&mut env)?;
    daemon.promote(active.pid, None)?;

    // Baseline: promotes over a generation with no connection.
    let base = baseline(&mut env, &daemon, &mut start, &mut active)?;

    let mut points = Vec::new();
    for &n in sizes {
        println!("scale: {n} connections");
        let t = Instant::now();
        let clients = connect_clients(&mut env, addr, n)?;
        let connect_s = t.elapsed().as_secs_f64();
        let (next, rescan_cpu_ms) = start_quietly(&mut env, &mut start, daemon.pid)?;
        let cpu0 = cpu_ns(daemon.pid)?;
        let promote_ms = ms(daemon.promote(next.pid, None)?);
        let (start_ms, pass_counted) = daemon.drain_counted(active.pid, Instant::now() + STEP)?;
        let start_cpu_ms = cpu_ms_since(daemon.pid, cpu0)?;
        let t = Instant::now();
        let counted = daemon.connections(active.pid)?;
        let status_ms = ms(t.elapsed());

        let closing = close_all(&mut env, &daemon, &active, n)?;
        for pid in clients {
            env.kill(pid, Signal::SIGKILL)?;
        }
        env.wait_exit(active.pid, Instant::now() + STEP)?;
        points.push(Point {
            n,
            connect_s,
            rescan_cpu_ms,
            promote_ms,
            start_ms,
            start_cpu_ms,
            pass_counted,
            counted,
            status_ms,
            close_ms: closing.close_ms,
            release_ns: closing.release.per_run(),
            releases: closing.release.run_cnt,
            close_cpu_ms: closing.close_cpu_ms,
            retire_ms: closing.retire_ms,
        });
        active = next;
    }
    Ok(outcome(&points, &base))
}

/// Three promotes over a generation with no connection: the medians of their figures.
fn baseline(
    env: &mut Env,
    daemon: &Daemon,
    start: &mut impl FnMut(&mut Env) -> Result<Server>,
    active: &mut Server,
) -> Result<Base> {
    let mut empty = Vec::new();
    for _ in 0..3 {
        let (next, rescan) = start_quietly(env, start, daemon.pid)?;
        let cpu0 = cpu_ns(daemon.pid)?;
        let took = ms(daemon.promote(next.pid, None)?);
        let (start, _) = daemon.drain_counted(active.pid, Instant::now() + STEP)?;
        empty.push([took, start, cpu_ms_since(daemon.pid, cpu0)?, rescan]);
        env.wait_exit(active.pid, Instant::now() + STEP)?;
        *active = next;
    }
    let median = |i: usize| {
        Stats::of(&empty.iter().map(|e| e[i]).collect::<Vec<_>>()).map_or(0.0, |s| s.p50)
    };
    Ok(Base {
        promote_ms: median(0),
        start_ms: median(1),
        start_cpu_ms: median(2),
        rescan_cpu_ms: median(3),
    })
}

/// What closing a draining generation's connections cost, and how soon it was retired.
struct Closing {
    /// First close → last close in the server, ms.
    close_ms: f64,
    /// Last close → retire signal in the server, ms.
    retire_ms: f64,
    /// The daemon's CPU time from the first close to the retire signal, ms.
    close_cpu_ms: f64,
    /// The countdown program's runs meanwhile.
    release: ProgStats,
}

/// Has `active`'s workers close their `n` connections (SIGUSR1), with the kernel's BPF
/// statistics on, and waits for the retire signal.
fn close_all(env: &mut Env, daemon: &Daemon, active: &Server, n: u32) -> Result<Closing> {
    let stats = BpfStats::enable()?;
    let release0 = ProgStats::of(daemon.pid, PROG_CGROUP_SOCK)?;
    let cpu1 = cpu_ns(daemon.pid)?;
    env.kill(active.pid, Signal::SIGUSR1)?;
    let deadline = Instant::now() + STEP;
    let prefix = format!("closed {} ", active.name);
    let closed = active.stderr.wait_n(
        "every worker to close its connections",
        deadline,
        active.workers.len(),
        |l| l.starts_with(&prefix),
    )?;
    let retired = active.wait_term(deadline)?;
    let close_cpu_ms = cpu_ms_since(daemon.pid, cpu1)?;
    let release = ProgStats::of(daemon.pid, PROG_CGROUP_SOCK)?.since(release0);
    drop(stats);
    let get = |line: &String, key: &str| {
        field(line, key).with_context(|| format!("no {key} in {line:?}"))
    };
    let mut first = u64::MAX;
    let mut last = 0;
    let mut total = 0;
    for line in &closed {
        first = first.min(get(line, "first_ns=")?);
        last = last.max(get(line, "last_ns=")?);
        total += get(line, "count=")?;
    }
    if total != u64::from(n) {
        bail!("the workers closed {total} connections, not {n}");
    }
    Ok(Closing {
        close_ms: ns_to_ms(first, last),
        retire_ms: ns_to_ms(last, retired),
        close_cpu_ms,
        release,
    })
}

/// The CPU time of `pid` since it was `earlier` (ns), in milliseconds.
fn cpu_ms_since(pid: u32, earlier: u64) -> Result<f64> {
    Ok(cpu_ns(pid)?.saturating_sub(earlier) as f64 / 1e6)
}

/// The same figures with no connection held.
struct Base {
    promote_ms: f64,
    start_ms: f64,
    start_cpu_ms: f64,
    rescan_cpu_ms: f64,
}

/// Starts the next generation and waits until the daemon is done with what its bind()
/// caused; returns it and the daemon's CPU time meanwhile (ms).
fn start_quietly(
    env: &mut Env,
    start: &mut impl FnMut(&mut Env) -> Result<Server>,
    daemon: u32,
) -> Result<(Server, f64)> {
    let cpu0 = cpu_ns(daemon)?;
    let next = start(env)?;
    pause(RESCANS)?;
    let cpu1 = wait_idle(daemon, STEP)?;
    Ok((next, cpu1.saturating_sub(cpu0) as f64 / 1e6))
}

/// Starts enough clients for `n` connections to `addr`; returns their pids once all hold.
fn connect_clients(env: &mut Env, addr: SocketAddr, n: u32) -> Result<Vec<u32>> {
    let SocketAddr::V4(v4) = addr else {
        bail!("the scale benchmark uses IPv4");
    };
    let mut pids = Vec::new();
    let mut outs = Vec::new();
    let mut left = n;
    let mut k = 0;
    while left > 0 {
        let count = left.min(PER_CLIENT);
        left -= count;
        k += 1;
        let (_, log) = env.file("bench-hold", "log")?;
        let mut cmd = Command::new(&env.ctx.xtask);
        cmd.arg("bench-hold")
            .args(["--connect", &v4.to_string()])
            .args(["--source", &format!("127.0.1.{k}")])
            .args(["--count", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        let (pid, out) = env.spawn_captured("bench-hold", cmd)?;
        pids.push(pid);
        outs.push(out);
    }
    let deadline = Instant::now() + STEP;
    for out in &outs {
        out.wait("a client to hold its connections", deadline, |l| {
            l.starts_with("held ")
        })?;
    }
    Ok(pids)
}

fn outcome(points: &[Point], base: &Base) -> Outcome {
    let mut rows = start_rows(points, base);
    if let Some(linear) = growth(points, base) {
        rows.push(linear);
    }
    for p in points {
        rows.push(
            Row::new(
                format!("last close → retire signal, {} connections", thousands(p.n)),
                fmt_ms(p.retire_ms),
                Some(p.retire_ms),
            )
            .baseline(format!(
                "closing all {} took {}",
                thousands(p.n),
                fmt_ms(p.close_ms)
            ))
            .goal(
                format!("≤ {GOAL_RETIRE_MS} ms"),
                p.retire_ms <= GOAL_RETIRE_MS,
            ),
        );
    }
    let sizes = join(points, |p| thousands(p.n));
    let release: Vec<f64> = points.iter().filter_map(|p| p.release_ns).collect();
    rows.push(
        Row::new(
            format!("countdown cost per closed connection ({sizes})"),
            format!(
                "{} ns",
                join(points, |p| p
                    .release_ns
                    .map_or("-".into(), |ns| format!("{ns:.0}")))
            ),
            release
                .iter()
                .copied()
                .reduce(f64::max)
                .filter(|_| release.len() == points.len()),
        )
        .baseline(format!(
            "the server's close() itself: {} µs",
            join(points, |p| format!(
                "{:.1}",
                p.close_ms * 1000.0 / f64::from(p.n)
            ))
        )),
    );
    rows.push(
        Row::new(
            format!("listener rescan after a new generation's bind() ({sizes})"),
            format!(
                "{} ms daemon CPU",
                join(points, |p| format!("{:.0}", p.rescan_cpu_ms))
            ),
            points.last().map(|p| p.rescan_cpu_ms),
        )
        .baseline(format!("no connection: {}", fmt_ms(base.rescan_cpu_ms))),
    );
    Outcome {
        rows,
        details: details(points),
    }
}

/// The drain start's row at each size, against the same with no connection.
fn start_rows(points: &[Point], base: &Base) -> Vec<Row> {
    let mut rows = Vec::new();
    let baseline = format!(
        "no connection: {} (promote {}; {} CPU for both)",
        fmt_ms(base.start_ms),
        fmt_ms(base.promote_ms),
        fmt_ms(base.start_cpu_ms)
    );
    for p in points {
        let start = p.start_ms;
        let row = Row::new(
            format!("drain start (tag pass), {} connections", thousands(p.n)),
            format!(
                "{} ({} daemon CPU above the baseline; counted {})",
                fmt_ms(start),
                fmt_ms((p.start_cpu_ms - base.start_cpu_ms).max(0.0)),
                p.pass_counted
            ),
            Some(start),
        )
        .baseline(baseline.clone());
        rows.push(if p.n == 100_000 {
            row.goal(
                format!("< {GOAL_START_MS} ms at 100 k"),
                start < GOAL_START_MS,
            )
        } else {
            row
        });
    }
    rows
}

/// What the tag pass and the rescan are, then each size's figures.
fn details(points: &[Point]) -> Vec<String> {
    let mut details = vec![
        "The tag pass is an `iter/task_file` run over each process of the draining \
         generation (Linux ≥ 6.1): it visits their open files only, and tags the sockets on \
         the service port. It runs just after the promote has answered; its wall time is the \
         daemon's own measure (`took_ms` of its `drain counted` event). `counted` is what \
         the pass counted, and what `handoffctl status --json` then shows for the draining \
         generation (both must be N). \
         Before each promote the bench waits until the daemon is idle again after the new \
         generation's bind() (it looks for new listeners of the active generation for up to \
         1 s after a bind on the service port): that CPU time is the rescan row."
            .to_owned(),
    ];
    for p in points {
        details.push(format!(
            "- {}: clients connected in {:.1} s; rescan after the bind {} CPU; promote {}, \
             then the tag pass {} (daemon CPU for both {}), counted {} (`status --json` took \
             {}); closing took {} over \
             {WORKERS} workers, {} countdown runs at {}; daemon CPU from the first close to the \
             retire signal {}; last close → retire {}",
            thousands(p.n),
            p.connect_s,
            fmt_ms(p.rescan_cpu_ms),
            fmt_ms(p.promote_ms),
            fmt_ms(p.start_ms),
            fmt_ms(p.start_cpu_ms),
            p.counted,
            fmt_ms(p.status_ms),
            fmt_ms(p.close_ms),
            p.releases,
            p.release_ns.map_or("-".into(), |ns| format!("{ns:.0} ns")),
            fmt_ms(p.close_cpu_ms),
            fmt_ms(p.retire_ms)
        ));
    }
    details
}

/// Whether the drain start grows linearly or better: the daemon's CPU time for it (above
/// the same with no connection) per connection at the largest size against 10 k.
fn growth(points: &[Point], base: &Base) -> Option<Row> {
    let small = points.iter().find(|p| p.n == 10_000)?;
    let large = points.last().filter(|p| p.n > small.n)?;
    let per = |p: &Point| (p.start_cpu_ms - base.start_cpu_ms) / f64::from(p.n) * 1e6;
    let (a, b) = (per(small), per(large));
    Some(
        Row::new(
            format!(
                "drain start, daemon CPU per connection: {} / 10 k",
                thousands(large.n)
            ),
            format!("{:.2} ({b:.0} ns vs {a:.0} ns)", b / a),
            Some(b / a),
        )
        .baseline("the same at 10 k")
        .goal("≤ 1.25 (linear or better)", b / a <= 1.25),
    )
}

/// `f` of every point, joined with ` · `.
fn join(points: &[Point], f: impl Fn(&Point) -> String) -> String {
    points.iter().map(f).collect::<Vec<_>>().join(" · ")
}

/// `100 k`, `1 k`.
fn thousands(n: u32) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{} k", n / 1000)
    } else {
        n.to_string()
    }
}
