//! The steering watch: the kernel cannot read back a group's program, so probes check
//! that each group still runs handoff's: soon after every bind on the service port (a
//! bind may form a new group, or join one), and at most once a second as the backstop
//! (a 32-bit process's setsockopt bypasses the guard). Probes run only while the service
//! has an active generation. A probe that no program of ours saw makes the daemon attach
//! its program again, through a listener of a live generation in that group, and probe
//! again; both are logged, counted in metrics and shown in `status`.

use std::os::fd::AsFd;
use std::time::{Duration, Instant, SystemTime};

use handoff_common::proto::SteeringWatchStatus;

use super::{Ctx, Members, Service};
use crate::discover::members::Member;
use crate::kernel::probe;
use crate::lifecycle::Phase;
use crate::runtime::metrics::SteeringWatch;

/// The backstop's period.
const PERIOD: Duration = Duration::from_secs(1);
/// A probe after a bind waits this long (the socket joins its group at listen()).
const AFTER_BIND: Duration = Duration::from_millis(20);
/// Binds bring a probe forward no more often than this (a bind flood costs ≤ 10 probes/s).
const MIN_GAP: Duration = Duration::from_millis(100);

/// What the watch knows of one service.
#[derive(Debug)]
pub(super) struct Watch {
    /// The next probe.
    next: Instant,
    /// The last probe.
    last: Option<Instant>,
    lost: u64,
    restored: u64,
    last_lost: Option<SystemTime>,
    last_restored: Option<SystemTime>,
    /// Found lost and not restored since.
    lost_now: bool,
    /// The service port was given to the guard.
    guarded: bool,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            next: Instant::now(),
            last: None,
            lost: 0,
            restored: 0,
            last_lost: None,
            last_restored: None,
            lost_now: false,
            guarded: false,
        }
    }
}

fn unix_ms(t: Option<SystemTime>) -> Option<u64> {
    let d = t?.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    u64::try_from(d.as_millis()).ok()
}

impl Watch {
    /// As `status` shows it.
    pub(super) fn status(&self) -> SteeringWatchStatus {
        SteeringWatchStatus {
            lost: self.lost,
            restored: self.restored,
            last_lost_ms: unix_ms(self.last_lost),
            last_restored_ms: unix_ms(self.last_restored),
            lost_now: self.lost_now,
        }
    }
}

impl Service {
    /// Whether anything is steered: an active generation and a loaded program.
    fn steered(&self) -> bool {
        self.active().is_some() && self.groups.iter().any(|g| g.program.is_some())
    }

    /// When the next probe is due; none while nothing is steered.
    pub fn watch_due(&self) -> Option<Instant> {
        self.steered().then_some(self.watch.next)
    }

    /// Steering is in force (a promote or rollback succeeded, verified by a probe): the
    /// guard covers the port, and the backstop starts a period from now.
    pub(super) fn watch_start(&mut self, ctx: &mut Ctx) {
        self.guard_port(ctx);
        self.watch.lost_now = false;
        self.watch.next = Instant::now() + PERIOD;
        // The supervisor sleeps until the earliest deadline it knew: this one is new.
        ctx.waker().notify_one();
    }

    fn guard_port(&mut self, ctx: &mut Ctx) {
        if self.watch.guarded {
            return;
        }
        if let Some(guard) = ctx.guard.as_mut() {
            match guard.watch(&self.config.listen) {
                Ok(()) => self.watch.guarded = true,
                Err(e) => {
                    tracing::warn!(service = %self.config.name, error = %e, "cannot guard the service addresses")
                }
            }
        }
    }

    /// A bind on the service port: probe soon (not sooner than [`MIN_GAP`] after the last).
    pub fn watch_bind(&mut self, now: Instant) {
        let mut at = now + AFTER_BIND;
        if let Some(last) = self.watch.last {
            at = at.max(last + MIN_GAP);
        }
        self.watch.next = self.watch.next.min(at);
    }

