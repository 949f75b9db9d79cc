//! Processes of a generation, held as pidfds so that a recycled pid is never mistaken
//! for a member.

use std::os::fd::{AsFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::discover::{self, Stat};
use crate::sys;

/// One process of a generation.
#[derive(Debug)]
pub struct Member {
    /// Its pid.
    pub pid: i32,
    /// Its start time (clock ticks after boot), which with the pid names it for good.
    pub start_time: u64,
    /// A pidfd on it: readable once it has exited.
    pidfd: OwnedFd,
}

/// Why a process could not be taken as a member.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// No process has this pid, or it has exited.
    #[error("no process with pid {pid}")]
    NoSuchProcess {
        /// The pid asked for.
        pid: i32,
    },
    /// pidfd_open failed otherwise.
    #[error("pidfd_open({pid}) failed")]
    Pidfd {
        /// The pid.
        pid: i32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Member {
    /// Opens a pidfd on `pid`, then reads its start time (in that order: the pidfd pins the
    /// process, so the start time read after it belongs to the same process).
    pub fn open(pid: i32) -> Result<Self, MemberError> {
        if pid <= 0 {
            return Err(MemberError::NoSuchProcess { pid });
        }
        let pidfd = sys::pidfd_open(pid).map_err(|source| match source.raw_os_error() {
            Some(libc::ESRCH) | Some(libc::EINVAL) => MemberError::NoSuchProcess { pid },
            _ => MemberError::Pidfd { pid, source },
        })?;
        let stat = discover::read_stat(pid).ok_or(MemberError::NoSuchProcess { pid })?;
        let member = Self {
            pid,
            start_time: stat.start_time,
            pidfd,
        };
        if stat.state == 'Z' || !member.alive() {
            return Err(MemberError::NoSuchProcess { pid });
        }
        Ok(member)
    }

    /// Whether it is still running (not exited, not a zombie).
    pub fn alive(&self) -> bool {
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        // A pidfd polls readable once the process has exited.
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => true,
            Ok(_) => false,
            Err(_) => {
                matches!(discover::read_stat(self.pid), Some(Stat { start_time, state, .. }) if start_time == self.start_time && state != 'Z')
            }
        }
    }

    /// Sends `signal` to exactly this process (never to a later one with its pid).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        sys::pidfd_send_signal(self.pidfd.as_fd(), signal)
    }

    /// The pidfd, for fd duplication and signals.
    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.pidfd.as_fd()
    }
}
