//! The listener set stays live: a worker that is respawned, or a reload that changes the
//! worker count, opens new listeners. A bind() on the service port by a process of the
//! active generation (reported with its pid by the drain programs' bind watch) makes the
//! daemon look at that process for a short while, and each new listener joins the
//! generation's block of slots. Binds by anyone else (a candidate starting, a client)
//! cost one map lookup in the kernel and one ancestry check here.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use handoff_common::maps::GEN_SLOTS;

use super::{Ctx, Service};
use crate::discover;
use crate::discover::candidate;
use crate::discover::group::GroupKey;
use crate::discover::members::Member;
use crate::lifecycle::{Event, GenId, Phase};

/// Looking for new listeners after a bind: first soon, then less often, for a second.
#[derive(Debug, Clone)]
pub(super) struct Rescan {
    /// The next look.
    pub next: Instant,
    /// The wait after it.
    step: Duration,
    /// When to stop looking.
    until: Instant,
    /// The generation the binding processes belong to: the look ends if it is no longer
    /// the active one, so a listener never joins another generation.
    generation: u64,
    /// The processes that bound the port: where the new listeners are.
    pids: Vec<i32>,
}

/// How far up the parent chain a binding process may be from a member: a worker's
/// worker is two.
const MAX_DEPTH: usize = 16;

impl Service {
    /// Process `pid` bound the service port: if it belongs to the active generation, a new
    /// listener may follow (bind, then listen).
    pub fn on_bind(&mut self, pid: i32, now: Instant, ctx: &Ctx) {
        let Some(generation) = self.active().map(|g| g.id) else {
            return;
        };
        if !self.adopt_process(generation, pid, ctx) {
            return;
        }
        let mut pids = match self.rescan.take() {
            Some(r) if r.generation == generation => r.pids,
            _ => Vec::new(),
        };
        if !pids.contains(&pid) {
            pids.push(pid);
        }
        self.rescan = Some(Rescan {
            next: now + Duration::from_millis(1),
            step: Duration::from_millis(2),
            until: now + Duration::from_secs(1),
            generation,
            pids,
        });
    }

    /// Whether `pid` is a member of generation `id`, or a descendant of one: then it, and
    /// every process between it and that member, become members.
    fn adopt_process(&mut self, id: GenId, pid: i32, ctx: &Ctx) -> bool {
        let Some(g) = self.members.get_mut(&id) else {
            return false;
        };
        let mut chain = Vec::new();
        let mut at = pid;
        // Up to a verified member: an unverified leader is no ground for new members.
        while !g.all().any(|m| m.pid == at && m.verified()) {
            // Reparented to init (or a subreaper), gone, or too far: not this generation's.
            if at <= 1 || chain.len() >= MAX_DEPTH {
                return false;
            }
            chain.push(at);
            let Some(stat) = discover::read_stat(at) else {
                return false;
            };
            at = stat.ppid;
        }
        let mut adopted = Vec::with_capacity(chain.len());
        for p in chain {
            match Member::open(p) {
                // Only processes of the generation's uids join by binding: one of another
                // uid (or one the rule excludes) is never a member, and its listener
                // never joins.
                Ok(m) if m.uids.within(&g.trusted) => adopted.push(m),
                Ok(m) => {
                    tracing::info!(service = %self.config.name, generation = id, pid = p, uids = ?m.uids, trusted = ?g.trusted, "a process of another uid bound the port: not a member");
                    return false;
                }
                Err(e @ crate::discover::members::MemberError::FdLimit { .. }) => {
                    tracing::error!(service = %self.config.name, generation = id, error = %e, "a process of the generation cannot be tracked");
                    return false;
                }
                Err(e @ crate::discover::members::MemberError::Excluded { .. }) => {
                    tracing::info!(service = %self.config.name, generation = id, error = %e, "not a member");
                    return false;
                }
                // One that exited meanwhile has no listener to give.
                Err(_) => {}
            }
        }
        for m in adopted {
            ctx.watch(&m);
            g.descendants.push(m);
        }
        true
    }

