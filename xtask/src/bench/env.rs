//! Where the benchmarks run: a network namespace per benchmark ([`Netns`]), children
//! started in it and always stopped, and handles on handoffd, testsrv and loadgen.
//!
//! Every child runs in the benchmark's network namespace and in a process group of its own,
//! so a Ctrl-C reaches only this process. An [`Env`] stops its children, runs `handoffd --cleanup` for its daemons and
//! deletes its namespace when dropped, on every path.

mod handles;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;

pub use self::handles::{Daemon, Server};
pub use super::netns::{Netns, remove_leftovers};
use super::output::parse_ready;
pub use super::output::{Captured, LoadReport, field};
use crate::TempDir;
use crate::children::{
    Proc, check_interrupted, cleanup_daemon, pause_until, stop_all, wait_answering,
};

/// How long handoffd and testsrv may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long children get between SIGTERM and SIGKILL at the end.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Ephemeral ports inside a namespace: wide, and above every service port the benches use.
const PORT_RANGE: &str = "10000 65000";

/// What every benchmark gets.
pub struct Ctx {
    /// handoffd, handoffctl, testsrv and loadgen (release; debug with `--quick`).
    pub bin: PathBuf,
    /// This executable: its hidden `bench-hold` task is the scale benchmark's client.
    pub xtask: PathBuf,
    /// `--quick`: every benchmark once and briefly; numbers, no verdicts.
    pub quick: bool,
    /// Logs and config files of the run, removed at the end.
    pub tmp: TempDir,
    /// The daemons' state directories, on tmpfs when the host has `/dev/shm`: handoffd's
    /// default, `/run/handoff`, is on tmpfs under systemd, where a state write is a page
    /// cache copy and not a file system journal entry.
    pub state: TempDir,
}

impl Ctx {
    /// `full` in a full run, `quick` with `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}

/// One benchmark's namespace, children and daemons, all released on drop.
pub struct Env<'a> {
    /// The run's settings and binaries.
    pub ctx: &'a Ctx,
    /// Logs, state directories and config files of this environment.
    dir: PathBuf,
    /// Every child not known to be gone with its whole process group.
    procs: Vec<Proc>,
    /// State directories (and the service) of the daemons, for `handoffd --cleanup`.
    daemons: Vec<(PathBuf, Option<String>)>,
    /// Distinguishes log files and state directories.
    seq: u32,
    /// The namespace; declared last so that it is deleted after the children stopped.
    pub ns: Netns,
}

impl<'a> Env<'a> {
    /// A fresh namespace with loopback up and a wide ephemeral port range.
    pub fn new(ctx: &'a Ctx, label: &str) -> Result<Self> {
        let dir = ctx.tmp.path().join(label);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let ns = Netns::new(label)?;
        ns.sysctl("net.ipv4.ip_local_port_range", PORT_RANGE)?;
        Ok(Self {
            ctx,
            dir,
            procs: Vec::new(),
            daemons: Vec::new(),
            seq: 0,
            ns,
        })
    }

    /// A new file `DIR/<name>-<n>.<ext>`.
    pub fn file(&mut self, name: &str, ext: &str) -> Result<(PathBuf, File)> {
        self.seq += 1;
        let path = self.dir.join(format!("{name}-{}.{ext}", self.seq));
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok((path, file))
    }

    /// Spawns `cmd` in the namespace and a process group of its own; returns its pid.
    pub fn spawn(&mut self, name: &str, cmd: Command, kill_group: bool) -> Result<u32> {
        Ok(self.spawn_piped(name, cmd, kill_group, None)?.0)
    }

    /// [`Env::spawn`] with stdout piped and captured.
    pub fn spawn_captured(&mut self, name: &str, mut cmd: Command) -> Result<(u32, Captured)> {
        cmd.stdout(Stdio::piped());
        let (pid, out, _) = self.spawn_piped(name, cmd, false, None)?;
        Ok((pid, out.context("no stdout")?))
    }

