//! Draining: count a generation's connections in the kernel, retire it at zero, and
//! enforce the drain timeout and kill-after.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use handoff_common::proto::GenerationState;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;

use super::{Generation, Service};
use crate::config::Sig;
use crate::discover::{self, Processes};
use crate::loader::DrainProgram;
use crate::members::Member;
use crate::metrics::Metrics;

/// What generations need beyond their own state: the drain programs, the task that
/// watches members' pidfds for their exit, and the metrics.
#[derive(Debug)]
pub struct Ctx {
    /// The tag pass, the counts and the events.
    pub program: DrainProgram,
    /// Where a new member's pidfd goes to be watched (none in tests without a runtime).
    watch: Option<UnboundedSender<Arc<OwnedFd>>>,
    /// The tag of the next drain; never 0 (0 means "not counted" in socket storage).
    next_tag: u32,
    /// Wakes the supervisor to look at deadlines again (one was brought forward).
    wake: Arc<Notify>,
    /// Promotions, retirements and their durations.
    pub metrics: Metrics,
    /// The guard of the groups' programs; `None` on a kernel without cgroup/setsockopt.
    pub guard: Option<crate::loader::GuardProgram>,
    /// The kernel's release (`uname -r`), for status.
    release: String,
}

impl Ctx {
    /// A context over `program`, sending members' pidfds to `watch`.
    pub fn new(program: DrainProgram, watch: Option<UnboundedSender<Arc<OwnedFd>>>) -> Self {
        Self {
            program,
            watch,
            next_tag: 1,
            wake: Arc::new(Notify::new()),
            metrics: Metrics::new(),
            guard: None,
            release: crate::kernel::release(),
        }
    }

    /// The kernel and the modes the daemon runs in, as `status` reports them.
    pub fn kernel_status(&self) -> handoff_common::proto::KernelStatus {
        use handoff_common::proto::{KernelStatus, TagPass};
        KernelStatus {
            release: self.release.clone(),
            tag_pass: if self.program.per_process() {
                TagPass::PerProcess
            } else {
                TagPass::WholeHost
            },
            bind_filter_netns: self.program.netns_filter(),
            guard: self.guard.is_some(),
        }
    }

    fn tag(&mut self) -> u32 {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.checked_add(1).unwrap_or(1);
        tag
    }

    /// What the supervisor waits on besides its deadline: notified when a deadline is
    /// brought forward.
    pub fn waker(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// Has `member`'s exit watched, on its own pidfd (shared, not duplicated: one
    /// descriptor per member).
    pub fn watch(&self, member: &Member) {
        if let Some(tx) = &self.watch {
            let _ = tx.send(member.shared_pidfd());
        }
    }
}

impl Ctx {
    /// Every (inode, holder) of a TCP listener on `port` in `pids`, from the listener
    /// iterator; `None` (logged) when it failed and /proc must be read instead.
    fn iterated_listeners(
        &mut self,
        port: u16,
        pids: &[i32],
    ) -> Option<Vec<(u64, discover::FdRef)>> {
        match self.program.listeners(port, pids) {
            Ok(found) => Some(
                found
                    .into_iter()
                    .map(|l| {
                        (
                            l.inode,
                            discover::FdRef {
                                pid: l.pid,
                                fd: l.fd,
                            },
                        )
                    })
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "the listener iterator failed; reading /proc");
                None
            }
        }
    }
}

impl discover::Processes for Ctx {
    /// From the kernel's process table iterator: one pass, however many processes the
    /// host runs; from /proc if the iterator fails.
    fn tree(&mut self, pid: i32) -> Result<Vec<i32>, discover::DiscoverError> {
        match self.program.processes() {
            Ok(table) => Ok(discover::tree_of(pid, table)),
            Err(e) => {
                tracing::warn!(error = %e, "the process table iterator failed; reading /proc");
                discover::ProcFs.tree(pid)
            }
        }
    }

    /// From the listener iterator run over each process: no readlink per fd.
    fn listener_fds(
        &mut self,
        port: u16,
        pids: &[i32],
    ) -> Result<HashMap<u64, discover::FdRef>, discover::DiscoverError> {
        match self.iterated_listeners(port, pids) {
            Some(found) => Ok(found.into_iter().collect()),
            None => discover::ProcFs.listener_fds(port, pids),
        }
    }

