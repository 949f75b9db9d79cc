//! What a service does when the kernel's event counters say an event was lost or held
//! back, and what it tells the bind watch.

use std::time::Instant;

use super::{Ctx, Service};
use crate::lifecycle::{Event, GenId};

impl Service {
    /// Counts every draining generation again now: a zero event may have been lost, and
    /// a generation whose count is zero must not wait for its drain timeout.
    pub fn recount_draining(&mut self, ctx: &mut Ctx) {
        self.drive(Event::RecountDraining, ctx);
    }

    /// A tag's count reached zero in the kernel: count once more, retire if still zero.
    pub fn on_zero(&mut self, tag: u32, ctx: &mut Ctx) {
        self.drive(Event::Zero { tag }, ctx);
    }

    /// Acts on every deadline that has passed: drain timeouts, kill-after, rechecks, the
    /// end of watch windows; and looks for new listeners.
    pub fn tick(&mut self, now: Instant, ctx: &mut Ctx) {
        self.rescan_due(now, ctx);
        if self
            .machine
            .next_deadline()
            .is_some_and(|at| ctx.instant(at) <= now)
        {
            self.drive(Event::Tick, ctx);
        }
    }

    /// The earliest deadline of any generation, or of the look for new listeners.
    pub fn next_deadline(&self, ctx: &Ctx) -> Option<Instant> {
        self.machine
            .next_deadline()
            .map(|at| ctx.instant(at))
            .into_iter()
            .chain(self.rescan.as_ref().map(|r| r.next))
            .min()
    }

    /// Looks for new listeners of the active generation as if its leader had bound the
    /// port: a bind event of the service's uid was held back by the rate limit or lost.
    pub fn look_for_listeners(&mut self, now: Instant, ctx: &Ctx) {
        if let Some(id) = self.active().map(|g| g.id) {
            let pid = self.leader_pid(id);
            self.on_bind(pid, now, ctx);
        }
    }

    /// A new configured `user` (a reload): the next promote is judged by it, and the bind
    /// watch reports the active generation's binds and that user's from now on.
    /// Generations promoted already keep the uids they were trusted with.
    pub fn set_user(&mut self, user: Option<u32>, ctx: &mut Ctx) {
        if user == self.config.user {
            return;
        }
        tracing::info!(service = %self.config.name, ?user, "service user changed: applies to the next promote");
        self.config.user = user;
        self.watch_recovered_owner(ctx);
    }

    /// [`Service::watch_owner`] for the active generation a restarted daemon took up.
    pub fn watch_recovered_owner(&self, ctx: &mut Ctx) {
        if let Some(id) = self.active().map(|g| g.id) {
            self.watch_owner(id, ctx);
        }
    }

    /// Tells the bind watch whose binds of the service's addresses to report: the uid of
    /// generation `id` (just made active), from now on.
    pub(super) fn watch_owner(&self, id: GenId, ctx: &mut Ctx) {
        let Some(g) = self.members.get(&id) else {
            return;
        };
        // Read after the pidfd was opened: a recycled pid's uid is never taken (the
        // member's liveness is checked after the read).
        let uid = real_uid(g.leader.pid).filter(|_| g.leader.alive());
        let Some(uid) = uid else {
            tracing::warn!(service = %self.config.name, pid = g.leader.pid, "cannot read the uid of the active generation: binds by every uid are reported");
            return;
        };
        if let Err(e) = ctx
            .program
            .set_owner(&self.config.listen, uid, self.config.user)
        {
            tracing::warn!(service = %self.config.name, error = %e, "cannot tell the bind watch the service's uid");
        }
    }
}

/// The real uid of `pid` (as `bpf_get_current_uid_gid` reports it), from the first field
/// of the `Uid:` line of /proc/PID/status.
fn real_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_real_uid(&status)
}

fn parse_real_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn real_uid_is_the_first_uid_field() {
        let status = "Name:\tnginx\nUid:\t33\t0\t0\t0\nGid:\t33\t33\t33\t33\n";
        assert_eq!(super::parse_real_uid(status), Some(33));
        assert_eq!(super::parse_real_uid("Name:\tx\n"), None);
        assert_eq!(super::parse_real_uid("Uid:\tx\n"), None);
    }
}
