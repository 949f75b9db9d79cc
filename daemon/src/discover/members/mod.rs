//! Processes of a generation, held as pidfds so that a recycled pid is never mistaken
//! for a member, and the rule of who may be one at all.
//!
//! Never a member, whatever asks: pid 1, handoffd itself or any of its ancestors, kernel
//! threads, processes this daemon's /proc cannot name (another pid namespace), and
//! processes in another network namespace. Every fact is read after the pidfd is open
//! and checked against the start time, so it belongs to the pinned process.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::discover;
use crate::sys;

mod pidfd;
mod rule;
#[cfg(test)]
mod signal_tests;

pub use pidfd::PidfdError;
use pidfd::{PIDFD_THREAD, parse_pidfd_info, read_fdinfo};
use rule::{Facts, check_rule, pidfd_pid, read_facts};

/// A process's real, effective and saved uids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uids {
    /// Real uid.
    pub real: u32,
    /// Effective uid.
    pub effective: u32,
    /// Saved set-user-id.
    pub saved: u32,
}

impl Uids {
    /// Whether every one of the three is in `trusted`.
    pub fn within(&self, trusted: &[u32]) -> bool {
        [self.real, self.effective, self.saved]
            .iter()
            .all(|u| trusted.contains(u))
    }
}

/// One process of a generation. A clone shares its pidfd.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its pid.
    pub pid: i32,
    /// Its start time (clock ticks after boot), which with the pid names it for good.
    pub start_time: u64,
    /// Its uids when it became a member.
    pub uids: Uids,
    /// Its parent pid when it was opened.
    pub ppid: i32,
    /// A pidfd on it: readable once it has exited. Shared with the supervisor, which
    /// waits on this same descriptor (one fd per member, not two).
    pidfd: Arc<OwnedFd>,
    /// Whether handoffd may signal it (and adopt its new children): false for a leader a
    /// restarted daemon could not tie to its generation's sockets.
    verified: bool,
}

/// Why a process may never be a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Excluded {
    /// pid 1.
    Init,
    /// handoffd itself.
    Daemon,
    /// An ancestor of handoffd (the shell or service manager that started it).
    Ancestor,
    /// A kernel thread.
    KernelThread,
    /// Its pidfd names no pid in this daemon's pid namespace.
    OtherPidNamespace,
    /// It lives in another network namespace.
    OtherNetns,
}

