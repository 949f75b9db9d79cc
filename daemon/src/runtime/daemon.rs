//! The daemon's state and its answer to each control request.

use crate::logging::one_line;
use handoff_common::proto::{ErrorKind, ErrorReply, Promoted, Reloaded, Request, Response, Status};

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use crate::config::ServiceConfig;
use crate::config::file::{self as config_file, ConfigFileError};
use crate::config::{ConfigError, Overrides};
use crate::discover::members::Member;
use crate::kernel::loader::{DrainEvent, EventStats};
use crate::persist::state::{SavedService, SavedState};
use crate::runtime::metrics::PromotionResult;
use crate::runtime::service::{Ctx, PromoteError, Service, StatusPlan};

/// While the kernel holds bind events back, how often the daemon reads its counters (and
/// looks for new listeners): twice the rate limit's window.
const STATS_RECHECK: std::time::Duration = std::time::Duration::from_millis(200);

mod recover;

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
            .min()
    }

    /// Answers one request.
    pub fn handle(&mut self, request: Request) -> Response {
        self.guarded("request", |d| d.handle_unguarded(request))
            .unwrap_or_else(|| {
                error(
                    ErrorKind::Internal,
                    &"the request failed on an internal error (logged); the daemon took up its last consistent state and serves on: check `handoffctl status` and retry",
                )
            })
    }

    fn handle_unguarded(&mut self, request: Request) -> Response {
        let response = self.answer(request);
        self.persist();
        response
    }

    fn answer(&mut self, request: Request) -> Response {
        match request {
            Request::Promote { pid, service } => match self.service(service.as_deref()) {
                Ok(i) => self.change(i, |s, ctx| s.promote(pid, ctx)),
                Err(e) => e,
            },
            Request::Rollback { service } => match self.service(service.as_deref()) {
                Ok(i) => self.change(i, Service::rollback),
                Err(e) => e,
            },
            // Callers that can should use `status_plans` and finish outside the lock.
            Request::Status {} => {
                let plans = self.status_plans();
                finish_status(plans, Some(self.kernel_status()))
            }
            // The file is read by `reload`, which needs the daemon's --config.
            Request::Reload {} => error(
                ErrorKind::Internal,
                &"reload is answered by the control socket, not the daemon's table",
            ),
        }
    }

    /// Promotes `leader`, a process already opened from a pidfd a client passed (see
    /// [`Member::from_pidfd`]), as a promote request naming `service` would.
    pub fn promote_member(&mut self, leader: Member, service: Option<&str>) -> Response {
        self.guarded("request", |d| {
            let response = match d.service(service) {
                Ok(i) => d.change(i, |s, ctx| s.promote_member(leader, ctx)),
                Err(e) => e,
            };
            d.persist();
            response
        })
        .unwrap_or_else(|| {
            error(
                ErrorKind::Internal,
                &"the request failed on an internal error (logged); the daemon took up its last consistent state and serves on: check `handoffctl status` and retry",
            )
        })
    }

    /// Runs a promote or rollback on service `i`, counting it in the metrics.
    fn change(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut Service, &mut Ctx) -> Result<Promoted, PromoteError>,
    ) -> Response {
        let started = Instant::now();
        let result = f(&mut self.services[i], &mut self.ctx);
        let name = self.services[i].name();
        match result {
            Ok(p) => {
                let seconds = started.elapsed().as_secs_f64();
                self.ctx
                    .metrics
                    .promotion(name, PromotionResult::Ok, Some(seconds));
                Response::Promoted(p)
            }
            Err(e) => {
                let kind = e.kind();
                let result = match kind {
                    ErrorKind::Kernel | ErrorKind::Internal => PromotionResult::Failed,
                    _ => PromotionResult::Refused,
                };
                self.ctx.metrics.promotion(name, result, None);
                error(kind, &one_line(&e))
            }
        }
    }

    /// The first step of a status: what needs the daemon's state (see
    /// [`StatusPlan`]); finish it with [`finish_status`] without holding the daemon.
    pub fn status_plans(&mut self) -> Vec<StatusPlan> {
        self.guarded("status", Self::status_plans_unguarded)
            .unwrap_or_default()
    }

    fn status_plans_unguarded(&mut self) -> Vec<StatusPlan> {
        let plans = self
            .services
            .iter_mut()
            .map(|s| s.status_plan(&mut self.ctx))
            .collect();
        self.persist();
        plans
    }

    /// The kernel and the modes the daemon runs in.
    pub fn kernel_status(&self) -> handoff_common::proto::KernelStatus {
        self.ctx.kernel_status()
    }

    /// What `/metrics` needs of the daemon's state, copied without changing it; finish
    /// each plan with [`StatusPlan::finish_metrics`] without holding the daemon.
    pub fn metrics_plans(&self) -> Vec<StatusPlan> {
        self.services
            .iter()
            .map(|s| s.metrics_plan(&self.ctx))
            .collect()
    }

    /// The daemon's metrics, shared with the caller (see [`crate::runtime::metrics::serve`]).
    pub fn metrics(&self) -> crate::runtime::metrics::Metrics {
        self.ctx.metrics.clone()
    }

    /// The index of the service a request names (or the only one).
    fn service(&self, name: Option<&str>) -> Result<usize, Response> {
        let known = || self_names(&self.services);
        match name {
            Some(name) => self
                .services
                .iter()
                .position(|s| s.name() == name)
                .ok_or_else(|| {
                    error(
                        ErrorKind::UnknownService,
                        &format!("no service {name:?} (this daemon runs: {})", known()),
                    )
                }),
            None if self.services.len() == 1 => Ok(0),
            None => Err(error(
                ErrorKind::UnknownService,
                &format!(
                    "this daemon runs several services ({}): name one with --service",
                    known()
                ),
            )),
        }
    }
}

