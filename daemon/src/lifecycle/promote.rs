//! Promote, rollback and canaries: which operation a request starts, its steps, and
//! what changes when they all succeeded.

use std::collections::HashSet;

use handoff_common::maps::BLOCKS;

use super::event::{Effect, PromoteMode, Promoted, Refusal, Reply, RollbackReason};
use super::model::{Block, GenId, Generation, Phase, Span, Steer};
use super::operation::{Flip, OpKind, Operation, Step};
use super::service::Lifecycle;

impl Lifecycle {
    /// `promote PID`: a generation it leads already is made active again (or, a canary,
    /// completed or re-weighed); any other pid is discovered first.
    pub(super) fn promote(&mut self, pid: i32, mode: PromoteMode, out: &mut Vec<Effect>) {
        let mode = PromoteMode {
            weight: mode.weight.filter(|&w| w != 100),
            ..mode
        };
        let refuse = |out: &mut Vec<Effect>, r| out.push(Effect::Reply(Reply::Refused(r)));
        if self.op.is_some() {
            return refuse(out, Refusal::Busy);
        }
        if let Some(weight) = mode.weight.filter(|w| !(1..=99).contains(w)) {
            return refuse(out, Refusal::BadWeight { weight });
        }
        if mode.weight.is_some() && self.active().is_none() {
            // Known before anything is discovered: nothing to share traffic with.
            return refuse(out, Refusal::NoActive);
        }
        let known = self.generations.iter().find(|g| {
            g.phase.live() && g.leader == pid && pid > 0 && !self.leaders_exited.contains(&g.id)
        });
        let Some(g) = known else {
            let op = Operation::new(OpKind::Discover { pid, mode }, vec![Step::Discover { pid }]);
            return self.start(op, out);
        };
        let (generation, retiring) = (g.id, g.retiring());
        let flip = match (g.phase, mode.weight) {
            (Phase::Active, _) => {
                return refuse(out, Refusal::AlreadyActive { pid, generation });
            }
            (Phase::Canary { .. }, Some(weight)) => Flip::Weigh {
                canary: generation,
                weight,
            },
            (Phase::Canary { .. }, None) => Flip::Complete {
                canary: generation,
                watch_ms: mode.watch_ms,
            },
            (_, _) if retiring => return refuse(out, Refusal::Retiring { pid, generation }),
            (_, _) => Flip::Reactivate {
                target: generation,
                reason: RollbackReason::Operator,
            },
        };
        // A checked promote of a generation already in the table (completing or
        // re-weighing a canary, going back to a draining one) checks it first too.
        self.flip_checked(flip, mode.check.then_some(generation), out);
    }

    /// `rollback`: a canary is aborted; else the newest standby, or the newest draining
    /// generation not retiring with every listener in place, is made active again.
    pub(super) fn rollback(&mut self, listening: &[GenId], out: &mut Vec<Effect>) {
        if self.op.is_some() {
            return out.push(Effect::Reply(Reply::Refused(Refusal::Busy)));
        }
        if let Some(canary) = self.canary() {
            return self.flip(Flip::Abort { canary }, out);
        }
        match self.rollback_target(listening) {
            Some(target) => self.flip(
                Flip::Reactivate {
                    target,
                    reason: RollbackReason::Operator,
                },
                out,
            ),
            None => out.push(Effect::Reply(Reply::Refused(Refusal::NothingToRollBack))),
        }
    }

    /// The generation a rollback goes back to.
    pub(super) fn rollback_target(&self, listening: &[GenId]) -> Option<GenId> {
        let standby = self
            .generations
            .iter()
            .rev()
            .find(|g| matches!(g.phase, Phase::Standby { .. }));
        let draining = || {
            self.generations
                .iter()
                .rev()
                .find(|g| g.phase == Phase::Draining && !g.retiring() && listening.contains(&g.id))
        };
        standby.or_else(draining).map(|g| g.id)
    }