    /// Spawns `cmd`; captures stdout if piped, and stderr into `stderr_log` if given.
    fn spawn_piped(
        &mut self,
        name: &str,
        mut cmd: Command,
        kill_group: bool,
        stderr_log: Option<File>,
    ) -> Result<(u32, Option<Captured>, Option<Captured>)> {
        check_interrupted()?;
        if stderr_log.is_some() {
            cmd.stderr(Stdio::piped());
        }
        self.ns.prepare(&mut cmd);
        cmd.process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", Path::new(cmd.get_program()).display()))?;
        let pid = child.id();
        let out = child.stdout.take().map(|p| Captured::start(p, None));
        let err = match (child.stderr.take(), stderr_log) {
            (Some(pipe), Some(log)) => Some(Captured::start(pipe, Some(log))),
            _ => None,
        };
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            kill_group,
        });
        Ok((pid, out, err))
    }

    /// Spawns `cmd` as `uid`:`gid` (no supplementary groups) in the namespace and a process
    /// group of its own, stdout captured, stderr to a log file; returns its pid, its stdout
    /// and its stdin. setns(2) needs privilege, which the child has dropped before a
    /// `pre_exec` hook runs, so it is forked from a thread that entered the namespace: a
    /// child starts in its parent thread's namespaces.
    pub fn spawn_as(
        &mut self,
        name: &str,
        mut cmd: Command,
        uid: u32,
        gid: u32,
    ) -> Result<(u32, Captured, ChildStdin)> {
        check_interrupted()?;
        let (_, log) = self.file(name, "log")?;
        cmd.uid(uid)
            .gid(gid)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        let program = Path::new(cmd.get_program()).display().to_string();
        let mut child = self
            .ns
            .enter(|| cmd.spawn())?
            .with_context(|| format!("cannot start {program} as uid {uid}"))?;
        let pid = child.id();
        let out = child.stdout.take().map(|p| Captured::start(p, None));
        let stdin = child.stdin.take();
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            kill_group: false,
        });
        Ok((pid, out.context("no stdout")?, stdin.context("no stdin")?))
    }

    fn proc(&mut self, pid: u32) -> Result<&mut Proc> {
        self.procs
            .iter_mut()
            .find(|p| p.child.id() == pid)
            .with_context(|| format!("pid {pid} is no child of this bench"))
    }

    /// Sends `sig` to the child `pid` alone (not its group), if it has not exited.
    pub fn kill(&mut self, pid: u32, sig: Signal) -> Result<()> {
        let proc = self.proc(pid)?;
        if proc.exit_status().is_none() {
            kill(Pid::from_raw(pid as i32), sig)
                .with_context(|| format!("cannot send {sig} to {}", proc.name))?;
        }
        Ok(())
    }

    /// Sends `sig` to the child `pid`'s whole process group (testsrv and its workers).
    pub fn kill_group(&mut self, pid: u32, sig: Signal) -> Result<()> {
        // Only a child not pruned yet: its group cannot have been reused.
        let name = self.proc(pid)?.name.clone();
        killpg(Pid::from_raw(pid as i32), sig)
            .with_context(|| format!("cannot send {sig} to {name}'s process group"))
    }

    /// Waits until the child `pid` has exited, at most until `deadline`.
    pub fn wait_exit(&mut self, pid: u32, deadline: Instant) -> Result<ExitStatus> {
        let status = self.proc(pid)?.wait_until(deadline)?;
        self.prune();
        Ok(status)
    }

    /// Forgets children that exited and whose process group is empty: their pid may be
    /// reused, so they must never be signalled again.
    pub fn prune(&mut self) {
        self.procs.retain_mut(|p| {
            p.exit_status().is_none()
                || (p.kill_group
                    && killpg(Pid::from_raw(p.child.id() as i32), None) != Err(Errno::ESRCH))
        });
    }

    /// Starts handoffd for one service, [`service_name`]`(name)`, on the `listen`
    /// addresses, with `extra` arguments (drain settings).
    pub fn daemon(&mut self, name: &str, listen: &[&str], extra: &[&str]) -> Result<Daemon> {
        let service = service_name(name);
        let mut args = Vec::new();
        for addr in listen {
            args.extend(["--listen", addr]);
        }
        args.extend(["--service", service.as_str()]);
        args.extend(extra);
        self.start_daemon(&args, Some(&service))
    }

    /// Starts handoffd with the services of a `--config` file.
    pub fn daemon_with_config(&mut self, config: &Path) -> Result<Daemon> {
        let config = config.to_string_lossy();
        self.start_daemon(&["--config", &config], None)
    }

    /// Starts handoffd with `args` and its own state directory and control socket, and
    /// waits until it answers.
    fn start_daemon(&mut self, args: &[&str], service: Option<&str>) -> Result<Daemon> {
        self.seq += 1;
        // Named after this environment's directory: environments share `ctx.state`.
        let label = self.dir.file_name().unwrap_or_default().to_string_lossy();
        let state = self
            .ctx
            .state
            .path()
            .join(format!("{label}-state-{}", self.seq));
        let socket = self.dir.join(format!("ctl-{}.sock", self.seq));
        let (log_path, log) = self.file("handoffd", "log")?;
        let mut cmd = Command::new(self.ctx.bin.join("handoffd"));
        cmd.args(args)
            .args(["--log-format", "json"])
            .arg("--state-dir")
            .arg(&state)
            .arg("--control-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let pid = self.spawn("handoffd", cmd, false)?;
        self.daemons.push((state, service.map(str::to_owned)));
        let daemon = Daemon {
            pid,
            socket,
            ctl: self.ctx.bin.join("handoffctl"),
            log: log_path,
        };
        let hint = format!("; its log is in {}", self.dir.display());
        wait_answering(
            || daemon.ctl(&["status"]),
            self.proc(pid)?,
            READY_TIMEOUT,
            &hint,
        )?;
        Ok(daemon)
    }

    /// Starts `testsrv --name NAME ARGS` and waits for its ready line.
    pub fn testsrv(&mut self, name: &str, args: &[&str]) -> Result<Server> {
        let (_, log) = self.file(&format!("testsrv-{name}"), "log")?;
        let mut cmd = Command::new(self.ctx.bin.join("testsrv"));
        cmd.args(["--name", name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let (spawned, stdout, stderr) =
            self.spawn_piped(&format!("testsrv {name}"), cmd, true, Some(log))?;
        let (stdout, stderr) = (stdout.context("no stdout")?, stderr.context("no stderr")?);
        let line = stdout
            .wait(
                &format!("testsrv {name} to be ready"),
                Instant::now() + READY_TIMEOUT,
                |l| l.starts_with("ready "),
            )
            .with_context(|| format!("testsrv {name}: {}", stderr.tail()))?;
        let (pid, workers) = parse_ready(&line)
            .with_context(|| format!("testsrv {name}: bad ready line {line:?}"))?;
        if pid != spawned {
            bail!("testsrv {name}: ready line of pid {pid}, started {spawned}");
        }
        Ok(Server {
            name: name.to_owned(),
            pid,
            workers,
            stderr,
        })
    }

    /// Starts `loadgen --connect ADDR ARGS` in the background.
    pub fn loadgen(&mut self, addr: SocketAddr, args: &[&str]) -> Result<Load> {
        let (_, log) = self.file("loadgen", "log")?;
        let mut cmd = Command::new(self.ctx.bin.join("loadgen"));
        cmd.args(["--connect", &addr.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stderr(log);
        let (pid, out) = self.spawn_captured("loadgen", cmd)?;
        Ok(Load { pid, out })
    }

    /// Waits for loadgen to finish (at most until `deadline`) and reads its report.
    pub fn finish_load(&mut self, load: Load, deadline: Instant) -> Result<LoadReport> {
        let status = self.wait_exit(load.pid, deadline)?;
        let text = load.out.all().join("\n");
        let report: Value = serde_json::from_str(&text)
            .with_context(|| format!("loadgen ({status}) printed no report: {text:?}"))?;
        LoadReport::from_json(&report)
    }

    /// Stops loadgen (SIGTERM: it finishes the attempts under way) and reads its report.
    pub fn stop_load(&mut self, load: Load) -> Result<LoadReport> {
        self.kill(load.pid, Signal::SIGTERM)?;
        self.finish_load(load, Instant::now() + Duration::from_secs(30))
    }

    /// Runs loadgen to its end (its arguments must bound it).
    pub fn run_load(
        &mut self,
        addr: SocketAddr,
        args: &[&str],
        limit: Duration,
    ) -> Result<LoadReport> {
        let load = self.loadgen(addr, args)?;
        self.finish_load(load, Instant::now() + limit)
    }
}

impl Drop for Env<'_> {
    fn drop(&mut self) {
        self.prune();
        stop_all(&mut self.procs, STOP_GRACE);
        for (state, service) in &self.daemons {
            cleanup_daemon(&self.ctx.bin, state, service.as_deref());
        }
    }
}

/// The name of a benchmark's service: `hbench-<pid>-NAME`. handoffd pins its maps on the
/// host's bpffs by service name, so a bench running at the same time, or a test, must not
/// share it; [`remove_leftovers`] removes the pins of a bench that was killed.
pub fn service_name(name: &str) -> String {
    format!("{}{}-{name}", super::netns::NS_PREFIX, std::process::id())
}

/// A running loadgen.
pub struct Load {
    pid: u32,
    out: Captured,
}

/// Connects to `addr` and reads the `NAME PID` answer; returns the stream and NAME.
pub fn connect(addr: SocketAddr) -> Result<(TcpStream, String)> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .with_context(|| format!("no answer from {addr}"))?;
    let name = line
        .split_whitespace()
        .next()
        .with_context(|| format!("empty answer from {addr}"))?
        .to_owned();
    Ok((stream, name))
}

/// Sleeps `d`, ending early (with an error) on Ctrl-C.
pub fn pause(d: Duration) -> Result<()> {
    pause_until(Instant::now() + d)
}
