//! Why a promote or rollback was refused, and the protocol kind of each refusal.

use std::net::SocketAddr;

use handoff_common::maps::BLOCKS;
use handoff_common::proto::ErrorKind;

use super::check::CheckError;
use crate::discover::candidate::CandidateError;
use crate::discover::group::GroupKey;
use crate::kernel::loader::LoaderError;
use crate::kernel::probe::{ProbeError, ProbeResult};
use crate::lifecycle::Refusal;

/// Why a promote or rollback was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// The candidate does not qualify.
    #[error(transparent)]
    Candidate(#[from] CandidateError),
    /// The generation got its retire signal and is exiting.
    #[error(
        "generation {id} (pid {pid}) is retiring (its retire signal was sent): start a new process instead"
    )]
    Retiring {
        /// The generation.
        id: u64,
        /// Its pid.
        pid: i32,
    },
    /// It is the active generation already.
    #[error("pid {pid} is already the active generation ({id}) of service {service}")]
    AlreadyActive {
        /// The pid.
        pid: i32,
        /// The generation.
        id: u64,
        /// The service.
        service: String,
    },
    /// A listener is already a socket of another generation.
    #[error(
        "listener {addr} of pid {pid} already belongs to generation {id} (pid {owner}); a socket can be in one generation only (a server's own upgrade that hands its sockets to a child cannot be steered)"
    )]
    SharedSocket {
        /// The candidate.
        pid: i32,
        /// The listener.
        addr: SocketAddr,
        /// The generation holding it.
        id: u64,
        /// That generation's pid.
        owner: i32,
    },
    /// No generation to roll back to.
    #[error(
        "service {service} has no draining generation with live listeners to roll back to: promote a new process instead"
    )]
    NothingToRollBack {
        /// The service.
        service: String,
    },
    /// Every block of slots is taken by live generations.
    #[error("service {service} has {BLOCKS} generations with listeners; let some retire first")]
    NoFreeBlock {
        /// The service.
        service: String,
    },
    /// The kernel program could not be loaded or driven.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// A generation failed its health check; `candidate`: one no client was sent to yet.
    #[error("{error}: {}steering left as it was", if *candidate { "no client was sent to it, " } else { "" })]
    Check { error: CheckError, candidate: bool },
    /// The probe did not see the kernel steer to the new generation.
    #[error("{0}")]
    Probe(#[from] ProbeError),
    /// The lifecycle refused the operation itself (an operation under way, a weight out
    /// of range, a canary with nothing active).
    #[error("{0}")]
    Refused(Refusal),
    /// The probe saw another choice than the new generation.
    #[error(
        "the probe to {group} chose {chosen} instead of the new generation: steering left as it was; check that the new process still listens, then promote again"
    )]
    ProbeMismatch {
        /// The group probed.
        group: GroupKey,
        /// What the program chose.
        chosen: ProbeResult,
    },
}

impl PromoteError {
    /// The protocol kind of this refusal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PromoteError::Candidate(e) => e.kind(),
            PromoteError::AlreadyActive { .. } => ErrorKind::AlreadyActive,
            PromoteError::Retiring { .. } => ErrorKind::Retiring,
            PromoteError::SharedSocket { .. } => ErrorKind::SharedSocket,
            PromoteError::NothingToRollBack { .. } => ErrorKind::NothingToRollBack,
            PromoteError::NoFreeBlock { .. } => ErrorKind::TooManyGenerations,
            PromoteError::Refused(Refusal::BadWeight { .. } | Refusal::NoActive) => {
                ErrorKind::BadRequest
            }
            PromoteError::Refused(Refusal::Busy) => ErrorKind::Busy,
            PromoteError::Refused(_) => ErrorKind::Internal,
            PromoteError::Check { .. } => ErrorKind::CheckFailed,
            PromoteError::Loader(_)
            | PromoteError::Probe(_)
            | PromoteError::ProbeMismatch { .. } => ErrorKind::Kernel,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_have_their_kinds() {
        let retiring = PromoteError::Retiring { id: 3, pid: 42 };
        assert_eq!(retiring.kind(), ErrorKind::Retiring);
        let full = PromoteError::NoFreeBlock {
            service: "web".into(),
        };
        assert_eq!(full.kind(), ErrorKind::TooManyGenerations);
        let none = PromoteError::NothingToRollBack {
            service: "web".into(),
        };
        assert_eq!(none.kind(), ErrorKind::NothingToRollBack);
        assert_eq!(
            none.to_string(),
            "service web has no draining generation with live listeners to roll back to: promote a new process instead"
        );
    }

    #[test]
    fn a_probe_mismatch_names_the_choice() {
        let e = PromoteError::ProbeMismatch {
            group: GroupKey {
                addr: "127.0.0.1:8080".parse().expect("an address"),
                v6only: None,
                ifindex: 0,
                uid: 0,
            },
            chosen: ProbeResult::Slot(5),
        };
        assert_eq!(e.kind(), ErrorKind::Kernel);
        assert!(
            e.to_string()
                .contains(" chose slot 5 instead of the new generation")
        );
    }
}