    fn canary(&self) -> Option<GenId> {
        self.generations
            .iter()
            .find(|g| matches!(g.phase, Phase::Canary { .. }))
            .map(|g| g.id)
    }

    /// The candidate of the promote under way was found: checked against the table, then
    /// its listeners put in free blocks, the groups flipped and probed one by one.
    pub(super) fn discovered(
        &mut self,
        leader: i32,
        listeners: Vec<Vec<u64>>,
        out: &mut Vec<Effect>,
    ) {
        let Some(op) = self.op.take() else { return };
        let OpKind::Discover { mode, .. } = op.kind else {
            self.op = Some(op);
            return;
        };
        let refused = self
            .check_not_shared(&listeners)
            .and_then(|()| self.allocate_blocks())
            .and_then(|blocks| self.install_plan(leader, listeners, blocks, mode));
        match refused {
            Ok(op) => self.start(op, out),
            Err(r) => {
                out.push(Effect::Reply(Reply::Refused(r)));
                // As after a failed operation (see `fail`).
                if self.active().is_none() {
                    self.fail_over(RollbackReason::Exited, out);
                }
            }
        }
    }

    fn check_not_shared(&self, listeners: &[Vec<u64>]) -> Result<(), Refusal> {
        for (group, cookies) in listeners.iter().enumerate() {
            for &cookie in cookies {
                let owner = self
                    .generations
                    .iter()
                    .filter(|g| g.phase.live())
                    .find(|g| g.blocks.iter().any(|b| b.cookies.contains(&cookie)));
                if let Some(owner) = owner {
                    return Err(Refusal::SharedSocket {
                        group,
                        cookie,
                        generation: owner.id,
                        owner: owner.leader,
                    });
                }
            }
        }
        Ok(())
    }

    /// A free block per group: held by no live generation, named by no record in force
    /// (the program may still fall back to it). Rotates through the blocks so that a
    /// block just freed is reused last.
    fn allocate_blocks(&self) -> Result<Vec<u32>, Refusal> {
        let start = u32::try_from(self.next_id % u64::from(BLOCKS)).unwrap_or(0);
        (0..self.records.len())
            .map(|group| {
                let mut used: HashSet<u32> = self
                    .generations
                    .iter()
                    .filter(|g| g.phase.live())
                    .filter_map(|g| g.blocks.get(group).map(|b| b.index))
                    .collect();
                used.extend(self.records[group].blocks());
                (0..BLOCKS)
                    .map(|k| (start + k) % BLOCKS)
                    .find(|b| !used.contains(b))
                    .ok_or(Refusal::NoFreeBlock)
            })
            .collect()
    }

    fn install_plan(
        &self,
        leader: i32,
        listeners: Vec<Vec<u64>>,
        blocks: Vec<u32>,
        mode: PromoteMode,
    ) -> Result<Operation, Refusal> {
        if mode.weight.is_some() && self.active().is_none() {
            return Err(Refusal::NoActive);
        }
        let blocks: Vec<Block> = blocks
            .into_iter()
            .zip(listeners)
            .map(|(index, cookies)| Block { index, cookies })
            .collect();
        let generation = Generation {
            id: self.next_id,
            leader,
            phase: Phase::Candidate,
            blocks,
            drain: None,
        };
        let mut steps = Vec::new();
        for (group, block) in generation.blocks.iter().enumerate() {
            steps.push(Step::Insert {
                group,
                block: block.index,
            });
            if mode.check {
                steps.push(Step::Attach { group });
            } else {
                steps.extend(self.flip_steps(group, &generation, mode));
                // After the flip: attaching again replaces whatever the group runs (an
                // intruder's program, or ours detached), at the cost of one setsockopt.
                steps.insert(steps.len() - 1, Step::Attach { group });
            }
        }
        if mode.check {
            steps.push(Step::Check {
                generation: generation.id,
            });
            for group in 0..generation.blocks.len() {
                steps.extend(self.flip_steps(group, &generation, mode));
            }
        }
        Ok(Operation::new(OpKind::Install { generation, mode }, steps))
    }

