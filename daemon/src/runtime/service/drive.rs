//! Driving the lifecycle machine: an event in, its effects applied in order, the outcome
//! of each fallible one handed back as the next event, until none is left.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::time::Instant;

use handoff_common::maps::SteerRecord;

use super::Members;
use super::check::{CheckJob, CheckPlan, GroupTargets};
use super::promote_error::PromoteError;
use super::trace;
use super::{Ctx, Service};
use crate::discover::candidate::{self, Candidate, TakenListener};
use crate::kernel::loader::LoaderError;
use crate::kernel::probe::{self, ProbeResult};
use crate::lifecycle::{
    Block, Effect, Event, Failure, GenId, Outcome, ProbeSeen, Reply, Retirement, Span, Steer,
};

/// What an operation holds while the machine runs it: the candidate being installed
/// (its listeners' descriptors), the error behind a failed step, when it started.
#[derive(Debug)]
pub(super) struct Run {
    /// The listeners of a promote's candidate, per group, once discovered.
    pub taken: Option<Vec<Vec<TakenListener>>>,
    /// The id the candidate gets, once discovered (its members are in the table under
    /// it from then on, and taken out again if the promote fails).
    pub installing: Option<crate::lifecycle::GenId>,
    /// A leader opened from a client's pidfd, for the discovery step.
    pub leader: Option<crate::discover::members::Member>,
    /// Why the last failed step failed.
    pub error: Option<PromoteError>,
    /// When the operation began (the probes' shared patience).
    pub started: Instant,
    /// The machine's answer.
    pub reply: Option<Reply>,
    /// The block each group's Insert step filled, by group.
    pub blocks: Vec<(usize, u32)>,
    /// How the operation checks its candidate, if it does.
    pub check: Option<CheckPlan>,
    /// A check the machine asked for, to be run without the daemon's lock.
    pub job: Option<CheckJob>,
    /// When each group's record was published: one atomic flip per group, one group
    /// after the other (each probed before the next).
    pub flips: Vec<Instant>,
}

impl Run {
    pub(super) fn new(leader: Option<crate::discover::members::Member>) -> Self {
        Self {
            taken: None,
            installing: None,
            leader,
            error: None,
            started: Instant::now(),
            reply: None,
            blocks: Vec::new(),
            check: None,
            job: None,
            flips: Vec::new(),
        }
    }
}

/// The kernel's record for `steer`.
fn encode(steer: Steer) -> SteerRecord {
    let (canary, weight) = steer.canary.unwrap_or_default();
    let active = steer.active.unwrap_or_default();
    let previous = steer.previous.unwrap_or_default();
    SteerRecord {
        canary_first: canary.first,
        canary_len: canary.len,
        active_first: active.first,
        active_len: active.len,
        prev_first: previous.first,
        prev_len: previous.len,
        weight: u32::from(weight.min(100)),
        reserved: 0,
    }
}

/// The machine's view of a record read from the kernel.
pub(super) fn decode(r: SteerRecord) -> Steer {
    let span = |first, len| (len > 0).then_some(Span { first, len });
    // A weight outside 1–99 is no canary the daemon wrote: none.
    let weight = u8::try_from(r.weight).ok().filter(|w| (1..=99).contains(w));
    Steer {
        canary: span(r.canary_first, r.canary_len).zip(weight),
        active: span(r.active_first, r.active_len),
        previous: span(r.prev_first, r.prev_len),
    }
}

impl Service {
    /// Hands `event` to the machine and applies what it answers, outside any operation.
    pub(super) fn drive(&mut self, event: Event, ctx: &mut Ctx) {
        let mut run = Run::new(None);
        self.drive_run(event, &mut run, ctx);
        if let Some(Reply::Refused(r)) = run.reply {
            tracing::warn!(service = %self.config.name, refusal = ?r, error = ?run.error.map(|e| e.to_string()), "an automatic change of steering failed; steering left as it was");
        }
    }

    /// Hands `event` to the machine and applies its effects in order; the outcome of
    /// each fallible one is the next event.
    pub(super) fn drive_run(&mut self, event: Event, run: &mut Run, ctx: &mut Ctx) {
        let mut queue: VecDeque<Effect> = self.handle(event, ctx).into();
        while let Some(effect) = queue.pop_front() {
            if let Some(next) = self.apply(effect, run, ctx) {
                queue.extend(self.handle(next, ctx));
            }
        }
    }

