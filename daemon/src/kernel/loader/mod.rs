//! The only module that touches aya: the steering program (one instance per reuseport
//! group) and the drain accounting programs (one set per daemon): the tag pass, the
//! release countdown, the process and listener iterators, and the bind watch with its two
//! event rings (`events`).

mod drain;
mod events;
pub mod features;
mod guard;
pub mod migrate;
mod steer;

use aya::maps::{Map, MapError};
use aya::programs::ProgramError;
use aya::{Ebpf, EbpfError};

pub use drain::{CGROUP_ROOT_INODE, DrainProgram, cgroup2_root};
pub use events::{DrainEvent, EventRings, EventStats};
pub use guard::GuardProgram;
pub use steer::{GroupProgram, ProbeMap};

/// Detaches whatever sk_reuseport program the group of `socket` has.
pub fn detach(socket: &impl std::os::fd::AsFd) -> Result<(), LoaderError> {
    aya::programs::SkReuseport::detach(socket).map_err(|source| LoaderError::Program {
        name: handoff_common::maps::PROGRAM,
        source,
    })
}

/// Errors of loading and driving the steering program.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The object could not be loaded (no BPF, or a kernel without the features).
    #[error("loading {what} failed (needs Linux >= 5.14 with BPF and BTF, and root)")]
    Load {
        /// Which object.
        what: &'static str,
        /// Why.
        #[source]
        source: EbpfError,
    },
    /// A program was refused by the verifier or could not be attached.
    #[error("program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        #[source]
        source: ProgramError,
    },
    /// The kernel refused to load programs (see [`features::check`] for the line that
    /// names what it lacks); the verifier's logs are kept, not shown.
    #[error("the kernel refused program(s) {}", names(.0))]
    Refused(Vec<features::Refusal>),
    /// Loading a program was not permitted.
    #[error(
        "loading program {program} was not permitted ({what}): handoffd needs root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN)"
    )]
    Denied {
        /// The program.
        program: &'static str,
        /// The error.
        what: String,
    },
    /// A map of the object is missing or has another shape than common/src/maps/ says.
    #[error("map {name}: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// What went wrong.
        #[source]
        source: MapError,
    },
    /// No cgroup v2 hierarchy is mounted (the drain programs attach at its root).
    #[error(
        "no cgroup2 file system is mounted: drain accounting needs one (mount -t cgroup2 none /sys/fs/cgroup/unified)"
    )]
    NoCgroup2,
    /// A file could not be used.
    #[error("{op} {path} failed")]
    Io {
        /// What was done.
        op: &'static str,
        /// On what.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A map could not be pinned.
    #[error("pinning {path} failed")]
    Pin {
        /// Where.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: aya::pin::PinError,
    },
    /// The tag pass could not be started.
    #[error("starting the tag pass failed")]
    Iter(#[source] aya::programs::links::LinkError),
    /// A map the object must have is absent or of the wrong type.
    #[error("the object has no {0} map of the expected type")]
    MissingMap(&'static str),
    /// A syscall on a map failed.
    #[error("{op} on map {name} failed")]
    Sys {
        /// What was done.
        op: &'static str,
        /// The map.
        name: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn names(refused: &[features::Refusal]) -> String {
    refused
        .iter()
        .map(|r| format!("{} ({})", r.program, r.what))
        .collect::<Vec<_>>()
        .join(", ")
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, LoaderError> {
    ebpf.take_map(name).ok_or(LoaderError::MissingMap(name))
}