impl std::fmt::Display for Excluded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Excluded::Init => "it is init (pid 1)",
            Excluded::Daemon => "it is handoffd itself",
            Excluded::Ancestor => "it is an ancestor of handoffd (the process that started it)",
            Excluded::KernelThread => "it is a kernel thread",
            Excluded::OtherPidNamespace => "it is not visible in handoffd's pid namespace",
            Excluded::OtherNetns => {
                "it is in another network namespace: handoffd steers only listeners of its own"
            }
        })
    }
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
    /// The rule excludes it.
    #[error("pid {pid} can never be part of a generation: {why}")]
    Excluded {
        /// The pid.
        pid: i32,
        /// Which part of the rule.
        why: Excluded,
    },
    /// The daemon is out of file descriptors: the process may well be alive.
    #[error(
        "out of file descriptors while opening pid {pid}: raise handoffd's LimitNOFILE (RLIMIT_NOFILE)"
    )]
    FdLimit {
        /// The pid.
        pid: i32,
        /// The OS error (EMFILE or ENFILE).
        #[source]
        source: std::io::Error,
    },
    /// pidfd_open or /proc failed otherwise.
    #[error("pidfd_open({pid}) or reading its /proc entry failed")]
    Pidfd {
        /// The pid.
        pid: i32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

pub use crate::discover::is_fd_limit;

impl Member {
    /// Opens a pidfd on `pid`, then reads its start time, parent and uids (in that order:
    /// the pidfd pins the process, so what is read after it belongs to the same process),
    /// and checks the rule of who may be a member.
    pub fn open(pid: i32) -> Result<Self, MemberError> {
        if pid <= 0 {
            return Err(MemberError::NoSuchProcess { pid });
        }
        let pidfd = sys::pidfd_open(pid).map_err(|source| match source.raw_os_error() {
            Some(libc::ESRCH) | Some(libc::EINVAL) => MemberError::NoSuchProcess { pid },
            Some(libc::EMFILE) | Some(libc::ENFILE) => MemberError::FdLimit { pid, source },
            _ => MemberError::Pidfd { pid, source },
        })?;
        let facts = read_facts(pid)?;
        check_rule(pid, &pidfd, &facts)?;
        Self::live_verified(pid, pidfd, &facts).ok_or(MemberError::NoSuchProcess { pid })
    }

    /// The member `pid`, whose facts were read after `pidfd` was opened and passed the
    /// rule; none if it has exited or is a zombie.
    fn live_verified(pid: i32, pidfd: OwnedFd, facts: &Facts) -> Option<Self> {
        let member = Self {
            pid,
            start_time: facts.start_time,
            uids: facts.uids,
            ppid: facts.ppid,
            pidfd: Arc::new(pidfd),
            verified: true,
        };
        (!facts.zombie && member.alive()).then_some(member)
    }

    /// Takes a pidfd a client passed as a member: the process it names, with its pid
    /// in handoffd's pid namespace (`Pid:` of the descriptor's fdinfo, read through
    /// handoffd's own /proc), checked like [`Member::open`]. The descriptor itself is kept
    /// as the member's pidfd: it pins the process the client meant.
    pub fn from_pidfd(pidfd: OwnedFd) -> Result<Self, PidfdError> {
        use std::os::fd::AsRawFd;
        let fd = pidfd.as_raw_fd();
        // A pidfd is an anonymous inode of that name (also with pidfs, Linux >= 6.9).
        let link = fs::read_link(format!("/proc/self/fd/{fd}")).map_err(PidfdError::Proc)?;
        let what = link.to_string_lossy();
        if what != "anon_inode:[pidfd]" {
            return Err(PidfdError::NotPidfd {
                what: what.chars().take(64).collect(),
            });
        }
        let info = read_fdinfo(fd).map_err(PidfdError::Proc)?;
        let info = parse_pidfd_info(&info).ok_or_else(|| PidfdError::NotPidfd {
            what: "a descriptor without a pid in its fdinfo".into(),
        })?;
        if info.flags & PIDFD_THREAD != 0 {
            return Err(PidfdError::Thread);
        }
        let pid = match info.pid {
            p if p > 0 => p,
            0 => return Err(PidfdError::OtherPidNamespace),
            _ => return Err(PidfdError::Exited),
        };
        let facts = read_facts(pid)?;
        // The facts were read from /proc/PID: they are the pidfd's process only if it
        // still has that pid now (a live process keeps its pid, so it was not recycled).
        if pidfd_pid(&pidfd).map_err(PidfdError::Proc)? != Some(pid) {
            return Err(PidfdError::Exited);
        }
        check_rule(pid, &pidfd, &facts)?;
        Self::live_verified(pid, pidfd, &facts).ok_or(PidfdError::Exited)
    }

    /// Whether it is still running (not exited, not a zombie).
    pub fn alive(&self) -> bool {
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        // A pidfd polls readable once the process has exited.
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => true,
            Ok(_) => false,
            Err(_) => {
                matches!(discover::read_stat(self.pid), Some(s) if s.start_time == self.start_time && s.state != 'Z')
            }
        }
    }

    /// Whether it may be signalled now: alive, still the process that was opened (same
    /// start time, read while the pidfd pins it), still outside what the rule excludes,
    /// and its uids all in `trusted`, or unchanged since it became a member, or `trusted`
    /// holds root (a root generation may signal a worker that dropped its privileges
    /// since). A member that has since gained another uid (it ran a set-user-id program)
    /// is left alone.
    pub fn may_signal(&self, trusted: &[u32]) -> Result<(), String> {
        if !self.verified {
            return Err("a restarted daemon could not tie it to its generation's sockets".into());
        }
        if !self.alive() {
            return Err("it has exited".into());
        }
        let facts = read_facts(self.pid).map_err(|e| e.to_string())?;
        if facts.start_time != self.start_time || facts.zombie {
            return Err("it has exited (its pid names another process now)".into());
        }
        check_rule(self.pid, &self.pidfd, &facts).map_err(|e| e.to_string())?;
        if facts.uids.within(trusted) || facts.uids == self.uids || trusted.contains(&0) {
            Ok(())
        } else {
            Err(format!(
                "its uids changed to {:?} since it became a member, none of the generation's ({trusted:?})",
                facts.uids
            ))
        }
    }

    /// Marks it as never to be signalled nor adopted from (see [`Member::verified`]).
    pub fn unverified(self) -> Self {
        Self {
            verified: false,
            ..self
        }
    }

    /// Whether handoffd may signal it and adopt its new children.
    pub fn verified(&self) -> bool {
        self.verified
    }

    /// Sends `signal` to exactly this process (never to a later one with its pid).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        sys::pidfd_send_signal(self.pidfd.as_fd(), signal)
    }

    /// The pidfd, for fd duplication and signals.
    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The same pidfd, shared (for the supervisor, which waits for the exit on it).
    pub fn shared_pidfd(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.pidfd)
    }
}

