//! A service to and from the state file: how a restarted daemon takes up the generations
//! the previous one steered.

use std::collections::HashSet;

use handoff_common::maps::{BLOCKS, GEN_SLOTS};
use handoff_common::proto::GenerationState;

use super::{Ctx, Group, Members, Service};
use crate::config::ServiceConfig;
use crate::discover;
use crate::discover::candidate;
use crate::discover::group::GroupKey;
use crate::discover::members::{self, Member};
use crate::kernel::loader::migrate::{self, Pinned, Staged};
use crate::lifecycle::{self, Block, Drain, Event, GenId, Generation, Phase, RetireReason};
use crate::persist::pins;
use crate::persist::state::{
    MAX_CHECK, Resume, SavedBlock, SavedDrain, SavedGeneration, SavedMember, SavedService,
    from_wall, to_wall,
};

fn saved(m: &Member) -> SavedMember {
    SavedMember {
        pid: m.pid,
        start_time: m.start_time,
    }
}

/// The process a saved member names, if it still runs (same pid and start time) and the
/// rule allows it as a member at all.
fn reopen(service: &str, m: &SavedMember) -> Option<Member> {
    match Member::open(m.pid) {
        Ok(live) if live.start_time == m.start_time => Some(live),
        Ok(_) | Err(members::MemberError::NoSuchProcess { .. }) => None,
        Err(e) => {
            tracing::warn!(service, pid = m.pid, error = %e, "a member named by the state file is dropped; it is never signalled");
            None
        }
    }
}

/// How far below the leader a saved member may be.
const MAX_DEPTH: usize = 64;

/// A drain as the state file keeps it: instants of the lifecycle's clock as wall-clock
/// milliseconds.
fn save_drain(d: &Drain, ctx: &Ctx) -> SavedDrain {
    let wall = |at| to_wall(ctx.instant(at));
    SavedDrain {
        started_ms: wall(d.started),
        deadline_ms: wall(d.deadline),
        retired_ms: d.retire.map(|(at, _)| wall(at)),
        timed_out: matches!(d.retire, Some((_, RetireReason::Timeout))),
        killed: d.killed,
    }
}

/// A saved drain on the lifecycle's clock.
fn load_drain(d: &SavedDrain, ctx: &Ctx) -> Drain {
    let at = |ms| ctx.millis(from_wall(ms));
    let reason = if d.timed_out {
        RetireReason::Timeout
    } else {
        RetireReason::Drained
    };
    lifecycle::resumed(
        at(d.started_ms),
        at(d.deadline_ms),
        d.retired_ms.map(|ms| (at(ms), reason)),
        d.killed,
    )
}

impl Service {
    /// The cookies in the kernel's maps at the slots of `blocks` (what the state file
    /// says is checked against the pinned maps; a block outside them counts nothing).
    fn pinned_cookies(&self, blocks: &[SavedBlock]) -> HashSet<u64> {
        let mut out = HashSet::new();
        for (block, group) in blocks.iter().zip(&self.groups) {
            let Some(program) = &group.program else {
                continue;
            };
            if block.index >= BLOCKS {
                continue;
            }
            let first = block.index * GEN_SLOTS;
            for k in 0..GEN_SLOTS {
                if let Ok(Some(cookie)) = program.cookie_at(first + k) {
                    out.insert(cookie);
                }
            }
        }
        out
    }

    /// What the state file keeps of this service: everything but retired generations.
    pub fn save(&self, ctx: &Ctx) -> SavedService {
        SavedService {
            name: self.config.name.clone(),
            listen: self.config.listen.clone(),
            next_id: self.machine.next_id(),
            groups: self.groups.iter().map(|g| g.key).collect(),
            generations: self
                .machine
                .generations()
                .iter()
                .filter_map(|g| self.save_generation(g, ctx))
                .collect(),
        }
    }

