//! The daemon's state and its answer to each control request.

use crate::logging::one_line;
use handoff_common::proto::{ErrorKind, ErrorReply, Promoted, Reloaded, Request, Response, Status};

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use crate::config::ServiceConfig;
use crate::config::file::{self as config_file, ConfigFileError};
use crate::config::{ConfigError, Overrides};
use crate::kernel::loader::{DrainEvent, EventStats};
use crate::persist::state::{SavedService, SavedState};
use crate::runtime::metrics::PromotionResult;
use crate::runtime::service::{Ctx, PromoteError, Service, StatusPlan};

/// While the kernel holds bind events back, how often the daemon reads its counters (and
/// looks for new listeners): twice the rate limit's window.
const STATS_RECHECK: std::time::Duration = std::time::Duration::from_millis(200);

mod events;
mod promote;
mod recover;
mod reload;
mod requests;

pub use promote::{Step, Who, promote};
pub use reload::{ConfigSource, ReloadError, reload};
pub use requests::{error, finish_status};

/// Every service of the daemon.
#[derive(Debug)]
pub struct Daemon {
    services: Vec<Service>,
    /// The drain accounting shared by all services.
    ctx: Ctx,
    /// Where the generation table is kept (none: not kept).
    state_file: Option<PathBuf>,
    /// Saved services that are not configured now: kept as they were.
    orphans: Vec<SavedService>,
    /// What was last written, to write only changes.
    last_saved: String,
    /// The services as configured, to rebuild the table after a panic.
    configs: Vec<ServiceConfig>,
    /// The table as of the end of the last operation that completed, written or not.
    last_good: SavedState,
    /// The kernel's event counters as last read.
    event_stats: EventStats,
    /// Bind events received from the kernel, and that count when the counters were last
    /// logged.
    binds_received: u64,
    binds_logged: u64,
    /// While the kernel holds bind events back: when to read its counters again.
    stats_check_at: Option<Instant>,
}

impl Daemon {
    /// A daemon steering `services`, taking up what `saved` says a previous daemon
    /// steered; no steering program is loaded for a new service until its first promote.
    pub fn new(
        services: Vec<ServiceConfig>,
        mut ctx: Ctx,
        saved: SavedState,
        state_file: Option<PathBuf>,
    ) -> Self {
        let configs = services.clone();
        let mut saved = saved.services;
        let mut table = Vec::with_capacity(services.len());
        for config in services {
            if let Err(e) = ctx.program.watch(&config.listen) {
                tracing::warn!(service = %config.name, error = %e, "cannot watch binds of the service port");
            }
            table.push(match saved.iter().position(|s| s.name == config.name) {
                Some(i) => Service::recover(config, saved.remove(i), &mut ctx),
                None => Service::new(config),
            });
            if let Some(s) = table.last() {
                s.watch_recovered_owner(&mut ctx);
            }
        }
        for orphan in &saved {
            tracing::warn!(service = %orphan.name, "saved state of a service that is not configured: kept as it is (handoffd --cleanup --service NAME removes it)");
        }
        let mut daemon = Self {
            services: table,
            ctx,
            state_file,
            orphans: saved,
            last_saved: String::new(),
            configs,
            last_good: SavedState::default(),
            event_stats: EventStats::default(),
            binds_received: 0,
            binds_logged: 0,
            stats_check_at: None,
        };
        daemon.persist();
        daemon
    }

    /// The table as [`SavedState`], every service and orphan.
    fn snapshot(&self) -> SavedState {
        SavedState {
            version: crate::persist::state::VERSION,
            services: self
                .services
                .iter()
                .map(|s| s.save(&self.ctx))
                .chain(self.orphans.iter().cloned())
                .collect(),
        }
    }

    /// One line for systemd's STATUS: services and generations by state.
    pub fn summary(&self) -> String {
        let (mut active, mut draining) = (0, 0);
        for s in &self.services {
            let (a, d) = s.counts();
            active += a;
            draining += d;
        }
        format!(
            "{} services, {active} active and {draining} draining generations",
            self.services.len()
        )
    }

