//! Turning a pid into a promotable generation: its process tree, its listeners in the
//! service's groups, each checked and duplicated into the daemon.
//!
//! Everything here only reads; a refusal leaves no trace.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use handoff_common::maps::GEN_SLOTS;
use handoff_common::proto::ErrorKind;
use nix::sys::socket::{getsockopt, sockopt};

use crate::discover::{self, DiscoverError, FdRef};
use crate::group::GroupKey;
use crate::members::{Member, MemberError};
use crate::sys;

/// Why a pid cannot be promoted. Every variant is one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum CandidateError {
    /// The pid names no live process.
    #[error(transparent)]
    Member(#[from] MemberError),
    /// The process lives in another network namespace.
    #[error("pid {pid} is in another network namespace: handoffd steers only listeners of its own")]
    OtherNetns {
        /// The pid.
        pid: i32,
    },
    /// The process tree holds no listener on the service port.
    #[error("pid {pid} (and its {descendants} descendants) holds no TCP listener on port {port}")]
    NoListener {
        /// The pid.
        pid: i32,
        /// How many descendants were searched.
        descendants: usize,
        /// The service port.
        port: u16,
    },
    /// A listener on the service port outside the service's addresses.
    #[error(
        "pid {pid} listens on {addr}, outside the service's addresses ({listen}): that listener would take connections handoff cannot steer"
    )]
    OutsideAddresses {
        /// The holder.
        pid: i32,
        /// The listener's address.
        addr: SocketAddr,
        /// The service's addresses.
        listen: String,
    },
    /// A listener on a service address, but in another kernel group than the service's.
    #[error(
        "listener {found} of pid {pid} is not in the service's group {expected}: the kernel keeps the two groups apart, so it cannot be steered"
    )]
    OtherGroup {
        /// The holder.
        pid: i32,
        /// Its group.
        found: GroupKey,
        /// The group the service steers.
        expected: GroupKey,
    },
    /// No listener on one of the service's addresses.
    #[error("pid {pid} has no listener on {addr}: every address of the service needs one")]
    MissingGroup {
        /// The pid.
        pid: i32,
        /// The address without a listener.
        addr: SocketAddr,
    },
    /// More listeners in one group than a generation's block holds.
    #[error("pid {pid} has {count} listeners on {addr}; a generation may have at most {GEN_SLOTS}")]
    TooMany {
        /// The pid.
        pid: i32,
        /// The address.
        addr: SocketAddr,
        /// How many it has.
        count: usize,
    },
    /// A listener without SO_REUSEPORT.
    #[error(
        "listener {addr} of pid {pid} (fd {fd}) has no SO_REUSEPORT: only reuseport groups can be steered"
    )]
    NotReuseport {
        /// The holder.
        pid: i32,
        /// Its fd there.
        fd: i32,
        /// Its address.
        addr: SocketAddr,
    },
    /// The listener changed between the dump and the duplication; promote again.
    #[error("listener {addr} of pid {pid} changed while it was being taken: try again")]
    Raced {
        /// The holder.
        pid: i32,
        /// Its address.
        addr: SocketAddr,
    },
    /// pidfd_getfd failed (no ptrace access, e.g. Yama ptrace_scope=3).
    #[error("cannot duplicate fd {fd} of pid {pid} (pidfd_getfd needs ptrace access)")]
    GetFd {
        /// The holder.
        pid: i32,
        /// The fd.
        fd: i32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// /proc or sock_diag failed.
    #[error(transparent)]
    Discover(#[from] DiscoverError),
}

impl CandidateError {
    /// The protocol kind of this refusal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CandidateError::Member(MemberError::NoSuchProcess { .. }) => ErrorKind::NoSuchProcess,
            CandidateError::NoListener { .. } => ErrorKind::NoListener,
            CandidateError::OtherNetns { .. }
            | CandidateError::OutsideAddresses { .. }
            | CandidateError::OtherGroup { .. }
            | CandidateError::MissingGroup { .. }
            | CandidateError::TooMany { .. } => ErrorKind::WrongGroup,
            CandidateError::NotReuseport { .. } => ErrorKind::NotReuseport,
            CandidateError::Raced { .. } | CandidateError::GetFd { .. } => ErrorKind::Kernel,
            CandidateError::Member(MemberError::Pidfd { .. }) | CandidateError::Discover(_) => {
                ErrorKind::Internal
            }
        }
    }
}

/// A listener of the candidate, duplicated into the daemon.
#[derive(Debug)]
pub struct TakenListener {
    /// Its group.
    pub key: GroupKey,
    /// Its cookie.
    pub cookie: u64,
    /// The duplicate; closed as soon as it is in the map (a kept duplicate would keep a
    /// listener its owner closed alive).
    pub fd: OwnedFd,
}