    /// Publish and probe one group for the new `generation`.
    fn flip_steps(&self, group: usize, generation: &Generation, mode: PromoteMode) -> [Step; 2] {
        let span = generation.blocks[group].span();
        let current = self
            .active()
            .and_then(|a| a.blocks.get(group))
            .map(Block::span);
        let record = match mode.weight {
            Some(weight) => Steer {
                canary: Some((span, weight)),
                active: current,
                previous: self
                    .fallback()
                    .and_then(|g| g.blocks.get(group))
                    .map(Block::span),
            },
            None => Steer {
                canary: None,
                active: Some(span),
                previous: current,
            },
        };
        [
            Step::Publish { group, record },
            Step::Probe {
                group,
                expect: expected(&record),
                patient: true,
                reattach: false,
            },
        ]
    }

    /// Starts a flip between generations in the table: per group, publish and probe.
    pub(super) fn flip(&mut self, flip: Flip, out: &mut Vec<Effect>) {
        self.flip_checked(flip, None, out);
    }

    /// As [`Lifecycle::flip`], checking generation `check` first if given: a failing
    /// check ends the operation before anything is published.
    fn flip_checked(&mut self, flip: Flip, check: Option<GenId>, out: &mut Vec<Effect>) {
        let mut steps = Vec::with_capacity(2 * self.records.len() + 1);
        steps.extend(check.map(|generation| Step::Check { generation }));
        for group in 0..self.records.len() {
            let record = self.flip_record(flip, group);
            steps.push(Step::Publish { group, record });
            steps.push(Step::Probe {
                group,
                expect: expected(&record),
                patient: true,
                reattach: true,
            });
        }
        self.start(Operation::new(OpKind::Flip(flip), steps), out);
    }

    fn flip_record(&self, flip: Flip, group: usize) -> Steer {
        let span =
            |id: GenId| -> Option<Span> { self.generation(id)?.blocks.get(group).map(Block::span) };
        let active = self.active().map(|g| g.id);
        match flip {
            Flip::Reactivate { target, .. } | Flip::Complete { canary: target, .. } => Steer {
                canary: None,
                active: span(target),
                previous: active.filter(|&a| a != target).and_then(span),
            },
            Flip::Weigh { canary, weight } => Steer {
                canary: span(canary).map(|s| (s, weight)),
                active: active.and_then(span),
                previous: self.fallback().and_then(|g| span(g.id)),
            },
            Flip::Abort { .. } => Steer {
                canary: None,
                active: active.and_then(span),
                previous: self.fallback().and_then(|g| span(g.id)),
            },
        }
    }

    /// Every step of an install succeeded: the new generation is active (or a canary),
    /// the one before drains (or stands by through the watch window).
    pub(super) fn installed(
        &mut self,
        mut generation: Generation,
        mode: PromoteMode,
        out: &mut Vec<Effect>,
    ) {
        // At most MAX_NEXT_ID from a state file: one more never overflows, but saturate.
        self.next_id = self.next_id.saturating_add(1);
        let id = generation.id;
        let mut promoted = Promoted {
            generation: id,
            pid: generation.leader,
            listeners: generation.listeners(),
            draining: None,
        };
        match mode.weight {
            Some(weight) => {
                generation.phase = Phase::Canary { weight };
                // The record names one canary: the one it replaces drains.
                let before = self.canary().and_then(|c| self.index(c));
                if let Some(i) = before {
                    promoted.draining = Some(self.generations[i].id);
                    self.start_drain(i, out);
                }
                self.generations.push(generation);
            }
            None => {
                generation.phase = Phase::Active;
                promoted.draining = self.active().map(|g| g.id);
                self.generations.push(generation);
                self.took_over(id, mode.watch_ms, out);
            }
        }
        out.push(Effect::Persist);
        out.push(Effect::Reply(Reply::Promoted(promoted)));
    }

