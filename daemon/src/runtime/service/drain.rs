//! The runtime's part of a drain: counting a generation's connections in the kernel,
//! finding the processes it forked since, and signalling them. When to do each is the
//! lifecycle machine's decision.

use std::collections::HashSet;
use std::time::Instant;

use super::{Ctx, Members, Service};
use crate::discover::members::Member;
use crate::discover::{self, Processes};
use crate::lifecycle::{Event, GenId, RetireReason, SignalScope, Why};

impl Service {
    /// Counts generation `id` (members read again first, so processes forked since are
    /// included): its sockets tagged in the kernel, and connections waiting in its
    /// listeners' accept queues.
    pub(super) fn count(&mut self, id: GenId, tag: u32, first: bool, ctx: &mut Ctx) -> Event {
        let started = Instant::now();
        let port = self.port();
        self.adopt_descendants(id, ctx);
        let pids = self
            .members
            .get(&id)
            .map(Members::alive)
            .unwrap_or_default();
        let counted = match ctx.program.pass(tag, port, &pids) {
            // A negative count (a socket closed before the pass saw it) is none.
            Ok(n) => n.max(0).unsigned_abs(),
            Err(e) => {
                tracing::error!(service = %self.config.name, generation = id, error = %e, "the tag pass failed; the drain timeout will retire it");
                return Event::CountFailed { generation: id };
            }
        };
        let queued = match self.queued(id) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(service = %self.config.name, error = %e, "reading accept queues failed");
                1
            }
        };
        if first {
            let took_ms = started.elapsed().as_secs_f64() * 1e3;
            // From the drain's start (the promote) to the count: the pass and its wait.
            let since_start_ms = self
                .machine
                .generation(id)
                .and_then(|g| g.drain.as_ref())
                .map(|d| ctx.now().since(d.started));
            let pid = self.leader_pid(id);
            tracing::info!(service = %self.config.name, generation = id, pid, connections = counted, queued, took_ms, since_start_ms, "drain counted");
        } else {
            tracing::debug!(service = %self.config.name, generation = id, counted, queued, "counted");
        }
        Event::Counted {
            generation: id,
            counted,
            queued,
        }
    }

    /// Adds processes forked since the promote to generation `id`'s members: those of a
    /// trusted uid, and those holding one of its listeners. Others (a set-user-id helper a
    /// worker ran, say) are not members and are never signalled.
    pub(super) fn adopt_descendants(&mut self, id: GenId, ctx: &mut Ctx) {
        let port = self.port();
        let cookies: HashSet<u64> = self.cookies(id);
        let Some(g) = self.members.get_mut(&id) else {
            return;
        };
        // A leader a restarted daemon could not verify is no ground for new members.
        if !g.leader.alive() || !g.leader.verified() {
            return;
        }
        let Ok(tree) = ctx.tree(g.leader.pid) else {
            return;
        };
        let mut others = Vec::new();
        let known: HashSet<i32> = g.all().map(|m| m.pid).collect();
        for pid in tree {
            if known.contains(&pid) {
                continue;
            }
            // One read instead of a pidfd, /proc and a socket lookup for what was judged.
            if discover::read_stat(pid)
                .is_some_and(|s| self.outsiders.contains(&(pid, s.start_time)))
            {
                continue;
            }
            match Member::open(pid) {
                // The snapshot's pid may have been reused before the pidfd pinned it.
                Ok(m) if !crate::discover::members::member_descends_from(&m, &g.leader, 64) => {}
                Ok(m) if m.uids.within(&g.trusted) => {
                    ctx.watch(&m);
                    g.descendants.push(m);
                }
                Ok(m) => others.push(m),
                Err(e @ crate::discover::members::MemberError::FdLimit { .. }) => {
                    tracing::error!(service = %self.config.name, generation = id, error = %e, "a new process of the generation cannot be tracked");
                }
                Err(_) => {}
            }
        }
        if others.is_empty() {
            return;
        }
        let pids: Vec<i32> = others.iter().map(|m| m.pid).collect();
        let holders = match discover::held_listeners(port, &pids, 0, Some(&cookies), ctx) {
            Ok((_, holders)) => holders,
            Err(e) => {
                tracing::warn!(service = %self.config.name, error = %e, "reading new processes' listeners failed");
                HashSet::new()
            }
        };
        let Some(g) = self.members.get_mut(&id) else {
            return;
        };
        for m in others {
            if holders.contains(&m.pid) {
                ctx.watch(&m);
                g.descendants.push(m);
            } else {
                self.outsiders.insert((m.pid, m.start_time));
                tracing::debug!(service = %self.config.name, generation = id, pid = m.pid, uids = ?m.uids, "a descendant of another uid holding none of the generation's listeners is not a member");
            }
        }
    }

    /// Sends `sig` to generation `id`: to the leader (or, with [`SignalScope::All`] or the
    /// leader gone or unverified, every live member). Each target is checked again just
    /// before its signal (see [`Member::may_signal`]).
    pub(super) fn signal(&self, id: GenId, sig: i32, why: Why, scope: SignalScope) {
        let service = self.config.name.as_str();
        let Some(g) = self.members.get(&id) else {
            return;
        };
        let signal = crate::config::Sig(sig);
        match why {
            Why::Retire(RetireReason::Drained) => {
                tracing::info!(service, generation = id, pid = g.leader.pid, %signal, "drained: no connection left, retiring")
            }
            Why::Retire(RetireReason::Timeout) => {
                tracing::warn!(service, generation = id, pid = g.leader.pid, %signal, timeout = ?self.config.drain.drain_timeout, "drain timeout: retiring with connections left")
            }
            Why::Kill => {
                tracing::warn!(
                    service,
                    generation = id,
                    pid = g.leader.pid,
                    "kill-after passed: SIGKILL to every member still alive"
                )
            }
            Why::Drain => {}
        }
        let why = match why {
            Why::Drain => "drain",
            Why::Retire(_) => "retire",
            Why::Kill => "kill",
        };
        let leader_only = scope == SignalScope::Leader;
        let targets: Vec<&Member> = if leader_only && g.leader.alive() && g.leader.verified() {
            vec![&g.leader]
        } else {
            g.all().filter(|m| m.alive()).collect()
        };
        for m in targets {
            if let Err(reason) = m.may_signal(&g.trusted) {
                tracing::warn!(service, generation = id, pid = m.pid, %signal, why, reason, "signal not sent");
                continue;
            }
            match m.signal(sig) {
                Ok(()) => {
                    tracing::info!(service, generation = id, pid = m.pid, %signal, why, "signal sent")
                }
                Err(e) => {
                    tracing::warn!(service, generation = id, pid = m.pid, %signal, error = %e, "signal failed")
                }
            }
        }
    }
}
