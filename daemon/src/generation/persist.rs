//! A service to and from the state file: how a restarted daemon takes up the generations
//! the previous one steered.

use handoff_common::proto::GenerationState;

use super::drain::{Ctx, DrainState, RetireReason};
use super::{Block, Generation, Group, Service, ServiceConfig};
use crate::loader::GroupProgram;
use crate::members::Member;
use crate::pins;
use crate::state::{
    SavedBlock, SavedDrain, SavedGeneration, SavedMember, SavedService, from_wall, to_wall,
};

fn saved(m: &Member) -> SavedMember {
    SavedMember {
        pid: m.pid,
        start_time: m.start_time,
    }
}

/// The process a saved member names, if it still runs (same pid and start time).
fn reopen(m: &SavedMember) -> Option<Member> {
    Member::open(m.pid)
        .ok()
        .filter(|live| live.start_time == m.start_time)
}

impl DrainState {
    fn save(&self) -> SavedDrain {
        SavedDrain {
            started_ms: to_wall(self.started),
            deadline_ms: to_wall(self.deadline),
            retired_ms: self.retire.map(|(at, _)| to_wall(at)),
            timed_out: matches!(self.retire, Some((_, RetireReason::Timeout))),
            killed: self.killed,
        }
    }
}

impl Service {
    /// What the state file keeps of this service: everything but retired generations.
    pub fn save(&self) -> SavedService {
        SavedService {
            name: self.config.name.clone(),
            listen: self.config.listen.clone(),
            next_id: self.next_id,
            groups: self.groups.iter().map(|g| g.key).collect(),
            generations: self
                .generations
                .iter()
                .filter(|g| g.state != GenerationState::Retired)
                .map(|g| SavedGeneration {
                    id: g.id,
                    state: g.state,
                    leader: saved(&g.leader),
                    descendants: g.descendants.iter().map(saved).collect(),
                    blocks: g
                        .blocks
                        .iter()
                        .map(|b| SavedBlock {
                            index: b.index,
                            cookies: b.cookies.clone(),
                        })
                        .collect(),
                    drain: g.drain.as_ref().map(DrainState::save),
                })
                .collect(),
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
        service.next_id = saved.next_id;
        for (i, (group, key)) in service.groups.iter_mut().zip(&saved.groups).enumerate() {
            let Some(key) = key else { continue };
            let dir = pins::group_dir(&service.config.name, i);
            match GroupProgram::from_pins(&dir) {
                Ok(program) => {
                    *group = Group {
                        key: Some(*key),
                        program: Some(program),
                    };
                }
                Err(e) => {
                    tracing::warn!(service = %service.config.name, group = %key, error = %e, "pinned maps not found; their generations are gone")
                }
            }
        }
        if service.groups.iter().any(|g| g.program.is_none())
            && saved.groups.iter().any(Option::is_some)
        {
            return service;
        }
        for g in saved.generations {
            let Some(leader) = reopen(&g.leader) else {
                tracing::info!(service = %service.config.name, generation = g.id, pid = g.leader.pid, "generation ended while the daemon was away");
                continue;
            };
            let descendants: Vec<Member> = g.descendants.iter().filter_map(reopen).collect();
            for m in std::iter::once(&leader).chain(&descendants) {
                ctx.watch(m);
            }
            service.generations.push(Generation {
                id: g.id,
                state: g.state,
                leader,
                descendants,
                blocks: g
                    .blocks
                    .into_iter()
                    .map(|b| Block {
                        index: b.index,
                        cookies: b.cookies,
                    })
                    .collect(),
                drain: None,
            });
            if let Some(d) = g.drain {
                let index = service.generations.len() - 1;
                service.resume_drain(index, &d, from_wall, ctx);
            }
            tracing::info!(service = %service.config.name, generation = g.id, pid = g.leader.pid, state = g.state.as_str(), "generation taken up");
        }
        service
    }
}