    /// From the listener iterator: one run over every process, every holder listed.
    fn socket_holders(
        &mut self,
        port: u16,
        pids: &[i32],
    ) -> Result<Vec<(u64, discover::FdRef)>, discover::DiscoverError> {
        match self.iterated_listeners(port, pids) {
            Some(found) => Ok(found),
            None => discover::ProcFs.socket_holders(port, pids),
        }
    }
}

/// Why a generation got its retire signal, or ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetireReason {
    /// Its last connection closed.
    Drained,
    /// The drain timeout passed first.
    Timeout,
}

/// A draining generation's progress.
#[derive(Debug)]
pub struct DrainState {
    /// Its tag in the kernel's counts.
    pub tag: u32,
    /// When the drain started.
    pub started: Instant,
    /// When the drain timeout sends the retire signal anyway.
    pub deadline: Instant,
    /// When and why the retire signal was sent.
    pub retire: Option<(Instant, RetireReason)>,
    /// When every member still alive gets SIGKILL.
    pub kill_at: Option<Instant>,
    /// Whether SIGKILL was sent.
    pub killed: bool,
    /// When to count (again): at the start, or while connections are still queued.
    pub recheck_at: Option<Instant>,
    /// Whether the first tag pass has run.
    pub counted: bool,
}

impl DrainState {
    /// Live count: sockets counted in the kernel plus connections queued on listeners.
    pub fn connections(&self, ctx: &Ctx, queued: u64) -> u64 {
        let counted = ctx.program.count(self.tag).unwrap_or(0).max(0);
        counted.unsigned_abs() + queued
    }

    fn next_deadline(&self) -> Option<Instant> {
        let timeout = self.retire.is_none().then_some(self.deadline);
        [timeout, self.kill_at, self.recheck_at]
            .into_iter()
            .flatten()
            .min()
    }
}

/// How long to wait before counting again while connections sit in an accept queue.
const RECHECK: std::time::Duration = std::time::Duration::from_millis(5);

impl Service {
    /// Starts draining the generation at `index`: its members read again and the drain
    /// signal now; the tag pass as soon as the supervisor gets the lock, after the promote
    /// that demoted it has answered (a socket closed meanwhile was never counted, so
    /// nothing is missed).
    pub(super) fn start_drain(&mut self, index: usize, ctx: &mut Ctx) {
        let settings = self.config.drain;
        let tag = ctx.tag();
        let now = Instant::now();
        // Members are read before the drain signal: a leader that exits on it must not
        // take the knowledge of its workers with it.
        self.adopt_descendants(index, ctx);
        let g = &mut self.generations[index];
        if let Err(e) = ctx.program.start(tag) {
            tracing::error!(service = %self.config.name, generation = g.id, error = %e, "cannot count connections; the drain timeout will retire it");
        }
        g.drain = Some(DrainState {
            tag,
            started: now,
            deadline: now + settings.drain_timeout,
            retire: None,
            kill_at: None,
            killed: false,
            recheck_at: Some(now),
            counted: false,
        });
        if let Some(sig) = settings.drain_signal {
            signal(&self.config.name, g, sig, "drain", true);
        }
        ctx.wake.notify_one();
    }

    /// Takes up the drain of a generation a previous daemon started: its start, deadline
    /// and retire signal as saved, its connections counted afresh (under a new tag).
    pub(super) fn resume_drain(
        &mut self,
        index: usize,
        saved: &crate::state::SavedDrain,
        at: impl Fn(u64) -> Instant,
        ctx: &mut Ctx,
    ) {
        let settings = self.config.drain;
        let tag = ctx.tag();
        if let Err(e) = ctx.program.start(tag) {
            tracing::error!(service = %self.config.name, error = %e, "cannot count connections; the drain timeout will retire it");
        }
        let retire = saved.retired_ms.map(|ms| {
            let reason = if saved.timed_out {
                RetireReason::Timeout
            } else {
                RetireReason::Drained
            };
            (at(ms), reason)
        });
        let kill_at = match (retire, settings.kill_after) {
            (Some((sent, _)), Some(k)) if !saved.killed => Some(sent + k),
            _ => None,
        };
        self.generations[index].drain = Some(DrainState {
            tag,
            started: at(saved.started_ms),
            deadline: at(saved.deadline_ms),
            retire,
            kill_at,
            killed: saved.killed,
            recheck_at: None,
            counted: false,
        });
        self.count(index, ctx);
    }

