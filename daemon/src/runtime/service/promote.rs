//! Promote and rollback as the control socket asks for them: the machine runs the
//! operation (see [`crate::lifecycle`]), this module turns its answer into the reply.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use handoff_common::proto::{PromoteOptions, Promoted};

use super::Service;
use super::check::{CheckError, CheckJob, CheckPlan};
use super::ctx::Ctx;
use super::drive::Run;
use super::promote_error::PromoteError;
use crate::discover::group::GroupKey;
use crate::discover::members::Member;
use crate::kernel::probe::{self, ProbeResult};
use crate::lifecycle::{Event, Failure, Outcome, Phase, ProbeSeen, PromoteMode, Refusal, Reply};

/// What a promote or rollback came to: its answer, or a check of its candidate to run
/// without the daemon's lock (then [`Service::checked`] takes the operation up again).
#[derive(Debug)]
pub enum Operated {
    /// The answer.
    Done(Result<Promoted, PromoteError>),
    /// A check to run; the operation waits for its outcome.
    Check(CheckJob),
}

/// An operation waiting for its check: what it holds, and the pid it was asked for.
#[derive(Debug)]
pub(super) struct Parked {
    run: Run,
    asked: Option<i32>,
}

impl Service {
    /// Makes `pid` the active generation (or a canary), verified by a probe in every
    /// group, checked first if `options` or the service's configuration asks for it.
    pub fn promote(&mut self, pid: i32, options: &PromoteOptions, ctx: &mut Ctx) -> Operated {
        self.promote_run(pid, options, Run::new(None), ctx)
    }

    /// Makes `leader`, already opened (from a pidfd a client passed), the active
    /// generation, as [`Service::promote`] does for a pid.
    pub fn promote_member(
        &mut self,
        leader: Member,
        options: &PromoteOptions,
        ctx: &mut Ctx,
    ) -> Operated {
        let pid = leader.pid;
        self.promote_run(pid, options, Run::new(Some(leader)), ctx)
    }

    fn promote_run(
        &mut self,
        pid: i32,
        options: &PromoteOptions,
        mut run: Run,
        ctx: &mut Ctx,
    ) -> Operated {
        let release = &self.config.release;
        let spec = match (&options.check, options.no_check) {
            (Some(spec), _) => Some(spec.clone()),
            (None, false) => release.check.clone(),
            (None, true) => None,
        };
        let timeout = options
            .check_timeout_ms
            .map_or(release.check_timeout, Duration::from_millis);
        run.check = spec.map(|spec| CheckPlan {
            spec,
            deadline: run.started + timeout,
            wait: options.wait,
        });
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mode = PromoteMode {
            check: run.check.is_some(),
            weight: options.weight,
            watch_ms: options
                .watch_ms
                .or(release.watch.map(ms))
                .filter(|&ms| ms > 0),
        };
        self.operate(Event::Promote { pid, mode }, run, ctx)
    }

    /// Makes the newest draining generation with live listeners active again (or
    /// aborts a canary).
    pub fn rollback(&mut self, ctx: &mut Ctx) -> Operated {
        self.reap(ctx);
        let listening = self
            .machine
            .generations()
            .iter()
            .filter(|g| self.listening(g).iter().all(|&n| n > 0))
            .map(|g| g.id)
            .collect();
        let operated = self.operate(Event::Rollback { listening }, Run::new(None), ctx);
        if let Operated::Done(Ok(p)) = &operated {
            self.note_rollback(
                p.generation,
                crate::lifecycle::RollbackReason::Operator,
                ctx,
            );
        }
        operated
    }

    /// Runs a promote or rollback through the machine until it answers or waits for a
    /// check.
    fn operate(&mut self, event: Event, mut run: Run, ctx: &mut Ctx) -> Operated {
        if matches!(event, Event::Promote { .. }) {
            self.reap(ctx);
        }
        let asked = match &event {
            Event::Promote { pid, .. } => Some(*pid),
            _ => None,
        };
        self.drive_run(event, &mut run, ctx);
        self.settle(run, asked, ctx)
    }

    /// The check the operation waits for came back: the operation goes on from there.
    pub fn checked(&mut self, result: Result<(), CheckError>, ctx: &mut Ctx) -> Operated {
        let Some(Parked { mut run, asked }) = self.parked.take() else {
            return Operated::Done(Err(PromoteError::Refused(Refusal::Failed)));
        };
        let outcome = match result {
            Ok(()) => Outcome::Done,
            Err(error) => {
                // A candidate of an install is not in the table yet: no client reached it.
                let candidate = run
                    .installing
                    .is_some_and(|id| self.machine.generation(id).is_none());
                tracing::info!(service = %self.config.name, error = %error, candidate, "the generation failed its check; steering left as it was");
                run.error = Some(PromoteError::Check { error, candidate });
                Outcome::Failed(Failure::Error)
            }
        };
        self.drive_run(Event::Outcome(outcome), &mut run, ctx);
        self.settle(run, asked, ctx)
    }

    /// Parks the operation if it waits for a check, else answers.
    fn settle(&mut self, mut run: Run, asked: Option<i32>, ctx: &mut Ctx) -> Operated {
        if let Some(job) = run.job.take() {
            self.parked = Some(Parked { run, asked });
            return Operated::Check(job);
        }
        Operated::Done(self.answer(run, asked, ctx))
    }

    /// The answer of an operation that ended.
    fn answer(
        &mut self,
        mut run: Run,
        asked: Option<i32>,
        ctx: &mut Ctx,
    ) -> Result<Promoted, PromoteError> {
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
        if let Some(plan) = run.check.take() {
            self.remember_check(promoted.generation, &plan.spec);
        }
        let installed = run.installing == Some(promoted.generation);
        if installed && let Some(m) = self.members.get(&promoted.generation) {
            for member in m.all() {
                ctx.watch(member);
            }
        }
        let pid = self.leader_pid(promoted.generation);
        let took_ms = run.started.elapsed().as_secs_f64() * 1e3;
        // How far apart the groups' flips (IPv4 and IPv6, say) landed.
        let flips_apart_us = match (run.flips.first(), run.flips.last()) {
            (Some(a), Some(b)) if run.flips.len() > 1 => Some(b.duration_since(*a).as_micros()),
            _ => None,
        };
        if installed {
            // Discovery, map writes, flip, probe and drain signal; not the state write.
            tracing::info!(service = %self.config.name, generation = promoted.generation, pid, listeners = promoted.listeners, draining = ?promoted.draining, took_ms, flips_apart_us, "promoted");
        } else {
            tracing::info!(service = %self.config.name, generation = promoted.generation, pid, draining = ?promoted.draining, asked = ?asked, flips_apart_us, "reactivated");
        }
        Ok(Promoted {
            service: self.config.name.clone(),
            generation: promoted.generation,
            pid,
            listeners: promoted.listeners,
            draining: promoted.draining,
            weight: self
                .machine
                .generation(promoted.generation)
                .and_then(|g| match g.phase {
                    Phase::Canary { weight } => Some(weight),
                    _ => None,
                }),
            standby_ms: promoted
                .draining
                .and_then(|id| match self.machine.generation(id)?.phase {
                    Phase::Standby { until } => Some(until.since(ctx.now())),
                    _ => None,
                }),
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

    /// The tuple group `group` is probed and checked through: the candidate's (a
    /// promote), else the group's.
    pub(super) fn probe_key(&self, group: usize, run: &Run) -> Option<GroupKey> {
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