    /// `id` became the active generation: the one active before it drains (or, with a
    /// watch window, stands by), and so do a canary and older standbys.
    fn took_over(&mut self, id: GenId, watch_ms: Option<u64>, out: &mut Vec<Effect>) {
        out.push(Effect::Steered { generation: id });
        for i in 0..self.generations.len() {
            let g = &self.generations[i];
            if g.id == id {
                continue;
            }
            match (g.phase, watch_ms) {
                (Phase::Active, Some(ms)) => {
                    self.generations[i].phase = Phase::Standby {
                        until: self.now.after(ms),
                    };
                    out.push(Effect::Wake);
                }
                (Phase::Active | Phase::Canary { .. } | Phase::Standby { .. }, _) => {
                    self.start_drain(i, out)
                }
                _ => {}
            }
        }
    }

    /// Why a flip whose steps all succeeded must still be undone: the generation it
    /// makes active (or weighs) exited, or got its retire signal, while a step was
    /// pending (a tick or a count is handled between steps).
    pub(super) fn flip_refusal(&self, flip: Flip) -> Option<Refusal> {
        let target = match flip {
            Flip::Reactivate { target, .. } => target,
            Flip::Complete { canary, .. } | Flip::Weigh { canary, .. } => canary,
            Flip::Abort { .. } => return None,
        };
        match self.generation(target) {
            Some(g) if g.phase.live() && g.retiring() => Some(Refusal::Retiring {
                pid: g.leader,
                generation: target,
            }),
            Some(g) if g.phase.live() => None,
            _ => Some(Refusal::Failed),
        }
    }

    /// Every step of a flip succeeded.
    pub(super) fn flipped(&mut self, flip: Flip, out: &mut Vec<Effect>) {
        let prior = self.active().map(|g| g.id);
        let (generation, draining) = match flip {
            Flip::Reactivate { target, reason } => {
                self.reactivated(target, out);
                // Traffic went back: the generation it left drains at once.
                self.took_over(target, None, out);
                if reason != RollbackReason::Operator {
                    out.push(Effect::RolledBack { to: target, reason });
                }
                (target, prior.filter(|&p| p != target))
            }
            Flip::Complete { canary, watch_ms } => {
                self.reactivated(canary, out);
                self.took_over(canary, watch_ms, out);
                (canary, prior)
            }
            Flip::Weigh { canary, weight } => {
                if let Some(i) = self.index(canary) {
                    self.generations[i].phase = Phase::Canary { weight };
                }
                (canary, None)
            }
            Flip::Abort { canary } => {
                // A canary that exited meanwhile is retired already: nothing to drain.
                let live = self
                    .index(canary)
                    .filter(|&i| self.generations[i].phase.live());
                if let Some(i) = live {
                    self.start_drain(i, out);
                }
                (prior.unwrap_or(canary), Some(canary))
            }
        };
        let Some(g) = self.generation(generation) else {
            return;
        };
        let promoted = Promoted {
            generation,
            pid: g.leader,
            listeners: g.listeners(),
            draining,
        };
        out.push(Effect::Persist);
        out.push(Effect::Reply(Reply::Promoted(promoted)));
    }

    /// Generation `id` is active again: its drain (if any) is over.
    fn reactivated(&mut self, id: GenId, out: &mut Vec<Effect>) {
        if let Some(i) = self.index(id) {
            let g = &mut self.generations[i];
            g.phase = Phase::Active;
            if let Some(tag) = g.drain.take().map(|d| d.tag).filter(|&t| t != 0) {
                out.push(Effect::Forget { tag });
            }
        }
    }
}

/// The slots a probe may be steered to under `record`: the active span, and the canary's.
fn expected(record: &Steer) -> Vec<Span> {
    record
        .active
        .into_iter()
        .chain(record.canary.map(|(s, _)| s))
        .collect()
}
