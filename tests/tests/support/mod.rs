//! What every real-kernel test needs: the root check, a handoffd of its own, handoffctl.
#![allow(dead_code)] // each test file uses a different part of this module

pub mod netns;
pub mod release;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use handoff_common::proto::{GenerationState, GenerationStatus, ServiceStatus, Status};
use handoff_tests::{Proc, bin_path, free_port, load, scaled};

pub use handoff_tests::privileged;

/// A handoffd of this test alone: its own service name, state dir and control socket.
/// Dropping it kills it and removes its state.
pub struct Handoffd {
    proc: Option<Proc>,
    /// The service's name.
    pub service: String,
    /// The control socket.
    pub socket: PathBuf,
    state: PathBuf,
    dir: PathBuf,
    /// Extra environment of the daemon process.
    pub env: Vec<(String, String)>,
}

impl Handoffd {
    /// Starts handoffd for `listen` and waits (up to 10 s, times the slowdown) until it
    /// answers `status`.
    pub fn start(name: &str, listen: &[SocketAddr]) -> Self {
        Self::start_with(name, listen, &[])
    }

    /// As [`Handoffd::start`], with extra arguments.
    pub fn start_with(name: &str, listen: &[SocketAddr], extra: &[&str]) -> Self {
        let mut d = Self::new(name);
        d.spawn(listen, extra);
        d
    }

