//! Test programs and helpers for handoff's real-kernel integration tests.
//!
//! # Layout
//!
//! - [`server`]: `testsrv`, a stand-in service generation (answers `NAME PID`, optional
//!   nginx-like master and workers in three listener layouts).
//! - [`load`]: `loadgen`, the load client, also callable in-process ([`load::run`]), plus
//!   single-connection helpers ([`load::connect_once`], [`load::hold`]).
//! - `sys`: fork, signals, sockets, rlimit; the only module with `unsafe`.
//! - this file: the root check of every privileged test ([`privileged`]), finding the
//!   built binaries ([`bin_path`]), [`free_port`], [`Proc`], a child process guard
//!   that kills the child's whole process group when dropped, and the machine's
//!   [`slowdown`] (`HANDOFF_TEST_SLOWDOWN`) that scales loads and timeouts.
//! - `src/bin/{testsrv,loadgen}.rs`: thin binaries over [`server::run`] and [`load::try_run`].

pub mod load;
pub mod server;
mod sys;

/// What an intruder in a reuseport group can do (see `src/bin/intruder.rs`).
pub use sys::{
    attach_reuseport_cbpf, detach_reuseport, recv_with_credentials, reuseport_listener,
    setsockopt_oversized,
};

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// True when the privileged test `test` may run (as root). Otherwise it says loudly why it
/// skips, and with `HANDOFF_REQUIRE_PRIVILEGED=1` a skip is a failure.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let why = format!("{test}: SKIPPED, needs root (BPF, pidfd_getfd, probe ports < 1024)");
    assert!(
        std::env::var("HANDOFF_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
        "{why}, and HANDOFF_REQUIRE_PRIVILEGED=1 forbids skipping"
    );
    eprintln!("\n!!! {why}\n");
    false
}

/// How long [`Proc::spawn_testsrv`] waits for the `ready` line, on this machine (scaled by
/// [`slowdown`]).
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The environment variable giving [`slowdown`].
pub const SLOWDOWN_VAR: &str = "HANDOFF_TEST_SLOWDOWN";
/// The largest [`slowdown`] accepted.
pub const MAX_SLOWDOWN: u32 = 50;

/// How many times slower the machine running the tests is than the one their loads and
/// timeouts are sized for: `HANDOFF_TEST_SLOWDOWN`, an integer from 1 to 50, 1 when unset
/// (e.g. 8 under qemu's software emulation, where a CPU makes ~250 connections/s).
///
/// Only how hard and how long the tests push scales with it: timeouts and deadlines grow by
/// it ([`scaled`]), client counts and load durations shrink by it down to a floor
/// ([`scaled_down`], [`scaled_down_duration`]). What a test asserts (no failed connection,
/// which generation answers, when one retires) never depends on it.
///
/// # Panics
///
/// If the variable is set to anything else, naming it.
pub fn slowdown() -> u32 {
    static SLOWDOWN: OnceLock<u32> = OnceLock::new();
    *SLOWDOWN.get_or_init(|| {
        parse_slowdown(std::env::var_os(SLOWDOWN_VAR).as_deref()).unwrap_or_else(|e| panic!("{e}"))
    })
}

/// [`slowdown`] from the variable's value, if set.
fn parse_slowdown(value: Option<&std::ffi::OsStr>) -> Result<u32, String> {
    let Some(value) = value else { return Ok(1) };
    value
        .to_str()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| (1..=MAX_SLOWDOWN).contains(n))
        .ok_or_else(|| {
            format!(
                "{SLOWDOWN_VAR}={value:?} is not an integer from 1 to {MAX_SLOWDOWN} (how many times \
                 slower this machine is than the one the tests are sized for; unset means 1)"
            )
        })
}

/// A timeout or deadline sized for this machine, made [`slowdown`] times longer.
pub fn scaled(timeout: Duration) -> Duration {
    timeout * slowdown()
}

