//! `cargo xtask demo`: a handoff under load, on loopback, with the workspace binaries.
//!
//! handoffd steers `127.0.0.1:PORT`; generation A (a two-worker `testsrv`) is promoted;
//! `loadgen` runs for the whole demo; a third of the way in generation B starts, two
//! thirds in it is promoted. The summary counts the connections each generation
//! answered and every failed connection: a correct handoff has none.
//!
//! Every child gets its own process group so that a Ctrl-C on the terminal reaches only
//! this process, which then stops the children in order. A [`Demo`] guard stops them on
//! every path, runs `handoffd --cleanup` and removes the temporary directory.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::children::{
    Lines, Proc, catch_interrupts, cleanup_daemon, pause_until, stop_all, wait_answering,
};
use crate::{TempDir, cargo, run_checked};

/// How long a child may take to become ready (handoffd to answer, testsrv to listen).
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the children get between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long loadgen may overrun its duration before the demo gives up on it.
const LOADGEN_SLACK: Duration = Duration::from_secs(30);

/// Runs the demo; `Ok(false)` when a step or a connection failed (already reported).
pub fn run(root: &Path, seconds: u64, concurrency: u32) -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo needs root (BPF and pidfd_getfd): run it with sudo");
    }
    catch_interrupts()?;
    println!("building the workspace binaries");
    run_checked(
        cargo(root).args(["build", "--workspace", "--bins"]),
        "cargo build --workspace --bins",
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), |t| root.join(t));
    let mut demo = Demo::new(target.join("debug"))?;
    // Report a failed step before the guard's cleanup output, not after it.
    let passed = demo
        .run(Duration::from_secs(seconds), concurrency)
        .unwrap_or_else(|e| {
            eprintln!("demo: FAILED: {e:#}");
            false
        });
    demo.show_logs = !passed;
    Ok(passed)
}

/// One demo run: its children and temporary directory, released on drop.
struct Demo {
    /// Where handoffd, handoffctl, testsrv and loadgen are.
    bin: PathBuf,
    /// The service name: `demo<pid of this process>`.
    service: String,
    /// The steered address, `127.0.0.1:PORT`.
    addr: String,
    /// Every child started so far, in start order.
    procs: Vec<Proc>,
    /// Print the tails of the children's logs on drop (set when the demo did not pass).
    show_logs: bool,
    /// State dir, control socket and logs; declared last so it is removed last.
    dir: TempDir,
}

