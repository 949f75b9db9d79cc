//! The machine's inputs and outputs.

use serde::{Deserialize, Serialize};

use super::model::{GenId, Generation, Policy, RetireReason, Retirement, Span, Steer};

/// How a promote hands over traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteMode {
    /// Check the candidate through its own listeners before any client reaches it.
    pub check: bool,
    /// Percent of new connections for the candidate (1–99: a canary); none: all.
    pub weight: Option<u8>,
    /// Keep the previous generation undrained this long after the promote, to roll back
    /// to it automatically if the new one fails.
    pub watch_ms: Option<u64>,
}

/// Something that happened, for the machine to act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// `promote PID`, before anything is discovered of it.
    Promote {
        /// The process asked for.
        pid: i32,
        /// How traffic is handed over.
        mode: PromoteMode,
    },
    /// The candidate the runtime found for the promote under way: its leader and its
    /// listeners' cookies, per group.
    Discovered {
        /// The leader's pid.
        leader: i32,
        /// Cookies per group (same order as the service's groups).
        listeners: Vec<Vec<u64>>,
    },
    /// `rollback`. `listening` names the generations whose listeners are all still in
    /// their slots (a generation that closed one cannot take traffic back).
    Rollback {
        /// Generations with every listener in place.
        listening: Vec<GenId>,
    },
    /// The outcome of the pending step of the operation under way.
    Outcome(Outcome),
    /// The drain of `generation` is counted under `tag` from now on.
    Tagged {
        /// The generation.
        generation: GenId,
        /// Its tag.
        tag: u32,
    },
    /// A count of a draining generation.
    Counted {
        /// The generation.
        generation: GenId,
        /// Connections its processes hold, counted in the kernel.
        counted: u64,
        /// Connections waiting in its listeners' accept queues.
        queued: u64,
    },
    /// Counting failed: the drain timeout will retire it.
    CountFailed {
        /// The generation.
        generation: GenId,
    },
    /// The kernel says a tag's count reached zero.
    Zero {
        /// The tag.
        tag: u32,
    },
    /// Time passed: act on every deadline up to the event's `now`.
    Tick,
    /// Recount every draining generation (a zero event may have been lost).
    RecountDraining,
    /// The leader of `generation` exited (its other members may live on).
    LeaderExited {
        /// The generation.
        generation: GenId,
    },
    /// Every member of `generation` exited.
    Exited {
        /// The generation.
        generation: GenId,
    },
    /// The active generation failed its health check (run in its watch window).
    CheckFailed {
        /// The generation.
        generation: GenId,
    },
    /// The active generation has no listener left in some group.
    ListenersLost {
        /// The generation.
        generation: GenId,
    },
    /// A listener the runtime put in slot `offset` of `generation`'s block in `group`.
    ListenerJoined {
        /// The generation.
        generation: GenId,
        /// The group.
        group: usize,
        /// Its slot offset in the block.
        offset: usize,
        /// Its cookie.
        cookie: u64,
    },
    /// New drain settings (a reload).
    Policy(Policy),
    /// A restarted daemon takes up the table the previous one saved.
    Recover {
        /// The next generation id.
        next_id: GenId,
        /// The record in force in each group (read from the pinned maps).
        records: Vec<Steer>,
        /// Generations whose processes were found again.
        generations: Vec<Generation>,
    },
    /// Publish every group's record as the table says (after the table was rebuilt).
    Resteer,
}

/// The outcome of a fallible step, reported by the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done.
    Done,
    /// A probe's answer: what the program chose.
    Probed(ProbeSeen),
    /// Whether a re-attach found a listener to attach through.
    Attached(bool),
    /// Failed; the runtime keeps the error for the reply.
    Failed(Failure),
}

/// What a probe connection found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeSeen {
    /// The program chose this slot.
    Slot(u32),
    /// The program found no socket to choose.
    NoSocket,
}

impl std::fmt::Display for ProbeSeen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeSeen::Slot(s) => write!(f, "slot {s}"),
            ProbeSeen::NoSocket => f.write_str("no socket"),
        }
    }
}

/// How a step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// No program of handoff saw the probe: the group lost handoff's program.
    Lost,
    /// Any other failure.
    Error,
}

/// Why a signal is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Why {
    /// The generation starts draining.
    Drain,
    /// Its drain ended.
    Retire(RetireReason),
    /// Kill-after passed.
    Kill,
}

/// Which of a generation's processes get a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignalScope {
    /// The leader (every member if it is gone or unverified).
    Leader,
    /// Every live member.
    All,
}

/// Why traffic went back to an earlier generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RollbackReason {
    /// `handoffctl rollback`.
    Operator,
    /// The active generation exited inside its watch window.
    Exited,
    /// It lost its listeners inside its watch window.
    ListenersLost,
    /// It failed its health check inside its watch window.
    CheckFailed,
}

impl RollbackReason {
    /// Every reason, in the order the metrics list them.
    pub const ALL: &'static [RollbackReason] = &[
        RollbackReason::Operator,
        RollbackReason::Exited,
        RollbackReason::ListenersLost,
        RollbackReason::CheckFailed,
    ];

    /// The label in metrics, logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            RollbackReason::Operator => "operator",
            RollbackReason::Exited => "exited",
            RollbackReason::ListenersLost => "listeners_lost",
            RollbackReason::CheckFailed => "check_failed",
        }
    }
}

/// A check of a candidate through its own listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// The candidate.
    pub generation: GenId,
}