/// Whether `pid`'s parent chain reaches `ancestor` (with `start_time`) within `depth`
/// steps, each step read while `pid` is pinned by an open pidfd of the caller.
///
/// The intermediate steps are not pinned: a parent that exited may have had its pid
/// reused. A process never starts before its parent, so a step whose start time is later
/// than its child's is a recycled pid, and the chain is refused.
pub fn descends_from(pid: i32, ancestor: &Member, depth: usize) -> bool {
    let Some(stat) = discover::read_stat(pid) else {
        return false;
    };
    chain_reaches(stat.ppid, stat.start_time, ancestor, depth)
}

/// Whether the opened member `m` (its parent and start time read after its pidfd pinned
/// it) is a descendant of `ancestor`: the check a process-table snapshot needs, since a
/// pid in it may have been reused before its pidfd was opened.
pub fn member_descends_from(m: &Member, ancestor: &Member, depth: usize) -> bool {
    chain_reaches(m.ppid, m.start_time, ancestor, depth)
}

/// Walks up from `parent` (the parent of a process started at `child_start`).
fn chain_reaches(mut parent: i32, mut child_start: u64, ancestor: &Member, depth: usize) -> bool {
    for _ in 0..depth {
        if parent == ancestor.pid {
            // The ancestor's pidfd is open and it is alive: its pid is not reused.
            return ancestor.alive()
                && child_start >= ancestor.start_time
                && discover::read_stat(ancestor.pid)
                    .is_some_and(|s| s.start_time == ancestor.start_time);
        }
        if parent <= 1 {
            return false;
        }
        let Some(stat) = discover::read_stat(parent) else {
            return false;
        };
        if stat.start_time > child_start {
            return false;
        }
        child_start = stat.start_time;
        parent = stat.ppid;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_refuses_init_self_ancestors_and_kernel_threads() {
        let me = std::process::id() as i32;
        let parent = nix::unistd::getppid().as_raw();
        for (pid, why) in [
            (1, Excluded::Init),
            (me, Excluded::Daemon),
            (parent, Excluded::Ancestor),
            (2, Excluded::KernelThread),
        ] {
            match Member::open(pid) {
                Err(MemberError::Excluded { why: got, .. }) => assert_eq!(got, why, "pid {pid}"),
                other => panic!("pid {pid}: {other:?}"),
            }
        }
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let m = Member::open(child.id() as i32);
        let _ = child.kill();
        let _ = child.wait();
        let m = m.expect("a child of ours is a possible member");
        assert_eq!(m.ppid, me);
    }

    #[test]
    fn a_passed_pidfd_names_its_process_or_is_refused() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        let pidfd = sys::pidfd_open(pid).expect("pidfd_open of a child");
        let m = Member::from_pidfd(pidfd).expect("a child's pidfd names a possible member");
        assert_eq!(m.pid, pid);
        assert!(m.alive());
        let file: OwnedFd = fs::File::open("/dev/null").expect("open").into();
        match Member::from_pidfd(file) {
            Err(PidfdError::NotPidfd { what }) => assert_eq!(what, "/dev/null"),
            other => panic!("{other:?}"),
        }
        let own = sys::pidfd_open(std::process::id() as i32).expect("own pidfd");
        assert!(matches!(
            Member::from_pidfd(own),
            Err(PidfdError::Member(MemberError::Excluded {
                why: Excluded::Daemon,
                ..
            }))
        ));
        let pidfd = sys::pidfd_open(pid).expect("pidfd_open of a child");
        let _ = child.kill();
        let _ = child.wait();
        let e = Member::from_pidfd(pidfd).expect_err("exited");
        assert!(matches!(e, PidfdError::Exited), "{e:?}");
        assert_eq!(e.kind(), handoff_common::proto::ErrorKind::NoSuchProcess);
    }

    #[test]
    fn uids_within_needs_all_three() {
        let u = Uids {
            real: 33,
            effective: 0,
            saved: 0,
        };
        assert!(!u.within(&[33]));
        assert!(u.within(&[33, 0]));
    }
}
