//! One phase of the flood benchmark: a namespace with its own handoffd and a one-process
//! testsrv, the floods of an unprivileged user started as uid 65534 (none when quiet),
//! drains measured as the drain benchmark measures them, each capped, and handoffd's CPU,
//! threads, memory and descriptors sampled meanwhile.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use super::env::{Captured, Ctx, Daemon, Env, Server, connect, field, pause};
use super::measure::{RunDelay, cpu_ns, ms, ns_to_ms};
use crate::children::pause_until;

/// The attacker: `nobody`.
const NOBODY: u32 = 65534;
/// The service's address in each phase's namespace.
pub const SERVICE: &str = "127.0.0.1:8310";
/// Another address on the service's port: the flood's binds of it succeed.
const FREE: &str = "127.0.0.2:8310";
/// Where the flood's foreign listeners sit: the service's port, another family.
const FOREIGN: &str = "[::1]:8310";
/// The metrics address (handoffd's default, given explicitly), in the phase's namespace.
const METRICS: &str = "127.0.0.1:9464";
/// How long one uncapped step of a round may take (start a server, see a close).
const STEP: Duration = Duration::from_secs(10);
/// How long a promote may take before it counts as failed.
pub const PROMOTE_CAP: Duration = Duration::from_secs(10);
/// How long a flood may take to be ready, and to report once told to stop.
const FLOOD_READY: Duration = Duration::from_secs(60);
/// The soft open-file limit systemd gives a unit without `LimitNOFILE=` (the hard limit
/// stays): handoffd starts as it would under its unit.
const UNIT_NOFILE: u64 = 1024;
/// How often handoffd's threads, memory and descriptors are sampled.
const SAMPLE: Duration = Duration::from_millis(100);

/// What floods the daemon during a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// Nothing: the baseline.
    Quiet,
    /// Binds of the service's port, failing and succeeding.
    Bind,
    /// Scrapes, held connections and foreign listeners.
    Metrics,
}

impl Attack {
    /// Short name, for namespaces, services and servers.
    pub fn label(self) -> &'static str {
        match self {
            Self::Quiet => "quiet",
            Self::Bind => "bind",
            Self::Metrics => "metrics",
        }
    }
}

/// How big and how long.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Drains to measure.
    pub drains: usize,
    /// The most a phase's drains may take together; rounds stop when it is used.
    pub budget: Duration,
    /// A drain not retired within this is a timeout.
    pub cap: Duration,
    /// Threads of each bind flood (failing, succeeding).
    pub bind_threads: u32,
    /// Concurrent scrapes of `/metrics`.
    pub scrapers: u32,
    /// Idle connections held to the metrics address.
    pub held: u32,
    /// Foreign listeners on the service's port.
    pub listeners: u32,
    /// Flooding before the first drain.
    pub warmup: Duration,
    /// The shortest window over which CPU and peaks are measured, drains or not.
    pub min_window: Duration,
    /// How long after the floods stopped drains that hit the cap may still retire.
    pub late: Duration,
}

/// What one flood process reported at its end.
#[derive(Debug, Clone, Default)]
pub struct FloodCounts {
    /// What it was (`bind-taken`, ...).
    pub kind: &'static str,
    /// How many threads, connections or listeners.
    pub count: u32,
    /// Binds that succeeded, scrapes answered 200, connections opened, listeners.
    pub ok: u64,
    /// Binds refused with EADDRINUSE, scrapes not answered 200, connects that failed.
    pub failed: u64,
    /// Any other error.
    pub other: u64,
    /// Most connections held (hold) or scrapes under way (scrape) at once.
    pub peak: u64,
}

/// Peaks of handoffd's threads, resident memory and descriptors during a phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peaks {
    /// Threads.
    pub threads: u64,
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// Open descriptors.
    pub fds: u64,
}

