//! Promote and rollback: take a candidate's listeners into a free block of slots, flip
//! every group to them, and verify with a probe; on any failure, put everything back.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use handoff_common::maps::{BLOCKS, GEN_SLOTS, SteerRecord};
use handoff_common::proto::{GenerationState, Promoted};

use super::drain::Ctx;
use super::{Block, Generation, PromoteError, Service};
use crate::candidate::{self, Candidate, Target};
use crate::group::GroupKey;
use crate::loader::{GroupProgram, LoaderError};
use crate::members::Member;
use crate::probe::{self, ProbeResult};

impl Service {
    /// Makes `pid` the active generation, verified by a probe in every group.
    pub fn promote(&mut self, pid: i32, ctx: &mut Ctx) -> Result<Promoted, PromoteError> {
        self.promote_as(pid, None, ctx)
    }

    /// Makes `leader`, already opened (from a pidfd a client passed), the active
    /// generation, as [`Service::promote`] does for a pid.
    pub fn promote_member(
        &mut self,
        leader: Member,
        ctx: &mut Ctx,
    ) -> Result<Promoted, PromoteError> {
        self.promote_as(leader.pid, Some(leader), ctx)
    }

    fn promote_as(
        &mut self,
        pid: i32,
        leader: Option<Member>,
        ctx: &mut Ctx,
    ) -> Result<Promoted, PromoteError> {
        let started = std::time::Instant::now();
        self.reap(ctx);
        // A pid that already leads a live generation: the active one is a no-op refused,
        // a draining one is made active again (its listeners are still in the map).
        let known = self.generations.iter().position(|g| {
            g.state != GenerationState::Retired && g.leader.pid == pid && g.leader.alive()
        });
        if let Some(index) = known {
            let g = &self.generations[index];
            if g.state == GenerationState::Active {
                return Err(PromoteError::AlreadyActive {
                    pid,
                    id: g.id,
                    service: self.config.name.clone(),
                });
            }
            return self.reactivate(index, ctx);
        }
        let target = Target {
            listen: &self.config.listen,
            groups: self.groups.iter().map(|g| g.key).collect(),
            user: self.config.user,
        };
        let candidate = match leader {
            Some(leader) => candidate::take_leader(leader, &target, ctx)?,
            None => candidate::take(pid, &target, ctx)?,
        };
        self.check_not_shared(&candidate)?;
        let blocks = self.allocate_blocks()?;
        let id = self.next_id;
        let previous = self.active().map(|g| (g.id, g.blocks.clone()));
        let blocks = self.install(
            &candidate,
            &blocks,
            previous.as_ref().map(|p| p.1.as_slice()),
        )?;

        // At most MAX_NEXT_ID from a state file: one more never overflows, but saturate.
        self.next_id = self.next_id.saturating_add(1);
        for (group, taken) in self.groups.iter_mut().zip(&candidate.listeners) {
            group.key = Some(taken[0].key);
        }
        let listeners = blocks.iter().map(|b| b.cookies.len()).sum();
        let Candidate {
            leader,
            descendants,
            trusted,
            ..
        } = candidate;
        for m in std::iter::once(&leader).chain(&descendants) {
            ctx.watch(m);
        }
        self.generations.push(Generation {
            id,
            state: GenerationState::Active,
            leader,
            descendants,
            blocks,
            drain: None,
            trusted,
        });
        self.demote_active(self.generations.len() - 1, ctx);
        self.watch_start(ctx);
        // Discovery, map writes, flip, probe and drain signal; not the state write.
        let took_ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::info!(service = %self.config.name, generation = id, pid, listeners, draining = ?previous.as_ref().map(|p| p.0), took_ms, "promoted");
        Ok(Promoted {
            service: self.config.name.clone(),
            generation: id,
            pid,
            listeners,
            draining: previous.map(|p| p.0),
        })
    }

    /// Makes the newest draining generation with live listeners active again.
    pub fn rollback(&mut self, ctx: &mut Ctx) -> Result<Promoted, PromoteError> {
        self.reap(ctx);
        let back = self
            .generations
            .iter()
            .rposition(|g| {
                g.state == GenerationState::Draining
                    && g.drain.as_ref().is_none_or(|d| d.retire.is_none())
                    && self.listening(g).iter().all(|&n| n > 0)
            })
            .ok_or_else(|| PromoteError::NothingToRollBack {
                service: self.config.name.clone(),
            })?;
        self.reactivate(back, ctx)
    }

