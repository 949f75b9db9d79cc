//! What a service's runtime needs beyond its own state: the drain programs, the task
//! that watches members' pidfds, the metrics, the guard, and the clock the lifecycle
//! machine counts in.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;

use crate::discover;
use crate::discover::members::Member;
use crate::kernel::loader::DrainProgram;
use crate::lifecycle::Millis;
use crate::runtime::metrics::Metrics;

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
    pub guard: Option<crate::kernel::loader::GuardProgram>,
    /// The kernel's release (`uname -r`), for status.
    release: String,
    /// The zero of the lifecycle's clock.
    epoch: Instant,
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
            epoch: Instant::now(),
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

    /// `at` on the lifecycle's clock.
    pub fn millis(&self, at: Instant) -> Millis {
        let ms = at.saturating_duration_since(self.epoch).as_millis();
        Millis(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// The instant `at` on the lifecycle's clock names.
    pub fn instant(&self, at: Millis) -> Instant {
        self.epoch + Duration::from_millis(at.0)
    }

    /// Now, on the lifecycle's clock.
    pub fn now(&self) -> Millis {
        self.millis(Instant::now())
    }

    pub(super) fn tag(&mut self) -> u32 {
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
                        let holder = discover::FdRef {
                            pid: l.pid,
                            fd: l.fd,
                        };
                        (l.inode, holder)
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
