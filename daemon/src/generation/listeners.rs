//! The listener set stays live: a worker that is respawned, or a reload that changes the
//! worker count, opens new listeners. A bind() on the service port (reported by the drain
//! programs' bind watch) makes the daemon look for them for a short while, and each new
//! listener of the active generation joins its block of slots.

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
#[derive(Debug, Clone, Copy)]
pub(super) struct Rescan {
    /// The next look.
    pub next: Instant,
    /// The wait after it.
    step: Duration,
    /// When to stop looking.
    until: Instant,
}

impl Service {
    /// Someone bound the service port: a new listener may follow (bind, then listen).
    pub fn on_bind(&mut self, now: Instant) {
        self.rescan = Some(Rescan {
            next: now + Duration::from_millis(1),
            step: Duration::from_millis(2),
            until: now + Duration::from_secs(1),
        });
    }

    /// Runs a scheduled look for new listeners, if due.
    pub(super) fn rescan_due(&mut self, now: Instant, ctx: &mut Ctx) {
        let Some(r) = self.rescan else { return };
        if r.next > now {
            return;
        }
        self.rescan = (now < r.until).then(|| Rescan {
            next: now + r.step,
            step: (r.step * 2).min(Duration::from_millis(250)),
            until: r.until,
        });
        self.adopt_listeners(ctx);
    }

    /// Puts listeners that the active generation's processes opened since its promote into
    /// its block: in a slot whose listener has closed, or after the last one.
    fn adopt_listeners(&mut self, ctx: &mut Ctx) {
        let Some(index) = self
            .generations
            .iter()
            .position(|g| g.state == GenerationState::Active)
        else {
            return;
        };
        self.adopt_descendants(index, ctx);
        let port = self.port();
        let g = &self.generations[index];
        let pids: Vec<i32> = g.members().filter(|m| m.alive()).map(|m| m.pid).collect();
        let Ok(found) = discover::listeners(port, &pids) else {
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
