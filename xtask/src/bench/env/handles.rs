//! Handles on a running handoffd ([`Daemon`]: its control socket and its log) and a
//! running testsrv ([`Server`]: its stderr lines).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Captured, field};

/// A running handoffd.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Its pid (for `/proc` and BPF statistics).
    pub pid: u32,
    /// Its control socket.
    pub(super) socket: PathBuf,
    /// The handoffctl binary.
    pub(super) ctl: PathBuf,
    /// Its log (JSON lines).
    pub(super) log: PathBuf,
}

impl Daemon {
    /// A handoffctl command talking to this daemon.
    pub fn ctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.ctl);
        cmd.arg("--control-socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// `handoffctl promote PID [--service NAME]`; returns how long the call took, from its
    /// start to its exit (it returns once the probe saw the kernel steer to `pid`).
    pub fn promote(&self, pid: u32, service: Option<&str>) -> Result<Duration> {
        match service {
            Some(service) => self.promote_with(pid, &["--service", service]),
            None => self.promote_with(pid, &[]),
        }
    }

    /// `handoffctl promote PID OPTIONS` (e.g. `--watch 60s`, `--weight 10`); returns how
    /// long the call took.
    pub fn promote_with(&self, pid: u32, options: &[&str]) -> Result<Duration> {
        let pid = pid.to_string();
        let mut args = vec!["promote", pid.as_str()];
        args.extend(options);
        let (took, out) = self.timed(&args)?;
        if !out.status.success() {
            bail!(
                "promote {pid} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(took)
    }

    /// Runs `handoffctl ARGS`; returns how long it took, from its start to its exit, and
    /// what it printed.
    fn timed(&self, args: &[&str]) -> Result<(Duration, std::process::Output)> {
        let mut cmd = self.ctl(args);
        let started = Instant::now();
        let out = cmd
            .output()
            .with_context(|| format!("cannot run handoffctl {}", args.join(" ")))?;
        Ok((started.elapsed(), out))
    }

    /// Runs `handoffctl ARGS` and fails, with its stderr, unless it succeeds.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<()> {
        let (_, out) = self.timed(args)?;
        if !out.status.success() {
            bail!(
                "handoffctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Its log file (JSON lines).
    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    /// The fields of every event with `message` in the daemon's log so far.
    pub fn events(&self, message: &str) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(&self.log)
            .with_context(|| format!("cannot read {}", self.log.display()))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|mut v| v["fields"].take())
            .filter(|f| f["message"] == message)
            .collect())
    }

    /// The daemon's own measure of a drain start: its `drain counted` event for the
    /// generation led by `pid`, once logged: (the first tag pass's wall time in ms, the
    /// connections it counted).
    pub fn drain_counted(&self, pid: u32, deadline: Instant) -> Result<(f64, u64)> {
        loop {
            let found = self
                .events("drain counted")?
                .into_iter()
                .find(|f| f["pid"].as_u64() == Some(u64::from(pid)));
            if let Some(f) = found {
                let took = f["took_ms"]
                    .as_f64()
                    .context("drain counted without took_ms")?;
                let n = f["connections"]
                    .as_u64()
                    .context("drain counted without connections")?;
                return Ok((took, n));
            }
            if Instant::now() >= deadline {
                bail!(
                    "handoffd logged no drain count for pid {pid} in {}",
                    self.log.display()
                );
            }
            crate::children::pause_until(Instant::now() + Duration::from_millis(5))?;
        }
    }

    /// `handoffctl promote PID` of the active generation's pid, which the daemon refuses at
    /// once; returns how long the call took.
    pub fn refused_promote(&self, pid: u32) -> Result<Duration> {
        let pid = pid.to_string();
        let (took, out) = self.timed(&["promote", &pid])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains("already the active generation") {
            bail!(
                "promote {pid} again was not refused as already active: {}",
                stderr.trim()
            );
        }
        Ok(took)
    }

    /// `handoffctl status --json`.
    pub fn status(&self) -> Result<Value> {
        let out = self
            .ctl(&["status", "--json"])
            .output()
            .context("cannot run handoffctl status")?;
        if !out.status.success() {
            bail!(
                "handoffctl status failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("handoffctl status --json: not JSON")
    }

    /// The `connections` of the generation led by `pid`, from `status --json`.
    pub fn connections(&self, pid: u32) -> Result<u64> {
        let status = self.status()?;
        status["services"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["generations"].as_array().into_iter().flatten())
            .find(|g| g["pid"].as_u64() == Some(u64::from(pid)))
            .and_then(|g| g["connections"].as_u64())
            .with_context(|| format!("no generation of pid {pid} in status: {status}"))
    }
}

/// A running testsrv.
pub struct Server {
    /// `--name`.
    pub name: String,
    /// The master (or only) process.
    pub pid: u32,
    /// Its workers, from the ready line.
    pub workers: Vec<u32>,
    /// Its stderr lines (`term`, `close`, `closed`, ...).
    pub stderr: Captured,
}

impl Server {
    /// Waits for a stderr line starting with `prefix`.
    pub fn wait_line(&self, prefix: &str, deadline: Instant) -> Result<String> {
        self.stderr.wait(
            &format!("{prefix:?} from testsrv {}", self.name),
            deadline,
            |l| l.starts_with(prefix),
        )
    }

    /// The `term` line of the master: when the retire signal arrived (CLOCK_MONOTONIC ns).
    pub fn wait_term(&self, deadline: Instant) -> Result<u64> {
        let line = self.wait_line(&format!("term {} pid={} ", self.name, self.pid), deadline)?;
        field(&line, "ns=").with_context(|| format!("no ns= in {line:?}"))
    }
}
