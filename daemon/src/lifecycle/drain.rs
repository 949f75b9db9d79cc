//! Draining and retirement: counts, the retire signal at zero or at the timeout,
//! kill-after, the end of a watch window, exits, and recovery of a saved table.

use handoff_common::maps::GEN_SLOTS;

use super::event::{Effect, RollbackReason, SignalScope, Why};
use super::model::{
    Block, Drain, GenId, Generation, Millis, Phase, RetireReason, Retirement, Span, Steer,
};
use super::operation::Flip;
use super::service::{KEEP_RETIRED, Lifecycle};

/// How long to wait before counting again while connections wait in an accept queue.
const RECHECK_MS: u64 = 5;

impl Lifecycle {
    /// Starts draining the generation at `index`: members read again, counting under a
    /// new tag, the drain signal; the first count at the next tick (after the promote
    /// that demoted it has answered: a socket closed meanwhile was never counted, so
    /// nothing is missed).
    pub(super) fn start_drain(&mut self, index: usize, out: &mut Vec<Effect>) {
        let now = self.now;
        let policy = self.policy;
        let g = &mut self.generations[index];
        g.phase = Phase::Draining;
        g.drain = Some(Drain {
            tag: 0,
            started: now,
            deadline: now.after(policy.drain_timeout_ms),
            retire: None,
            kill_at: None,
            killed: false,
            recheck_at: Some(now),
            counted: false,
        });
        // Members are read before the drain signal: a leader that exits on it must not
        // take the knowledge of its workers with it.
        out.push(Effect::Adopt { generation: g.id });
        out.push(Effect::StartCount { generation: g.id });
        if let Some(signal) = policy.drain_signal {
            out.push(Effect::Signal {
                generation: g.id,
                signal,
                why: Why::Drain,
                scope: SignalScope::Leader,
            });
        }
        out.push(Effect::Wake);
    }

    pub(super) fn tagged(&mut self, generation: GenId, tag: u32) {
        if let Some(d) = self.drain_mut(generation) {
            d.tag = tag;
        }
    }

    fn drain_mut(&mut self, generation: GenId) -> Option<&mut Drain> {
        let i = self.index(generation)?;
        self.generations[i].drain.as_mut()
    }

    /// Counts the generation at `index`, if it drains and was not told to retire.
    fn count(&mut self, index: usize, out: &mut Vec<Effect>) {
        let g = &self.generations[index];
        let Some(d) = g.drain.as_ref() else { return };
        if g.phase != Phase::Draining || d.retire.is_some() {
            return;
        }
        out.push(Effect::Count {
            generation: g.id,
            tag: d.tag,
            first: !d.counted,
        });
    }

    pub(super) fn counted(&mut self, id: GenId, counted: u64, queued: u64, out: &mut Vec<Effect>) {
        let now = self.now;
        let Some(index) = self.index(id) else { return };
        let g = &mut self.generations[index];
        let Some(d) = g.drain.as_mut() else { return };
        if g.phase != Phase::Draining || d.retire.is_some() {
            return;
        }
        d.counted = true;
        if counted > 0 {
            d.recheck_at = None;
        } else if queued > 0 {
            // Accepted soon (then counted), or migrated when the listener closes.
            d.recheck_at = Some(now.after(RECHECK_MS));
        } else {
            self.retire(index, RetireReason::Drained, out);
        }
    }

    pub(super) fn count_failed(&mut self, id: GenId) {
        if let Some(d) = self.drain_mut(id) {
            // Not counted again: the drain timeout retires it.
            d.recheck_at = None;
        }
    }

    /// A tag's count reached zero in the kernel: count once more (a socket may be on
    /// its way), retire if still zero.
    pub(super) fn zero(&mut self, tag: u32, out: &mut Vec<Effect>) {
        if tag == 0 {
            return;
        }
        let found = self
            .generations
            .iter()
            .position(|g| g.drain.as_ref().is_some_and(|d| d.tag == tag));
        if let Some(index) = found {
            self.count(index, out);
        }
    }

