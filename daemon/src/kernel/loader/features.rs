//! The start-up check of the kernel: every program handoffd will run is loaded once
//! (the drain programs for real, to be attached later; a steering program to be
//! dropped), and the map types are tried one by one, so that a missing feature is named
//! ([`crate::kernel`] turns what failed into that name) before the daemon takes its
//! state directory.

use std::path::Path;

use aya::maps::MapType;
use aya::programs::{ProgramError, ProgramType};

use super::{DrainProgram, LoaderError};
use crate::kernel::{self, Failure, Feature, KernelError, ProgramKind};

/// A program the kernel would not load, as much as is known of why.
#[derive(Debug)]
pub struct Refusal {
    /// The program's name.
    pub program: &'static str,
    /// Its kind (what a verifier message means depends on it).
    pub kind: ProgramKind,
    /// The error number of `BPF_PROG_LOAD`, if it got that far.
    pub errno: Option<i32>,
    /// The verifier's log (may be empty).
    pub log: String,
    /// The kernel's BTF has no attach point for this iterator.
    pub no_iter_target: bool,
    /// The error in one line, without the log.
    pub what: String,
}

impl Refusal {
    /// Keeps what `error` says without its verifier log (which aya's `Display` embeds).
    pub(super) fn new(program: &'static str, kind: ProgramKind, error: ProgramError) -> Self {
        let (errno, log, no_iter_target, what) = match &error {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => (
                io_error.raw_os_error(),
                verifier_log.to_string(),
                false,
                format!("BPF_PROG_LOAD failed: {io_error}"),
            ),
            ProgramError::Btf(e) if kind == ProgramKind::Iterator => {
                (None, String::new(), true, e.to_string())
            }
            other => (None, String::new(), false, other.to_string()),
        };
        Self {
            program,
            kind,
            errno,
            log,
            no_iter_target,
            what,
        }
    }

    /// The feature whose absence explains it, if known.
    pub fn feature(&self) -> Option<Feature> {
        let failure = if self.no_iter_target {
            Failure::NoIterTarget
        } else {
            Failure::Load {
                errno: self.errno,
                log: &self.log,
            }
        };
        kernel::classify(self.kind, failure)
    }

    /// Not the kernel's fault: the daemon lacks the privilege to load programs.
    fn denied(&self) -> bool {
        self.log.trim().is_empty() && matches!(self.errno, Some(libc::EPERM | libc::EACCES))
    }
}

/// Why the check stopped the start.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The kernel lacks something (one line, naming it).
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Something else (no privilege, no cgroup2, ...).
    #[error(transparent)]
    Loader(#[from] LoaderError),
}

/// The drain programs, loaded and not attached, after the kernel was found to offer
/// everything handoffd needs; or why not. Every verifier log seen is logged once at
/// debug level. `cgroup`: the cgroup v2 root to attach at, if not the mounted one.
pub fn check(whole_host: bool, cgroup: Option<&Path>) -> Result<DrainProgram, CheckError> {
    let started = std::time::Instant::now();
    let mut missing = separately();
    // The steering program is loaded by the drain object's loader (one parse of the
    // kernel's BTF for both), or on its own if that loader was never made.
    let mut steer = None;
    let drain = DrainProgram::prepare_probing(whole_host, cgroup, Some(&mut steer));
    let steer = steer.unwrap_or_else(super::steer::probe);
    let mut refused = Vec::new();
    match steer {
        Ok(()) => {}
        Err(LoaderError::Refused(r)) => refused.extend(r),
        // The object itself did not load (its maps): named below if a map type is
        // missing, else it is the error.
        Err(e) if !missing.is_empty() => tracing::debug!(error = %e, "the steering program"),
        Err(e) => return Err(e.into()),
    }
    // The socket storage test costs the kernel a grace period (some 20 ms): made only
    // when the drain object could not be created, to name why.
    if matches!(drain, Err(LoaderError::Load { .. }))
        && !aya::sys::is_map_supported(MapType::SkStorage).unwrap_or(true)
    {
        missing.push(Feature::SkStorage);
    }
    let drain = match drain {
        Ok(p) => Some(p),
        Err(LoaderError::Refused(r)) => {
            refused.extend(r);
            None
        }
        // Without BTF, ring buffers or socket storage the object cannot even be created:
        // what its programs lack is not learnt, and need not be.
        Err(e) if !missing.is_empty() => {
            tracing::debug!(error = %e, "the drain accounting programs");
            None
        }
        Err(e) => return Err(e.into()),
    };
    tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "kernel check");
    let mut unexplained = None;
    for r in &refused {
        tracing::debug!(program = r.program, error = %r.what, "the kernel refused a program; the verifier's log:\n{}", r.log);
        if r.denied() {
            return Err(LoaderError::Denied {
                program: r.program,
                what: r.what.clone(),
            }
            .into());
        }
        match r.feature() {
            Some(f) => missing.push(f),
            None => unexplained = unexplained.or(Some(r.program)),
        }
    }
    missing.sort_unstable();
    missing.dedup();
    if !missing.is_empty() {
        return Err(KernelError::Lacks {
            release: kernel::release(),
            features: missing,
        }
        .into());
    }
    if let Some(program) = unexplained {
        return Err(KernelError::Refused {
            release: kernel::release(),
            program: program.to_string(),
        }
        .into());
    }
    // Everything loaded: `drain` is there (no refusal, nothing missing).
    drain.ok_or_else(|| LoaderError::MissingMap("the drain accounting object").into())
}

/// The features that can be tried on their own, cheaply, each by the test that shows
/// it: a file, a map of the type, a trivial program of the type (socket storage: see
/// [`check`]).
fn separately() -> Vec<Feature> {
    let mut missing = Vec::new();
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push(Feature::Btf);
    }
    // An error (e.g. no privilege) says nothing of the kernel: the loads below show it.
    let map = |t: MapType, what: &str| {
        aya::sys::is_map_supported(t).unwrap_or_else(|e| {
            tracing::debug!(error = %e, what, "probing a map type failed");
            true
        })
    };
    if !map(MapType::RingBuf, "ring buffer") {
        missing.push(Feature::RingBuf);
    }
    let sk_reuseport =
        aya::sys::is_program_supported(ProgramType::SkReuseport).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "probing the sk_reuseport program type failed");
            true
        });
    if !sk_reuseport || !map(MapType::ReuseportSockArray, "reuseport sockarray") {
        missing.push(Feature::SkReuseport);
    }
    missing
}