/// A process tree ready to be promoted.
#[derive(Debug)]
pub struct Candidate {
    /// The promoted process.
    pub leader: Member,
    /// Its descendants at the time of the promote.
    pub descendants: Vec<Member>,
    /// Its listeners, per service address (same order as the service's `listen`).
    pub listeners: Vec<Vec<TakenListener>>,
}

/// What a candidate is checked against.
#[derive(Debug)]
pub struct Target<'a> {
    /// The service's addresses, all on one port.
    pub listen: &'a [SocketAddr],
    /// The group each address is steered in, once known (after the first promote).
    pub groups: Vec<Option<GroupKey>>,
}

/// Finds `pid`'s listeners in the target's groups and duplicates them.
pub fn take(
    pid: i32,
    target: &Target<'_>,
    procs: &mut impl discover::Processes,
) -> Result<Candidate, CandidateError> {
    let leader = Member::open(pid)?;
    if discover::netns(pid)? != discover::netns(std::process::id() as i32)? {
        return Err(CandidateError::OtherNetns { pid });
    }
    let port = target.listen.first().map_or(0, |a| a.port());
    let tree = procs.tree(pid)?;
    let held: Vec<_> = discover::listeners(port, &tree, procs)?
        .into_iter()
        .filter_map(|l| l.held_by.map(|at| (l.diag, at)))
        .collect();
    if held.is_empty() {
        return Err(CandidateError::NoListener {
            pid,
            descendants: tree.len() - 1,
            port,
        });
    }

    // Sort the listeners into the service's groups, refusing any outside them.
    let mut by_group: Vec<Vec<_>> = target.listen.iter().map(|_| Vec::new()).collect();
    for (diag, at) in held {
        let key = GroupKey::of(&diag);
        let Some(i) = target.listen.iter().position(|a| *a == diag.local) else {
            return Err(CandidateError::OutsideAddresses {
                pid: at.pid,
                addr: diag.local,
                listen: listen_string(target.listen),
            });
        };
        let expected = target.groups[i].or_else(|| by_group[i].first().map(|(k, _, _)| *k));
        if let Some(expected) = expected.filter(|e| *e != key) {
            return Err(CandidateError::OtherGroup {
                pid: at.pid,
                found: key,
                expected,
            });
        }
        by_group[i].push((key, diag.cookie, at));
    }

    let mut pidfds: HashMap<i32, Member> = HashMap::new();
    let mut listeners = Vec::with_capacity(by_group.len());
    for (i, group) in by_group.into_iter().enumerate() {
        let addr = target.listen[i];
        if group.is_empty() {
            return Err(CandidateError::MissingGroup { pid, addr });
        }
        if group.len() > GEN_SLOTS as usize {
            return Err(CandidateError::TooMany {
                pid,
                addr,
                count: group.len(),
            });
        }
        let mut taken = Vec::with_capacity(group.len());
        for (key, cookie, at) in group {
            let owner = if at.pid == pid {
                &leader
            } else {
                match pidfds.entry(at.pid) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(
                        Member::open(at.pid)
                            .map_err(|_| CandidateError::Raced { pid: at.pid, addr })?,
                    ),
                }
            };
            let fd = duplicate(owner, at, cookie, addr)?;
            taken.push(TakenListener { key, cookie, fd });
        }
        listeners.push(taken);
    }

    // The owners of listeners are open already; the other descendants are opened now.
    let descendants = tree[1..]
        .iter()
        .filter_map(|p| pidfds.remove(p).or_else(|| Member::open(*p).ok()))
        .collect();
    Ok(Candidate {
        leader,
        descendants,
        listeners,
    })
}

/// Duplicates the listener `at` (with `cookie`, on `addr`) of `owner` into the daemon,
/// checking that it is still that socket and that it has SO_REUSEPORT.
pub fn duplicate(
    owner: &Member,
    at: FdRef,
    cookie: u64,
    addr: SocketAddr,
) -> Result<OwnedFd, CandidateError> {
    let fd =
        sys::pidfd_getfd(owner.pidfd(), at.fd).map_err(|source| match source.raw_os_error() {
            Some(libc::EBADF) | Some(libc::ESRCH) => CandidateError::Raced { pid: at.pid, addr },
            _ => CandidateError::GetFd {
                pid: at.pid,
                fd: at.fd,
                source,
            },
        })?;
    // The fd number may have been reused since /proc was read: check the cookie.
    if sys::socket_cookie(fd.as_fd()).ok() != Some(cookie) {
        return Err(CandidateError::Raced { pid: at.pid, addr });
    }
    if !getsockopt(&fd, sockopt::ReusePort).unwrap_or(false) {
        return Err(CandidateError::NotReuseport {
            pid: at.pid,
            fd: at.fd,
            addr,
        });
    }
    Ok(fd)
}

/// The service's addresses as one comma-separated string.
pub fn listen_string(listen: &[SocketAddr]) -> String {
    listen
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