/// What a phase measured.
#[derive(Debug, Clone)]
pub struct Phase {
    /// Its attack.
    pub attack: Attack,
    /// Close → retire of each drain in ms; `INFINITY` when not retired within the cap.
    pub retire: Vec<f64>,
    /// For drains not retired within the cap: ms to their retire signal if it came before
    /// the end of the phase, `None` if it never came.
    pub late: Vec<Option<f64>>,
    /// Each promote's time, from handoffctl's start to its exit (ms).
    pub promote: Vec<f64>,
    /// Why the drains stopped before the planned number, if they did.
    pub cut: Option<String>,
    /// Whether a promote failed (the phase misses its goal whatever the drains).
    pub promote_failed: bool,
    /// handoffd's CPU during the drains, in % of one core.
    pub cpu_pct: f64,
    /// How long handoffd's threads waited for a CPU while runnable, in % of the drains'
    /// time (summed over threads: may exceed 100).
    pub wait_pct: f64,
    /// Peaks during the drains.
    pub peaks: Peaks,
    /// How long the drains ran (at least `min_window`), with the floods during them.
    pub window: Duration,
    /// The floods' own counts.
    pub floods: Vec<FloodCounts>,
    /// From the first flood's start to the last one's end.
    pub flooded: Duration,
}

/// A flood running as uid 65534.
struct Flood {
    kind: &'static str,
    count: u32,
    pid: u32,
    out: Captured,
    stdin: ChildStdin,
}

/// A copy of this executable that uid 65534 may run: the run's temporary directory is
/// private to root.
pub struct AttackerBin {
    _dir: crate::TempDir,
    path: PathBuf,
}

impl AttackerBin {
    /// Copies `xtask` into a new world-readable directory.
    pub fn new(xtask: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::TempDir::new("bench-attacker")?;
        // uid 65534 must be able to reach it: every directory above it searchable by all.
        for parent in dir.path().ancestors().skip(1) {
            let mode = std::fs::metadata(parent)
                .with_context(|| format!("cannot stat {}", parent.display()))?
                .permissions()
                .mode();
            if mode & 0o001 == 0 {
                bail!(
                    "{} is not searchable by other users, so uid 65534 cannot run the \
                     flood from below it: set TMPDIR to a directory such as /tmp",
                    parent.display()
                );
            }
        }
        let perms = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(dir.path(), perms.clone())
            .with_context(|| format!("cannot open up {}", dir.path().display()))?;
        let path = dir.path().join("xtask");
        std::fs::copy(xtask, &path).context("cannot copy this executable")?;
        std::fs::set_permissions(&path, perms)
            .with_context(|| format!("cannot open up {}", path.display()))?;
        Ok(Self { _dir: dir, path })
    }
}

/// Runs one phase in a namespace of its own.
pub fn run(ctx: &Ctx, bin: &AttackerBin, attack: Attack, sizes: Sizes) -> Result<Phase> {
    let label = attack.label();
    let mut env = Env::new(ctx, &format!("flood-{label}"))?;
    let addr: SocketAddr = SERVICE.parse()?;
    let daemon = with_unit_nofile(|| {
        env.daemon(
            &format!("flood-{label}"),
            &[SERVICE],
            &["--metrics-addr", METRICS],
        )
    })?;
    let args = ["--listen", SERVICE, "--log-close"];
    let prefix = &label[..1];
    let mut active = env.testsrv(&format!("{prefix}0"), &args)?;
    daemon.promote(active.pid, None)?;
    let seconds = (sizes.warmup + sizes.budget + sizes.cap * 2 + FLOOD_READY).as_secs();
    let mut floods = Vec::new();
    let plan = flood_plan(attack, sizes);
    let flood_start = Instant::now();
    for (kind, target, count) in plan {
        floods.push(start_flood(&mut env, bin, kind, target, count, seconds)?);
    }
    pause(sizes.warmup)?;

    let stop = AtomicBool::new(false);
    let pid = daemon.pid;
    let cpu_before = cpu_ns(pid)?;
    let wait_before = RunDelay::of(pid)?;
    let started = Instant::now();
    let (rounds, peaks) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| sample(pid, &stop));
        let rounds =
            drains(&mut env, &daemon, &mut active, addr, &args, prefix, sizes).and_then(|r| {
                // Drains cut short (a failed promote) leave too short a window for CPU.
                pause_until(started + sizes.min_window)?;
                Ok(r)
            });
        stop.store(true, Ordering::Relaxed);
        (rounds, sampler.join().unwrap_or_default())
    });
    let window = started.elapsed();
    let cpu = cpu_ns(pid)?.saturating_sub(cpu_before);
    let waited = RunDelay::of(pid)?.since(&wait_before);
    let mut rounds = rounds?;
    let mut counts = Vec::new();
    for flood in floods {
        counts.push(stop_flood(&mut env, flood)?);
    }
    let flooded = flood_start.elapsed();
    let late = late_retires(&rounds.overdue, sizes.late);
    Ok(Phase {
        attack,
        retire: std::mem::take(&mut rounds.retire),
        late,
        promote: rounds.promote,
        cut: rounds.cut,
        promote_failed: rounds.promote_failed,
        cpu_pct: cpu as f64 / 1e6 / ms(window) * 100.0,
        wait_pct: waited as f64 / 1e6 / ms(window) * 100.0,
        peaks,
        window,
        floods: counts,
        flooded,
    })
}

