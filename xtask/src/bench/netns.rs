//! The benchmarks' network namespaces: created with loopback up, entered by children
//! between fork and exec (setns(2): the mount namespace stays the host's, so handoffd finds
//! the cgroup v2 root and bpffs) or by a thread of this process, and deleted with whatever
//! still runs in them.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Names of the benchmarks' network namespaces and services start with this, then the
/// bench's pid.
pub const NS_PREFIX: &str = "hbench-";
/// Where handoffd pins its maps, a directory per service.
const PINS: &str = "/sys/fs/bpf/handoff";

/// A network namespace of the benchmark's own, deleted (with anything left in it) on drop.
pub struct Netns {
    /// `hbench-<pid>-<label>`.
    name: String,
    /// `/run/netns/<name>`, for setns(2).
    file: File,
}

impl Netns {
    /// Creates the namespace with its loopback up.
    pub fn new(label: &str) -> Result<Self> {
        let name = format!("{NS_PREFIX}{}-{label}", std::process::id());
        ip(&["netns", "add", &name])?;
        let path = format!("/run/netns/{name}");
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                let _ = ip(&["netns", "del", &name]);
                return Err(e).with_context(|| format!("cannot open {path}"));
            }
        };
        let ns = Self { name, file };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Sets a (network namespace local) sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-q", "-w"])
            .arg(format!("{key}={value}"))
            .stdin(Stdio::null())
            .status()
            .context("cannot run ip netns exec sysctl")?;
        if !status.success() {
            bail!("sysctl {key}={value} in {} failed ({status})", self.name);
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace: sockets it creates live there (a thread's
    /// network namespace is its own; this process stays where it is).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(&self.file, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("cannot enter {}", self.name))?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|_| bail!("a thread in {} panicked", self.name))
        })
    }

    /// Makes `cmd` start inside the namespace. Spawn it while `self` lives.
    pub fn prepare(&self, cmd: &mut Command) {
        let fd = self.file.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // setns(2), which is async-signal-safe; `fd` is open in the parent (and so in the
        // child) for as long as `self` lives, and a closed one only makes setns fail.
        unsafe {
            cmd.pre_exec(move || {
                setns(BorrowedFd::borrow_raw(fd), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e:#}");
        }
    }
}

/// SIGKILLs whatever still runs in the namespace `name` (only this bench's children can).
fn kill_all_in(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Deletes namespaces and pinned maps left by an earlier bench that was killed (its pid is
/// gone), with whatever still runs in those namespaces.
pub fn remove_leftovers() {
    let namespaces = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    for name in namespaces
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        if stale(name) {
            eprintln!("removing network namespace {name}, left by a killed bench");
            kill_all_in(name);
            let _ = ip(&["netns", "del", name]);
        }
    }
    let Ok(pins) = std::fs::read_dir(PINS) else {
        return;
    };
    for entry in pins.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if stale(&name) {
            eprintln!("removing {PINS}/{name}, left by a killed bench");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether `name` is `hbench-<pid>-...` of a bench that no longer runs.
fn stale(name: &str) -> bool {
    name.strip_prefix(NS_PREFIX)
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !alive(pid))
}

/// Whether `pid` runs (a zombie, waiting to be reaped, does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    })
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_gone_benches_are_stale() {
        let me = std::process::id();
        assert!(!stale(&format!("{NS_PREFIX}{me}-scale")));
        // Above any pid_max.
        assert!(stale(&format!("{NS_PREFIX}999999999-scale")));
        assert!(!stale("handoff-mig-123-synrecv"));
        assert!(!stale(&format!("{NS_PREFIX}x-scale")));
    }
}
