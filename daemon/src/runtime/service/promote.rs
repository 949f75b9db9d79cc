//! Promote and rollback as the control socket asks for them: the machine runs the
//! operation (see [`crate::lifecycle`]), this module turns its answer into the reply.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use handoff_common::proto::Promoted;

use super::Service;
use super::ctx::Ctx;
use super::drive::Run;
use super::promote_error::PromoteError;
use crate::discover::group::GroupKey;
use crate::discover::members::Member;
use crate::kernel::probe::{self, ProbeResult};
use crate::lifecycle::{Event, ProbeSeen, PromoteMode, Refusal, Reply};

impl Service {
    /// Makes `pid` the active generation, verified by a probe in every group.
    pub fn promote(&mut self, pid: i32, ctx: &mut Ctx) -> Result<Promoted, PromoteError> {
        self.operate(
            Event::Promote {
                pid,
                mode: PromoteMode::default(),
            },
            Run::new(None),
            ctx,
        )
    }

    /// Makes `leader`, already opened (from a pidfd a client passed), the active
    /// generation, as [`Service::promote`] does for a pid.
    pub fn promote_member(
        &mut self,
        leader: Member,
        ctx: &mut Ctx,
    ) -> Result<Promoted, PromoteError> {
        let pid = leader.pid;
        self.operate(
            Event::Promote {
                pid,
                mode: PromoteMode::default(),
            },
            Run::new(Some(leader)),
            ctx,
        )
    }

    /// Makes the newest draining generation with live listeners active again.
    pub fn rollback(&mut self, ctx: &mut Ctx) -> Result<Promoted, PromoteError> {
        self.reap(ctx);
        let listening = self
            .machine
            .generations()
            .iter()
            .filter(|g| self.listening(g).iter().all(|&n| n > 0))
            .map(|g| g.id)
            .collect();
        self.operate(Event::Rollback { listening }, Run::new(None), ctx)
    }

    /// Runs a promote or rollback through the machine and answers as the control
    /// socket does.
    fn operate(
        &mut self,
        event: Event,
        mut run: Run,
        ctx: &mut Ctx,
    ) -> Result<Promoted, PromoteError> {
        if matches!(event, Event::Promote { .. }) {
            self.reap(ctx);
        }
        let asked = match &event {
            Event::Promote { pid, .. } => Some(*pid),
            _ => None,
        };
        self.drive_run(event, &mut run, ctx);
        let reply = run.reply.take().unwrap_or(Reply::Refused(Refusal::Failed));
        let promoted = match reply {
            Reply::Promoted(p) => p,
            Reply::Refused(refusal) => {
                if let Some(id) = run
                    .installing
                    .filter(|&id| self.machine.generation(id).is_none())
                {
                    self.members.remove(&id);
                }
                return Err(self.refusal(refusal, &mut run));
            }
        };
        let installed = run.installing == Some(promoted.generation);
        if installed && let Some(m) = self.members.get(&promoted.generation) {
            for member in m.all() {
                ctx.watch(member);
            }
        }
        let pid = self.leader_pid(promoted.generation);
        let took_ms = run.started.elapsed().as_secs_f64() * 1e3;
        if installed {
            // Discovery, map writes, flip, probe and drain signal; not the state write.
            tracing::info!(service = %self.config.name, generation = promoted.generation, pid, listeners = promoted.listeners, draining = ?promoted.draining, took_ms, "promoted");
        } else {
            tracing::info!(service = %self.config.name, generation = promoted.generation, pid, draining = ?promoted.draining, asked = ?asked, "reactivated");
        }
        Ok(Promoted {
            service: self.config.name.clone(),
            generation: promoted.generation,
            pid,
            listeners: promoted.listeners,
            draining: promoted.draining,
        })
    }

    /// The error a refusal of the machine stands for.
    fn refusal(&self, refusal: Refusal, run: &mut Run) -> PromoteError {
        let service = self.config.name.clone();
        match refusal {
            Refusal::AlreadyActive { pid, generation } => PromoteError::AlreadyActive {
                pid,
                id: generation,
                service,
            },
            Refusal::Retiring { generation, .. } => PromoteError::Retiring {
                id: generation,
                pid: self.leader_pid(generation),
            },
            Refusal::NothingToRollBack => PromoteError::NothingToRollBack { service },
            Refusal::SharedSocket {
                group, generation, ..
            } => PromoteError::SharedSocket {
                pid: run.installing.map_or(0, |id| self.leader_pid(id)),
                addr: self
                    .config
                    .listen
                    .get(group)
                    .copied()
                    .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                id: generation,
                owner: self.leader_pid(generation),
            },
            Refusal::NoFreeBlock => PromoteError::NoFreeBlock { service },
            Refusal::ProbeMismatch { group, seen } => match self.probe_key(group, run) {
                Some(group) => PromoteError::ProbeMismatch {
                    group,
                    chosen: match seen {
                        ProbeSeen::Slot(s) => ProbeResult::Slot(s),
                        ProbeSeen::NoSocket => ProbeResult::NoSocket,
                    },
                },
                None => PromoteError::Refused(refusal),
            },
            Refusal::Failed => run
                .error
                .take()
                .unwrap_or(PromoteError::Refused(Refusal::Failed)),
            Refusal::Busy | Refusal::BadWeight { .. } | Refusal::NoActive => {
                PromoteError::Refused(refusal)
            }
        }
    }

    /// The tuple group `group` was probed through.
    fn probe_key(&self, group: usize, run: &Run) -> Option<GroupKey> {
        run.taken
            .as_ref()
            .and_then(|t| t.get(group)?.first())
            .map(|t| t.key)
            .or_else(|| self.groups.get(group)?.key)
    }

    /// Makes every group steer as the table says: to the active generation, falling back
    /// to the newest draining one (with none active, to the kernel's hash). Used after the
    /// table was rebuilt from its last consistent state, when a failed operation may have
    /// flipped a group already.
    pub fn resteer(&mut self, ctx: &mut Ctx) {
        self.drive(Event::Resteer, ctx);
    }

    /// Each group's steering record in force (none: no program loaded), for tests.
    #[cfg(test)]
    pub(crate) fn records(&self) -> Vec<Option<handoff_common::maps::SteerRecord>> {
        self.groups
            .iter()
            .map(|g| g.program.as_ref().and_then(|p| p.record().ok()))
            .collect()
    }
}

/// How long the next probe of an operation that began at `started` may wait for a SYN
/// the program has not seen yet: what is left of one [`probe::PROBE_SLOW_DEADLINE`] for
/// the whole operation, at least [`probe::PROBE_DEADLINE`]. The daemon's lock is held
/// throughout, so a slow softirq costs one second per promote, not one per group.
pub(super) fn patience(started: Instant) -> Duration {
    probe::PROBE_SLOW_DEADLINE
        .saturating_sub(started.elapsed())
        .max(probe::PROBE_DEADLINE)
}