impl Demo {
    /// Picks a free loopback port and creates the temporary directory.
    fn new(bin: PathBuf) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free loopback port")?
            .port();
        Ok(Self {
            bin,
            service: format!("demo{}", std::process::id()),
            addr: format!("127.0.0.1:{port}"),
            procs: Vec::new(),
            show_logs: false,
            dir: TempDir::new("demo")?,
        })
    }

    /// The demo's steps; `Ok(false)` when connections failed.
    fn run(&mut self, duration: Duration, concurrency: u32) -> Result<bool> {
        self.start_handoffd()?;
        let a = self.start_generation("A")?;
        let promote_a = self.promote("A", a)?;

        println!(
            "load: {concurrency} connections for {} s",
            duration.as_secs()
        );
        let start = Instant::now();
        let loadgen = self.start_loadgen(duration, concurrency)?;

        pause_until(start + duration / 3)?;
        let b = self.start_generation("B")?;
        pause_until(start + duration * 2 / 3)?;
        let promote_b = self.promote("B", b)?;

        let status = self
            .ctl(&["status"])
            .output()
            .context("cannot run handoffctl status")?;
        if !status.status.success() {
            bail!(
                "handoffctl status failed: {}",
                String::from_utf8_lossy(&status.stderr).trim()
            );
        }
        print!("{}", String::from_utf8_lossy(&status.stdout));

        println!("waiting for the load to finish");
        let report = self.finish_loadgen(loadgen, start + duration + LOADGEN_SLACK)?;
        summarise(&report, &[("A", promote_a), ("B", promote_b)])
    }

    /// Starts handoffd and waits until `handoffctl status` answers.
    fn start_handoffd(&mut self) -> Result<()> {
        println!("starting handoffd on {}", self.addr);
        let log = self.log("handoffd")?;
        let mut cmd = Command::new(self.bin.join("handoffd"));
        cmd.args(["--listen", &self.addr, "--service", &self.service])
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--control-socket")
            .arg(self.control_socket())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.spawn("handoffd", cmd, false)?;
        let ctl = self.bin.join("handoffctl");
        let socket = self.control_socket();
        let status = || {
            let mut cmd = Command::new(&ctl);
            cmd.arg("--control-socket").arg(&socket).arg("status");
            cmd
        };
        wait_answering(status, &mut self.procs[0], READY_TIMEOUT, "")
    }

    /// Starts generation `name` (testsrv, two workers) and returns its pid once ready.
    fn start_generation(&mut self, name: &str) -> Result<u32> {
        let mut cmd = Command::new(self.bin.join("testsrv"));
        cmd.args(["--name", name, "--listen", &self.addr])
            .args(["--workers", "2", "--mode", "per-worker"])
            .stdout(Stdio::piped())
            .stderr(self.log(&format!("testsrv-{name}"))?);
        let stdout = self
            .spawn(&format!("testsrv {name}"), cmd, true)?
            .context("no stdout pipe")?;
        let lines = Lines::new(stdout);
        let deadline = Instant::now() + READY_TIMEOUT;
        while let Some(line) = lines.next(deadline, &format!("testsrv {name} to be ready"))? {
            if let Some(ready) = line.strip_prefix("ready ") {
                let (pid, workers) = parse_ready(ready)
                    .with_context(|| format!("testsrv {name}: bad ready line {line:?}"))?;
                println!("generation {name} ready: pid {pid}, workers {workers}");
                return Ok(pid);
            }
        }
        bail!("testsrv {name} closed its output before it was ready")
    }

    /// `handoffctl promote PID`; returns how long the call took.
    fn promote(&self, name: &str, pid: u32) -> Result<Duration> {
        let started = Instant::now();
        let out = self
            .ctl(&["promote", &pid.to_string()])
            .output()
            .context("cannot run handoffctl promote")?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "promote {name} (pid {pid}) failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        println!("promote {name}: {:.1} ms", millis(took));
        Ok(took)
    }

    /// Starts loadgen in the background; returns its stdout lines.
    fn start_loadgen(&mut self, duration: Duration, concurrency: u32) -> Result<Lines> {
        let mut cmd = Command::new(self.bin.join("loadgen"));
        cmd.args(["--connect", &self.addr])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--duration-ms", &duration.as_millis().to_string()])
            .stdout(Stdio::piped())
            .stderr(self.log("loadgen")?);
        let stdout = self
            .spawn("loadgen", cmd, false)?
            .context("no stdout pipe")?;
        Ok(Lines::new(stdout))
    }

    /// Reads loadgen's JSON report to the end of its output and reaps it.
    fn finish_loadgen(&mut self, lines: Lines, deadline: Instant) -> Result<Value> {
        let mut output = String::new();
        while let Some(line) = lines.next(deadline, "loadgen to finish")? {
            output.push_str(&line);
            output.push('\n');
        }
        let proc = self
            .procs
            .iter_mut()
            .find(|p| p.name == "loadgen")
            .context("no loadgen")?;
        let status = proc.wait_until(deadline)?;
        match serde_json::from_str(&output) {
            Ok(report) => {
                if !status.success() {
                    println!("note: loadgen exited with {status}");
                }
                Ok(report)
            }
            Err(e) => bail!(
                "loadgen ({status}) printed no report: {e}: {:?}",
                output.trim()
            ),
        }
    }

    /// Spawns `cmd` in a process group of its own and keeps it for the cleanup.
    /// Returns the child's stdout if it was piped.
    fn spawn(
        &mut self,
        name: &str,
        mut cmd: Command,
        kill_group: bool,
    ) -> Result<Option<ChildStdout>> {
        cmd.stdin(Stdio::null()).process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", Path::new(cmd.get_program()).display()))?;
        let stdout = child.stdout.take();
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            kill_group,
        });
        Ok(stdout)
    }

    /// A handoffctl command talking to this demo's daemon.
    fn ctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin.join("handoffctl"));
        cmd.arg("--control-socket")
            .arg(self.control_socket())
            .args(args);
        cmd
    }

    /// Creates `DIR/<name>.log` for a child's output.
    fn log(&self, name: &str) -> Result<File> {
        let path = self.dir.path().join(format!("{name}.log"));
        File::create(&path).with_context(|| format!("cannot create {}", path.display()))
    }

    /// handoffd's state directory.
    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// handoffd's control socket.
    fn control_socket(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        stop_all(&mut self.procs, STOP_GRACE);
        cleanup_daemon(&self.bin, &self.state_dir(), Some(&self.service));
        if self.show_logs {
            print_log_tails(self.dir.path());
        }
        println!("cleaned up: {} processes stopped", self.procs.len());
    }
}

