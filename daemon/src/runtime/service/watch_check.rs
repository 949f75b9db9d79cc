//! The active generation in its watch window: while the previous generation stands by,
//! every [`INTERVAL`] the active one's listeners are read from the kernel's maps (a group
//! with none left hands traffic back: [`Event::ListenersLost`]) and it is checked with the
//! check it was promoted with (a failure hands traffic back: [`Event::CheckFailed`]).
//! Like a promote's check, the check runs without the daemon's lock.

use std::time::{Duration, Instant};

use handoff_common::check::CheckSpec;

use super::check::{CheckError, CheckJob, CheckPlan};
use super::drive::Run;
use super::{Ctx, Service};
use crate::lifecycle::{Event, GenId};

/// How often the active generation is checked in its watch window.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// A service's watch-window checks (the check each generation was promoted with is kept
/// with its members, and saved in the state file).
#[derive(Debug, Default)]
pub(super) struct WatchChecks {
    /// When the next check is due.
    next: Option<Instant>,
    /// A check is running.
    running: bool,
}

impl Service {
    /// Remembers the check generation `id` was promoted with.
    pub(super) fn remember_check(&mut self, id: GenId, spec: &CheckSpec) {
        self.set_check(id, Some(spec.to_string()));
    }

    /// The look at the active generation that is due at `now` in its watch window: its
    /// listeners, read from the kernel's maps (none left in a group: traffic goes back),
    /// then its health check, returned to be run without the lock, if it was promoted
    /// with one.
    pub fn watch_check_due(&mut self, now: Instant, ctx: &mut Ctx) -> Option<CheckJob> {
        if !self.machine.watching()
            || self.checks.running
            || self.checks.next.is_some_and(|at| at > now)
        {
            return None;
        }
        self.checks.next = Some(now + INTERVAL);
        let active = self.machine.active()?;
        let id = active.id;
        if self.listening(active).contains(&0) {
            tracing::warn!(service = %self.config.name, generation = id, "the active generation closed its listeners in its watch window: traffic goes back");
            self.drive(Event::ListenersLost { generation: id }, ctx);
            return None;
        }
        let mut run = Run::new(None);
        run.check = Some(CheckPlan {
            spec: self.watched_spec()?,
            deadline: now + self.config.release.check_timeout.min(INTERVAL * 2),
            wait: false,
        });
        match self.check_job(id, &run) {
            Ok(job) => {
                self.checks.running = true;
                Some(job)
            }
            Err(e) => {
                tracing::warn!(service = %self.config.name, generation = id, error = %e, "cannot check the active generation in its watch window");
                None
            }
        }
    }

    /// The check of `generation` in its watch window came back.
    pub fn watch_checked(
        &mut self,
        generation: GenId,
        result: Result<(), CheckError>,
        ctx: &mut Ctx,
    ) {
        self.checks.running = false;
        self.checks.next = Some(Instant::now() + INTERVAL);
        let Err(e) = result else { return };
        let still = self.machine.active().is_some_and(|g| g.id == generation);
        if still && self.machine.watching() {
            tracing::warn!(service = %self.config.name, generation, error = %e, "the active generation failed its check in its watch window: traffic goes back");
            self.drive(Event::CheckFailed { generation }, ctx);
        }
    }

    /// When the next look at the active generation in its watch window is due, if one is.
    pub fn watch_check_at(&self) -> Option<Instant> {
        if !self.machine.watching() || self.checks.running {
            return None;
        }
        Some(self.checks.next.unwrap_or_else(Instant::now))
    }

    /// The check of the active generation, while its watch window is open.
    fn watched_spec(&self) -> Option<CheckSpec> {
        if !self.machine.watching() {
            return None;
        }
        let id = self.machine.active()?.id;
        // Validated when saved and when read back: one that does not parse is no check.
        self.check_of(id)?.parse().ok()
    }
}
