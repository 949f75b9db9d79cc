//! One service's lifecycle: its generations, the record each group is told, and the
//! operation under way.

use serde::{Deserialize, Serialize};

use super::event::{Effect, Event, Outcome};
use super::model::{GenId, Generation, Millis, Phase, Policy, Steer};
use super::operation::Operation;

/// How many retired generations a service keeps listing.
pub(super) const KEEP_RETIRED: usize = 8;

/// The lifecycle of one service's generations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    /// The record last published in each group (default: none yet, the kernel's hash).
    pub(super) records: Vec<Steer>,
    /// Generations, oldest first; the retired ones listed until [`KEEP_RETIRED`] are.
    pub(super) generations: Vec<Generation>,
    /// The id of the next promote.
    pub(super) next_id: GenId,
    /// How generations drain.
    pub(super) policy: Policy,
    /// The promote or rollback under way.
    pub(super) op: Option<Operation>,
    /// Live generations whose leader exited: `promote PID` never finds them again (the
    /// pid may be reused), but replies still name the pid they were promoted as.
    #[serde(default)]
    pub(super) leaders_exited: Vec<GenId>,
    /// The time of the event being handled.
    #[serde(skip)]
    pub(super) now: Millis,
}

impl Lifecycle {
    /// A service with `groups` addresses and no generation yet.
    pub fn new(groups: usize, policy: Policy) -> Self {
        Self {
            records: vec![Steer::default(); groups],
            generations: Vec::new(),
            next_id: 1,
            policy,
            op: None,
            leaders_exited: Vec::new(),
            now: Millis::default(),
        }
    }

    /// Acts on `event`, which happened at `now`; returns what the runtime must do, in
    /// order.
    pub fn handle(&mut self, now: Millis, event: Event) -> Vec<Effect> {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        match event {
            Event::Promote { pid, mode } => self.promote(pid, mode, &mut out),
            Event::Discovered { leader, listeners } => self.discovered(leader, listeners, &mut out),
            Event::Rollback { listening } => self.rollback(&listening, &mut out),
            Event::Outcome(outcome) => self.outcome(outcome, &mut out),
            Event::Tagged { generation, tag } => self.tagged(generation, tag),
            Event::Counted {
                generation,
                counted,
                queued,
            } => self.counted(generation, counted, queued, &mut out),
            Event::CountFailed { generation } => self.count_failed(generation),
            Event::Zero { tag } => self.zero(tag, &mut out),
            Event::Tick => self.tick(&mut out),
            Event::RecountDraining => self.recount_draining(&mut out),
            Event::LeaderExited { generation } => self.leader_exited(generation),
            Event::Exited { generation } => self.exited(generation, &mut out),
            Event::ListenersLost { generation } => self.listeners_lost(generation, &mut out),
            Event::CheckFailed { generation } => self.check_failed(generation, &mut out),
            Event::ListenerJoined {
                generation,
                group,
                offset,
                cookie,
            } => self.listener_joined(generation, group, offset, cookie, &mut out),
            Event::Policy(policy) => self.set_policy(policy),
            Event::Recover {
                next_id,
                records,
                generations,
            } => self.recover(next_id, records, generations, &mut out),
            Event::Resteer => self.resteer(&mut out),
        }
        out
    }

    /// Every generation, oldest first.
    pub fn generations(&self) -> &[Generation] {
        &self.generations
    }

    /// The generation with `id`.
    pub fn generation(&self, id: GenId) -> Option<&Generation> {
        self.generations.iter().find(|g| g.id == id)
    }

    /// The active generation.
    pub fn active(&self) -> Option<&Generation> {
        self.generations.iter().find(|g| g.phase == Phase::Active)
    }

    /// The record last published in each group.
    #[cfg(test)]
    pub fn records(&self) -> &[Steer] {
        &self.records
    }

    /// Whether an operation waits for a step's outcome.
    #[cfg(test)]
    pub fn busy(&self) -> bool {
        self.op.is_some()
    }

    /// The id the next promote gets.
    pub fn next_id(&self) -> GenId {
        self.next_id
    }

    /// Whether the leader of generation `id` was reported exited (its pid may be reused:
    /// `promote PID` does not find the generation; replies still name the pid).
    pub fn leader_gone(&self, id: GenId) -> bool {
        self.leaders_exited.contains(&id)
    }

    /// How generations drain.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Generations not retired.
    pub fn live(&self) -> usize {
        self.generations.iter().filter(|g| g.phase.live()).count()
    }

    /// The earliest deadline of any generation.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.generations
            .iter()
            .filter_map(|g| match g.phase {
                Phase::Draining => g.drain.as_ref()?.next_deadline(),
                Phase::Standby { until } => Some(until),
                _ => None,
            })
            .min()
    }

    pub(super) fn index(&self, id: GenId) -> Option<usize> {
        self.generations.iter().position(|g| g.id == id)
    }

    fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
        for d in self.generations.iter_mut().filter_map(|g| g.drain.as_mut()) {
            d.deadline = d.started.after(policy.drain_timeout_ms);
        }
    }

    fn leader_exited(&mut self, generation: GenId) {
        // Its pid may be reused: `promote PID` never finds this generation again.
        if self.index(generation).is_some() && !self.leaders_exited.contains(&generation) {
            self.leaders_exited.push(generation);
        }
    }

    /// The record that steers to the active generation (and the canary), falling back
    /// to the newest standby or draining one.
    pub(super) fn record_for_table(&self, group: usize) -> Steer {
        let span = |g: &Generation| g.blocks.get(group).map(|b| b.span());
        let Some(active) = self.active() else {
            return Steer::default();
        };
        let canary = self.generations.iter().find_map(|g| match g.phase {
            Phase::Canary { weight } => Some((span(g)?, weight)),
            _ => None,
        });
        Steer {
            canary,
            active: span(active),
            previous: self.fallback().and_then(span),
        }
    }

    /// The generation the program falls back to: the newest standby, else the newest
    /// draining one.
    pub(super) fn fallback(&self) -> Option<&Generation> {
        let newest =
            |want: fn(Phase) -> bool| self.generations.iter().rev().find(|g| want(g.phase));
        newest(|p| matches!(p, Phase::Standby { .. })).or_else(|| newest(|p| p == Phase::Draining))
    }

    fn resteer(&mut self, out: &mut Vec<Effect>) {
        // An operation under way owns the records until it ends (and its undo restores
        // them): the table it would steer by is not settled yet.
        if self.op.is_some() {
            return;
        }
        for group in 0..self.records.len() {
            let record = self.record_for_table(group);
            self.records[group] = record;
            out.push(Effect::Republish { group, record });
        }
    }

    pub(super) fn outcome(&mut self, outcome: Outcome, out: &mut Vec<Effect>) {
        if let Some(op) = self.op.take() {
            self.step(op, outcome, out);
        }
    }
}
