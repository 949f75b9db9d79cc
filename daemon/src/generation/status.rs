//! What `status` reports of a service.

use std::time::{Duration, Instant};

use handoff_common::maps::Counters;
use handoff_common::proto::{ForeignListener, GenerationState, GenerationStatus, ServiceStatus};

use super::drain::Ctx;
use super::{Generation, Service};
use crate::discover::{self, DiscoverError};
use crate::group::GroupKey;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Service {
    /// Listeners still open per group of `g` (a closed one has left the map).
    pub(super) fn listening(&self, g: &Generation) -> Vec<usize> {
        g.blocks
            .iter()
            .zip(&self.groups)
            .map(|(b, group)| {
                let Some(program) = &group.program else {
                    return 0;
                };
                b.cookies
                    .iter()
                    .enumerate()
                    .filter(|&(k, c)| {
                        program.cookie_at(b.first() + k as u32).ok().flatten() == Some(*c)
                    })
                    .count()
            })
            .collect()
    }

    /// The service as `status` shows it.
    pub fn status(&mut self, ctx: &mut Ctx) -> Result<ServiceStatus, DiscoverError> {
        self.reap(ctx);
        let port = self.port();
        let now = Instant::now();
        let mut generations = Vec::with_capacity(self.generations.len());
        for g in &self.generations {
            let listeners = self.listening(g).iter().sum();
            let connections = if g.state == GenerationState::Retired {
                0
            } else if let Some(d) = &g.drain {
                // What the drain accounting counts, live: the number retirement waits on.
                d.connections(ctx, self.queued(g)?)
            } else {
                let pids: Vec<i32> = if g.leader.alive() {
                    discover::process_tree(g.leader.pid)?
                } else {
                    g.members().filter(|m| m.alive()).map(|m| m.pid).collect()
                };
                discover::connections(port, &pids, &g.cookies().collect())?
            };
            generations.push(GenerationStatus {
                id: g.id,
                pid: g.leader.pid,
                state: g.state,
                listeners,
                connections,
                drain_age_ms: g.drain.as_ref().map(|d| millis(now - d.started)),
                drain_deadline_ms: g
                    .drain
                    .as_ref()
                    .map(|d| millis(d.deadline.saturating_duration_since(now))),
            });
        }
        let mut steering = Counters::default();
        for program in self.groups.iter().filter_map(|g| g.program.as_ref()) {
            match program.counters() {
                Ok(c) => steering.merge(&c),
                Err(e) => tracing::warn!(error = %e, "reading the program's counters failed"),
            }
        }
        Ok(ServiceStatus {
            name: self.config.name.clone(),
            listen: self.config.listen.iter().map(|a| a.to_string()).collect(),
            generations,
            foreign_listeners: self.foreign_listeners()?,
            steering,
        })
    }

    /// LISTEN sockets on the service port outside its groups.
    fn foreign_listeners(&self) -> Result<Vec<ForeignListener>, DiscoverError> {
        let listeners = discover::listeners(self.port(), &[])?;
        let mut out = Vec::new();
        for l in listeners {
            let key = GroupKey::of(&l.diag);
            let inside = self
                .config
                .listen
                .iter()
                .zip(&self.groups)
                .any(|(addr, g)| *addr == l.diag.local && g.key.is_none_or(|k| k == key));
            if !inside {
                out.push(ForeignListener {
                    addr: l.diag.local.to_string(),
                    group: key.to_string(),
                    pid: discover::owner_of(u64::from(l.diag.inode)),
                });
            }
        }
        Ok(out)
    }

    /// Connections waiting in the accept queues of `g`'s listeners.
    pub(super) fn queued(&self, g: &Generation) -> Result<u64, DiscoverError> {
        let cookies: std::collections::HashSet<u64> = g.cookies().collect();
        Ok(discover::listeners(self.port(), &[])?
            .iter()
            .filter(|l| cookies.contains(&l.diag.cookie))
            .map(|l| u64::from(l.diag.recv_queue))
            .sum())
    }
}