/// The floods of `attack`: each kind of attacker, its target and how many.
fn flood_plan(attack: Attack, sizes: Sizes) -> Vec<(&'static str, &'static str, u32)> {
    match attack {
        Attack::Quiet => Vec::new(),
        Attack::Bind => vec![
            ("bind-taken", SERVICE, sizes.bind_threads),
            ("bind-free", FREE, sizes.bind_threads),
        ],
        // Listeners first: they make each scrape costly.
        Attack::Metrics => vec![
            ("listen", FOREIGN, sizes.listeners),
            ("hold", METRICS, sizes.held),
            ("scrape", METRICS, sizes.scrapers),
        ],
    }
}

/// For each drain not retired within the cap, when (ms after its close) the daemon retired it
/// within `late` more; None when it did not.
fn late_retires(overdue: &[(Server, u64)], late: Duration) -> Vec<Option<f64>> {
    // Drains the daemon had not retired within the cap: did it, later?
    let grace = Instant::now() + late;
    overdue
        .iter()
        .map(|(srv, closed)| {
            let term = format!("term {} pid={} ", srv.name, srv.pid);
            srv.stderr
                .wait("a late retire", grace, |l| l.starts_with(&term))
                .ok()
                .and_then(|l| field(&l, "ns="))
                .map(|t| ns_to_ms(*closed, t))
        })
        .collect()
}

/// Runs `f` (which starts handoffd) with this process's soft open-file limit at
/// [`UNIT_NOFILE`], which the daemon inherits; restores it after.
fn with_unit_nofile<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    setrlimit(Resource::RLIMIT_NOFILE, soft.min(UNIT_NOFILE), hard)
        .context("lowering the open file limit")?;
    let started = f();
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).context("restoring the open file limit")?;
    started
}

/// Starts `bench-flood --kind KIND --addr TARGET --count COUNT` as uid 65534 and waits
/// until it is ready.
fn start_flood(
    env: &mut Env,
    bin: &AttackerBin,
    kind: &'static str,
    target: &str,
    count: u32,
    seconds: u64,
) -> Result<Flood> {
    let mut cmd = Command::new(&bin.path);
    cmd.args(["bench-flood", "--kind", kind, "--addr", target])
        .args(["--count", &count.to_string()])
        .args(["--seconds", &seconds.to_string()]);
    let (pid, out, stdin) = env.spawn_as(&format!("flood-{kind}"), cmd, NOBODY, NOBODY)?;
    out.wait(
        &format!("the {kind} flood to be ready"),
        Instant::now() + FLOOD_READY,
        |l| l == "ready",
    )?;
    Ok(Flood {
        kind,
        count,
        pid,
        out,
        stdin,
    })
}

/// Tells a flood to stop (closes its stdin) and reads its counts.
fn stop_flood(env: &mut Env, flood: Flood) -> Result<FloodCounts> {
    drop(flood.stdin);
    let deadline = Instant::now() + FLOOD_READY;
    let line = flood.out.wait(
        &format!("the {} flood's counts", flood.kind),
        deadline,
        |l| l.starts_with("done "),
    )?;
    env.wait_exit(flood.pid, deadline)?;
    let get = |key: &str| field(&line, key).with_context(|| format!("no {key} in {line:?}"));
    Ok(FloodCounts {
        kind: flood.kind,
        count: flood.count,
        ok: get("ok=")?,
        failed: get("failed=")?,
        other: get("other=")?,
        peak: get("peak=")?,
    })
}

