//! Children of the demo and the benchmarks: stopping them, reading their output with a
//! deadline, waits that end early on SIGINT or SIGTERM, and `handoffd --cleanup` after a
//! daemon.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

/// Poll interval while waiting for something.
pub const POLL: Duration = Duration::from_millis(20);

/// Waits until `status()` (a `handoffctl status` command) succeeds: handoffd answers on
/// its control socket. Fails when `daemon` exits first or after `timeout`; `hint` ends
/// the exit message (e.g. where the log is).
pub fn wait_answering(
    mut status: impl FnMut() -> std::process::Command,
    daemon: &mut Proc,
    timeout: Duration,
    hint: &str,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let answered = status()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .context("cannot run handoffctl")?
            .success();
        if answered {
            return Ok(());
        }
        if let Some(exit) = daemon.exit_status() {
            bail!("handoffd exited ({exit}) before it answered{hint}");
        }
        if Instant::now() >= deadline {
            bail!("handoffd did not answer `handoffctl status` within {timeout:?}");
        }
        pause_until(Instant::now() + POLL)?;
    }
}

/// Set by SIGINT or SIGTERM; every wait checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A started child.
pub struct Proc {
    /// For messages.
    pub name: String,
    /// The child; its pid is also its process group id.
    pub child: Child,
    /// Signal the whole process group (testsrv and its workers), not just the child.
    pub kill_group: bool,
}

impl Proc {
    /// The exit status, reaping the child if it has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the child to exit, at most until `deadline`.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<ExitStatus> {
        loop {
            if let Some(status) = self.exit_status() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit in time", self.name);
            }
            pause_until(Instant::now() + POLL)?;
        }
    }

    /// Sends `sig` to the child (if not yet reaped, so the pid is still ours) or its group.
    pub fn signal(&mut self, sig: Signal) {
        let pid = Pid::from_raw(self.child.id() as i32);
        if self.kill_group {
            let _ = signal::killpg(pid, sig);
        } else if self.exit_status().is_none() {
            let _ = signal::kill(pid, sig);
        }
    }
}

/// Runs `handoffd --cleanup` (binary in `bin`) on a stopped daemon's `state_dir`, for
/// `service` if given: its pins and state go. A failure is a warning: cleanup runs on drop.
pub fn cleanup_daemon(bin: &Path, state_dir: &Path, service: Option<&str>) {
    let mut cmd = Command::new(bin.join("handoffd"));
    cmd.arg("--cleanup").arg("--state-dir").arg(state_dir);
    if let Some(service) = service {
        cmd.args(["--service", service]);
    }
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "warning: handoffd --cleanup failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("warning: cannot run handoffd --cleanup: {e}"),
    }
}

/// Sends SIGTERM to every child, gives them `grace` to exit, then SIGKILLs and reaps all.
pub fn stop_all(procs: &mut [Proc], grace: Duration) {
    for proc in procs.iter_mut() {
        proc.signal(Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && procs.iter_mut().any(|p| p.exit_status().is_none()) {
        std::thread::sleep(POLL);
    }
    for proc in procs.iter_mut() {
        // Also for an exited testsrv: its workers may outlive it.
        proc.signal(Signal::SIGKILL);
        let _ = proc.child.wait();
    }
}

/// The stdout lines of a child, read by a thread so that waits can time out.
pub struct Lines(Receiver<String>);

impl Lines {
    /// Starts the reader; it drains the pipe to the end even after `self` is dropped.
    pub fn new(stdout: ChildStdout) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        Self(rx)
    }

    /// The next line, `None` at the end of the output, an error at `deadline`.
    pub fn next(&self, deadline: Instant, waiting_for: &str) -> Result<Option<String>> {
        loop {
            check_interrupted()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out waiting for {waiting_for}");
            }
            match self.0.recv_timeout(left.min(POLL * 5)) {
                Ok(line) => return Ok(Some(line)),
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

/// Sleeps until `deadline` in short steps; fails early on SIGINT or SIGTERM.
pub fn pause_until(deadline: Instant) -> Result<()> {
    loop {
        check_interrupted()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(POLL));
    }
}

/// Fails once SIGINT or SIGTERM has arrived.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Turns SIGINT and SIGTERM into [`INTERRUPTED`], so that the guard still cleans up.
pub fn catch_interrupts() -> Result<()> {
    extern "C" fn on_signal(_: nix::libc::c_int) {
        INTERRUPTED.store(true, Ordering::Relaxed);
    }
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { signal::sigaction(sig, &action) }
            .with_context(|| format!("cannot catch {sig}"))?;
    }
    Ok(())
}
