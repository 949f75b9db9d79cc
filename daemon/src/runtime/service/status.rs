//! What `status` reports of a service.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use handoff_common::maps::Counters;
use handoff_common::proto::{ForeignListener, GenerationStatus, Release, ServiceStatus};

use super::{Ctx, Service};
use crate::discover::group::GroupKey;
use crate::discover::{self, DiscoverError};
use crate::lifecycle::{GenId, Generation, Millis, Phase};

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

    /// The service as `status` shows it, in two steps: what needs the daemon's state is
    /// read now (under its lock); the socket dumps, which cost in proportion to every
    /// socket of the host, are left to [`StatusPlan::finish`], run without the lock so
    /// that status and metrics never hold up a drain.
    pub fn status_plan(&mut self, ctx: &mut Ctx) -> StatusPlan {
        self.reap(ctx);
        self.metrics_plan(ctx)
    }

    /// As [`Service::status_plan`], changing nothing (exited generations are not reaped
    /// here): a copy of small numbers and the kernel's counters, for the metrics thread,
    /// which holds the daemon's lock only this long.
    pub fn metrics_plan(&self, ctx: &Ctx) -> StatusPlan {
        let now = ctx.now();
        let generations_all = self.machine.generations();
        let mut generations = Vec::with_capacity(generations_all.len());
        let mut pending = Vec::with_capacity(generations_all.len());
        for g in generations_all {
            let cookies = g.cookies().collect();
            let members = self.members.get(&g.id);
            pending.push(match &g.drain {
                _ if !g.phase.live() => Pending::None,
                // What the drain accounting counts, live: the number retirement waits on.
                // Before its first tag pass (just after the promote), counted like an
                // active generation.
                Some(d) if d.counted => Pending::Queued {
                    counted: connections(ctx, d.tag),
                    cookies,
                },
                _ => Pending::Held {
                    leader: members.filter(|m| m.leader.alive()).map(|m| m.leader.pid),
                    members: members.map(|m| m.alive()).unwrap_or_default(),
                    cookies,
                },
            });
            generations.push(GenerationStatus {
                id: g.id,
                pid: self.leader_pid(g.id),
                state: g.phase.public(),
                listeners: self.listening(g).iter().sum(),
                connections: 0,
                drain_age_ms: g.drain.as_ref().map(|d| now.since(d.started)),
                drain_deadline_ms: g.drain.as_ref().map(|d| d.deadline.since(now)),
                release: self.release_of(g, now),
            });
        }
        let mut steering = Counters::default();
        for program in self.groups.iter().filter_map(|g| g.program.as_ref()) {
            match program.counters() {
                Ok(c) => steering.merge(&c),
                Err(e) => tracing::warn!(error = %e, "reading the program's counters failed"),
            }
        }
        StatusPlan {
            status: ServiceStatus {
                name: self.config.name.clone(),
                listen: self.config.listen.iter().map(|a| a.to_string()).collect(),
                generations,
                foreign_listeners: Vec::new(),
                steering,
                steering_watch: self.watch.status(),
                rollbacks: self.rollbacks.clone(),
            },
            port: self.port(),
            pending,
            groups: self
                .config
                .listen
                .iter()
                .copied()
                .zip(self.groups.iter().map(|g| g.key))
                .collect(),
        }
    }

    /// Connections waiting in the accept queues of generation `id`'s listeners.
    pub(super) fn queued(&self, id: GenId) -> Result<u64, DiscoverError> {
        let listeners = discover::listeners(self.port(), &[], &mut discover::ProcFs)?;
        let cookies = self.cookies(id);
        Ok(queued_on(&listeners, &cookies))
    }
}

/// Connections counted in the kernel under `tag` (a negative count, a socket closed
/// before the pass saw it, as none).
fn connections(ctx: &Ctx, tag: u32) -> u64 {
    ctx.program.count(tag).unwrap_or(0).max(0).unsigned_abs()
}

/// Connections waiting in the accept queues of the listeners with `cookies`.
fn queued_on(listeners: &[discover::Listener], cookies: &HashSet<u64>) -> u64 {
    listeners
        .iter()
        .filter(|l| cookies.contains(&l.diag.cookie))
        .map(|l| u64::from(l.diag.recv_queue))
        .sum()
}