/// A client count (or any amount of load) sized for this machine, divided by [`slowdown`]
/// but not below `floor` (nor above `count`).
pub fn scaled_down<T>(count: T, floor: T) -> T
where
    T: Copy + Ord + std::ops::Div<Output = T> + From<u8>,
{
    let n = u8::try_from(slowdown()).unwrap_or(u8::MAX);
    (count / T::from(n)).max(floor).min(count)
}

/// A load duration sized for this machine, divided by [`slowdown`] but not below `floor`
/// (nor above `duration`).
pub fn scaled_down_duration(duration: Duration, floor: Duration) -> Duration {
    (duration / slowdown()).max(floor).min(duration)
}

/// Path of the workspace binary `name`, built into the same target directory as the running
/// test executable (`target/<profile>/deps/xxx` → `target/<profile>/NAME`).
///
/// # Panics
///
/// If the binary is missing, saying how to build it.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test executable");
    let mut dir = exe
        .parent()
        .expect("an executable lives in a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{name} not found at {}: build the workspace binaries first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// A TCP port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Raises the soft open file limit to the hard one (for tests holding many connections);
/// returns the new limit.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    sys::raise_nofile_limit()
}

/// A child process in its own process group. Dropping it SIGKILLs the group (so forked
/// workers die too) and reaps the child. Its stdout and stderr are captured line by line (and
/// echoed to the test's stderr).
pub struct Proc {
    child: Child,
    /// Pid of the child (for `testsrv`: the master).
    pub pid: u32,
    /// Worker pids from the `ready` line; empty for other programs or without workers.
    pub workers: Vec<u32>,
    /// Lines captured from stdout and stderr.
    output: Arc<Output>,
}

/// Captured output, appended by the reader threads.
#[derive(Default)]
struct Output {
    lines: Mutex<Lines>,
    /// Notified on every new line and when a stream closes.
    changed: Condvar,
}

#[derive(Default)]
struct Lines {
    stdout: Vec<String>,
    stderr: Vec<String>,
    /// Whether stdout and stderr reached EOF.
    closed: [bool; 2],
}

/// Which output stream of a [`Proc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout = 0,
    /// Standard error.
    Stderr = 1,
}

impl Output {
    fn lock(&self) -> MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Lines {
    fn of(&self, stream: Stream) -> &Vec<String> {
        match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        }
    }
}

