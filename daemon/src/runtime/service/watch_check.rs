//! The active generation's health check in its watch window: while the previous
//! generation stands by, the active one is checked every [`INTERVAL`] with the check it
//! was promoted with, and a failure hands traffic back (the machine's
//! [`Event::CheckFailed`]). Like a promote's check, it runs without the daemon's lock.

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

    /// The check of the active generation that is due at `now`, if its watch window is
    /// open and it was promoted with a check.
    pub fn watch_check_due(&mut self, now: Instant) -> Option<CheckJob> {
        let spec = self.watched_spec()?;
        if self.checks.running || self.checks.next.is_some_and(|at| at > now) {
            return None;
        }
        let id = self.machine.active()?.id;
        let mut run = Run::new(None);
        run.check = Some(CheckPlan {
            spec,
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
                self.checks.next = Some(now + INTERVAL);
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

    /// When the next watch-window check is due, if one is.
    pub fn watch_check_at(&self) -> Option<Instant> {
        self.watched_spec()?;
        if self.checks.running {
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