/// What a generation's connection count still needs from the kernel.
#[derive(Debug)]
enum Pending {
    /// Retired: none.
    None,
    /// Draining: counted already; add what waits in its listeners' accept queues.
    Queued { counted: u64, cookies: HashSet<u64> },
    /// Active: the connections its processes hold, and its queues.
    Held {
        leader: Option<i32>,
        members: Vec<i32>,
        cookies: HashSet<u64>,
    },
}

/// A status read from the daemon's state, to be completed from socket dumps.
#[derive(Debug)]
pub struct StatusPlan {
    status: ServiceStatus,
    port: u16,
    pending: Vec<Pending>,
    /// Each address with its group tuple, once fixed.
    groups: Vec<(SocketAddr, Option<GroupKey>)>,
}

impl StatusPlan {
    /// Counts connections and finds foreign listeners: one LISTEN dump for the service
    /// port, and a dump of its connections when a generation is active. Each foreign
    /// listener is named with a process holding it, found in one pass over every
    /// process's fds (a cost that grows with the host, not with the foreign listeners).
    pub fn finish(self) -> Result<ServiceStatus, DiscoverError> {
        self.finish_with(true)
    }

    /// As [`StatusPlan::finish`] without naming the processes of foreign listeners: what
    /// `/metrics` needs (their number), at the cost of two socket dumps and the active
    /// generation's process tree, whatever other users listen on the port.
    pub fn finish_metrics(self) -> Result<ServiceStatus, DiscoverError> {
        self.finish_with(false)
    }

    fn finish_with(mut self, owners: bool) -> Result<ServiceStatus, DiscoverError> {
        let listeners = discover::listeners(self.port, &[], &mut discover::ProcFs)?;
        for (g, pending) in self.status.generations.iter_mut().zip(&self.pending) {
            g.connections = match pending {
                Pending::None => 0,
                Pending::Queued { counted, cookies } => counted + queued_on(&listeners, cookies),
                Pending::Held {
                    leader,
                    members,
                    cookies,
                } => {
                    // Processes forked since the promote belong to it too.
                    let pids = match leader {
                        Some(pid) => discover::process_tree(*pid)?,
                        None => members.clone(),
                    };
                    discover::connections(self.port, &pids, cookies)?
                }
            };
        }
        let foreign: Vec<&discover::Listener> = listeners
            .iter()
            .filter(|l| {
                let key = GroupKey::of(&l.diag);
                !self
                    .groups
                    .iter()
                    .any(|(addr, k)| *addr == l.diag.local && k.is_none_or(|k| k == key))
            })
            .collect();
        let owners = if owners {
            owners_of(&foreign.iter().map(|l| u64::from(l.diag.inode)).collect())
        } else {
            HashMap::new()
        };
        for l in foreign {
            self.status.foreign_listeners.push(ForeignListener {
                addr: l.diag.local.to_string(),
                group: GroupKey::of(&l.diag).to_string(),
                pid: owners.get(&u64::from(l.diag.inode)).copied(),
            });
        }
        Ok(self.status)
    }
}

/// A process holding each socket inode of `wanted` (0, a socket no file refers to any
/// more, has none), from one pass over every process's fds that stops once all are found.
fn owners_of(wanted: &HashSet<u64>) -> HashMap<u64, i32> {
    let mut found = HashMap::new();
    let wanted_n = wanted.iter().filter(|&&i| i != 0).count();
    if wanted_n == 0 {
        return found;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for pid in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        let mut fds = HashMap::new();
        // A process that exited or may not be read names no listener: skip it.
        if discover::socket_fds(pid, &mut fds).is_err() {
            continue;
        }
        for inode in fds.into_keys().filter(|i| *i != 0 && wanted.contains(i)) {
            found.entry(inode).or_insert(pid);
        }
        if found.len() == wanted_n {
            break;
        }
    }
    found
}

impl Service {
    /// What a release made of generation `g`, as status shows it.
    fn release_of(&self, g: &Generation, now: Millis) -> Option<Release> {
        match g.phase {
            Phase::Canary { weight } => Some(Release::Canary { weight }),
            Phase::Standby { until } => Some(Release::Standby {
                watch_left_ms: until.since(now),
            }),
            Phase::Active if self.machine.watching() => Some(Release::Watched {
                check: self.check_of(g.id).map(str::to_owned),
            }),
            _ => None,
        }
    }
}