    /// A live generation as the state file keeps it. A canary and a standby are saved as
    /// draining (their own fields say what they are), each with a drain a daemon before
    /// canaries can take up: a canary's timeout long passed (that daemon retires it),
    /// a standby's the one it gets at the end of its window.
    fn save_generation(&self, g: &Generation, ctx: &Ctx) -> Option<SavedGeneration> {
        let m = self.members.get(&g.id)?;
        let wall = |at| to_wall(ctx.instant(at));
        let untimed = |started_ms: u64, timeout_ms: u64| SavedDrain {
            started_ms,
            deadline_ms: started_ms.saturating_add(timeout_ms),
            retired_ms: None,
            timed_out: false,
            killed: false,
        };
        // The state file holds no drain longer than the longest duration handoffd takes.
        let max = u64::try_from(crate::config::MAX_DURATION.as_millis()).unwrap_or(u64::MAX);
        let timeout = self.machine.policy().drain_timeout_ms.min(max);
        let (drain, canary, watch_until_ms) = match g.phase {
            Phase::Candidate | Phase::Retired(_) => return None,
            Phase::Canary { weight } => (Some(untimed(0, 0)), Some(u64::from(weight)), None),
            Phase::Standby { until } => {
                let at = wall(until);
                (Some(untimed(at, timeout)), None, Some(at))
            }
            Phase::Active | Phase::Draining => {
                (g.drain.as_ref().map(|d| save_drain(d, ctx)), None, None)
            }
        };
        Some(SavedGeneration {
            id: g.id,
            state: match g.phase {
                Phase::Canary { .. } => GenerationState::Draining,
                phase => phase.public(),
            },
            leader: saved(&m.leader),
            descendants: m.descendants.iter().map(saved).collect(),
            blocks: g
                .blocks
                .iter()
                .map(|b| SavedBlock {
                    index: b.index,
                    cookies: b.cookies.clone(),
                })
                .collect(),
            drain,
            canary,
            watch_until_ms,
            check: self.check_of(g.id).map(str::to_owned),
        })
    }

    /// The health check generation `id` was promoted with, if it has one.
    pub(super) fn check_of(&self, id: GenId) -> Option<&str> {
        self.members.get(&id)?.check.as_deref()
    }

    /// Keeps `check` as generation `id`'s health check (saved with it); one longer than
    /// [`MAX_CHECK`] bytes is not kept.
    pub(super) fn set_check(&mut self, id: GenId, check: Option<String>) {
        if let Some(m) = self.members.get_mut(&id) {
            m.check = check.filter(|c| c.len() <= MAX_CHECK);
        }
    }

    /// Takes up a saved service: its pinned maps, the members still running (by pid and
    /// start time), and the drains, counted afresh.
    pub fn recover(config: ServiceConfig, saved: SavedService, ctx: &mut Ctx) -> Service {
        let mut service = Service::new(config);
        if saved.listen != service.config.listen {
            tracing::warn!(service = %service.config.name, "the saved state is for other addresses; starting afresh");
            return service;
        }
        let mut upgrades = Vec::new();
        if !service.open_pins(&saved.groups, &mut upgrades) {
            for (_, staged) in upgrades {
                staged.abandon();
            }
            return service;
        }
        let mut recovered = Vec::with_capacity(saved.generations.len());
        for g in saved.generations {
            let Some((members, trusted)) = service.take_up(&g, ctx) else {
                continue;
            };
            for m in members.iter() {
                ctx.watch(m);
            }
            tracing::info!(service = %service.config.name, generation = g.id, pid = g.leader.pid, state = g.state.as_str(), "generation taken up");
            let Tree(leader, descendants) = members;
            recovered.push(service.resumed(&g, ctx));
            let members = Members {
                leader,
                descendants,
                trusted,
                check: None,
            };
            service.members.insert(g.id, members);
            let check = g.check().unwrap_or_else(|why| {
                tracing::warn!(service = %service.config.name, generation = g.id, "{why}: not kept");
                None
            });
            service.set_check(g.id, check.map(str::to_owned));
        }
        let records = service
            .groups
            .iter()
            .map(|g| {
                g.program
                    .as_ref()
                    .and_then(|p| p.record().ok())
                    .map(super::drive::decode)
                    .unwrap_or_default()
            })
            .collect();
        let event = Event::Recover {
            next_id: saved.next_id,
            records,
            generations: recovered,
        };
        service.drive(event, ctx);
        service.finish_upgrades(upgrades, ctx);
        service
    }