impl Proc {
    /// Spawns `cmd` in a new process group with stdin closed and stdout/stderr captured.
    ///
    /// # Panics
    ///
    /// If the program cannot be started.
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let pid = child.id();
        let output = Arc::new(Output::default());
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        capture(stdout, Stream::Stdout, pid, Arc::clone(&output));
        capture(stderr, Stream::Stderr, pid, Arc::clone(&output));
        Proc {
            child,
            pid,
            workers: Vec::new(),
            output,
        }
    }

    /// Spawns `testsrv` with `args` and waits for its `ready` line.
    ///
    /// # Panics
    ///
    /// If no `ready` line comes within 10 s (times [`slowdown`]), showing what testsrv wrote
    /// on stderr.
    pub fn spawn_testsrv(args: &[&str]) -> Proc {
        let mut proc = Proc::spawn(Command::new(bin_path("testsrv")).args(args));
        let timeout = scaled(READY_TIMEOUT);
        let Some(line) = proc.wait_line(Stream::Stdout, "ready ", timeout) else {
            let status = proc.child.try_wait().ok().flatten();
            panic!(
                "testsrv {args:?} not ready within {timeout:?} (exit status: {status:?}); stderr:\n{}",
                proc.lines(Stream::Stderr).join("\n")
            );
        };
        let (pid, workers) =
            server::parse_ready(&line).unwrap_or_else(|| panic!("malformed ready line {line:?}"));
        assert_eq!(pid, proc.pid, "the ready line names the spawned process");
        proc.workers = workers;
        proc
    }

    /// The lines captured so far from `stream`.
    pub fn lines(&self, stream: Stream) -> Vec<String> {
        self.output.lock().of(stream).clone()
    }

    /// Waits for the first line of `stream` containing `needle`; `None` on timeout or when the
    /// stream closed without one. `timeout` is taken as given: a caller waiting for a line it
    /// expects passes a [`scaled`] one; one checking that a line does *not* come within a
    /// window need not.
    pub fn wait_line(&self, stream: Stream, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_lines(stream, needle, 1, timeout)
            .and_then(|mut v| v.pop())
    }

    /// Waits until `count` lines of `stream` contain `needle` and returns them.
    pub fn wait_lines(
        &self,
        stream: Stream,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Option<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.output.lock();
        loop {
            let found: Vec<String> = lines
                .of(stream)
                .iter()
                .filter(|l| l.contains(needle))
                .take(count)
                .cloned()
                .collect();
            if found.len() == count {
                return Some(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || lines.closed[stream as usize] {
                return None;
            }
            lines = self
                .output
                .changed
                .wait_timeout(lines, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until `stream` reached its end (every process holding it, the child and what it
    /// forked, closed it or exited) and every line of it was captured; `false` on timeout.
    /// After the child exited, this is what makes its last lines certain to be in
    /// [`Proc::lines`]: they are read by another thread.
    pub fn wait_closed(&self, stream: Stream, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut lines = self.output.lock();
        loop {
            if lines.closed[stream as usize] {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            lines = self
                .output
                .changed
                .wait_timeout(lines, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Sends `signal` to the child itself (not its group).
    ///
    /// # Panics
    ///
    /// If the child no longer exists.
    pub fn signal(&self, signal: Signal) {
        kill(pid_of(self.pid), signal)
            .unwrap_or_else(|e| panic!("kill {} {signal}: {e}", self.pid));
    }

    /// Waits up to `timeout` for the child to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The group outlives an exited leader while a member lives, so workers die here too.
        let _ = killpg(pid_of(self.pid), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"))
}

/// Reads `pipe` line by line into `output` on a background thread, echoing every line.
fn capture(pipe: impl Read + Send + 'static, stream: Stream, pid: u32, output: Arc<Output>) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{pid} {stream:?}] {line}");
            let mut lines = output.lock();
            match stream {
                Stream::Stdout => lines.stdout.push(line),
                Stream::Stderr => lines.stderr.push(line),
            }
            output.changed.notify_all();
        }
        output.lock().closed[stream as usize] = true;
        output.changed.notify_all();
    });
}

/// A directory of one test's own, `$TMPDIR/handoff-test-NAME-PID`: emptied when made,
/// removed when dropped, whether the test passed or failed.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Makes (or empties) the directory for `name`.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("handoff-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test's directory");
        Self(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod slowdown_tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn slowdown_accepts_1_to_50_and_nothing_else() {
        assert_eq!(parse_slowdown(None), Ok(1));
        assert_eq!(parse_slowdown(Some(OsStr::new("1"))), Ok(1));
        assert_eq!(parse_slowdown(Some(OsStr::new("8"))), Ok(8));
        assert_eq!(parse_slowdown(Some(OsStr::new("50"))), Ok(50));
        for bad in ["", "0", "51", "-1", "8.5", " 8", "eight", "99999999999"] {
            let err = parse_slowdown(Some(OsStr::new(bad))).expect_err(bad);
            assert!(
                err.starts_with("HANDOFF_TEST_SLOWDOWN=") && err.contains("1 to 50"),
                "{err}"
            );
        }
    }

    #[test]
    fn scaling_follows_the_slowdown() {
        // The test binary's own setting (1 unless the runner sets it).
        let n = slowdown();
        assert_eq!(scaled(Duration::from_secs(2)), Duration::from_secs(2) * n);
        assert_eq!(scaled_down(256u32, 32), (256 / n).max(32));
        assert_eq!(scaled_down(16usize, 32), 16, "never above the count");
        assert_eq!(
            scaled_down_duration(Duration::from_secs(10), Duration::from_secs(3)),
            (Duration::from_secs(10) / n).max(Duration::from_secs(3))
        );
    }
}