    /// Makes the draining generation at `index` active again: one flip per group back to
    /// its listeners, which never left the map. Verified by a probe like a promote.
    fn reactivate(&mut self, index: usize, ctx: &mut Ctx) -> Result<Promoted, PromoteError> {
        let g = &self.generations[index];
        if g.drain.as_ref().is_some_and(|d| d.retire.is_some()) {
            return Err(PromoteError::Retiring {
                id: g.id,
                pid: g.leader.pid,
            });
        }
        let current = self.active().map(|g| g.blocks.clone());
        let target = self.generations[index].blocks.clone();
        let mut flipped = Vec::new();
        let mut result = Ok(());
        let started = Instant::now();
        for i in 0..self.groups.len() {
            result = self.flip_back(
                i,
                &target[i],
                current.as_ref().map(|c| &c[i]),
                &mut flipped,
                started,
                ctx,
            );
            if result.is_err() {
                break;
            }
        }
        if let Err(e) = result {
            for (i, old) in flipped {
                self.restore(i, old);
            }
            return Err(e);
        }
        let draining = self.active().map(|g| g.id);
        self.stop_drain(index, ctx);
        self.generations[index].state = GenerationState::Active;
        self.demote_active(index, ctx);
        self.watch_start(ctx);
        let g = &self.generations[index];
        tracing::info!(service = %self.config.name, generation = g.id, pid = g.leader.pid, draining = ?draining, "reactivated");
        Ok(Promoted {
            service: self.config.name.clone(),
            generation: g.id,
            pid: g.leader.pid,
            listeners: g.blocks.iter().map(|b| b.cookies.len()).sum(),
            draining,
        })
    }

    /// Flips group `i` to `block` (falling back to `previous`) and probes; a group that
    /// lost handoff's program (another one attached, or the group re-formed) gets it
    /// attached again through a listener of a live generation, and is probed again.
    fn flip_back(
        &mut self,
        i: usize,
        block: &Block,
        previous: Option<&Block>,
        flipped: &mut Vec<(usize, SteerRecord)>,
        started: Instant,
        ctx: &mut Ctx,
    ) -> Result<(), PromoteError> {
        let key = self.groups[i].key;
        let Some(program) = self.groups[i].program.as_mut() else {
            return Ok(());
        };
        flipped.push((i, program.record()?));
        program.publish(record_for(block, previous))?;
        match verify(program, key, block, patience(started)) {
            Err(PromoteError::Probe(e)) if e.lost() => {
                tracing::warn!(service = %self.config.name, error = %e, "the group lost handoff's program: attaching it again");
                if !self.reattach(i, ctx)? {
                    return Err(PromoteError::Probe(e));
                }
                let program = self.groups[i]
                    .program
                    .as_mut()
                    .ok_or(LoaderError::MissingMap("program"))?;
                // Just attached: the program answers at once or not at all.
                verify(program, key, block, probe::PROBE_DEADLINE)
            }
            other => other,
        }
    }

    /// Makes every group steer as the table says: to the active generation, falling back
    /// to the newest draining one (with none active, to the kernel's hash). Used after the table was rebuilt from its last
    /// consistent state, when a failed operation may have flipped a group already.
    pub fn resteer(&mut self) {
        // No active generation: an empty record, the kernel's hash as before any promote.
        let active = self.active().map(|g| g.blocks.clone()).unwrap_or_default();
        let previous = self
            .generations
            .iter()
            .rev()
            .find(|g| g.state == GenerationState::Draining)
            .map(|g| g.blocks.clone());
        for (i, group) in self.groups.iter_mut().enumerate() {
            let Some(program) = group.program.as_mut() else {
                continue;
            };
            let record = active.get(i).map_or_else(SteerRecord::default, |block| {
                record_for(block, previous.as_ref().and_then(|p| p.get(i)))
            });
            if let Err(e) = program.publish(record) {
                tracing::error!(service = %self.config.name, error = %e, "publishing the rebuilt table's steering failed");
            }
        }
    }

    /// Each group's steering record in force (none: no program loaded), for tests.
    #[cfg(test)]
    pub(crate) fn records(&self) -> Vec<Option<SteerRecord>> {
        self.groups
            .iter()
            .map(|g| g.program.as_ref().and_then(|p| p.record().ok()))
            .collect()
    }

    /// Every active generation but the one at `keep` starts draining.
    fn demote_active(&mut self, keep: usize, ctx: &mut Ctx) {
        self.watch_owner(keep, ctx);
        for index in 0..self.generations.len() {
            if index != keep && self.generations[index].state == GenerationState::Active {
                self.generations[index].state = GenerationState::Draining;
                self.start_drain(index, ctx);
            }
        }
    }

    fn check_not_shared(&self, candidate: &Candidate) -> Result<(), PromoteError> {
        for (i, taken) in candidate.listeners.iter().enumerate() {
            for t in taken {
                if let Some(owner) = self
                    .generations
                    .iter()
                    .filter(|g| g.state != GenerationState::Retired)
                    .find(|g| g.cookies().any(|c| c == t.cookie))
                {
                    return Err(PromoteError::SharedSocket {
                        pid: candidate.leader.pid,
                        addr: self.config.listen[i],
                        id: owner.id,
                        owner: owner.leader.pid,
                    });
                }
            }
        }
        Ok(())
    }

