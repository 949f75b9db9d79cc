//! The daemon's answer to each control request.

use super::*;

impl Daemon {
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
            // The control socket runs a promote's check without the lock (see
            // `promote::promote`); here, the check runs under it.
            Request::Promote {
                pid,
                service,
                options,
            } => {
                let started = Instant::now();
                let mut step =
                    self.promote_step(Who::Pid(pid), service.as_deref(), &options, started);
                loop {
                    match step {
                        Step::Check { service, job } => {
                            step = self.checked(&service, job.run(), started);
                        }
                        Step::Answer(response, _) => break response,
                    }
                }
            }
            Request::Rollback { service } => self.rollback_step(service.as_deref()),
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

    /// The answer to a promote or rollback of service `i` begun at `started`, counted
    /// in the metrics.
    pub(super) fn change(
        &mut self,
        i: usize,
        result: Result<Promoted, PromoteError>,
        started: Instant,
    ) -> Response {
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

    /// The daemon's metrics, shared with the caller (see [`crate::runtime::scrape`]).
    pub fn metrics(&self) -> crate::runtime::metrics::Metrics {
        self.ctx.metrics.clone()
    }

    /// The index of the service a request names (or the only one).
    pub(super) fn service(&self, name: Option<&str>) -> Result<usize, Response> {
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