/// The drains of a phase.
#[derive(Default)]
struct Rounds {
    retire: Vec<f64>,
    promote: Vec<f64>,
    /// Servers whose drain hit the cap, with their close stamp.
    overdue: Vec<(Server, u64)>,
    cut: Option<String>,
    promote_failed: bool,
}

/// Up to `sizes.drains` drains (after one uncounted), within the budget.
fn drains(
    env: &mut Env,
    daemon: &Daemon,
    active: &mut Server,
    addr: SocketAddr,
    args: &[&str],
    prefix: &str,
    sizes: Sizes,
) -> Result<Rounds> {
    let mut r = Rounds::default();
    let end = Instant::now() + sizes.budget;
    for round in 0..=sizes.drains {
        if round > 1 && Instant::now() >= end {
            r.cut = Some(format!(
                "{} of {} drains ran in the {} s budget",
                round - 1,
                sizes.drains,
                sizes.budget.as_secs()
            ));
            break;
        }
        let (stream, name) = env.ns.enter(|| connect(addr))??;
        if name != active.name {
            bail!(
                "the connection went to {name}, not to the active {}",
                active.name
            );
        }
        let next = env.testsrv(&format!("{prefix}{}", round + 1), args)?;
        match promote(daemon, next.pid, PROMOTE_CAP)? {
            Ok(took) if round > 0 => r.promote.push(ms(took)),
            Ok(_) => {}
            Err(why) => {
                r.cut = Some(if round == 0 {
                    format!("the first promote (uncounted round) {why}")
                } else {
                    format!("promote {why} before drain {round}")
                });
                r.promote_failed = true;
                break;
            }
        }
        drop(stream);
        let close = active.wait_line(
            &format!("close {} pid={} ", active.name, active.pid),
            Instant::now() + STEP,
        )?;
        let closed = field(&close, "ns=").with_context(|| format!("no ns= in {close:?}"))?;
        let deadline = Instant::now() + sizes.cap;
        let old = std::mem::replace(active, next);
        match old.wait_term(deadline) {
            Ok(retired) => {
                if round > 0 {
                    r.retire.push(ns_to_ms(closed, retired));
                }
                env.wait_exit(old.pid, Instant::now() + STEP)?;
            }
            Err(_) if Instant::now() >= deadline => {
                if round > 0 {
                    r.retire.push(f64::INFINITY);
                }
                // Left running: the daemon may still retire it; the end of the phase looks.
                r.overdue.push((old, closed));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(r)
}

/// `handoffctl promote PID`, killed after `cap`: its time, or why it failed.
fn promote(daemon: &Daemon, pid: u32, cap: Duration) -> Result<Result<Duration, String>> {
    let mut child = daemon
        .ctl(&["promote", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run handoffctl promote")?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let took = started.elapsed();
            if status.success() {
                return Ok(Ok(took));
            }
            let mut err = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                use std::io::Read;
                let _ = pipe.read_to_string(&mut err);
            }
            return Ok(Err(format!("failed ({})", err.trim())));
        }
        if started.elapsed() >= cap {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Err(format!("did not return within {} s", cap.as_secs())));
        }
        pause_until(Instant::now() + Duration::from_millis(1))?;
    }
}

/// Peaks of `pid`'s threads, resident memory and open descriptors until `stop`.
fn sample(pid: u32, stop: &AtomicBool) -> Peaks {
    let mut p = Peaks::default();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let value = |key: &str| -> u64 {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap_or(0)
            };
            p.threads = p.threads.max(value("Threads:"));
            p.rss_kib = p.rss_kib.max(value("VmRSS:"));
        }
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            p.fds = p.fds.max(fds.count() as u64);
        }
        std::thread::sleep(SAMPLE);
    }
    p
}
