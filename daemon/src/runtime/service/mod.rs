//! The runtime of a service's generations: the kernel's programs and the processes of
//! each generation, driven by the pure [`crate::lifecycle`] machine. Every change of a
//! generation's state is the machine's; this module discovers, applies the machine's
//! effects (map writes, probes, signals, counts) and reports their outcome back.

mod check;
mod ctx;
mod drain;
mod drive;
mod events;
mod guard;
#[cfg(test)]
mod iterators_tests;
mod listeners;
mod persist;
mod promote;
mod promote_error;
mod status;
mod trace;
mod watch_check;

use std::collections::HashMap;
use std::net::SocketAddr;

use handoff_common::proto::GenerationState;

pub use check::{CheckError, CheckJob};
pub use ctx::Ctx;
pub use promote::Operated;
pub use promote_error::PromoteError;
pub use status::StatusPlan;

use crate::config::{DrainSettings, ServiceConfig};
use crate::discover::group::GroupKey;
use crate::discover::members::Member;
use crate::kernel::loader::GroupProgram;
use crate::lifecycle::{Event, GenId, Generation, Lifecycle, Phase, Policy};

/// One of the service's groups: a listen address and the program steering it.
#[derive(Debug)]
struct Group {
    /// The full group tuple, fixed by the first promote.
    key: Option<GroupKey>,
    /// The steering program, loaded by the first promote.
    program: Option<GroupProgram>,
}

/// A generation's processes, held as pidfds.
#[derive(Debug)]
struct Members {
    /// The promoted process; its pidfd names the generation until it is forgotten.
    leader: Member,
    /// Its descendants at promote time, and those adopted since.
    descendants: Vec<Member>,
    /// Uids whose processes in the leader's tree are members (see
    /// [`crate::discover::candidate::Candidate::trusted`]).
    trusted: Vec<u32>,
    /// The health check it was promoted with, kept across restarts (see `persist`).
    check: Option<String>,
}

impl Members {
    fn all(&self) -> impl Iterator<Item = &Member> {
        std::iter::once(&self.leader).chain(&self.descendants)
    }

    fn alive(&self) -> Vec<i32> {
        self.all().filter(|m| m.alive()).map(|m| m.pid).collect()
    }
}

/// A service: its groups, its generations' lifecycle and their processes.
#[derive(Debug)]
pub struct Service {
    config: ServiceConfig,
    groups: Vec<Group>,
    /// Every generation's state: changed only by the machine.
    machine: Lifecycle,
    /// Each live generation's processes, by id.
    members: HashMap<GenId, Members>,
    /// A pending look for new listeners, after a bind on the port.
    rescan: Option<listeners::Rescan>,
    /// Descendants found not to be members, by (pid, start time): not opened again on
    /// every count. Forgotten once they exit.
    outsiders: std::collections::HashSet<(i32, u64)>,
    /// Removed from the configuration: forgotten once one generation is left.
    pub removing: bool,
    /// Probes that check the groups still run handoff's program.
    watch: guard::Watch,
    /// A promote waiting for its candidate's check.
    parked: Option<promote::Parked>,
    /// The active generation's checks in its watch window.
    checks: watch_check::WatchChecks,
    /// Rollbacks since the daemon started, and the last one.
    rollbacks: Option<handoff_common::proto::RollbackStatus>,
}