    /// A saved generation on the lifecycle's clock: its phase from its state, canary
    /// weight or watch window (a weight out of range refused with a warning: it drains).
    fn resumed(&self, g: &SavedGeneration, ctx: &Ctx) -> Generation {
        let resume = g.resume().unwrap_or_else(|why| {
            tracing::warn!(service = %self.config.name, generation = g.id, "{why}");
            Resume::AsSaved
        });
        let phase = match (resume, g.state) {
            (Resume::Canary(weight), _) => Phase::Canary { weight },
            (Resume::Standby(ms), _) => Phase::Standby {
                until: ctx.millis(from_wall(ms)),
            },
            (Resume::AsSaved, GenerationState::Active) => Phase::Active,
            (Resume::AsSaved, GenerationState::Draining) => Phase::Draining,
            (Resume::AsSaved, GenerationState::Retired) => {
                Phase::Retired(lifecycle::Retirement::Exited)
            }
        };
        // A refused canary's drain is the placeholder saved for older daemons: it
        // drains afresh.
        let drain = match (phase, g.canary) {
            (Phase::Draining, None) => g.drain.as_ref().map(|d| load_drain(d, ctx)),
            _ => None,
        };
        Generation {
            id: g.id,
            leader: g.leader.pid,
            phase,
            blocks: g
                .blocks
                .iter()
                .map(|b| Block {
                    index: b.index,
                    cookies: b.cookies.clone(),
                })
                .collect(),
            drain,
        }
    }

    /// Opens the pinned maps of the saved groups; false if one is missing (then the
    /// generations steered in it are gone). A group pinned in the previous layout gets
    /// a fresh program, attached by [`Self::finish_upgrades`] once the generations are
    /// taken up; its staged pins are returned with its index.
    fn open_pins(
        &mut self,
        saved: &[Option<GroupKey>],
        upgrades: &mut Vec<(usize, Staged)>,
    ) -> bool {
        for (i, (group, key)) in self.groups.iter_mut().zip(saved).enumerate() {
            let Some(key) = key else { continue };
            let dir = pins::group_dir(&self.config.name, i);
            let program = match migrate::open(&dir) {
                Ok(Pinned::Current(program)) => program,
                Ok(Pinned::Previous(program, staged)) => {
                    upgrades.push((i, staged));
                    program
                }
                Err(e) => {
                    tracing::warn!(service = %self.config.name, group = %key, error = %e, "pinned maps not found or not usable; their generations are gone (a program attached to the group keeps steering)");
                    continue;
                }
            };
            *group = Group {
                key: Some(*key),
                program: Some(program),
            };
        }
        !(self.groups.iter().any(|g| g.program.is_none()) && saved.iter().any(Option::is_some))
    }

    /// Attaches the fresh program of each group pinned in the previous layout through a
    /// listener of one of its generations (the kernel swaps the group's program in one
    /// store), then puts its pins in place of the old ones. When no listener is found or
    /// the attach fails, the old program is left attached and steering, the new one
    /// dropped (the group's next promote loads and attaches one).
    fn finish_upgrades(&mut self, upgrades: Vec<(usize, Staged)>, ctx: &mut Ctx) {
        for (i, staged) in upgrades {
            let name = self.config.name.clone();
            let name = name.as_str();
            let group = self.groups[i]
                .key
                .map(|k| k.to_string())
                .unwrap_or_default();
            match self.reattach(i, ctx) {
                Ok(true) => match staged.commit() {
                    Ok(()) => {
                        tracing::info!(
                            service = name,
                            group,
                            "group moved to the current map layout: its new program steers"
                        )
                    }
                    Err(e) => {
                        tracing::warn!(service = name, group, error = %e, "group moved to the current map layout, but its pins could not all be replaced: the next start moves it again")
                    }
                },
                outcome => {
                    let why = match outcome {
                        Err(e) => e.to_string(),
                        Ok(_) => "no listener of its generations was found".into(),
                    };
                    staged.abandon();
                    self.groups[i].program = None;
                    tracing::warn!(
                        service = name,
                        group,
                        "moving the group from the previous map layout failed ({why}): its old program is left attached and steering until the next promote"
                    );
                }
            }
        }
    }