/// Parses `pid=PID workers=P1,P2` (the rest of testsrv's ready line).
fn parse_ready(rest: &str) -> Option<(u32, &str)> {
    let mut pid = None;
    let mut workers = None;
    for field in rest.split_whitespace() {
        if let Some(v) = field.strip_prefix("pid=") {
            pid = v.parse().ok();
        } else if let Some(v) = field.strip_prefix("workers=") {
            workers = Some(v);
        }
    }
    Some((pid?, workers?))
}

/// Prints the loadgen report; `Ok(true)` when no connection failed.
fn summarise(report: &Value, promotes: &[(&str, Duration)]) -> Result<bool> {
    let count = |v: &Value| {
        v.as_u64()
            .context("loadgen report: a count is not a number")
    };
    let attempts = count(&report["attempts"])?;
    let ok = count(&report["ok"])?;
    println!(
        "loadgen: {attempts} connections, {ok} answered, in {} ms (max latency {} ms)",
        report["elapsed_ms"], report["max_latency_ms"]
    );
    let by_name = report["by_name"]
        .as_object()
        .context("loadgen report: no by_name")?;
    let per_gen: Vec<String> = by_name
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    println!("connections per generation: {}", per_gen.join(", "));
    let failures = report["failures"]
        .as_object()
        .context("loadgen report: no failures")?;
    let mut failed = 0;
    let mut kinds = Vec::new();
    for (kind, n) in failures {
        failed += count(n)?;
        kinds.push(format!("{kind} {n}"));
    }
    println!("failures: {}", kinds.join(", "));
    // An attempt that is neither answered nor counted as a failure kind still failed.
    let failed = failed.max(attempts.saturating_sub(ok));
    let latencies: Vec<String> = promotes
        .iter()
        .map(|(name, took)| format!("{name} {:.1} ms", millis(*took)))
        .collect();
    println!("promote latency: {}", latencies.join(", "));
    if by_name.get("B").and_then(Value::as_u64).unwrap_or(0) == 0 {
        println!("note: generation B answered no connection");
    }
    if failed == 0 {
        println!("demo: OK, 0 failed connections");
        Ok(true)
    } else {
        println!("demo: FAILED, {failed} failed connections");
        Ok(false)
    }
}

/// Prints the last lines of every `*.log` in `dir` to stderr.
fn print_log_tails(dir: &Path) {
    const TAIL: usize = 20;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for path in logs {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            continue;
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        eprintln!("--- {name} (last {} lines) ---", lines.len().min(TAIL));
        for line in &lines[lines.len().saturating_sub(TAIL)..] {
            eprintln!("{line}");
        }
    }
}

/// Milliseconds, fractional.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
