//! Operations that take several fallible steps (a promote, a rollback): one step at a
//! time, its outcome reported back; on a failure, every step taken is undone in the
//! order it was taken, and the operation answers with the reason.

use std::collections::VecDeque;

use handoff_common::maps::GEN_SLOTS;
use serde::{Deserialize, Serialize};

use super::event::RollbackReason;
use super::event::{Check, Effect, Failure, Outcome, ProbeSeen, PromoteMode, Refusal, Reply};
use super::model::{GenId, Generation, Span, Steer};
use super::service::Lifecycle;

/// A promote or rollback under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Operation {
    /// What it does when every step succeeded.
    pub kind: OpKind,
    /// Steps still to take, in order.
    pub steps: VecDeque<Step>,
    /// The step whose outcome is awaited.
    pub pending: Option<Step>,
    /// What was changed, to put back on a failure: a group's record before, and the
    /// block the operation filled in it.
    pub undo: Vec<Undo>,
}

/// What an operation does once its steps all succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum OpKind {
    /// Waiting for the runtime to discover the candidate `pid` names.
    Discover { pid: i32, mode: PromoteMode },
    /// A new generation, its listeners in their blocks.
    Install {
        generation: Generation,
        mode: PromoteMode,
    },
    /// Steering changed between live generations.
    Flip(Flip),
}

/// A change of steering between generations already in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Flip {
    /// A standby or draining generation becomes active again.
    Reactivate {
        target: GenId,
        reason: RollbackReason,
    },
    /// The canary takes every new connection.
    Complete {
        canary: GenId,
        watch_ms: Option<u64>,
    },
    /// The canary's share changes.
    Weigh { canary: GenId, weight: u8 },
    /// The canary takes no more connections and drains.
    Abort { canary: GenId },
}

/// One fallible step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Step {
    Insert {
        group: usize,
        block: u32,
    },
    Attach {
        group: usize,
    },
    Publish {
        group: usize,
        record: Steer,
    },
    Probe {
        group: usize,
        /// Slots the program may choose (the active span, and the canary's).
        expect: Vec<Span>,
        patient: bool,
        /// A probe no program saw makes the program be attached again, once.
        reattach: bool,
    },
    Reattach {
        group: usize,
        expect: Vec<Span>,
    },
    Check {
        generation: GenId,
    },
    Discover {
        pid: i32,
    },
}

/// What a failure must put back in one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Undo {
    pub group: usize,
    /// The record in force before.
    pub record: Steer,
    /// The block filled by the operation, emptied again.
    pub block: Option<u32>,
}

impl Step {
    fn effect(&self) -> Effect {
        match self {
            Step::Insert { group, block } => Effect::Insert {
                group: *group,
                block: *block,
            },
            Step::Attach { group } => Effect::Attach { group: *group },
            Step::Publish { group, record } => Effect::Publish {
                group: *group,
                record: *record,
            },
            Step::Probe {
                group,
                expect,
                patient,
                ..
            } => Effect::Probe {
                group: *group,
                expect: expect.first().copied().unwrap_or_default(),
                patient: *patient,
            },
            Step::Reattach { group, .. } => Effect::Reattach { group: *group },
            Step::Check { generation } => Effect::Check(Check {
                generation: *generation,
            }),
            Step::Discover { pid } => Effect::Discover { pid: *pid },
        }
    }
}

impl Operation {
    /// An operation of `kind` taking `steps`.
    pub fn new(kind: OpKind, steps: Vec<Step>) -> Self {
        Self {
            kind,
            steps: steps.into(),
            pending: None,
            undo: Vec::new(),
        }
    }
}

impl Operation {
    /// Block `before` of `group` grew to `grown`: the records and probes of `op` that
    /// name it name the grown one.
    pub fn grow(&mut self, group: usize, before: Span, grown: Span) {
        let fix = |s: &mut Span| {
            if *s == before {
                *s = grown;
            }
        };
        let fix_record = |r: &mut Steer| {
            r.active.iter_mut().chain(&mut r.previous).for_each(fix);
            r.canary.iter_mut().for_each(|(s, _)| fix(s));
        };
        for step in self.steps.iter_mut().chain(&mut self.pending) {
            match step {
                Step::Publish { group: g, record } if *g == group => fix_record(record),
                Step::Probe {
                    group: g, expect, ..
                }
                | Step::Reattach { group: g, expect }
                    if *g == group =>
                {
                    expect.iter_mut().for_each(fix)
                }
                _ => {}
            }
        }
        for undo in self.undo.iter_mut().filter(|u| u.group == group) {
            fix_record(&mut undo.record);
        }
    }
}

