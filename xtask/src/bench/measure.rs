//! Measuring: percentiles, a process's CPU time, wake-ups and memory from `/proc`, and the
//! kernel's run-time statistics of BPF programs.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::time::{ClockId, clock_getcpuclockid, clock_gettime};
use nix::unistd::Pid;

/// Order statistics of a sample.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Sample size.
    pub n: usize,
    /// Smallest value.
    pub min: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 99th percentile (nearest rank: with 100 values, the second largest).
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl Stats {
    /// The statistics of `values`; `None` if empty.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Self {
            n: v.len(),
            min: v[0],
            p50: rank(0.5),
            p99: rank(0.99),
            max: v[v.len() - 1],
        })
    }
}

/// CPU time of process `pid` so far, every thread counted, also threads that have ended
/// (its CPU-time clock: nanoseconds, unlike the ticks of `/proc/PID/stat`).
pub fn cpu_ns(pid: u32) -> Result<u64> {
    let clock = clock_getcpuclockid(Pid::from_raw(pid as i32))
        .with_context(|| format!("no CPU clock for pid {pid}"))?;
    let t =
        clock_gettime(clock).with_context(|| format!("cannot read the CPU clock of pid {pid}"))?;
    Ok(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// Waits until `pid` has used under 1 ms of CPU in 100 ms, at most `limit`; returns its
/// CPU time then (ns).
pub fn wait_idle(pid: u32, limit: Duration) -> Result<u64> {
    const WINDOW: Duration = Duration::from_millis(100);
    const QUIET_NS: u64 = 1_000_000;
    let deadline = Instant::now() + limit;
    let mut last = cpu_ns(pid)?;
    loop {
        crate::children::pause_until(Instant::now() + WINDOW)?;
        let now = cpu_ns(pid)?;
        if now.saturating_sub(last) < QUIET_NS {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            bail!("pid {pid} stayed busy for {limit:?}");
        }
        last = now;
    }
}

/// Context switches (wake-ups) of each thread of a process, by thread id.
#[derive(Debug, Clone, Default)]
pub struct Wakeups(BTreeMap<u32, u64>);

impl Wakeups {
    /// The counts of every thread of `pid` now.
    pub fn of(pid: u32) -> Result<Self> {
        let dir = format!("/proc/{pid}/task");
        let mut counts = BTreeMap::new();
        for task in std::fs::read_dir(&dir).with_context(|| format!("cannot read {dir}"))? {
            let task = task?;
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            // A thread that ended meanwhile adds nothing.
            let Ok(text) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            let count = |key: &str| -> Option<u64> {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))?
                    .trim()
                    .parse()
                    .ok()
            };
            if let (Some(v), Some(n)) = (
                count("voluntary_ctxt_switches:"),
                count("nonvoluntary_ctxt_switches:"),
            ) {
                counts.insert(tid, v + n);
            }
        }
        Ok(Self(counts))
    }

    /// Wake-ups since `earlier`, of the threads alive now (a thread that ended meanwhile
    /// is not counted; the daemon's idle pool threads end only after 10 s asleep).
    pub fn since(&self, earlier: &Self) -> u64 {
        self.0
            .iter()
            .map(|(tid, n)| n.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0)))
            .sum()
    }
}

/// Time each thread of a process has waited on a run queue (runnable, not running), by
/// thread id, in ns (`/proc/PID/task/TID/schedstat`, second field).
#[derive(Debug, Clone, Default)]
pub struct RunDelay(BTreeMap<u32, u64>);

impl RunDelay {
    /// The waits of every thread of `pid` so far.
    pub fn of(pid: u32) -> Result<Self> {
        let dir = format!("/proc/{pid}/task");
        let mut waits = BTreeMap::new();
        for task in std::fs::read_dir(&dir).with_context(|| format!("cannot read {dir}"))? {
            let task = task?;
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            // A thread that ended meanwhile adds nothing.
            let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
                continue;
            };
            if let Some(wait) = text.split_whitespace().nth(1).and_then(|w| w.parse().ok()) {
                waits.insert(tid, wait);
            }
        }
        Ok(Self(waits))
    }

    /// Nanoseconds waited since `earlier` by the threads alive now.
    pub fn since(&self, earlier: &Self) -> u64 {
        self.0
            .iter()
            .map(|(tid, n)| n.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0)))
            .sum()
    }
}

/// Resident memory of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// `BPF_PROG_TYPE_SK_REUSEPORT`: the steering program.
pub const PROG_SK_REUSEPORT: u32 = 21;
/// `BPF_PROG_TYPE_CGROUP_SOCK`: the drain countdown (`cgroup/sock_release`).
pub const PROG_CGROUP_SOCK: u32 = 9;

/// Keeps the kernel's BPF run-time statistics on while alive (`BPF_ENABLE_STATS`: the
/// kernel turns them off again when the last such fd closes, also if this bench dies).
pub struct BpfStats {
    /// Only held: closing it turns the statistics off.
    _enabled: OwnedFd,
}

impl BpfStats {
    /// Turns the statistics on.
    pub fn enable() -> Result<Self> {
        const BPF_ENABLE_STATS: nix::libc::c_long = 32;
        // union bpf_attr for this command: { __u32 type; } with BPF_STATS_RUN_TIME = 0.
        let attr = [0u32; 2];
        // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes from the valid, initialised
        // `attr` and writes nothing; it returns a new fd or -1.
        let fd = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("BPF_ENABLE_STATS");
        }
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        Ok(Self {
            _enabled: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }
}

/// Run time and run count of BPF programs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProgStats {
    /// Total nanoseconds spent in the programs.
    pub run_time_ns: u64,
    /// Times they ran.
    pub run_cnt: u64,
}

impl ProgStats {
    /// The statistics of every program of `prog_type` that `pid` holds an fd of (from
    /// `/proc/PID/fdinfo`, which shows them while [`BpfStats`] is on).
    pub fn of(pid: u32, prog_type: u32) -> Result<Self> {
        let dir = format!("/proc/{pid}/fd");
        let mut total = Self::default();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot read {dir}"))? {
            let entry = entry?;
            let Ok(link) = std::fs::read_link(entry.path()) else {
                continue;
            };
            if link.as_os_str() != "anon_inode:bpf-prog" {
                continue;
            }
            let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
            let Ok(text) = std::fs::read_to_string(&info) else {
                continue;
            };
            let value = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if value("prog_type:") == Some(u64::from(prog_type)) {
                total.run_time_ns += value("run_time_ns:").unwrap_or(0);
                total.run_cnt += value("run_cnt:").unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// What ran between `earlier` and `self`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(earlier.run_cnt),
        }
    }

    /// Nanoseconds per run.
    pub fn per_run(self) -> Option<f64> {
        (self.run_cnt > 0).then(|| self.run_time_ns as f64 / self.run_cnt as f64)
    }
}

/// Milliseconds, fractional.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The 1-minute load average, as `/proc/loadavg` shows it (`?` if unreadable).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock testsrv stamps its lines with.
pub fn monotonic_ns() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC exists");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// Nanoseconds from `a` to `b`, in milliseconds (negative if `b` came first).
pub fn ns_to_ms(a: u64, b: u64) -> f64 {
    (b as f64 - a as f64) / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Stats::of(&v).unwrap();
        assert_eq!(
            (s.n, s.min, s.p50, s.p99, s.max),
            (100, 1.0, 50.0, 99.0, 100.0)
        );
        let s = Stats::of(&[3.0]).unwrap();
        assert_eq!((s.p50, s.p99), (3.0, 3.0));
        assert!(Stats::of(&[]).is_none());
    }
}
