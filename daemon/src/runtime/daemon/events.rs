//! What the kernel and the clock tell the daemon: drain events, event counters, exits
//! and deadlines.

use super::*;
use crate::runtime::service::{CheckError, CheckJob};

impl Daemon {
    /// Acts on what the kernel reported.
    pub fn on_events(&mut self, events: &[DrainEvent]) {
        self.guarded("drain events", |d| d.on_events_unguarded(events));
    }

    fn on_events_unguarded(&mut self, events: &[DrainEvent]) {
        for e in events {
            match *e {
                DrainEvent::Zero(tag) => {
                    // Before counting: a zero after this count writes a new event.
                    self.ctx.program.ack_zero(tag);
                    for s in &mut self.services {
                        s.on_zero(tag, &mut self.ctx);
                    }
                }
                // A wake-up only: the counters, read after every wake-up, moved.
                DrainEvent::Held { port } => {
                    tracing::debug!(port, "bind events held back");
                }
                DrainEvent::Bind { port, pid } => {
                    self.binds_received += 1;
                    tracing::debug!(port, pid, "bind event");
                    let now = Instant::now();
                    for s in self.services.iter_mut().filter(|s| s.port() == port) {
                        s.on_bind(pid, now, &self.ctx);
                        s.watch_bind(now);
                    }
                }
            }
        }
        self.persist();
    }

    /// Reads the kernel's event counters (on every wake-up of the supervisor) and makes
    /// up for what they say was missed: a lost zero event recounts every drain at once; a
    /// bind event held back or lost makes each service look for new listeners once, and
    /// the counters are read again [`STATS_RECHECK`] later, and so on while they move. The
    /// first bind a window holds back wakes the daemon (`DrainEvent::Held`); later ones
    /// wake nothing, and the rechecks find them: each at most [`STATS_RECHECK`] after it,
    /// since the checks stop only when one saw no change.
    pub fn check_event_stats(&mut self) {
        self.guarded("event counters", Self::check_event_stats_unguarded);
    }

    fn check_event_stats_unguarded(&mut self) {
        let stats = match self.ctx.program.stats() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %one_line(&e), "reading the event counters failed");
                return;
            }
        };
        let last = std::mem::replace(&mut self.event_stats, stats);
        let logged = std::mem::replace(&mut self.binds_logged, self.binds_received);
        if stats == last && logged == self.binds_received {
            self.stats_check_at = None;
            return;
        }
        tracing::debug!(
            binds_received = self.binds_received,
            filtered = stats.filtered,
            suppressed = stats.suppressed,
            lost_binds = stats.lost_binds,
            lost_zeros = stats.lost_zeros,
            "event counters"
        );
        if stats.lost_zeros != last.lost_zeros {
            tracing::warn!(
                lost = stats.lost_zeros.wrapping_sub(last.lost_zeros),
                "zero events were lost: counting every draining generation again"
            );
            self.ctx.program.ack_all_zeros();
            for s in &mut self.services {
                s.recount_draining(&mut self.ctx);
            }
        }
        if stats.suppressed != last.suppressed || stats.lost_binds != last.lost_binds {
            let now = Instant::now();
            for s in &mut self.services {
                s.look_for_listeners(now, &self.ctx);
            }
            self.stats_check_at = Some(now + STATS_RECHECK);
        } else {
            self.stats_check_at = None;
        }
        self.persist();
    }

    /// Notified when a deadline is brought forward: the supervisor's wake-up.
    pub fn waker(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.ctx.waker()
    }

    /// Retires generations whose members have all exited.
    pub fn reap(&mut self) {
        self.guarded("reaping", Self::reap_unguarded);
    }

    fn reap_unguarded(&mut self) {
        for s in &mut self.services {
            s.reap(&mut self.ctx);
        }
        self.drop_removed();
        self.persist();
    }

    /// Acts on passed deadlines.
    pub fn tick(&mut self, now: Instant) {
        self.guarded("deadlines", |d| d.tick_unguarded(now));
    }

    fn tick_unguarded(&mut self, now: Instant) {
        for s in &mut self.services {
            s.tick(now, &mut self.ctx);
            s.watch_tick(now, &mut self.ctx);
        }
        self.persist();
    }

    /// The earliest deadline of any service, or of the next read of the event counters.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.services
            .iter()
            .filter_map(|s| s.next_deadline(&self.ctx))
            .chain(self.stats_check_at)
            .chain(self.services.iter().filter_map(Service::watch_due))
            .chain(self.services.iter().filter_map(Service::watch_check_at))
            .min()
    }

    /// The watch-window checks due at `now`, by service name: to run without the lock.
    pub fn watch_checks_due(&mut self, now: Instant) -> Vec<(String, CheckJob)> {
        self.guarded("watch checks", |d| {
            let jobs = d
                .services
                .iter_mut()
                .filter_map(|s| {
                    let job = s.watch_check_due(now, &mut d.ctx)?;
                    Some((s.name().to_owned(), job))
                })
                .collect();
            // A generation that closed its listeners was rolled back from here.
            d.persist();
            jobs
        })
        .unwrap_or_default()
    }

    /// A watch-window check of service `service`'s generation came back (a service a
    /// reload removed meanwhile has nothing to act on).
    pub fn watch_checked(
        &mut self,
        service: &str,
        generation: u64,
        result: Result<(), CheckError>,
    ) {
        self.guarded("watch check", |d| {
            if let Some(s) = d.services.iter_mut().find(|s| s.name() == service) {
                s.watch_checked(generation, result, &mut d.ctx);
            }
            d.persist();
        });
    }
}