    pub(super) fn recount_draining(&mut self, out: &mut Vec<Effect>) {
        for index in 0..self.generations.len() {
            self.count(index, out);
        }
    }

    /// Sends the retire signal (to the leader, or every member if it is gone).
    fn retire(&mut self, index: usize, reason: RetireReason, out: &mut Vec<Effect>) {
        let now = self.now;
        let policy = self.policy;
        let g = &mut self.generations[index];
        if let Some(d) = g.drain.as_mut() {
            d.retire = Some((now, reason));
            d.recheck_at = None;
            d.kill_at = policy.kill_after_ms.map(|k| now.after(k));
        }
        out.push(Effect::Signal {
            generation: g.id,
            signal: policy.retire_signal,
            why: Why::Retire(reason),
            scope: SignalScope::Leader,
        });
        out.push(Effect::Persist);
    }

    /// Acts on every deadline up to now: ends of watch windows, drain timeouts,
    /// kill-after, recounts.
    pub(super) fn tick(&mut self, out: &mut Vec<Effect>) {
        let now = self.now;
        for index in 0..self.generations.len() {
            let g = &self.generations[index];
            if let Phase::Standby { until } = g.phase {
                if until <= now {
                    self.start_drain(index, out);
                    out.push(Effect::Persist);
                }
                continue;
            }
            let Some(d) = g.drain.as_ref().filter(|_| g.phase == Phase::Draining) else {
                continue;
            };
            if d.retire.is_none() && d.deadline <= now {
                self.retire(index, RetireReason::Timeout, out);
            }
            self.kill_due(index, out);
            let g = &self.generations[index];
            if g.drain
                .as_ref()
                .and_then(|d| d.recheck_at)
                .is_some_and(|r| r <= now)
            {
                self.count(index, out);
            }
        }
    }

    fn kill_due(&mut self, index: usize, out: &mut Vec<Effect>) {
        let now = self.now;
        let g = &mut self.generations[index];
        let Some(d) = g.drain.as_mut() else { return };
        if d.kill_at.is_none_or(|k| k > now) {
            return;
        }
        d.kill_at = None;
        d.killed = true;
        // Processes forked since the last look are members too.
        out.push(Effect::Adopt { generation: g.id });
        out.push(Effect::Signal {
            generation: g.id,
            signal: libc::SIGKILL,
            why: Why::Kill,
            scope: SignalScope::All,
        });
        out.push(Effect::Persist);
    }

    /// Every member of a generation exited: it is retired, its slots emptied. An active
    /// generation that dies inside its watch window hands traffic back to the standby.
    pub(super) fn exited(&mut self, id: GenId, out: &mut Vec<Effect>) {
        let now = self.now;
        let Some(index) = self.index(id) else { return };
        self.leaders_exited.retain(|&e| e != id);
        let g = &mut self.generations[index];
        let was = g.phase;
        if !was.live() {
            return;
        }
        let how = match &g.drain {
            Some(d) if d.killed => Retirement::Killed,
            Some(d) => match d.retire {
                Some((_, RetireReason::Drained)) => Retirement::Drained,
                Some((_, RetireReason::Timeout)) => Retirement::Timeout,
                None => Retirement::Exited,
            },
            None => Retirement::Exited,
        };
        g.phase = Phase::Retired(how);
        let spans: Vec<Span> = g.blocks.iter().map(Block::span).collect();
        let drained_ms = g.drain.as_ref().map(|d| now.since(d.started));
        if let Some(tag) = g.drain.as_ref().map(|d| d.tag).filter(|&t| t != 0) {
            out.push(Effect::Forget { tag });
        }
        for (group, block) in g.blocks.iter().enumerate() {
            out.push(Effect::RemoveSlots {
                group,
                first: block.first(),
                count: u32::try_from(block.cookies.len()).unwrap_or(GEN_SLOTS),
            });
        }
        out.push(Effect::Retired {
            generation: id,
            how,
            drained_ms,
        });
        out.push(Effect::Persist);
        self.prune(out);
        match was {
            Phase::Active => self.fail_over(RollbackReason::Exited, out),
            Phase::Canary { .. } => self.uncanary(&spans, out),
            _ => {}
        }
    }

