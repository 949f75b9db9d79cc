//! A network namespace per test: its own loopback, its own kernel counters.

use std::fs::File;
use std::process::Command;

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A network namespace of the test's own (`ip netns add`, loopback up). Dropping it kills
/// every process still in it and deletes it, with its tc filters.
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Creates `handoff-<tag>-<pid>` with loopback up and a clsact qdisc on it.
    pub fn create(tag: &str) -> Netns {
        for tool in ["ip", "tc", "ss"] {
            assert!(
                Command::new(tool).arg("-V").output().is_ok(),
                "`{tool}` not found: these tests need iproute2 (apt-get install -y iproute2)"
            );
        }
        let name = format!("handoff-{tag}-{}", std::process::id());
        // Left by a killed run whose pid has come round again.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        run_ok(Command::new("tc").args(["-n", &ns.name, "qdisc", "add", "dev", "lo", "clsact"]));
        ns
    }

    /// Runs `f` on a thread inside the namespace: the sockets it makes and the processes it
    /// starts (handoffd, testsrv, ss, handoffctl) live there. A panic in `f` is passed on.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(format!("/run/netns/{}", self.name)).expect("the netns file");
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name(self.name.clone())
                .spawn_scoped(s, move || {
                    setns(&file, CloneFlags::CLONE_NEWNET).expect("entering the test's netns");
                    f()
                })
                .expect("starting the thread in the netns")
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs `tc -n NS ARGS`.
    pub fn tc(&self, args: &[&str]) {
        run_ok(Command::new("tc").args(["-n", &self.name]).args(args));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Everything the test started was killed by its guard already; this catches the rest.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            let own = std::process::id();
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .filter(|&p| p != own)
            {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `cmd`, panicking with its stderr unless it succeeds; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A kernel TCP counter (TcpExt) of the calling thread's network namespace.
pub fn tcp_ext(name: &str) -> u64 {
    // thread-self: /proc/self/net would show the main thread's namespace.
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").expect("reading netstat");
    let mut lines = text.lines();
    while let (Some(head), Some(values)) = (lines.next(), lines.next()) {
        if !head.starts_with("TcpExt:") {
            continue;
        }
        let names = head.split_whitespace().skip(1);
        let nums = values.split_whitespace().skip(1);
        if let Some((_, v)) = names.zip(nums).find(|(n, _)| *n == name) {
            return v.parse().expect("a counter");
        }
    }
    panic!("no TcpExt counter {name}");
}
