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
use handoff_common::proto::GenerationState;

use super::{Service, drain::Ctx};
use crate::candidate;
use crate::discover;
use crate::group::GroupKey;
use crate::members::Member;

/// Looking for new listeners after a bind: first soon, then less often, for a second.
#[derive(Debug, Clone)]
pub(super) struct Rescan {
    /// The next look.
    pub next: Instant,
    /// The wait after it.
    step: Duration,
    /// When to stop looking.
    until: Instant,
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
        let Some(index) = self
            .generations
            .iter()
            .position(|g| g.state == GenerationState::Active)
        else {
            return;
        };
        if !self.adopt_process(index, pid, ctx) {
            return;
        }
        let mut pids = self.rescan.take().map(|r| r.pids).unwrap_or_default();
        if !pids.contains(&pid) {
            pids.push(pid);
        }
        self.rescan = Some(Rescan {
            next: now + Duration::from_millis(1),
            step: Duration::from_millis(2),
            until: now + Duration::from_secs(1),
            pids,
        });
    }

    /// Whether `pid` is a member of the generation at `index`, or a descendant of one
    /// (then it becomes a member).
    fn adopt_process(&mut self, index: usize, pid: i32, ctx: &Ctx) -> bool {
        let g = &mut self.generations[index];
        if g.members().any(|m| m.pid == pid) {
            return true;
        }
        let mut at = pid;
        for _ in 0..MAX_DEPTH {
            let Some(stat) = discover::read_stat(at) else {
                return false;
            };
            if stat.ppid <= 1 {
                return false;
            }
            if g.members().any(|m| m.pid == stat.ppid) {
                return match Member::open(pid) {
                    Ok(m) => {
                        ctx.watch(&m);
                        g.descendants.push(m);
                        true
                    }
                    Err(_) => false,
                };
            }
            at = stat.ppid;
        }
        false
    }

    /// Runs a scheduled look for new listeners, if due.
    pub(super) fn rescan_due(&mut self, now: Instant, ctx: &mut Ctx) {
        let Some(r) = self.rescan.take() else { return };
        if r.next > now {
            self.rescan = Some(r);
            return;
        }
        let pids = r.pids.clone();
        self.rescan = (now < r.until).then(|| Rescan {
            next: now + r.step,
            step: (r.step * 2).min(Duration::from_millis(250)),
            until: r.until,
            pids: r.pids,
        });
        self.adopt_listeners(&pids, ctx);
    }

    /// Puts listeners that `pids` of the active generation opened since its promote into
    /// its block: in a slot whose listener has closed, or after the last one.
    fn adopt_listeners(&mut self, pids: &[i32], ctx: &mut Ctx) {
        let Some(index) = self
            .generations
            .iter()
            .position(|g| g.state == GenerationState::Active)
        else {
            return;
        };
        let port = self.port();
        let known: HashSet<u64> = self.generations.iter().flat_map(|g| g.cookies()).collect();
        let Ok(found) = discover::new_listeners(port, pids, &known, ctx) else {
            return;
        };
        for l in found {
            let Some(at) = l.held_by else { continue };
            let g = &self.generations[index];
            if g.cookies().any(|c| c == l.diag.cookie) {
                continue;
            }
            let key = GroupKey::of(&l.diag);
            let Some(i) = self.groups.iter().position(|group| group.key == Some(key)) else {
                continue; // outside the service's groups: status reports it
            };
            let owner = g.members().find(|m| m.pid == at.pid);
            let opened;
            let owner = match owner {
                Some(m) => m,
                None => match Member::open(at.pid) {
                    Ok(m) => {
                        opened = m;
                        &opened
                    }
                    Err(_) => continue,
                },
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
            let block = &self.generations[index].blocks[i];
            // A slot whose listener closed (the map dropped it), else the next one.
            let free = (0..block.cookies.len())
                .find(|&k| {
                    program
                        .cookie_at(block.first() + k as u32)
                        .ok()
                        .flatten()
                        .is_none()
                })
                .unwrap_or(block.cookies.len());
            if free >= GEN_SLOTS as usize {
                tracing::warn!(service = %self.config.name, "the active generation has {GEN_SLOTS} listeners in one group; a new one cannot join");
                continue;
            }
            let slot = block.first() + free as u32;
            if let Err(e) = program.insert(slot, fd.as_fd()) {
                tracing::warn!(service = %self.config.name, error = %e, "a new listener cannot join");
                continue;
            }
            drop(fd); // the map holds no reference; a kept duplicate would keep it alive
            let block = &mut self.generations[index].blocks[i];
            if free == block.cookies.len() {
                block.cookies.push(l.diag.cookie);
                // One more listener in the active range: a new record, flipped atomically.
                let grown = program.record().map(|mut r| {
                    r.active_len = block.cookies.len() as u32;
                    r
                });
                if let Err(e) = grown.and_then(|r| program.publish(r)) {
                    tracing::error!(service = %self.config.name, error = %e, "publishing the grown generation failed");
                }
            } else {
                block.cookies[free] = l.diag.cookie;
            }
            tracing::info!(service = %self.config.name, generation = self.generations[index].id, pid = at.pid, addr = %l.diag.local, slot, "a new listener joined the active generation");
        }
    }
}