    /// One step of the machine, traced when a trace is kept.
    fn handle(&mut self, event: Event, ctx: &Ctx) -> Vec<Effect> {
        let now = ctx.now();
        if !trace::enabled() {
            return self.machine.handle(now, event);
        }
        let effects = self.machine.handle(now, event.clone());
        trace::record(&trace::Line::Step {
            service: &self.config.name,
            now,
            event: &event,
            effects: &effects,
        });
        effects
    }

    /// Applies one effect; returns the event that reports its outcome, if it has one.
    fn apply(&mut self, effect: Effect, run: &mut Run, ctx: &mut Ctx) -> Option<Event> {
        match effect {
            Effect::Discover { pid } => Some(self.discover(pid, run, ctx)),
            Effect::Insert { group, block } => {
                let inserted = self.insert(group, block, run);
                Some(step(run, inserted))
            }
            Effect::Attach { group } => Some(step(run, self.attach(group, run))),
            Effect::Publish { group, record } => {
                let published = self.publish(group, record);
                run.flips.push(Instant::now());
                Some(step(run, published))
            }
            Effect::Probe { group, patient, .. } => Some(self.probe(group, patient, run)),
            Effect::Reattach { group } => Some(match self.reattach(group, ctx) {
                Ok(found) => Event::Outcome(Outcome::Attached(found)),
                Err(e) => step(run, Err(e.into())),
            }),
            // Planned here, run by the caller without the daemon's lock; its outcome
            // comes back through [`Service::checked`].
            Effect::Check(c) => match self.check_job(c.generation, run) {
                Ok(job) => {
                    run.job = Some(job);
                    None
                }
                Err(e) => Some(step(run, Err(e))),
            },
            other => self.apply_other(other, run, ctx),
        }
    }

    /// Applies an effect that is not a step of an operation.
    fn apply_other(&mut self, effect: Effect, run: &mut Run, ctx: &mut Ctx) -> Option<Event> {
        match effect {
            Effect::Republish { group, record } => {
                if let Err(e) = self.publish(group, record) {
                    tracing::error!(service = %self.config.name, group, error = %e, "publishing the steering record failed");
                }
                None
            }
            Effect::RemoveSlots { .. }
            | Effect::Adopt { .. }
            | Effect::StartCount { .. }
            | Effect::Forget { .. }
            | Effect::Count { .. }
            | Effect::Signal { .. } => self.apply_drain(effect, ctx),
            Effect::Steered { generation } => {
                self.now_steered(generation, run, ctx);
                None
            }
            Effect::Retired {
                generation,
                how,
                drained_ms,
            } => {
                self.retired(generation, how, drained_ms, ctx);
                None
            }
            Effect::RolledBack { to, reason } => {
                self.note_rollback(to, reason, ctx);
                tracing::warn!(service = %self.config.name, generation = to, reason = reason.as_str(), "traffic rolled back");
                None
            }
            Effect::Release { generation } => {
                self.members.remove(&generation);
                None
            }
            // The daemon writes the state file after every batch of events, if it changed.
            Effect::Persist => None,
            Effect::Wake => {
                ctx.waker().notify_one();
                None
            }
            // The first reply answers the request; a later one is an automatic flip's
            // that followed (a fail-over after the request's own operation failed).
            Effect::Reply(reply) => {
                if run.reply.is_none() {
                    run.reply = Some(reply);
                } else {
                    tracing::info!(service = %self.config.name, ?reply, "an automatic change of steering followed the request");
                }
                None
            }
            // The steps, applied by `apply`.
            Effect::Discover { .. }
            | Effect::Insert { .. }
            | Effect::Attach { .. }
            | Effect::Publish { .. }
            | Effect::Probe { .. }
            | Effect::Reattach { .. }
            | Effect::Check(_) => None,
        }
    }