    /// Writes the generation table if it changed.
    fn persist(&mut self) {
        let state = self.snapshot();
        self.last_good = state.clone();
        let Some(path) = &self.state_file else { return };
        let text = serde_json::to_string_pretty(&state).unwrap_or_default();
        if text == self.last_saved {
            return;
        }
        match crate::persist::state::save(path, &text) {
            Ok(()) => {
                self.last_saved = text;
                let _ = crate::runtime::notify::notify(&format!("STATUS={}", self.summary()));
            }
            Err(e) => {
                tracing::error!(error = %one_line(&e), "saving the generation table failed; a restarted daemon would not know the generations")
            }
        }
    }

    /// Applies a new configuration (SIGHUP): new services start, changed drain settings
    /// apply (also to drains under way), unchanged services are not touched. A removed
    /// service keeps being steered until it has one live generation left; then its
    /// program is detached and its pins removed. A configuration that changes the
    /// addresses of a service with live generations is refused whole: nothing changes.
    pub fn reload(&mut self, configs: Vec<ServiceConfig>) -> Result<(), ReloadError> {
        if let Some(service) = configs.iter().find_map(|c| {
            self.services
                .iter()
                .find(|s| s.name() == c.name && s.listen() != c.listen.as_slice() && s.live() > 0)
                .map(|s| s.name().to_owned())
        }) {
            return Err(ReloadError::AddressesInUse { service });
        }
        self.guarded("reload", |d| d.reload_unguarded(configs))
            .ok_or(ReloadError::Internal)
    }

    fn reload_unguarded(&mut self, configs: Vec<ServiceConfig>) {
        for config in &configs {
            match self.services.iter().position(|s| s.name() == config.name) {
                // With no live generation (checked by `reload`): a service anew.
                Some(i) if self.services[i].listen() != config.listen.as_slice() => {
                    tracing::info!(service = %config.name, listen = ?config.listen, "service addresses changed");
                    self.services[i] = Service::new(config.clone());
                    self.watch_port(config);
                }
                Some(i) => {
                    self.services[i].set_drain(config.drain, &mut self.ctx);
                    self.services[i].set_user(config.user, &mut self.ctx);
                    self.services[i].set_release(config.release.clone());
                    self.services[i].removing = false;
                }
                None => {
                    tracing::info!(service = %config.name, listen = ?config.listen, "service added");
                    self.watch_port(config);
                    self.services.push(Service::new(config.clone()));
                }
            }
        }
        for s in &mut self.services {
            if !configs.iter().any(|c| c.name == s.name()) && !s.removing {
                tracing::info!(service = %s.name(), "service removed from the configuration: steered until one generation is left");
                s.removing = true;
            }
        }
        self.drop_removed();
        self.remember(configs);
        self.persist();
    }

    /// Keeps the configuration of every service in the table, for [`Self::rebuild`]: the
    /// new one, with the addresses the service kept, or the old one of a removed service
    /// still steered.
    fn remember(&mut self, configs: Vec<ServiceConfig>) {
        let mut kept = Vec::with_capacity(self.services.len());
        for s in &self.services {
            let new = configs.iter().find(|c| c.name == s.name());
            let old = self.configs.iter().find(|c| c.name == s.name());
            if let Some(mut c) = new.or(old).cloned() {
                c.listen = s.listen().to_vec();
                kept.push(c);
            }
        }
        self.configs = kept;
    }

    /// Detaches and forgets removed services that have at most one live generation.
    fn drop_removed(&mut self) {
        let (done, kept): (Vec<Service>, Vec<Service>) = std::mem::take(&mut self.services)
            .into_iter()
            .partition(|s| s.removing && s.live() <= 1);
        self.services = kept;
        for s in done {
            for line in crate::kernel::detach::detach(&s.save(&self.ctx)) {
                tracing::info!(service = %s.name(), "{line}");
            }
            if let Err(e) = crate::persist::pins::remove_service(s.name()) {
                tracing::warn!(service = %s.name(), error = %e, "removing its pins failed");
            }
            tracing::info!(service = %s.name(), "removed service detached and forgotten");
        }
    }

    fn watch_port(&mut self, config: &ServiceConfig) {
        if let Err(e) = self.ctx.program.watch(&config.listen) {
            tracing::warn!(service = %config.name, error = %e, "cannot watch binds of the service port");
        }
    }
}
