//! A master with `--workers`: creates the listeners its `--mode` gives it, forks the workers,
//! waits for their readiness, respawns dead ones with `--respawn`, and stops them on SIGTERM.

use std::io::{self, PipeReader, PipeWriter, Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::serve::{bind_all, log_line, log_term, start_acceptors, wait_for_term};
use super::{Mode, ServerConfig, ServerError, sys_err};
use crate::sys::{self, Forked};

/// How long a master gives its workers to exit after SIGTERM before it SIGKILLs them.
pub(super) const WORKER_EXIT_GRACE: Duration = Duration::from_secs(2);

/// A master process and the workers it forked.
pub(super) struct Master<'a> {
    /// Mode, listen addresses and respawn policy of the workers.
    cfg: &'a ServerConfig,
    /// Listener sets the master holds: one shared set, one per worker, or none (after-fork).
    sets: Vec<Vec<TcpListener>>,
    /// Worker pid by slot; `None` once reaped and not replaced.
    pub(super) workers: Vec<Option<Pid>>,
}

impl<'a> Master<'a> {
    /// Creates the listeners the mode gives to the master, forks every worker and waits until
    /// all of them report readiness.
    pub(super) fn start(cfg: &'a ServerConfig) -> Result<Self, ServerError> {
        let sets = match cfg.mode {
            Mode::Shared => vec![bind_all(cfg)?],
            Mode::PerWorker => (0..cfg.workers)
                .map(|_| bind_all(cfg))
                .collect::<Result<_, _>>()?,
            Mode::AfterFork => Vec::new(),
        };
        let mut master = Master {
            cfg,
            sets,
            workers: Vec::new(),
        };
        // Fork all workers first so they start in parallel, then collect their readiness.
        let mut pending = Vec::new();
        for slot in 0..cfg.workers as usize {
            let (pid, ready) = master.fork_worker(slot)?;
            master.workers.push(Some(pid));
            pending.push((pid, ready));
        }
        for (pid, ready) in pending {
            await_ready(pid, ready)?;
        }
        Ok(master)
    }

    /// Forks the worker of `slot`; returns its pid and the pipe it reports readiness on.
    fn fork_worker(&self, slot: usize) -> Result<(Pid, PipeReader), ServerError> {
        let (reader, writer) = io::pipe().map_err(sys_err("pipe"))?;
        let parent = nix::unistd::getpid();
        match sys::fork().map_err(sys_err("fork"))? {
            Forked::Parent(pid) => Ok((pid, reader)),
            Forked::Child => {
                drop(reader);
                let own = match self.cfg.mode {
                    Mode::Shared => self.sets.first(),
                    Mode::PerWorker => self.sets.get(slot),
                    Mode::AfterFork => None,
                };
                worker_main(self.cfg, parent, own.map(Vec::as_slice), writer)
            }
        }
    }

    /// Takes signals until SIGTERM or SIGINT: logs dead workers and respawns them if asked.
    pub(super) fn supervise(&mut self) -> Result<(), ServerError> {
        let set = sys::handled_signals();
        loop {
            match set.wait() {
                Ok(Signal::SIGCHLD) => self.reap_and_respawn()?,
                Ok(Signal::SIGTERM) => {
                    log_term(self.cfg);
                    if !self.cfg.ignore_term {
                        break;
                    }
                }
                Ok(Signal::SIGINT) => break,
                Ok(Signal::SIGUSR1) => {
                    for pid in self.workers.iter().flatten() {
                        let _ = kill(*pid, Signal::SIGUSR1);
                    }
                }
                _ => {}
            }
        }
        self.stop_workers();
        Ok(())
    }

    fn reap_and_respawn(&mut self) -> Result<(), ServerError> {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(()),
                Ok(status) => status,
                Err(e) => return Err(sys_err("waitpid")(e.into())),
            };
            let (pid, how) = match status {
                WaitStatus::Exited(pid, code) => (pid, format!("exited({code})")),
                WaitStatus::Signaled(pid, sig, _) => (pid, format!("killed({sig})")),
                _ => continue,
            };
            let name = &self.cfg.name;
            log_line(&format!("worker-exit {name} pid={pid} status={how}"));
            let Some(slot) = self.workers.iter().position(|w| *w == Some(pid)) else {
                continue;
            };
            self.workers[slot] = None;
            if self.cfg.respawn {
                let (new, ready) = self.fork_worker(slot)?;
                self.workers[slot] = Some(new);
                match await_ready(new, ready) {
                    Ok(()) => log_line(&format!("respawn {name} old={pid} new={new}")),
                    Err(e) => {
                        // Out of its slot, it is reaped on the next SIGCHLD but not respawned:
                        // a worker that cannot start would otherwise be respawned forever.
                        self.workers[slot] = None;
                        eprintln!("testsrv {name}: {e}");
                    }
                }
            }
        }
    }

    /// SIGTERMs every worker and reaps them, leaving the stragglers to `Drop`.
    fn stop_workers(&mut self) {
        for pid in self.workers.iter().flatten() {
            let _ = kill(*pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + WORKER_EXIT_GRACE;
        while self.workers.iter().any(Option::is_some) && Instant::now() < deadline {
            for worker in &mut self.workers {
                if let Some(pid) = *worker
                    && !matches!(
                        waitpid(pid, Some(WaitPidFlag::WNOHANG)),
                        Ok(WaitStatus::StillAlive)
                    )
                {
                    *worker = None;
                }
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Master<'_> {
    /// Workers must never outlive a master that failed or stopped.
    fn drop(&mut self) {
        for pid in self.workers.iter().flatten() {
            let _ = kill(*pid, Signal::SIGKILL);
            let _ = waitpid(*pid, None);
        }
    }
}

/// Waits for the one byte a worker writes once it listens; EOF means it died before.
fn await_ready(pid: Pid, mut ready: PipeReader) -> Result<(), ServerError> {
    let mut byte = [0u8; 1];
    match ready.read(&mut byte) {
        Ok(1) => Ok(()),
        _ => Err(ServerError::WorkerNotReady { pid: pid.as_raw() }),
    }
}

/// Body of a forked worker: accept on `own` (or on new listeners), report readiness, serve
/// until SIGTERM. Never returns.
fn worker_main(
    cfg: &ServerConfig,
    parent: Pid,
    own: Option<&[TcpListener]>,
    mut ready: PipeWriter,
) -> ! {
    let mut created = Vec::new();
    let started = (|| {
        sys::die_with_parent(parent).map_err(sys_err("PR_SET_PDEATHSIG"))?;
        let listeners = match own {
            Some(listeners) => listeners,
            None => {
                created = bind_all(cfg)?;
                &created
            }
        };
        start_acceptors(cfg, listeners)?;
        ready
            .write_all(&[1])
            .map_err(sys_err("reporting readiness"))
    })();
    if let Err(e) = started {
        eprintln!(
            "testsrv {} worker {}: {}",
            cfg.name,
            std::process::id(),
            error_chain(&e)
        );
        std::process::exit(1);
    }
    drop(ready);
    wait_for_term(cfg, own.unwrap_or(&created));
    std::process::exit(0);
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}