    /// Applies an effect on a generation's slots, counts or processes.
    fn apply_drain(&mut self, effect: Effect, ctx: &mut Ctx) -> Option<Event> {
        match effect {
            Effect::RemoveSlots {
                group,
                first,
                count,
            } => {
                if let Some(program) = self.groups.get(group).and_then(|g| g.program.as_ref()) {
                    for slot in first..first.saturating_add(count) {
                        let _ = program.remove(slot);
                    }
                }
                None
            }
            Effect::Adopt { generation } => {
                self.adopt_descendants(generation, ctx);
                None
            }
            Effect::StartCount { generation } => {
                let tag = ctx.tag();
                if let Err(e) = ctx.program.start(tag) {
                    tracing::error!(service = %self.config.name, generation, error = %e, "cannot count connections; the drain timeout will retire it");
                }
                Some(Event::Tagged { generation, tag })
            }
            Effect::Forget { tag } => {
                ctx.program.forget(tag);
                None
            }
            Effect::Count {
                generation,
                tag,
                first,
            } => Some(self.count(generation, tag, first, ctx)),
            Effect::Signal {
                generation,
                signal,
                why,
                scope,
            } => {
                self.signal(generation, signal, why, scope);
                None
            }
            _ => None,
        }
    }

    fn insert(&mut self, group: usize, block: u32, run: &mut Run) -> Result<(), PromoteError> {
        let taken = run
            .taken
            .as_ref()
            .and_then(|t| t.get(group))
            .ok_or(LoaderError::MissingMap("candidate"))?;
        let slot = |k: usize| block.saturating_mul(handoff_common::maps::GEN_SLOTS) + k as u32;
        let dir = crate::persist::pins::group_dir(&self.config.name, group);
        let g = self
            .groups
            .get_mut(group)
            .ok_or(LoaderError::MissingMap("group"))?;
        if g.program.is_none() {
            g.program = Some(crate::kernel::loader::GroupProgram::load(&dir)?);
        }
        let program = g
            .program
            .as_ref()
            .ok_or(LoaderError::MissingMap("program"))?;
        for (k, t) in taken.iter().enumerate() {
            program.insert(slot(k), t.fd.as_fd())?;
        }
        run.blocks.push((group, block));
        Ok(())
    }

    /// The check of generation `id` (the candidate being installed, or one of the
    /// table): every listener of every group, through the group's address.
    pub(super) fn check_job(&self, id: GenId, run: &Run) -> Result<CheckJob, PromoteError> {
        let plan = run.check.clone().ok_or(LoaderError::MissingMap("check"))?;
        let spans: Vec<(usize, Span)> = match self.machine.generation(id) {
            Some(g) => g.blocks.iter().map(Block::span).enumerate().collect(),
            None => run
                .blocks
                .iter()
                .map(|&(group, block)| {
                    let len = run
                        .taken
                        .as_ref()
                        .and_then(|t| t.get(group))
                        .map_or(0, Vec::len);
                    let first = block.saturating_mul(handoff_common::maps::GEN_SLOTS);
                    let len = u32::try_from(len).unwrap_or(0);
                    (group, Span { first, len })
                })
                .collect(),
        };
        let mut groups = Vec::with_capacity(spans.len());
        for (group, span) in spans {
            let key = self
                .probe_key(group, run)
                .ok_or(LoaderError::MissingMap("group address"))?;
            let program = self
                .groups
                .get(group)
                .and_then(|g| g.program.as_ref())
                .ok_or(LoaderError::MissingMap("program"))?;
            groups.push(GroupTargets {
                address: key.probe_target(),
                map: program.probe_map()?,
                slots: (span.first..span.first.saturating_add(span.len)).collect(),
            });
        }
        Ok(CheckJob {
            generation: id,
            plan,
            groups,
        })
    }

    fn attach(&mut self, group: usize, run: &Run) -> Result<(), PromoteError> {
        let fd = run
            .taken
            .as_ref()
            .and_then(|t| t.get(group)?.first())
            .ok_or(LoaderError::MissingMap("candidate"))?;
        let program = self
            .groups
            .get_mut(group)
            .and_then(|g| g.program.as_mut())
            .ok_or(LoaderError::MissingMap("program"))?;
        program.attach(fd.fd.as_fd())?;
        Ok(())
    }

    /// Publishes `record` in group `group`; a group without a program yet has nothing to
    /// publish to (the kernel's hash steers it, as the empty record would).
    fn publish(&mut self, group: usize, record: Steer) -> Result<(), PromoteError> {
        let Some(program) = self.groups.get_mut(group).and_then(|g| g.program.as_mut()) else {
            return Ok(());
        };
        program.publish(encode(record))?;
        Ok(())
    }