    /// Probes every group if due; attaches the program again where it was lost.
    ///
    /// Runs with the daemon's lock held: each probe waits at most
    /// [`probe::PROBE_DEADLINE`] (twice for a lost group: before and after re-attaching),
    /// whatever listener another program sends it to, so the lock is held for a bounded
    /// time per group.
    pub fn watch_tick(&mut self, now: Instant, ctx: &mut Ctx) {
        if now < self.watch.next || !self.steered() {
            return;
        }
        self.watch.last = Some(now);
        self.watch.next = now + PERIOD;
        self.guard_port(ctx);
        let mut lost_now = false;
        for i in 0..self.groups.len() {
            if !self.group_lost(i) {
                continue;
            }
            // Known lost since an earlier probe (nothing to attach through yet): counted
            // and logged once, looked at again each period.
            let known = self.watch.lost_now;
            if !known {
                self.watch.lost += 1;
                self.watch.last_lost = Some(SystemTime::now());
                ctx.metrics
                    .steering_watch(&self.config.name, SteeringWatch::Lost);
            }
            let group = self.groups[i]
                .key
                .map(|k| k.to_string())
                .unwrap_or_default();
            if !known {
                tracing::warn!(service = %self.config.name, %group, "a probe was not seen by handoff's program (another program attached, ours detached, or the group re-formed): attaching it again");
            }
            match self.reattach(i, ctx) {
                Ok(true) if !self.group_lost(i) => {
                    self.watch.restored += 1;
                    self.watch.last_restored = Some(SystemTime::now());
                    ctx.metrics
                        .steering_watch(&self.config.name, SteeringWatch::Restored);
                    tracing::warn!(service = %self.config.name, %group, "steering restored: handoff's program attached again and seen by a probe");
                }
                Ok(_) => {
                    lost_now = true;
                    if !known {
                        tracing::warn!(service = %self.config.name, %group, "steering not restored: no listener of a live generation to attach through (promote a new one)");
                    }
                }
                Err(e) => {
                    lost_now = true;
                    if !known {
                        tracing::warn!(service = %self.config.name, %group, error = %e, "attaching the program again failed");
                    }
                }
            }
        }
        self.watch.lost_now = lost_now;
    }

    /// Whether a probe of group `i` went unseen by handoff's program.
    fn group_lost(&mut self, i: usize) -> bool {
        let group = &mut self.groups[i];
        let (Some(key), Some(program)) = (group.key, group.program.as_mut()) else {
            return false;
        };
        match probe::probe(program, key.probe_target(), probe::PROBE_DEADLINE) {
            Ok(_) => false,
            Err(e) if e.lost() => true,
            // Failed before the connect (no fd, a map error): nothing learnt about the group.
            Err(e) => {
                tracing::debug!(service = %self.config.name, group = %key, error = %e, "probe failed");
                false
            }
        }
    }

    /// Attaches group `i`'s program through a listener of the active generation, or else
    /// of another live one, still in the group (its cookie in the generation's block).
    /// Returns whether it attached.
    pub(super) fn reattach(
        &mut self,
        i: usize,
        ctx: &mut Ctx,
    ) -> Result<bool, crate::kernel::loader::LoaderError> {
        let port = self.port();
        // The active generation first, then the newest.
        let mut order: Vec<(bool, usize, crate::lifecycle::GenId)> = self
            .machine
            .generations()
            .iter()
            .enumerate()
            .filter(|(_, g)| g.phase.live())
            .map(|(k, g)| (g.phase != Phase::Active, k, g.id))
            .collect();
        order.sort_by_key(|&(not_active, k, _)| (not_active, std::cmp::Reverse(k)));
        for (_, _, id) in order {
            let cookies = match self.machine.generation(id).and_then(|g| g.blocks.get(i)) {
                Some(block) => block.cookies.clone(),
                None => continue,
            };
            let Some(members) = self.members.get(&id) else {
                continue;
            };
            let Some(fd) = listener_of(members, &cookies, port, ctx)? else {
                continue;
            };
            if let Some(program) = self.groups[i].program.as_mut() {
                program.attach(fd.as_fd())?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// A duplicate of one of `members`' listeners with one of `cookies`, if one still holds
/// one.
fn listener_of(
    members: &Members,
    cookies: &[u64],
    port: u16,
    ctx: &mut Ctx,
) -> Result<Option<std::os::fd::OwnedFd>, crate::kernel::loader::LoaderError> {
    let pids = members.alive();
    for l in ctx.program.listeners(port, &pids)? {
        let Some(member) = members.all().find(|m| m.pid == l.pid) else {
            continue;
        };
        if let Some(fd) = duplicate_listener(member, l.fd, cookies) {
            return Ok(Some(fd));
        }
    }
    Ok(None)
}

/// Fd `fd` of `member`, duplicated, if it is a socket with one of `cookies` (the number
/// may have been reused since the iterator ran).
fn duplicate_listener(member: &Member, fd: i32, cookies: &[u64]) -> Option<std::os::fd::OwnedFd> {
    let dup = crate::sys::pidfd_getfd(member.pidfd(), fd).ok()?;
    let cookie = crate::sys::socket_cookie(dup.as_fd()).ok()?;
    cookies.contains(&cookie).then_some(dup)
}