/// Where the daemon's configuration comes from: the `--config` file, if any, and the
/// flags that override its service. A reload (SIGHUP or `handoffctl reload`) reads the
/// file again through [`reload`].
#[derive(Debug, Default)]
pub struct ConfigSource {
    /// `--config`; none: the flags alone, and nothing to reload.
    file: Option<PathBuf>,
    /// The flags, applied to the file's service as at start.
    overrides: Overrides,
    /// Held from reading the file to applying it: of two reloads at once (SIGHUP and a
    /// request), the one that read the file last applies last.
    reloading: Mutex<()>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The daemon was started without `--config`.
    #[error(
        "handoffd runs without --config: there is no configuration file to reload (restart it with --config FILE)"
    )]
    NoConfig,
    /// The file is refused; its own error names `FILE:LINE:COLUMN`.
    #[error("configuration refused, the running one stays: {}", one_line(.0))]
    File(#[source] ConfigFileError),
    /// The file is fine but the flags cannot apply to it.
    #[error("configuration refused, the running one stays: {}: {}", file.display(), one_line(source))]
    Overrides {
        /// The file.
        file: PathBuf,
        /// Why the flags do not fit it.
        #[source]
        source: ConfigError,
    },
    /// The file changes the addresses of a service that still has live generations.
    #[error(
        "configuration refused, the running one stays: service {service} has live generations, so its addresses cannot change (retire them first, or use a new service name)"
    )]
    AddressesInUse {
        /// The service.
        service: String,
    },
    /// Applying it failed inside the daemon; the table was rebuilt from its last
    /// consistent state (logged).
    #[error(
        "the reload failed inside handoffd (see its log); the table was rebuilt from its last consistent state"
    )]
    Internal,
}

impl ReloadError {
    /// The protocol kind of this refusal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ReloadError::NoConfig => ErrorKind::NoConfig,
            ReloadError::File(_)
            | ReloadError::Overrides { .. }
            | ReloadError::AddressesInUse { .. } => ErrorKind::ConfigRefused,
            ReloadError::Internal => ErrorKind::Internal,
        }
    }
}

impl ConfigSource {
    /// The source of a daemon started with `file` (`--config`) and the flags.
    pub fn new(file: Option<PathBuf>, overrides: Overrides) -> Self {
        Self {
            file,
            overrides,
            reloading: Mutex::new(()),
        }
    }

    /// The services to run: the file's, if any, with the flags applied.
    pub fn load(&self) -> Result<Vec<ServiceConfig>, ReloadError> {
        let file = match &self.file {
            Some(path) => Some(config_file::load(path).map_err(ReloadError::File)?),
            None => None,
        };
        self.overrides
            .apply(file)
            .map_err(|source| ReloadError::Overrides {
                file: self.file.clone().unwrap_or_default(),
                source,
            })
    }
}

/// Reads the configuration file again and applies it: the one path of SIGHUP and of
/// `handoffctl reload`. The file is read and checked before the daemon is locked; a
/// refused file changes nothing. Blocking (it takes the daemon's lock): call it off the
/// async runtime's threads. The outcome is logged either way.
pub fn reload(daemon: &Mutex<Daemon>, source: &ConfigSource) -> Result<Reloaded, ReloadError> {
    let Some(path) = &source.file else {
        tracing::warn!("reload ignored: handoffd runs without --config");
        return Err(ReloadError::NoConfig);
    };
    // Not the daemon's lock: reading the file holds up no drain.
    let _one_at_a_time = source.reloading.lock().unwrap_or_else(|p| p.into_inner());
    let services = source.load().inspect_err(|e| tracing::error!("{e}"))?;
    let names = services.iter().map(|s| s.name.clone()).collect();
    tracing::info!(file = %path.display(), "reloading the configuration");
    Daemon::lock(daemon)
        .reload(services)
        .inspect_err(|e| tracing::error!("{e}"))?;
    Ok(Reloaded {
        file: path.display().to_string(),
        services: names,
    })
}

/// Completes status plans from socket dumps: the answer to a status request.
pub fn finish_status(
    plans: Vec<StatusPlan>,
    kernel: Option<handoff_common::proto::KernelStatus>,
) -> Response {
    let mut status = Status {
        kernel,
        ..Status::default()
    };
    for plan in plans {
        match plan.finish() {
            Ok(s) => status.services.push(s),
            Err(e) => return error(ErrorKind::Internal, &one_line(&e)),
        }
    }
    Response::Status(status)
}

fn self_names(services: &[Service]) -> String {
    services
        .iter()
        .map(Service::name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A refusal as the protocol carries it: the error and its causes on one line.
pub fn error(kind: ErrorKind, e: &dyn std::fmt::Display) -> Response {
    Response::Error(ErrorReply {
        kind,
        message: e.to_string(),
    })
}