/// The machine's drain policy from the configured settings.
fn policy(d: DrainSettings) -> Policy {
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Policy {
        drain_signal: d.drain_signal.map(|s| s.0),
        retire_signal: d.retire_signal.0,
        drain_timeout_ms: ms(d.drain_timeout),
        kill_after_ms: d.kill_after.map(ms),
    }
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
        let machine = Lifecycle::new(config.listen.len(), policy(config.drain));
        trace::record(&trace::Line::New {
            service: &config.name,
            groups: config.listen.len(),
            policy: machine.policy(),
        });
        Self {
            config,
            groups,
            machine,
            members: HashMap::new(),
            rescan: None,
            outsiders: std::collections::HashSet::new(),
            removing: false,
            watch: guard::Watch::default(),
            parked: None,
            checks: watch_check::WatchChecks::default(),
            rollbacks: None,
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Traffic went back to generation `to`: counted, shown in status.
    fn note_rollback(&mut self, to: GenId, reason: crate::lifecycle::RollbackReason, ctx: &Ctx) {
        ctx.metrics.rollback(&self.config.name, reason);
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let count = self.rollbacks.as_ref().map_or(0, |r| r.count) + 1;
        self.rollbacks = Some(handoff_common::proto::RollbackStatus {
            count,
            reason: reason.as_str().to_owned(),
            to,
            at_ms,
        });
    }

    /// How its promotes hand traffic over by default.
    pub fn release(&self) -> &crate::config::ReleaseSettings {
        &self.config.release
    }

    /// New release settings (a reload): promotes from now on take them as their defaults.
    /// A watch window under way keeps its deadline and the check it was promoted with.
    pub fn set_release(&mut self, settings: crate::config::ReleaseSettings) {
        if settings == self.config.release {
            return;
        }
        tracing::info!(service = %self.config.name, ?settings, "release settings changed: apply to the next promote");
        self.config.release = settings;
    }

    /// Its addresses.
    pub fn listen(&self) -> &[SocketAddr] {
        &self.config.listen
    }

    /// Generations not retired.
    pub fn live(&self) -> usize {
        self.machine.live()
    }

    /// New drain settings; drains under way keep their start and take the new timeout.
    pub fn set_drain(&mut self, settings: DrainSettings, ctx: &mut Ctx) {
        if settings == self.config.drain {
            return;
        }
        tracing::info!(service = %self.config.name, ?settings, "drain settings changed");
        self.config.drain = settings;
        self.drive(Event::Policy(policy(settings)), ctx);
    }

    /// Active and draining generations.
    pub fn counts(&self) -> (usize, usize) {
        let n = |s| {
            self.machine
                .generations()
                .iter()
                .filter(|g| g.phase.public() == s)
                .count()
        };
        (n(GenerationState::Active), n(GenerationState::Draining))
    }

    /// The service's port.
    pub fn port(&self) -> u16 {
        self.config.listen.first().map_or(0, |a| a.port())
    }

    fn active(&self) -> Option<&Generation> {
        self.machine.active()
    }

    /// The leader's pid of generation `id` (0 if unknown).
    fn leader_pid(&self, id: GenId) -> i32 {
        self.members.get(&id).map_or(0, |m| m.leader.pid)
    }

    /// Marks generations whose members have all exited as retired, and takes their
    /// slots and counts out of the kernel's maps.
    pub fn reap(&mut self, ctx: &mut Ctx) {
        let mut events = Vec::new();
        for g in self.machine.generations().iter().filter(|g| g.phase.live()) {
            let Some(m) = self.members.get_mut(&g.id) else {
                events.push(Event::Exited { generation: g.id });
                continue;
            };
            // An exited descendant's pidfd is closed now (the leader's stays: it names
            // the generation until it is forgotten).
            m.descendants.retain(Member::alive);
            if !self.machine.leader_gone(g.id) && !m.leader.alive() {
                events.push(Event::LeaderExited { generation: g.id });
            }
            // An unverified leader (see `Member::verified`) keeps nothing alive: it is
            // not the daemon's to wait for.
            if !m.all().filter(|m| m.verified()).any(Member::alive) {
                events.push(Event::Exited { generation: g.id });
            }
        }
        for event in events {
            self.drive(event, ctx);
        }
        self.outsiders.retain(|&(pid, start)| {
            crate::discover::read_stat(pid).is_some_and(|s| s.start_time == start && s.state != 'Z')
        });
    }

    /// The cookies of generation `id`'s listeners.
    fn cookies(&self, id: GenId) -> std::collections::HashSet<u64> {
        self.machine
            .generation(id)
            .map(|g| g.cookies().collect())
            .unwrap_or_default()
    }

    /// Whether generation `id` is in `phase`.
    fn is(&self, id: GenId, phase: Phase) -> bool {
        self.machine
            .generation(id)
            .is_some_and(|g| g.phase == phase)
    }
}