    /// Forgets the oldest retired generations beyond [`KEEP_RETIRED`].
    fn prune(&mut self, out: &mut Vec<Effect>) {
        let retired = self.generations.iter().filter(|g| !g.phase.live()).count();
        let mut drop = retired.saturating_sub(KEEP_RETIRED);
        self.generations.retain(|g| {
            let forget = drop > 0 && !g.phase.live();
            if forget {
                drop -= 1;
                out.push(Effect::Release { generation: g.id });
            }
            !forget
        });
    }

    /// The active generation lost every listener of a group.
    pub(super) fn listeners_lost(&mut self, id: GenId, out: &mut Vec<Effect>) {
        if self.active().is_some_and(|g| g.id == id) {
            self.fail_over(RollbackReason::ListenersLost, out);
        }
    }

    /// The active generation failed its check in its watch window.
    pub(super) fn check_failed(&mut self, id: GenId, out: &mut Vec<Effect>) {
        if self.active().is_some_and(|g| g.id == id) {
            self.fail_over(RollbackReason::CheckFailed, out);
        }
    }

    /// Whether a generation stands by: the watch window of the active one is open.
    pub fn watching(&self) -> bool {
        self.generations
            .iter()
            .any(|g| matches!(g.phase, Phase::Standby { .. }))
    }

    /// Traffic goes back to the standby, if the watch window keeps one.
    pub(super) fn fail_over(&mut self, reason: RollbackReason, out: &mut Vec<Effect>) {
        if self.op.is_some() {
            return;
        }
        let standby = self
            .generations
            .iter()
            .rev()
            .find(|g| matches!(g.phase, Phase::Standby { .. }))
            .map(|g| g.id);
        if let Some(target) = standby {
            self.flip(Flip::Reactivate { target, reason }, out);
        }
    }

    /// Takes an exited canary (its `spans`, per group) out of every record naming it:
    /// those in force, and those an operation under way would put back on a failure
    /// (not the table's records: an operation may have published a new canary).
    fn uncanary(&mut self, spans: &[Span], out: &mut Vec<Effect>) {
        let names = |r: &Steer, span: Span| r.canary.is_some_and(|(s, _)| s == span);
        for (group, &span) in spans.iter().enumerate() {
            if let Some(record) = self.records.get_mut(group).filter(|r| names(r, span)) {
                record.canary = None;
                out.push(Effect::Republish {
                    group,
                    record: *record,
                });
            }
            for undo in self.op.iter_mut().flat_map(|op| op.undo.iter_mut()) {
                if undo.group == group && names(&undo.record, span) {
                    undo.record.canary = None;
                }
            }
        }
    }

    /// A listener opened since the promote joined the active generation's block: a grown
    /// block is published (one atomic flip).
    pub(super) fn listener_joined(
        &mut self,
        id: GenId,
        group: usize,
        offset: usize,
        cookie: u64,
        out: &mut Vec<Effect>,
    ) {
        let Some(index) = self.index(id) else { return };
        let g = &mut self.generations[index];
        let Some(block) = g.blocks.get_mut(group).filter(|_| g.phase == Phase::Active) else {
            return;
        };
        if offset < block.cookies.len() {
            block.cookies[offset] = cookie;
            return;
        }
        if offset != block.cookies.len() || offset >= GEN_SLOTS as usize {
            return;
        }
        let before = block.span();
        block.cookies.push(cookie);
        let grown = block.span();
        let record = &mut self.records[group];
        if record.active == Some(before) {
            record.active = Some(grown);
            out.push(Effect::Republish {
                group,
                record: *record,
            });
        }
        // An operation under way publishes, probes for, or puts back records computed
        // before the block grew: they name the grown block.
        if let Some(op) = self.op.as_mut() {
            op.grow(group, before, grown);
        }
        out.push(Effect::Persist);
    }

