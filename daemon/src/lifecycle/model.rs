//! What the lifecycle knows: generations, their phases and blocks of slots, drains, and
//! the steering record each group is told.

use handoff_common::maps::GEN_SLOTS;
use handoff_common::proto::GenerationState;
use serde::{Deserialize, Serialize};

/// A generation's id: 1, 2, … in promote order, never reused within a service.
pub type GenId = u64;

/// A point on the runtime's monotonic clock, in milliseconds from an epoch the runtime
/// chooses (its start). The machine never reads a clock: every event carries `now`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Millis(pub u64);

impl Millis {
    /// `self + ms`, saturating.
    pub fn after(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self` (0 if `earlier` is later).
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// How a service's generations drain: the signals and deadlines of its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Sent to the leader when its generation starts draining (none: not signalled).
    pub drain_signal: Option<i32>,
    /// Sent when its last connection is gone, or at the drain timeout.
    pub retire_signal: i32,
    /// How long a drain may take before the retire signal is sent anyway.
    pub drain_timeout_ms: u64,
    /// After the retire signal, SIGKILL to every member still alive this much later.
    pub kill_after_ms: Option<u64>,
}

/// Where a generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Its listeners are in its blocks but no client is steered to them: a health check
    /// reaches them through probes that name their slot.
    Candidate,
    /// Takes `weight` % of new connections; the active generation takes the rest.
    Canary {
        /// Percent of new connections, 1–99.
        weight: u8,
    },
    /// Takes every new connection (or the rest of a canary's share).
    Active,
    /// The generation before the active one, in the watch window after a promote: it
    /// takes no new connection while the active one has listeners, and is neither told to
    /// drain nor retired until `until`, so that a failing active one can be rolled back
    /// to it.
    Standby {
        /// The end of the watch window: then it drains.
        until: Millis,
    },
    /// Takes no new connection; retired when its count reaches zero or at its timeout.
    Draining,
    /// Every member exited.
    Retired(Retirement),
}

impl Phase {
    /// The state `status` and the state file show. A candidate and a canary are not yet
    /// the active generation: they show as active only once promoted; a standby has
    /// been demoted and shows as draining (its drain deferred).
    pub fn public(self) -> GenerationState {
        match self {
            Phase::Candidate | Phase::Canary { .. } | Phase::Active => GenerationState::Active,
            Phase::Standby { .. } | Phase::Draining => GenerationState::Draining,
            Phase::Retired(_) => GenerationState::Retired,
        }
    }

    /// Not retired.
    pub fn live(self) -> bool {
        !matches!(self, Phase::Retired(_))
    }
}

/// How a generation ended, as metrics and logs name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Retirement {
    /// Its members exited after the retire signal sent when its count reached zero.
    Drained,
    /// … after the retire signal sent at its drain timeout.
    Timeout,
    /// … after SIGKILL, sent at kill-after.
    Killed,
    /// … on their own, before any retire signal.
    Exited,
}

impl Retirement {
    /// Every kind, in the order the metrics' help lists them.
    pub const ALL: &'static [Retirement] = &[
        Retirement::Drained,
        Retirement::Timeout,
        Retirement::Exited,
        Retirement::Killed,
    ];

    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Retirement::Drained => "drained",
            Retirement::Timeout => "timeout",
            Retirement::Killed => "killed",
            Retirement::Exited => "exited",
        }
    }
}

/// Why a draining generation got its retire signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetireReason {
    /// Its last connection closed.
    Drained,
    /// The drain timeout passed first.
    Timeout,
}

/// A generation's listeners in one group: a block of [`GEN_SLOTS`] slots in the group's
/// socket array, and the cookies of the listeners in it, by slot offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Index of the block.
    pub index: u32,
    /// Cookies of its listeners, by slot offset in the block.
    pub cookies: Vec<u64>,
}

impl Block {
    /// Its first slot.
    pub fn first(&self) -> u32 {
        self.index.saturating_mul(GEN_SLOTS)
    }

    /// The slots it steers to: one per listener.
    pub fn span(&self) -> Span {
        Span {
            first: self.first(),
            len: u32::try_from(self.cookies.len()).unwrap_or(GEN_SLOTS),
        }
    }
}

/// A run of slots a record steers to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// The first slot.
    pub first: u32,
    /// How many slots from it.
    pub len: u32,
}

impl Span {
    /// Whether `slot` is in the span.
    pub fn contains(self, slot: u32) -> bool {
        slot >= self.first && slot - self.first < self.len
    }
}

/// What a group's program is told: new connections go to `active` (with a canary, the
/// canary's share to `canary`), falling back to `previous` when the active span has no
/// listener left. The default (nothing) leaves the choice to the kernel's hash, as before
/// any promote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Steer {
    /// A canary and its percent of new connections.
    pub canary: Option<(Span, u8)>,
    /// The active generation.
    pub active: Option<Span>,
    /// The one before it.
    pub previous: Option<Span>,
}

impl Steer {
    /// Block indexes this record names: a block it names is not free, since the program
    /// may still send a connection there.
    pub fn blocks(&self) -> impl Iterator<Item = u32> + '_ {
        let canary = self.canary.map(|(s, _)| s);
        [canary, self.active, self.previous]
            .into_iter()
            .flatten()
            .map(|s| s.first / GEN_SLOTS)
    }
}

/// A draining generation's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// Its tag in the kernel's connection counts; never 0.
    pub tag: u32,
    /// When it started.
    pub started: Millis,
    /// When the drain timeout sends the retire signal anyway.
    pub deadline: Millis,
    /// When and why the retire signal was sent.
    pub retire: Option<(Millis, RetireReason)>,
    /// When every member still alive gets SIGKILL.
    pub kill_at: Option<Millis>,
    /// Whether SIGKILL was sent.
    pub killed: bool,
    /// When to count (again): at the start, or while connections wait in accept queues.
    pub recheck_at: Option<Millis>,
    /// Whether a count has come back.
    pub counted: bool,
}

impl Drain {
    /// The earliest moment something is due.
    pub fn next_deadline(&self) -> Option<Millis> {
        let timeout = self.retire.is_none().then_some(self.deadline);
        [timeout, self.kill_at, self.recheck_at]
            .into_iter()
            .flatten()
            .min()
    }
}

/// A promoted process tree, as the lifecycle sees it: its processes are the runtime's
/// (by generation id), its state is here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// Its id.
    pub id: GenId,
    /// The promoted process (how `promote PID` finds it again).
    pub leader: i32,
    /// Where it is in its life.
    pub phase: Phase,
    /// Its listeners, per group (same order as the service's groups).
    pub blocks: Vec<Block>,
    /// Set while it drains, and after, until it retires.
    pub drain: Option<Drain>,
}

impl Generation {
    /// The cookies of its listeners, over every group.
    pub fn cookies(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks.iter().flat_map(|b| b.cookies.iter().copied())
    }

    /// Listeners over every group.
    pub fn listeners(&self) -> usize {
        self.blocks.iter().map(|b| b.cookies.len()).sum()
    }

    /// Whether its retire signal was sent.
    pub fn retiring(&self) -> bool {
        self.drain.as_ref().is_some_and(|d| d.retire.is_some())
    }
}