    /// The guard of a daemon not started yet: its name, paths and environment.
    pub fn new(name: &str) -> Self {
        let service = format!("{name}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("handoff-test-{service}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test's temp dir");
        let state = dir.join("state");
        let socket = dir.join("ctl.sock");
        Self {
            proc: None,
            service,
            socket,
            state,
            dir,
            env: Vec::new(),
        }
    }

    /// (Re)starts the daemon process.
    pub fn spawn(&mut self, listen: &[SocketAddr], extra: &[&str]) {
        let mut cmd = Command::new(bin_path("handoffd"));
        for a in listen {
            cmd.arg("--listen").arg(a.to_string());
        }
        // With no --listen the test passes a --config naming its services.
        if !listen.is_empty() {
            cmd.args(["--service", &self.service]);
        }
        cmd.arg("--state-dir")
            .arg(&self.state)
            .arg("--control-socket")
            .arg(&self.socket)
            .args(extra)
            .env("RUST_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        // Tests run many daemons at once: no metrics endpoint unless the test asks.
        if !extra.iter().any(|a| a.starts_with("--metrics-addr")) {
            cmd.args(["--metrics-addr", "off"]);
        }
        self.proc = Some(Proc::spawn(&mut cmd));
        let timeout = scaled(Duration::from_secs(10));
        let deadline = Instant::now() + timeout;
        while !self.ctl(&["status"]).status.success() {
            if let Some(status) = self.proc().wait_exit(Duration::ZERO) {
                panic!("handoffd exited at start ({status})");
            }
            assert!(
                Instant::now() < deadline,
                "handoffd did not answer status within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // `cargo xtask test` runs the drain tests again with the whole-host fallback
        // forced: make sure the daemon really took that path.
        let forced = |v: &str| !v.is_empty() && v != "0";
        let inherited = std::env::var("HANDOFF_FORCE_WHOLE_HOST").is_ok_and(|v| forced(&v));
        let own = self
            .env
            .iter()
            .any(|(k, v)| k == "HANDOFF_FORCE_WHOLE_HOST" && forced(v));
        if inherited || own {
            let kernel = self.status().kernel.expect("status has a kernel section");
            assert_eq!(
                kernel.tag_pass,
                handoff_common::proto::TagPass::WholeHost,
                "HANDOFF_FORCE_WHOLE_HOST is set, but handoffd does not walk the whole host"
            );
        }
    }

    /// Kills the daemon with SIGKILL, as a crash would, and waits (up to 5 s, scaled) until it is
    /// gone: what it left in the kernel and the state directory stays.
    pub fn crash(&mut self) {
        self.proc().signal(nix::sys::signal::Signal::SIGKILL);
        self.proc()
            .wait_exit(scaled(Duration::from_secs(5)))
            .expect("handoffd died");
    }

    /// The daemon process.
    pub fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("handoffd is running")
    }

    /// Runs handoffctl against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.socket, args)
    }

    /// Promotes `pid`; panics with handoffctl's message if refused.
    pub fn promote(&self, pid: u32) {
        let out = self.ctl(&["promote", &pid.to_string()]);
        assert!(
            out.status.success(),
            "promote {pid} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Promotes `pid` expecting a refusal; returns the error line.
    pub fn refused(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "handoffctl {args:?} succeeded; expected a refusal"
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "handoffctl {args:?}: exit status {:?}, stderr {stderr}",
            out.status
        );
        assert_eq!(
            stderr.lines().count(),
            1,
            "handoffctl {args:?}: expected one error line, got {stderr:?}"
        );
        stderr
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> Status {
        let out = self.ctl(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json is the documented shape")
    }

    /// The one service's status.
    pub fn service(&self) -> ServiceStatus {
        let mut s = self.status();
        assert_eq!(s.services.len(), 1);
        s.services.remove(0)
    }

    /// The generation of the one service whose promoted pid is `pid`, if listed.
    pub fn generation_of(&self, pid: u32) -> Option<GenerationStatus> {
        self.service()
            .generations
            .into_iter()
            .find(|g| g.pid as u32 == pid)
    }

    /// The state of the generation of `pid`.
    pub fn state_of(&self, pid: u32) -> Option<GenerationState> {
        self.generation_of(pid).map(|g| g.state)
    }

    /// What a refused request must leave as it was: every service, its addresses, and its
    /// generations' ids, pids, states and listeners (the counters move with probes and
    /// traffic, so they are left out).
    pub fn shape(&self) -> Vec<ServiceShape> {
        self.status()
            .services
            .into_iter()
            .map(|s| {
                let gens = s
                    .generations
                    .iter()
                    .map(|g| (g.id, g.pid, g.state.as_str(), g.listeners))
                    .collect();
                (s.name, s.listen, gens)
            })
            .collect()
    }
}

/// A service as [`Handoffd::shape`] sees it: name, addresses, and per generation its id,
/// pid, state and listeners.
pub type ServiceShape = (String, Vec<String>, Vec<(u64, i32, &'static str, usize)>);

impl Drop for Handoffd {
    fn drop(&mut self) {
        drop(self.proc.take());
        let _ = Command::new(bin_path("handoffd"))
            // Every service of this test's state dir (a --config may name several).
            .arg("--cleanup")
            .arg("--state-dir")
            .arg(&self.state)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs handoffctl with `--control-socket socket`.
pub fn ctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin_path("handoffctl"))
        .arg("--control-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("running handoffctl")
}

/// A loopback address on a free port.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Starts a test server generation.
pub fn testsrv(name: &str, listen: &[SocketAddr], extra: &[&str]) -> Proc {
    let mut args = vec!["--name".to_string(), name.to_string()];
    for a in listen {
        args.extend(["--listen".to_string(), a.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn_testsrv(&args)
}

/// Makes `n` sequential connections to `addr` and counts the answers per generation name
/// (failures under `!kind`).
pub fn answers(addr: SocketAddr, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for _ in 0..n {
        let key = match load::connect_once(addr, scaled(Duration::from_secs(2))) {
            Ok((name, _)) => name,
            Err(kind) => format!("!{}", kind.as_str()),
        };
        *out.entry(key).or_default() += 1;
    }
    out
}

/// Makes `n` sequential connections and counts the answers per answering pid.
pub fn answers_by_pid(addr: SocketAddr, n: usize) -> std::collections::BTreeMap<u32, usize> {
    let mut out = std::collections::BTreeMap::new();
    for _ in 0..n {
        let (_, pid) =
            load::connect_once(addr, scaled(Duration::from_secs(2))).expect("connection answered");
        *out.entry(pid).or_default() += 1;
    }
    out
}

/// `{name: n}` as the map [`answers`] returns.
pub fn only(name: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    std::collections::BTreeMap::from([(name.to_string(), n)])
}

/// Polls `f` every 10 ms until it is true; panics naming `what` after `timeout`, which is
/// sized for this machine and made [`handoff_tests::slowdown`] times longer here.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let timeout = scaled(timeout);
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is running (not exited, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// SIGKILLs worker `victim` of testsrv master `m` (started with `--respawn`) and returns
/// the pid of the worker it forks in its place (its `old=VICTIM new=PID` line).
pub fn respawned(m: &handoff_tests::Proc, victim: u32) -> u32 {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("killing a worker");
    let line = m
        .wait_line(
            handoff_tests::Stream::Stderr,
            &format!("old={victim}"),
            scaled(Duration::from_secs(5)),
        )
        .expect("the master respawns its worker");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("new="))
        .and_then(|p| p.parse().ok())
        .expect("the new worker's pid")
}