    /// Takes up a saved table: generations whose processes were found again, their
    /// drains counted afresh under new tags, a standby standing by until the end of its
    /// watch window (draining at once if it passed while no daemon ran), a canary at its
    /// weight (a retired or candidate entry, which a state file never holds, is dropped).
    /// Then the canary is squared with the records in force ([`Self::square_canary`]),
    /// and a standby whose active generation ended meanwhile takes traffic back.
    pub(super) fn recover(
        &mut self,
        next_id: GenId,
        records: Vec<Steer>,
        generations: Vec<Generation>,
        out: &mut Vec<Effect>,
    ) {
        let groups = self.records.len();
        self.next_id = next_id.max(self.next_id);
        self.records = records;
        self.records.resize(groups, Steer::default());
        for g in generations {
            if matches!(g.phase, Phase::Retired(_) | Phase::Candidate) || g.blocks.len() != groups {
                continue;
            }
            self.resume(g, out);
        }
        self.square_canary(out);
        if self.active().is_none() {
            // Its active generation ended while no daemon ran: the program already falls
            // back to the standby's slots; the table follows (a rollback, counted).
            self.fail_over(RollbackReason::Exited, out);
        }
        out.push(Effect::Wake);
    }

    /// Adds one saved generation to the table (see [`Self::recover`]).
    fn resume(&mut self, mut g: Generation, out: &mut Vec<Effect>) {
        let index = self.generations.len();
        match (g.phase, g.drain.take()) {
            (Phase::Standby { until }, _) => {
                self.generations.push(g);
                if until <= self.now {
                    self.start_drain(index, out);
                }
            }
            (Phase::Draining, Some(mut d)) => {
                d.tag = 0;
                d.recheck_at = d.retire.is_none().then_some(self.now);
                d.counted = false;
                d.kill_at = match (d.retire, self.policy.kill_after_ms) {
                    (Some((sent, _)), Some(k)) if !d.killed => Some(sent.after(k)),
                    _ => None,
                };
                out.push(Effect::StartCount { generation: g.id });
                g.drain = Some(d);
                self.generations.push(g);
            }
            (Phase::Draining, None) => {
                // Saved before its drain began: it drains now.
                self.generations.push(g);
                self.start_drain(index, out);
            }
            _ => self.generations.push(g),
        }
    }

    /// The kernel's records are the truth of what steers: a canary that no record names
    /// (its abort was published, not saved) drains, as does any canary but the newest;
    /// a record that names another canary or weight than the table (the canary ended
    /// while no daemon ran) is published again without it, or with the table's.
    fn square_canary(&mut self, out: &mut Vec<Effect>) {
        let canaries: Vec<usize> = (0..self.generations.len())
            .filter(|&i| matches!(self.generations[i].phase, Phase::Canary { .. }))
            .collect();
        for (k, &i) in canaries.iter().enumerate().rev() {
            let steered = self.generations[i]
                .blocks
                .iter()
                .zip(&self.records)
                .any(|(b, r)| b.span().len > 0 && r.canary.is_some_and(|(s, _)| s == b.span()));
            if !steered || k + 1 < canaries.len() {
                self.start_drain(i, out);
            }
        }
        for group in 0..self.records.len() {
            let want = self.generations.iter().find_map(|g| match g.phase {
                Phase::Canary { weight } => {
                    let span = g.blocks.get(group)?.span();
                    (span.len > 0).then_some((span, weight))
                }
                _ => None,
            });
            if self.records[group].canary != want {
                self.records[group].canary = want;
                out.push(Effect::Republish {
                    group,
                    record: self.records[group],
                });
            }
        }
    }
}

/// A drain's deadlines as saved, for tests and the runtime's conversions.
pub fn resumed(
    started: Millis,
    deadline: Millis,
    retire: Option<(Millis, RetireReason)>,
    killed: bool,
) -> Drain {
    Drain {
        tag: 0,
        started,
        deadline,
        retire,
        kill_at: None,
        killed,
        recheck_at: None,
        counted: false,
    }
}