    /// The processes of a saved generation that still run and that the kernel ties to
    /// it (the state file is not trusted to say who the members are), and the uids it
    /// trusts; `None` if nothing of it is left to take up.
    fn take_up(&self, g: &SavedGeneration, ctx: &mut Ctx) -> Option<(Tree, Vec<u32>)> {
        let name = self.config.name.as_str();
        let Some(leader) = reopen(name, &g.leader) else {
            tracing::info!(
                service = name,
                generation = g.id,
                pid = g.leader.pid,
                "generation ended while the daemon was away"
            );
            return None;
        };
        let saved_descendants: Vec<Member> = g
            .descendants
            .iter()
            .filter_map(|m| reopen(name, m))
            .collect();
        let pids: Vec<i32> = std::iter::once(leader.pid)
            .chain(saved_descendants.iter().map(|m| m.pid))
            .collect();
        let holders = self.saved_holders(&g.blocks, &pids, ctx);
        let leader_holds = holders.contains(&leader.pid);
        let descendants = self.tied(g.id, &leader, leader_holds, saved_descendants, &holders);
        // The same rule as promote: the leader's uid is trusted only when the leader,
        // or a holder of its uid, holds a pinned socket; holders of other uids that
        // are not the configured one earn the generation nothing but the configured uid.
        let holding = descendants.iter().filter(|m| holders.contains(&m.pid));
        let trusted = match candidate::trusted_uids(
            &leader,
            leader_holds,
            holding,
            self.config.user,
        ) {
            Ok(trusted) => trusted,
            Err(e) => {
                tracing::warn!(service = name, generation = g.id, error = %e, "the saved generation's holders would be refused by promote: only the configured uid is trusted");
                self.config.user.into_iter().collect()
            }
        };
        let leader = if leader_holds {
            leader
        } else if descendants.is_empty() {
            tracing::warn!(
                service = name,
                generation = g.id,
                pid = leader.pid,
                "the state file names a leader that holds none of the generation's pinned sockets, nor does any of its members: generation dropped, its processes are never signalled"
            );
            return None;
        } else {
            // Workers that listen after fork hold the sockets, their parent none: it
            // is kept as the leader, but neither signalled nor adopted from.
            tracing::warn!(
                service = name,
                generation = g.id,
                pid = leader.pid,
                members = descendants.len(),
                "the state file names a leader that holds none of the generation's pinned sockets: kept, never signalled; its members that hold them get its signals"
            );
            leader.unverified()
        };
        Some((Tree(leader, descendants), trusted))
    }

    /// The saved descendants the kernel ties to the generation: holders of its pinned
    /// sockets or connections, or, when the leader holds one, processes of the trusted
    /// uids in its tree. Others are dropped (never signalled).
    fn tied(
        &self,
        id: GenId,
        leader: &Member,
        leader_holds: bool,
        saved: Vec<Member>,
        holders: &HashSet<i32>,
    ) -> Vec<Member> {
        // Only used when the leader holds a pinned socket: then promote trusted
        // exactly these uids (see `candidate::trusted_uids`).
        let tree_uids: Vec<u32> = self
            .config
            .user
            .into_iter()
            .chain([leader.uids.effective])
            .collect();
        let mut descendants = Vec::with_capacity(saved.len());
        for m in saved {
            let tied = holders.contains(&m.pid)
                || (leader_holds
                    && m.uids.within(&tree_uids)
                    && members::descends_from(m.pid, leader, MAX_DEPTH));
            if tied {
                descendants.push(m);
            } else {
                tracing::warn!(service = %self.config.name, generation = id, pid = m.pid, "the state file names a member tied neither to the generation's pinned sockets nor to its leader's tree: dropped, never signalled");
            }
        }
        descendants
    }

    /// Which of `pids` hold a socket pinned in `blocks`, or a connection on the port: a
    /// generation that closed its listeners on the drain signal (nginx on SIGQUIT) has
    /// emptied its slots, and its served connections tie it.
    fn saved_holders(&self, blocks: &[SavedBlock], pids: &[i32], ctx: &mut Ctx) -> HashSet<i32> {
        let (name, port) = (self.config.name.as_str(), self.port());
        let pinned = self.pinned_cookies(blocks);
        let holders = if pinned.is_empty() {
            HashSet::new()
        } else {
            match discover::held_listeners(port, pids, 0, Some(&pinned), ctx) {
                Ok((_, holders)) => holders,
                Err(e) => {
                    tracing::warn!(service = name, error = %e, "reading the saved members' listeners failed");
                    HashSet::new()
                }
            }
        };
        match discover::connection_holders(port, pids) {
            Ok(conns) => holders.union(&conns).copied().collect(),
            Err(e) => {
                tracing::warn!(service = name, error = %e, "reading the saved members' connections failed");
                holders
            }
        }
    }
}

/// A generation's leader and descendants.
struct Tree(Member, Vec<Member>);

impl Tree {
    fn iter(&self) -> impl Iterator<Item = &Member> {
        std::iter::once(&self.0).chain(&self.1)
    }
}

#[cfg(test)]
mod tests;