    /// Runs a scheduled look for new listeners, if due.
    pub(super) fn rescan_due(&mut self, now: Instant, ctx: &mut Ctx) {
        let Some(r) = self.rescan.take() else { return };
        if r.next > now {
            self.rescan = Some(r);
            return;
        }
        if !self.is(r.generation, Phase::Active) {
            return; // promoted or rolled back meanwhile: the look is over
        }
        let id = r.generation;
        let pids = r.pids.clone();
        self.rescan = (now < r.until).then(|| Rescan {
            next: now + r.step,
            step: (r.step * 2).min(Duration::from_millis(250)),
            pids: r.pids,
            ..r
        });
        self.adopt_listeners(id, &pids, ctx);
    }

    /// Puts listeners that the active generation `id` opened since its promote into its
    /// block: in a slot whose listener has closed, or after the last one. Looks in `pids`
    /// first; if a new listener is held by none of them (a binder that handed it to a
    /// child), in every member, descendants forked since included.
    fn adopt_listeners(&mut self, id: GenId, pids: &[i32], ctx: &mut Ctx) {
        let port = self.port();
        let known: HashSet<u64> = self
            .machine
            .generations()
            .iter()
            .flat_map(|g| g.cookies())
            .collect();
        let Ok(mut found) = discover::new_listeners(port, pids, &known, ctx) else {
            return;
        };
        if found.iter().any(|l| l.held_by.is_none()) {
            // A child forked since (it never bound) may hold it: members read again.
            self.adopt_descendants(id, ctx);
            let all = self.members.get(&id).map(|m| m.alive()).unwrap_or_default();
            let Ok(again) = discover::new_listeners(port, &all, &known, ctx) else {
                return;
            };
            found = again;
        }
        for l in found {
            let Some(at) = l.held_by else { continue };
            let key = GroupKey::of(&l.diag);
            let Some(i) = self.groups.iter().position(|group| group.key == Some(key)) else {
                continue; // outside the service's groups: status reports it
            };
            let Some(block) = self.machine.generation(id).and_then(|g| g.blocks.get(i)) else {
                continue;
            };
            if block.cookies.contains(&l.diag.cookie) {
                continue;
            }
            let (first, len) = (block.first(), block.cookies.len());
            // Held by a member only: a candidate starting, or anyone else, is not adopted.
            let Some(owner) = self
                .members
                .get(&id)
                .and_then(|m| m.all().find(|m| m.pid == at.pid))
            else {
                continue;
            };
            let fd = match candidate::duplicate(owner, at, l.diag.cookie, l.diag.local) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(service = %self.config.name, error = %e, "a new listener cannot join");
                    continue;
                }
            };
            let Some(program) = self.groups[i].program.as_mut() else {
                continue;
            };
            // A slot whose listener closed (the map dropped it), else the next one.
            let free = (0..len)
                .find(|&k| program.cookie_at(first + k as u32).ok().flatten().is_none())
                .unwrap_or(len);
            if free >= GEN_SLOTS as usize {
                tracing::warn!(service = %self.config.name, "the active generation has {GEN_SLOTS} listeners in one group; a new one cannot join");
                continue;
            }
            let slot = first + free as u32;
            if let Err(e) = program.insert(slot, fd.as_fd()) {
                tracing::warn!(service = %self.config.name, error = %e, "a new listener cannot join");
                continue;
            }
            drop(fd); // the map holds no reference; a kept duplicate would keep it alive
            // A grown block is published by the machine (one atomic flip).
            let joined = Event::ListenerJoined {
                generation: id,
                group: i,
                offset: free,
                cookie: l.diag.cookie,
            };
            self.drive(joined, ctx);
            tracing::info!(service = %self.config.name, generation = id, pid = at.pid, addr = %l.diag.local, slot, "a new listener joined the active generation");
        }
    }
}