    /// Probes group `group` through the candidate's tuple (a promote) or the group's.
    fn probe(&mut self, group: usize, patient: bool, run: &mut Run) -> Event {
        let key = self.probe_key(group, run);
        let Some(g) = self.groups.get_mut(group) else {
            return Event::Outcome(Outcome::Done);
        };
        let (Some(key), Some(program)) = (key, g.program.as_mut()) else {
            return Event::Outcome(Outcome::Done);
        };
        let patience = if patient {
            super::promote::patience(run.started)
        } else {
            probe::PROBE_DEADLINE
        };
        match probe::probe(program, key.probe_target(), patience) {
            Ok(ProbeResult::Slot(s)) => Event::Outcome(Outcome::Probed(ProbeSeen::Slot(s))),
            Ok(ProbeResult::NoSocket) => Event::Outcome(Outcome::Probed(ProbeSeen::NoSocket)),
            Err(e) => {
                let lost = e.lost();
                if lost && run.taken.is_none() {
                    tracing::warn!(service = %self.config.name, error = %e, "the group lost handoff's program: attaching it again");
                }
                run.error = Some(e.into());
                Event::Outcome(Outcome::Failed(if lost {
                    Failure::Lost
                } else {
                    Failure::Error
                }))
            }
        }
    }

    /// Every member of generation `id` exited: logged and counted; its leader's pidfd is
    /// kept until the machine forgets the generation.
    fn retired(&mut self, id: GenId, how: Retirement, drained_ms: Option<u64>, ctx: &mut Ctx) {
        let drained = drained_ms.map(|ms| ms as f64 / 1e3);
        ctx.metrics.retirement(&self.config.name, how, drained);
        let how = how.as_str();
        if let Some(m) = self.members.get_mut(&id) {
            m.descendants.clear();
        }
        let pid = self.leader_pid(id);
        tracing::info!(service = %self.config.name, generation = id, pid, how, drained_ms, "generation retired: every member exited");
    }

    /// Finds the candidate `pid` names (or the leader a client's pidfd opened): its
    /// members join the table under the id it will get, its listeners wait in `run`.
    fn discover(&mut self, pid: i32, run: &mut Run, ctx: &mut Ctx) -> Event {
        let target = candidate::Target {
            listen: &self.config.listen,
            groups: self.groups.iter().map(|g| g.key).collect(),
            user: self.config.user,
        };
        let found = match run.leader.take() {
            Some(leader) => candidate::take_leader(leader, &target, ctx),
            None => candidate::take(pid, &target, ctx),
        };
        let Candidate {
            leader,
            descendants,
            listeners,
            trusted,
        } = match found {
            Ok(c) => c,
            Err(e) => return step(run, Err(e.into())),
        };
        let id = self.machine.next_id();
        let event = Event::Discovered {
            leader: leader.pid,
            listeners: listeners
                .iter()
                .map(|t| t.iter().map(|l| l.cookie).collect())
                .collect(),
        };
        self.members.insert(
            id,
            Members {
                leader,
                descendants,
                trusted,
                check: None,
            },
        );
        run.installing = Some(id);
        run.taken = Some(listeners);
        event
    }

    /// Generation `id` is steered to: the bind watch reports its uid's binds, the guard
    /// and the steering watch cover the service.
    fn now_steered(&mut self, id: GenId, run: &mut Run, ctx: &mut Ctx) {
        if let Some(all) = run.taken.as_ref() {
            for (group, taken) in self.groups.iter_mut().zip(all) {
                if let Some(t) = taken.first() {
                    group.key = Some(t.key);
                }
            }
        }
        self.watch_owner(id, ctx);
        self.watch_start(ctx);
    }
}

/// The event reporting a fallible step's result; the error is kept for the reply.
fn step(run: &mut Run, result: Result<(), PromoteError>) -> Event {
    match result {
        Ok(()) => Event::Outcome(Outcome::Done),
        Err(e) => {
            run.error = Some(e);
            Event::Outcome(Outcome::Failed(Failure::Error))
        }
    }
}
