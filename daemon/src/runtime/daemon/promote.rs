//! Promote and rollback requests: each step under the daemon's lock, a candidate's
//! health check without it.
//!
//! A check waits on the candidate, a process of the service's user: holding the lock
//! meanwhile would let a slow candidate hold up every drain and every other request. So
//! the lock is taken to start the operation, released while the check runs (the
//! operation stays pending in the machine: another promote is refused as busy, drains
//! and counts go on), and taken again to finish it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use handoff_common::proto::{ErrorKind, PromoteOptions, Response};

use super::Daemon;
use super::requests::error;
use crate::discover::members::Member;
use crate::logging::one_line;
use crate::runtime::metrics::PromotionResult;
use crate::runtime::service::{CheckError, CheckJob, Operated};

/// How often `promote --wait` looks again for a candidate that does not listen yet.
const WAIT_PAUSE: Duration = Duration::from_millis(100);

/// The process a promote names.
#[derive(Debug, Clone)]
pub enum Who {
    /// A pid in the daemon's pid namespace.
    Pid(i32),
    /// A process opened from the pidfd a client passed.
    Member(Member),
}

/// Where a request stands after a step under the lock.
#[derive(Debug)]
pub enum Step {
    /// Answered; with `--wait`, worth asking again (the candidate does not listen yet)
    /// for as long as the check timeout given.
    Answer(Response, Option<Duration>),
    /// A check of service `service`'s candidate to run.
    Check {
        /// The service's name (a reload may move or remove it meanwhile).
        service: String,
        /// The check.
        job: CheckJob,
    },
}

/// Answers a promote: the whole request, the check run without the daemon's lock.
pub fn promote(
    daemon: &Mutex<Daemon>,
    who: Who,
    service: Option<&str>,
    options: &PromoteOptions,
) -> Response {
    if let Err(e) = options.validate() {
        return error(ErrorKind::BadRequest, &e);
    }
    // With `--wait`, attempts repeat until one deadline, counted from the request: each
    // attempt's check gets what is left of it.
    let started = Instant::now();
    let mut options = options.clone();
    let mut deadline = None;
    loop {
        let mut step = Daemon::lock(daemon).promote_step(who.clone(), service, &options, started);
        let (response, retry_for) = loop {
            match step {
                Step::Check { service, job } => {
                    let result = job.run();
                    step = Daemon::lock(daemon).checked(&service, result, started);
                }
                Step::Answer(response, retry_for) => break (response, retry_for),
            }
        };
        let Some(timeout) = retry_for else {
            return response;
        };
        let until = *deadline.get_or_insert(started + timeout);
        if Instant::now() + WAIT_PAUSE >= until {
            Daemon::lock(daemon).waited_in_vain(service);
            return response;
        }
        std::thread::sleep(WAIT_PAUSE);
        let left = until.saturating_duration_since(Instant::now());
        options.check_timeout_ms = Some(u64::try_from(left.as_millis()).unwrap_or(1).max(1));
    }
}

impl Daemon {
    /// The first step of a promote, under the lock.
    pub fn promote_step(
        &mut self,
        who: Who,
        service: Option<&str>,
        options: &PromoteOptions,
        started: Instant,
    ) -> Step {
        let i = match self.service(service) {
            Ok(i) => i,
            Err(e) => return Step::Answer(e, None),
        };
        let operated = self.guarded("request", |d| {
            let (s, ctx) = (&mut d.services[i], &mut d.ctx);
            match who {
                Who::Pid(pid) => s.promote(pid, options, ctx),
                Who::Member(leader) => s.promote_member(leader, options, ctx),
            }
        });
        // `--wait` and the candidate does not listen yet: looked at again, and counted in
        // the metrics only if it never does (see `waited_in_vain`).
        if let Some(Operated::Done(Err(e))) = &operated
            && options.wait
            && e.kind() == ErrorKind::NoListener
        {
            let timeout = options.check_timeout_ms.map_or(
                self.services[i].release().check_timeout,
                Duration::from_millis,
            );
            self.persist();
            return Step::Answer(error(e.kind(), &one_line(e)), Some(timeout));
        }
        self.step(i, operated, started)
    }

    /// `promote --wait` gave up on a candidate that never listened: counted once.
    fn waited_in_vain(&mut self, service: Option<&str>) {
        if let Ok(i) = self.service(service) {
            let name = self.services[i].name();
            self.ctx
                .metrics
                .promotion(name, PromotionResult::Refused, None);
        }
    }

    /// A rollback, under the lock (it never checks).
    pub fn rollback_step(&mut self, service: Option<&str>) -> Response {
        let started = Instant::now();
        let i = match self.service(service) {
            Ok(i) => i,
            Err(e) => return e,
        };
        let operated = self.guarded("request", |d| d.services[i].rollback(&mut d.ctx));
        if matches!(operated, Some(Operated::Done(Ok(_)))) {
            self.ctx.metrics.rollback(
                self.services[i].name(),
                crate::lifecycle::RollbackReason::Operator,
            );
        }
        match self.step(i, operated, started) {
            Step::Answer(response, _) => response,
            Step::Check { .. } => error(ErrorKind::Internal, &"a rollback asked for a check"),
        }
    }

    /// The check of service `service`'s candidate came back: the promote goes on.
    pub fn checked(
        &mut self,
        service: &str,
        result: Result<(), CheckError>,
        started: Instant,
    ) -> Step {
        let Some(i) = self.services.iter().position(|s| s.name() == service) else {
            // Removed by a reload meanwhile, and its pending promote with it.
            let e =
                format!("service {service} was removed from the configuration during the check");
            return Step::Answer(error(ErrorKind::UnknownService, &e), None);
        };
        let operated = self.guarded("request", |d| d.services[i].checked(result, &mut d.ctx));
        self.step(i, operated, started)
    }

    /// What an operation came to, as a step of the request; its state is written.
    fn step(&mut self, i: usize, operated: Option<Operated>, started: Instant) -> Step {
        let step = match operated {
            Some(Operated::Check(job)) => Step::Check {
                service: self.services[i].name().to_owned(),
                job,
            },
            Some(Operated::Done(result)) => Step::Answer(self.change(i, result, started), None),
            None => Step::Answer(
                error(
                    ErrorKind::Internal,
                    &"the request failed on an internal error (logged); the daemon took up its last consistent state and serves on: check `handoffctl status` and retry",
                ),
                None,
            ),
        };
        self.persist();
        step
    }
}