    /// A free block per group: not held by a live generation, not named by the record
    /// in force (the program may still fall back to it).
    fn allocate_blocks(&self) -> Result<Vec<u32>, PromoteError> {
        let mut out = Vec::with_capacity(self.groups.len());
        for (i, group) in self.groups.iter().enumerate() {
            let mut used: HashSet<u32> = self
                .generations
                .iter()
                .filter(|g| g.state != GenerationState::Retired)
                .map(|g| g.blocks[i].index)
                .collect();
            if let Some(program) = &group.program {
                let r = program.record()?;
                used.extend([r.active_first / GEN_SLOTS, r.prev_first / GEN_SLOTS]);
            }
            // Rotate through the blocks so a just-freed one is reused last.
            let start = u32::try_from(self.next_id).unwrap_or(0) % BLOCKS;
            let free = (0..BLOCKS)
                .map(|k| (start + k) % BLOCKS)
                .find(|b| !used.contains(b))
                .ok_or_else(|| PromoteError::NoFreeBlock {
                    service: self.config.name.clone(),
                })?;
            out.push(free);
        }
        Ok(out)
    }

    /// Puts the candidate's listeners into their blocks, flips every group to them and
    /// probes. On any failure every group is put back as it was.
    fn install(
        &mut self,
        candidate: &Candidate,
        block_indexes: &[u32],
        previous: Option<&[Block]>,
    ) -> Result<Vec<Block>, PromoteError> {
        let mut done: Vec<(usize, Option<SteerRecord>)> = Vec::new();
        let mut blocks = Vec::with_capacity(self.groups.len());
        let started = Instant::now();
        let result = (|| {
            for (i, taken) in candidate.listeners.iter().enumerate() {
                let block = Block {
                    index: block_indexes[i],
                    cookies: taken.iter().map(|t| t.cookie).collect(),
                };
                let group = &mut self.groups[i];
                if group.program.is_none() {
                    group.program = Some(GroupProgram::load(&crate::pins::group_dir(
                        &self.config.name,
                        i,
                    ))?);
                }
                let program = group
                    .program
                    .as_mut()
                    .ok_or(LoaderError::MissingMap("program"))?;
                let old = program.attached().then(|| program.record()).transpose()?;
                done.push((i, old));
                for (k, t) in taken.iter().enumerate() {
                    program.insert(block.first() + k as u32, t.fd.as_fd())?;
                }
                program.publish(record_for(&block, previous.map(|p| &p[i])))?;
                // Always: the group may have lost handoff's program (an intruder's, a
                // detach, a group re-formed since); attaching again replaces whatever it
                // runs, ours included, at the cost of one setsockopt.
                program.attach(taken[0].fd.as_fd())?;
                verify(program, Some(taken[0].key), &block, patience(started))?;
                blocks.push(block);
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (i, old) in done {
                // A group attached by this promote goes back to an empty record: the
                // kernel's hash, as before.
                self.restore(i, old.unwrap_or_default());
                if let Some(program) = &self.groups[i].program {
                    for k in 0..GEN_SLOTS {
                        let _ = program.remove(block_indexes[i] * GEN_SLOTS + k);
                    }
                }
            }
            return Err(e);
        }
        Ok(blocks)
    }

    /// Puts group `i`'s record `old` back in force after a failed change.
    fn restore(&mut self, i: usize, old: SteerRecord) {
        if let Some(program) = self.groups[i].program.as_mut()
            && let Err(err) = program.publish(old)
        {
            tracing::error!(service = %self.config.name, error = %err, "restoring the previous steering failed");
        }
    }
}

/// The record that steers to `active`, falling back to `previous`.
fn record_for(active: &Block, previous: Option<&Block>) -> SteerRecord {
    SteerRecord {
        active_first: active.first(),
        active_len: active.cookies.len() as u32,
        prev_first: previous.map_or(0, Block::first),
        prev_len: previous.map_or(0, |p| p.cookies.len() as u32),
    }
}

/// How long the next probe of an operation that began at `started` may wait for a SYN
/// the program has not seen yet: what is left of one [`probe::PROBE_SLOW_DEADLINE`] for
/// the whole operation, at least [`probe::PROBE_DEADLINE`]. The daemon's lock is held
/// throughout, so a slow softirq costs one second per promote, not one per group.
fn patience(started: Instant) -> Duration {
    probe::PROBE_SLOW_DEADLINE
        .saturating_sub(started.elapsed())
        .max(probe::PROBE_DEADLINE)
}

/// Probes the group and checks that the program chose a slot of `block`.
fn verify(
    program: &mut GroupProgram,
    key: Option<GroupKey>,
    block: &Block,
    patience: Duration,
) -> Result<(), PromoteError> {
    let Some(key) = key else { return Ok(()) };
    let range = block.first()..block.first() + block.cookies.len() as u32;
    match probe::probe(program, key.probe_target(), patience)? {
        ProbeResult::Slot(s) if range.contains(&s) => Ok(()),
        chosen => Err(PromoteError::ProbeMismatch { group: key, chosen }),
    }
}
