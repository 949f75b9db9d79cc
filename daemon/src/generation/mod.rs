//! The table of services and generations, and the only place that changes it: promote,
//! rollback, retirement.

mod drain;
mod events;
mod guard;
mod listeners;
mod persist;
mod promote;
mod promote_error;
mod status;

use std::net::SocketAddr;

use handoff_common::maps::GEN_SLOTS;
use handoff_common::proto::GenerationState;

use drain::DrainState;
pub use drain::{Ctx, RetireReason};
pub use promote_error::PromoteError;
pub use status::StatusPlan;

use crate::config::DrainSettings;
use crate::group::GroupKey;
use crate::loader::GroupProgram;
use crate::members::Member;

/// How many retired generations a service keeps listing.
const KEEP_RETIRED: usize = 8;

/// A service as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Its name (used in paths: letters, digits, `-`, `_`).
    pub name: String,
    /// Its addresses, all on one port.
    pub listen: Vec<SocketAddr>,
    /// Signals and deadlines of its drains.
    pub drain: DrainSettings,
    /// The uid its processes run as when it is not the promoted process's own (`user`):
    /// descendants of that uid are members, and may hold the listeners.
    pub user: Option<u32>,
}

/// One of the service's groups: a listen address and the program steering it.
#[derive(Debug)]
struct Group {
    /// The full group tuple, fixed by the first promote.
    key: Option<GroupKey>,
    /// The steering program, loaded by the first promote.
    program: Option<GroupProgram>,
}

/// A generation's listeners in one group.
#[derive(Debug, Clone)]
struct Block {
    /// Index of its block of slots.
    index: u32,
    /// Cookies of its listeners, by slot offset in the block.
    cookies: Vec<u64>,
}

impl Block {
    fn first(&self) -> u32 {
        self.index * GEN_SLOTS
    }
}

/// A promoted process tree.
#[derive(Debug)]
struct Generation {
    id: u64,
    state: GenerationState,
    /// The promoted process.
    leader: Member,
    /// Its descendants at promote time.
    descendants: Vec<Member>,
    /// Its listeners, per group (same order as the service's groups).
    blocks: Vec<Block>,
    /// Set while it drains (and after, until it is retired).
    drain: Option<DrainState>,
    /// Uids whose processes in the leader's tree are members (see
    /// [`crate::candidate::Candidate::trusted`]).
    trusted: Vec<u32>,
}

impl Generation {
    fn members(&self) -> impl Iterator<Item = &Member> {
        std::iter::once(&self.leader).chain(&self.descendants)
    }

    fn cookies(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks.iter().flat_map(|b| b.cookies.iter().copied())
    }
}

/// A service: its groups and its generations, oldest first.
#[derive(Debug)]
pub struct Service {
    config: ServiceConfig,
    groups: Vec<Group>,
    generations: Vec<Generation>,
    next_id: u64,
    /// A pending look for new listeners, after a bind on the port.
    rescan: Option<listeners::Rescan>,
    /// Descendants found not to be members, by (pid, start time): not opened again on
    /// every count. Forgotten once they exit.
    outsiders: std::collections::HashSet<(i32, u64)>,
    /// Removed from the configuration: forgotten once one generation is left.
    pub removing: bool,
    /// Probes that check the groups still run handoff's program.
    watch: guard::Watch,
}

impl Service {
    /// A service with no generation yet; nothing is loaded until the first promote.
    pub fn new(config: ServiceConfig) -> Self {
        let groups = config
            .listen
            .iter()
            .map(|_| Group {
                key: None,
                program: None,
            })
            .collect();
        Self {
            config,
            groups,
            generations: Vec::new(),
            next_id: 1,
            rescan: None,
            outsiders: std::collections::HashSet::new(),
            removing: false,
            watch: guard::Watch::default(),
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Its addresses.
    pub fn listen(&self) -> &[SocketAddr] {
        &self.config.listen
    }

    /// Generations not retired.
    pub fn live(&self) -> usize {
        self.generations
            .iter()
            .filter(|g| g.state != GenerationState::Retired)
            .count()
    }

    /// New drain settings; drains under way keep their start and take the new timeout.
    pub fn set_drain(&mut self, settings: crate::config::DrainSettings) {
        if settings == self.config.drain {
            return;
        }
        tracing::info!(service = %self.config.name, ?settings, "drain settings changed");
        self.config.drain = settings;
        for d in self.generations.iter_mut().filter_map(|g| g.drain.as_mut()) {
            d.deadline = d.started + settings.drain_timeout;
        }
    }

    /// Active and draining generations.
    pub fn counts(&self) -> (usize, usize) {
        let n = |s| self.generations.iter().filter(|g| g.state == s).count();
        (n(GenerationState::Active), n(GenerationState::Draining))
    }

    /// The service's port.
    pub fn port(&self) -> u16 {
        self.config.listen.first().map_or(0, |a| a.port())
    }

    fn active(&self) -> Option<&Generation> {
        self.generations
            .iter()
            .find(|g| g.state == GenerationState::Active)
    }

    /// Marks generations whose members have all exited as retired, and takes their
    /// slots and counts out of the kernel's maps.
    pub fn reap(&mut self, ctx: &mut Ctx) {
        for g in &mut self.generations {
            // An exited descendant's pidfd is closed now (the leader's stays: it names
            // the generation until it retires).
            g.descendants.retain(Member::alive);
            // An unverified leader (see `Member::verified`) keeps nothing alive: it is
            // not the daemon's to wait for.
            if g.state == GenerationState::Retired
                || g.members().filter(|m| m.verified()).any(Member::alive)
            {
                continue;
            }
            let how = match &g.drain {
                Some(d) if d.killed => "killed",
                Some(d) => match d.retire {
                    Some((_, RetireReason::Drained)) => "drained",
                    Some((_, RetireReason::Timeout)) => "timeout",
                    None => "exited",
                },
                None => "exited",
            };
            let drained = g.drain.as_ref().map(|d| d.started.elapsed());
            let drained_ms = drained.map(|d| d.as_millis());
            ctx.metrics
                .retirement(&self.config.name, how, drained.map(|d| d.as_secs_f64()));
            tracing::info!(service = %self.config.name, generation = g.id, pid = g.leader.pid, how, drained_ms, "generation retired: every member exited");
            g.state = GenerationState::Retired;
            if let Some(d) = &g.drain {
                ctx.program.forget(d.tag);
            }
            for (block, group) in g.blocks.iter().zip(&self.groups) {
                if let Some(program) = &group.program {
                    for k in 0..block.cookies.len() as u32 {
                        let _ = program.remove(block.first() + k);
                    }
                }
            }
        }
        self.outsiders.retain(|&(pid, start)| {
            crate::discover::read_stat(pid).is_some_and(|s| s.start_time == start && s.state != 'Z')
        });
        let retired = self
            .generations
            .iter()
            .filter(|g| g.state == GenerationState::Retired)
            .count();
        let mut drop = retired.saturating_sub(KEEP_RETIRED);
        self.generations.retain(|g| {
            let forget = drop > 0 && g.state == GenerationState::Retired;
            drop -= usize::from(forget);
            !forget
        });
    }
}