    /// Stops draining the generation at `index` (it is active again).
    pub(super) fn stop_drain(&mut self, index: usize, ctx: &mut Ctx) {
        if let Some(d) = self.generations[index].drain.take() {
            ctx.program.forget(d.tag);
        }
    }

    /// Counts the generation at `index` again (members re-read, so processes forked since
    /// are included) and sends the retire signal when nothing is left.
    pub(super) fn count(&mut self, index: usize, ctx: &mut Ctx) {
        let started = Instant::now();
        let port = self.port();
        self.adopt_descendants(index, ctx);
        let g = &self.generations[index];
        let Some(d) = &g.drain else { return };
        if d.retire.is_some() || g.state != GenerationState::Draining {
            return;
        }
        let pids: Vec<i32> = g.members().filter(|m| m.alive()).map(|m| m.pid).collect();
        let counted = match ctx.program.pass(d.tag, port, &pids) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(service = %self.config.name, generation = g.id, error = %e, "the tag pass failed; the drain timeout will retire it");
                if let Some(d) = self.generations[index].drain.as_mut() {
                    d.recheck_at = None;
                }
                return;
            }
        };
        let queued = match self.queued(g) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(service = %self.config.name, error = %e, "reading accept queues failed");
                1
            }
        };
        let (id, pid) = (g.id, g.leader.pid);
        let Some(d) = self.generations[index].drain.as_mut() else {
            return;
        };
        if d.counted {
            tracing::debug!(service = %self.config.name, generation = id, counted, queued, "counted");
        } else {
            d.counted = true;
            let took_ms = started.elapsed().as_secs_f64() * 1e3;
            // From the drain's start (the promote) to the count: the pass and its wait.
            let since_start_ms = d.started.elapsed().as_secs_f64() * 1e3;
            tracing::info!(service = %self.config.name, generation = id, pid, connections = counted, queued, took_ms, since_start_ms, "drain counted");
        }
        if counted > 0 {
            d.recheck_at = None;
        } else if queued > 0 {
            // Accepted soon (then counted), or migrated when the listener closes.
            d.recheck_at = Some(Instant::now() + RECHECK);
        } else {
            self.retire(index, RetireReason::Drained);
        }
    }

    /// Adds processes forked since the promote to the generation's members: those of a
    /// trusted uid, and those holding one of its listeners. Others (a set-user-id helper a
    /// worker ran, say) are not members and are never signalled.
    pub(super) fn adopt_descendants(&mut self, index: usize, ctx: &mut Ctx) {
        let port = self.port();
        let g = &mut self.generations[index];
        // A leader a restarted daemon could not verify is no ground for new members.
        if !g.leader.alive() || !g.leader.verified() {
            return;
        }
        let Ok(tree) = ctx.tree(g.leader.pid) else {
            return;
        };
        let mut others = Vec::new();
        let known: HashSet<i32> = g.members().map(|m| m.pid).collect();
        for pid in tree {
            if known.contains(&pid) {
                continue;
            }
            // One read instead of a pidfd, /proc and a socket lookup for what was judged.
            if discover::read_stat(pid)
                .is_some_and(|s| self.outsiders.contains(&(pid, s.start_time)))
            {
                continue;
            }
            match Member::open(pid) {
                // The snapshot's pid may have been reused before the pidfd pinned it.
                Ok(m) if !crate::members::member_descends_from(&m, &g.leader, 64) => {}
                Ok(m) if m.uids.within(&g.trusted) => {
                    ctx.watch(&m);
                    g.descendants.push(m);
                }
                Ok(m) => others.push(m),
                Err(e @ crate::members::MemberError::FdLimit { .. }) => {
                    tracing::error!(service = %self.config.name, generation = g.id, error = %e, "a new process of the generation cannot be tracked");
                }
                Err(_) => {}
            }
        }
        if others.is_empty() {
            return;
        }
        let cookies: HashSet<u64> = g.cookies().collect();
        let pids: Vec<i32> = others.iter().map(|m| m.pid).collect();
        let holders = match discover::held_listeners(port, &pids, 0, Some(&cookies), ctx) {
            Ok((_, holders)) => holders,
            Err(e) => {
                tracing::warn!(service = %self.config.name, error = %e, "reading new processes' listeners failed");
                HashSet::new()
            }
        };
        let g = &mut self.generations[index];
        for m in others {
            if holders.contains(&m.pid) {
                ctx.watch(&m);
                g.descendants.push(m);
            } else {
                self.outsiders.insert((m.pid, m.start_time));
                tracing::debug!(service = %self.config.name, generation = g.id, pid = m.pid, uids = ?m.uids, "a descendant of another uid holding none of the generation's listeners is not a member");
            }
        }
    }

    /// Sends the retire signal: to the leader, or to every member if it is gone.
    fn retire(&mut self, index: usize, reason: RetireReason) {
        let settings = self.config.drain;
        let g = &mut self.generations[index];
        let now = Instant::now();
        if let Some(d) = g.drain.as_mut() {
            d.retire = Some((now, reason));
            d.recheck_at = None;
            d.kill_at = settings.kill_after.map(|k| now + k);
        }
        match reason {
            RetireReason::Drained => {
                tracing::info!(service = %self.config.name, generation = g.id, pid = g.leader.pid, signal = %settings.retire_signal, "drained: no connection left, retiring")
            }
            RetireReason::Timeout => {
                tracing::warn!(service = %self.config.name, generation = g.id, pid = g.leader.pid, signal = %settings.retire_signal, timeout = ?settings.drain_timeout, "drain timeout: retiring with connections left")
            }
        }
        signal(&self.config.name, g, settings.retire_signal, "retire", true);
    }

    /// A tag's count reached zero in the kernel: count once more, retire if still zero.
    pub fn on_zero(&mut self, tag: u32, ctx: &mut Ctx) {
        if let Some(index) = self
            .generations
            .iter()
            .position(|g| g.drain.as_ref().is_some_and(|d| d.tag == tag))
        {
            self.count(index, ctx);
        }
    }

    /// Acts on every deadline that has passed: drain timeouts, kill-after, rechecks, and
    /// looks for new listeners.
    pub fn tick(&mut self, now: Instant, ctx: &mut Ctx) {
        self.rescan_due(now, ctx);
        for index in 0..self.generations.len() {
            let g = &self.generations[index];
            let Some(d) = g
                .drain
                .as_ref()
                .filter(|_| g.state == GenerationState::Draining)
            else {
                continue;
            };
            if d.retire.is_none() && d.deadline <= now {
                self.retire(index, RetireReason::Timeout);
            }
            let Some(d) = self.generations[index].drain.as_ref() else {
                continue;
            };
            if d.kill_at.is_some_and(|k| k <= now) {
                self.adopt_descendants(index, ctx);
                let g = &mut self.generations[index];
                tracing::warn!(service = %self.config.name, generation = g.id, pid = g.leader.pid, "kill-after passed: SIGKILL to every member still alive");
                signal(
                    &self.config.name,
                    g,
                    crate::config::Sig(libc::SIGKILL),
                    "kill",
                    false,
                );
                if let Some(d) = g.drain.as_mut() {
                    d.kill_at = None;
                    d.killed = true;
                }
            }
            let Some(d) = self.generations[index].drain.as_ref() else {
                continue;
            };
            if d.recheck_at.is_some_and(|r| r <= now) {
                self.count(index, ctx);
            }
        }
    }

    /// The earliest deadline of any draining generation.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.generations
            .iter()
            .filter(|g| g.state == GenerationState::Draining)
            .filter_map(|g| g.drain.as_ref()?.next_deadline())
            .chain(self.rescan.as_ref().map(|r| r.next))
            .min()
    }
}

/// Signals the leader (or, with `leader_only` false or the leader gone or unverified,
/// every live member).
/// Each target is checked again just before its signal (see [`Member::may_signal`]).
fn signal(service: &str, g: &Generation, sig: Sig, why: &str, leader_only: bool) {
    let targets: Vec<&Member> = if leader_only && g.leader.alive() && g.leader.verified() {
        vec![&g.leader]
    } else {
        g.members().filter(|m| m.alive()).collect()
    };
    for m in targets {
        if let Err(reason) = m.may_signal(&g.trusted) {
            tracing::warn!(service, generation = g.id, pid = m.pid, signal = %sig, why, reason, "signal not sent");
            continue;
        }
        match m.signal(sig.0) {
            Ok(()) => {
                tracing::info!(service, generation = g.id, pid = m.pid, signal = %sig, why, "signal sent")
            }
            Err(e) => {
                tracing::warn!(service, generation = g.id, pid = m.pid, signal = %sig, error = %e, "signal failed")
            }
        }
    }
}