/// Something for the runtime to do. Steps of an operation (marked "reported") are
/// applied one at a time, and their outcome comes back as [`Event::Outcome`]; the others
/// are applied in order, and their failures only logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// Find the candidate `pid` names (reported: [`Event::Discovered`], or
    /// [`Outcome::Failed`] with the runtime keeping the refusal).
    Discover {
        /// The pid asked for.
        pid: i32,
    },
    /// Put the candidate's listeners in `group` into the slots of `block` (reported).
    Insert {
        /// The group.
        group: usize,
        /// The block index.
        block: u32,
    },
    /// Attach the group's program through one of the candidate's listeners (reported).
    Attach {
        /// The group.
        group: usize,
    },
    /// Publish a group's steering record (reported).
    Publish {
        /// The group.
        group: usize,
        /// The record.
        record: Steer,
    },
    /// Probe a group and report what its program chose (reported).
    Probe {
        /// The group.
        group: usize,
        /// The slots the program should choose from (for the runtime's logs).
        expect: Span,
        /// Whether it may wait the operation's longer deadline (a late softirq).
        patient: bool,
    },
    /// Attach the group's program again, through a listener of a live generation
    /// (reported: [`Outcome::Attached`]).
    Reattach {
        /// The group.
        group: usize,
    },
    /// Check the candidate through its own listeners (reported).
    Check(Check),
    /// Publish a record, not as a step: a failure is logged.
    Republish {
        /// The group.
        group: usize,
        /// The record.
        record: Steer,
    },
    /// Empty slots `first..first + count` of a group.
    RemoveSlots {
        /// The group.
        group: usize,
        /// The first slot.
        first: u32,
        /// How many.
        count: u32,
    },
    /// Read the generation's members again (processes forked since).
    Adopt {
        /// The generation.
        generation: GenId,
    },
    /// Start counting the generation's connections under a new tag (reported:
    /// [`Event::Tagged`]).
    StartCount {
        /// The generation.
        generation: GenId,
    },
    /// Stop counting a tag.
    Forget {
        /// The tag.
        tag: u32,
    },
    /// Count the generation's connections (reported: [`Event::Counted`] or
    /// [`Event::CountFailed`]).
    Count {
        /// The generation.
        generation: GenId,
        /// Its tag.
        tag: u32,
        /// Whether it is the drain's first count (logged at info).
        first: bool,
    },
    /// Send a signal to the generation's processes.
    Signal {
        /// The generation.
        generation: GenId,
        /// The signal number.
        signal: i32,
        /// Why.
        why: Why,
        /// To whom.
        scope: SignalScope,
    },
    /// The generation is steered to now: the bind watch reports its binds, the steering
    /// watch and guard run.
    Steered {
        /// The generation.
        generation: GenId,
    },
    /// Every member of a generation exited (logged, counted in metrics).
    Retired {
        /// The generation.
        generation: GenId,
        /// How it ended.
        how: Retirement,
        /// How long it drained, if it did.
        drained_ms: Option<u64>,
    },
    /// Traffic went back to `to` without an operator's command.
    RolledBack {
        /// The generation now active.
        to: GenId,
        /// Why.
        reason: RollbackReason,
    },
    /// A retired generation is forgotten: its processes may be released.
    Release {
        /// The generation.
        generation: GenId,
    },
    /// The table changed: write the state file.
    Persist,
    /// A deadline was brought forward: the runtime's sleep must end sooner.
    Wake,
    /// The answer to the operation under way.
    Reply(Reply),
}

/// The answer to a promote or rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Done.
    Promoted(Promoted),
    /// Refused or failed; nothing changed (every step taken was undone).
    Refused(Refusal),
}

/// A promote or rollback that took effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promoted {
    /// The generation now active (or canary).
    pub generation: GenId,
    /// Its leader.
    pub pid: i32,
    /// Its listeners over every group.
    pub listeners: usize,
    /// The generation that stopped being active, if any.
    pub draining: Option<GenId>,
}

/// Why a promote or rollback did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("pid {pid} is already the active generation ({generation})")]
    /// The pid leads the active generation already.
    AlreadyActive {
        /// The pid.
        pid: i32,
        /// The generation.
        generation: GenId,
    },
    #[error("generation {generation} (pid {pid}) is retiring: start a new process instead")]
    /// The generation got its retire signal and is exiting.
    Retiring {
        /// The pid.
        pid: i32,
        /// The generation.
        generation: GenId,
    },
    #[error("no draining generation with live listeners to roll back to")]
    /// No generation to roll back to.
    NothingToRollBack,
    #[error("a listener of the candidate already belongs to generation {generation} (pid {owner})")]
    /// A listener of the candidate is a socket of a live generation already.
    SharedSocket {
        /// The group it is in.
        group: usize,
        /// Its cookie.
        cookie: u64,
        /// The generation holding it.
        generation: GenId,
        /// That generation's leader.
        owner: i32,
    },
    #[error("every block of slots is held by a live generation: let some retire first")]
    /// Every block of a group is held by live generations.
    NoFreeBlock,
    #[error("the probe of group {group} chose {seen}: steering left as it was")]
    /// A probe saw the program choose something else than the generation.
    ProbeMismatch {
        /// The group.
        group: usize,
        /// What it chose.
        seen: ProbeSeen,
    },
    #[error("a step of the operation failed: steering left as it was")]
    /// A step failed (the runtime holds the error).
    Failed,
    #[error("another promote or rollback of the service is under way: retry")]
    /// Another operation is under way.
    Busy,
    #[error(
        "a canary needs an active generation to share traffic with: promote without a weight first"
    )]
    /// A canary needs an active generation to share the traffic with.
    NoActive,
    #[error("weight {weight} is not a percentage from 1 to 99 (100 completes a promote)")]
    /// A weight outside 1–99.
    BadWeight {
        /// The weight asked for.
        weight: u8,
    },
}
