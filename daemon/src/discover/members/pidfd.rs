//! A pidfd a client passed with a request: what its fdinfo says, and why it is refused.

use std::fs;

use super::{Excluded, MemberError};

/// `PIDFD_THREAD` (`O_EXCL`) in a pidfd's file flags: the pidfd names one thread.
pub(super) const PIDFD_THREAD: u32 = libc::O_EXCL as u32;

/// The most of a descriptor's fdinfo that is read: a pidfd's is about 100 bytes.
pub(super) const MAX_FDINFO: u64 = 4096;

/// Why a pidfd a client passed names no process that can be promoted.
#[derive(Debug, thiserror::Error)]
pub enum PidfdError {
    /// The descriptor is not a pidfd.
    #[error(
        "the descriptor passed with the request is not a pidfd (it is {what}); pass pidfd_open(PID), or no descriptor and the pid"
    )]
    NotPidfd {
        /// What `/proc/self/fd` says it is.
        what: String,
    },
    /// A pidfd of one thread (`PIDFD_THREAD`), not of a process.
    #[error(
        "the pidfd passed with the request names a thread (PIDFD_THREAD); pass a pidfd of the process"
    )]
    Thread,
    /// The process has exited.
    #[error("the process of the pidfd passed with the request has exited")]
    Exited,
    /// The process has no pid in handoffd's pid namespace.
    #[error(
        "the process of the pidfd passed with the request has no pid in handoffd's pid namespace; run handoffd in the host's pid namespace"
    )]
    OtherPidNamespace,
    /// The process is one that may not be a member.
    #[error(transparent)]
    Member(#[from] MemberError),
    /// The descriptor's entries in handoffd's /proc could not be read.
    #[error("reading /proc/self/fd of the descriptor passed with the request failed")]
    Proc(#[source] std::io::Error),
}

impl PidfdError {
    /// The protocol kind of this refusal.
    pub fn kind(&self) -> handoff_common::proto::ErrorKind {
        use handoff_common::proto::ErrorKind;
        match self {
            PidfdError::NotPidfd { .. } | PidfdError::Thread => ErrorKind::BadRequest,
            PidfdError::Exited => ErrorKind::NoSuchProcess,
            // The fact `Excluded::OtherPidNamespace` names, found from the pidfd.
            PidfdError::OtherPidNamespace => ErrorKind::Excluded,
            PidfdError::Member(MemberError::NoSuchProcess { .. }) => ErrorKind::NoSuchProcess,
            // As a promote by pid gives them (`CandidateError::kind`).
            PidfdError::Member(MemberError::Excluded {
                why: Excluded::OtherNetns,
                ..
            }) => ErrorKind::WrongGroup,
            PidfdError::Member(MemberError::Excluded { .. }) => ErrorKind::Excluded,
            PidfdError::Member(_) | PidfdError::Proc(_) => ErrorKind::Internal,
        }
    }
}

/// What the fdinfo of a descriptor says, if it is a pidfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PidfdInfo {
    /// Its file flags (octal `flags:`).
    pub(super) flags: u32,
    /// `Pid:`: the pid in the pid namespace of handoffd's /proc, 0 when it has none
    /// there, -1 once the process has exited.
    pub(super) pid: i32,
}

/// Parses a pidfd's fdinfo; `None` unless both lines are there and well formed.
pub(super) fn parse_pidfd_info(info: &str) -> Option<PidfdInfo> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    Some(PidfdInfo {
        flags: u32::from_str_radix(field("flags:")?, 8).ok()?,
        pid: field("Pid:")?.parse().ok()?,
    })
}

/// Reads the fdinfo of `fd` (capped at [`MAX_FDINFO`] bytes).
pub(super) fn read_fdinfo(fd: std::os::fd::RawFd) -> std::io::Result<String> {
    use std::io::Read;
    let mut info = String::new();
    fs::File::open(format!("/proc/self/fdinfo/{fd}"))?
        .take(MAX_FDINFO)
        .read_to_string(&mut info)?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_info_parses_flags_and_pid() {
        let info =
            "pos:\t0\nflags:\t02000202\nmnt_id:\t4\nino:\t1\nPid:\t12330\nNSpid:\t12330\t5\n";
        assert_eq!(
            parse_pidfd_info(info),
            Some(PidfdInfo {
                flags: 0o2000202,
                pid: 12330
            })
        );
        let exited = "flags:\t02000002\nPid:\t-1\n";
        assert_eq!(parse_pidfd_info(exited).map(|i| i.pid), Some(-1));
        for bad in [
            "",
            "pos:\t0\nflags:\t02\n",
            "flags:\t9\nPid:\t1\n",
            "flags:\t02\nPid:\t99999999999\n",
            "flags:\t02\nPid:\tone\n",
        ] {
            assert_eq!(parse_pidfd_info(bad), None, "{bad:?}");
        }
    }
}