impl Lifecycle {
    /// Starts `op`: its first step, or its end if it has none.
    pub(super) fn start(&mut self, op: Operation, out: &mut Vec<Effect>) {
        self.advance(op, out);
    }

    /// Takes the next step of `op`, or ends it.
    fn advance(&mut self, mut op: Operation, out: &mut Vec<Effect>) {
        let Some(step) = op.steps.pop_front() else {
            return self.commit(op, out);
        };
        // The record in force before a step changes it, and the block a step fills: what
        // a later failure puts back.
        match &step {
            Step::Insert { group, block } => op.undo.push(Undo {
                group: *group,
                record: self.record(*group),
                block: Some(*block),
            }),
            Step::Publish { group, record } => {
                if !op.undo.iter().any(|u| u.group == *group) {
                    op.undo.push(Undo {
                        group: *group,
                        record: self.record(*group),
                        block: None,
                    });
                }
                if let Some(r) = self.records.get_mut(*group) {
                    *r = *record;
                }
            }
            _ => {}
        }
        out.push(step.effect());
        op.pending = Some(step);
        self.op = Some(op);
    }

    fn record(&self, group: usize) -> Steer {
        self.records.get(group).copied().unwrap_or_default()
    }

    /// The pending step of `op` ended with `outcome`.
    pub(super) fn step(&mut self, mut op: Operation, outcome: Outcome, out: &mut Vec<Effect>) {
        let Some(pending) = op.pending.take() else {
            return self.advance(op, out);
        };
        match (pending, outcome) {
            (
                Step::Probe {
                    group,
                    expect,
                    reattach: true,
                    ..
                },
                Outcome::Failed(Failure::Lost),
            ) => {
                op.steps.push_front(Step::Reattach { group, expect });
                self.advance(op, out)
            }
            (Step::Probe { group, expect, .. }, Outcome::Probed(seen)) => match seen {
                ProbeSeen::Slot(s) if expect.iter().any(|span| span.contains(s)) => {
                    self.advance(op, out)
                }
                _ => self.fail(op, Refusal::ProbeMismatch { group, seen }, out),
            },
            (Step::Reattach { group, expect }, Outcome::Attached(true)) => {
                // Just attached: the program answers at once or not at all.
                op.steps.push_front(Step::Probe {
                    group,
                    expect,
                    patient: false,
                    reattach: false,
                });
                self.advance(op, out)
            }
            (Step::Reattach { .. }, Outcome::Attached(false)) | (_, Outcome::Failed(_)) => {
                self.fail(op, Refusal::Failed, out)
            }
            // Done, or nothing to probe (a group without a program or a key yet).
            _ => self.advance(op, out),
        }
    }

    /// Undoes what `op` did, in the order it was done, and answers `refusal`.
    pub(super) fn fail(&mut self, op: Operation, refusal: Refusal, out: &mut Vec<Effect>) {
        let automatic = matches!(op.kind, OpKind::Flip(Flip::Reactivate { reason, .. })
            if reason != RollbackReason::Operator);
        for undo in op.undo {
            if let Some(r) = self.records.get_mut(undo.group) {
                *r = undo.record;
            }
            out.push(Effect::Republish {
                group: undo.group,
                record: undo.record,
            });
            if let Some(block) = undo.block {
                out.push(Effect::RemoveSlots {
                    group: undo.group,
                    first: block.saturating_mul(GEN_SLOTS),
                    count: GEN_SLOTS,
                });
            }
        }
        out.push(Effect::Reply(Reply::Refused(refusal)));
        // The active generation exited while the operation ran: traffic goes back to the
        // standby now (once: not again when that automatic flip is what failed).
        if !automatic && self.active().is_none() {
            self.fail_over(RollbackReason::Exited, out);
        }
    }

    /// Every step of `op` succeeded.
    fn commit(&mut self, op: Operation, out: &mut Vec<Effect>) {
        if let OpKind::Flip(flip) = op.kind
            && let Some(refusal) = self.flip_refusal(flip)
        {
            return self.fail(op, refusal, out);
        }
        match op.kind {
            // Discovery succeeds with its own event ([`Event::Discovered`]), not `Done`.
            OpKind::Discover { .. } => self.fail(op, Refusal::Failed, out),
            OpKind::Install { generation, mode } => self.installed(generation, mode, out),
            OpKind::Flip(flip) => self.flipped(flip, out),
        }
    }
}
