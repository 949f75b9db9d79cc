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

use crate::discover::group::GroupKey;
use crate::discover::members::{Member, MemberError};
use crate::discover::{self, DiscoverError, FdRef};
use crate::sys;

/// Why a pid cannot be promoted. Every variant is one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum CandidateError {
    /// The pid names no live process.
    #[error(transparent)]
    Member(#[from] MemberError),
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
    /// The confused-deputy shape: the promoted process holds no listener itself, and a
    /// descendant of another uid does (a pid file written by that uid could name any
    /// process above its own).
    #[error(
        "pid {pid} (uid {uid}) holds no listener itself; pid {holder} of uid {holder_uid} does, and that uid is neither pid {pid}'s nor the service's user: promote the process that holds the listeners, or name that uid in the service's `user` setting (--user) if it is the service's"
    )]
    ForeignHolder {
        /// The promoted pid.
        pid: i32,
        /// Its effective uid.
        uid: u32,
        /// The descendant holding a listener.
        holder: i32,
        /// That descendant's (first untrusted) uid.
        holder_uid: u32,
    },
}

impl CandidateError {
    /// The protocol kind of this refusal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CandidateError::Member(MemberError::NoSuchProcess { .. }) => ErrorKind::NoSuchProcess,
            CandidateError::NoListener { .. } => ErrorKind::NoListener,
            CandidateError::OutsideAddresses { .. }
            | CandidateError::OtherGroup { .. }
            | CandidateError::MissingGroup { .. }
            | CandidateError::TooMany { .. } => ErrorKind::WrongGroup,
            CandidateError::NotReuseport { .. } => ErrorKind::NotReuseport,
            CandidateError::Raced { .. } | CandidateError::GetFd { .. } => ErrorKind::Kernel,
            CandidateError::Member(MemberError::Excluded {
                why: crate::discover::members::Excluded::OtherNetns,
                ..
            }) => ErrorKind::WrongGroup,
            CandidateError::Member(MemberError::Excluded { .. }) => ErrorKind::Excluded,
            // No listener it may be promoted for.
            CandidateError::ForeignHolder { .. } => ErrorKind::NoListener,
            CandidateError::Member(MemberError::Pidfd { .. } | MemberError::FdLimit { .. })
            | CandidateError::Discover(_) => ErrorKind::Internal,
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
    /// The uids whose processes in its tree are members (and may be signalled): the
    /// service's `user`, and the leader's own when it holds a listener (or a descendant
    /// of its uid does). Descendants holding one of its listeners are members too.
    pub trusted: Vec<u32>,
}

/// What a candidate is checked against.
#[derive(Debug)]
pub struct Target<'a> {
    /// The service's addresses, all on one port.
    pub listen: &'a [SocketAddr],
    /// The group each address is steered in, once known (after the first promote).
    pub groups: Vec<Option<GroupKey>>,
    /// The service's configured `user`, if any.
    pub user: Option<u32>,
}

/// Finds `pid`'s listeners in the target's groups and duplicates them.
pub fn take(
    pid: i32,
    target: &Target<'_>,
    procs: &mut impl discover::Processes,
) -> Result<Candidate, CandidateError> {
    // Member::open refuses pid 1, handoffd and its ancestors, kernel threads, and other
    // pid and network namespaces.
    take_leader(Member::open(pid)?, target, procs)
}

/// As [`take`], for a leader already opened (from a pidfd a client passed).
pub fn take_leader(
    leader: Member,
    target: &Target<'_>,
    procs: &mut impl discover::Processes,
) -> Result<Candidate, CandidateError> {
    let pid = leader.pid;
    let port = target.listen.first().map_or(0, |a| a.port());
    let tree = procs.tree(pid)?;
    let (found, holding) = discover::held_listeners(port, &tree, pid, None, procs)?;
    let held: Vec<_> = found
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
    let by_group = sort_into_groups(held, target)?;
    // Every holder opened (pinned) before anything is taken from it.
    let mut pidfds = open_holders(&by_group, pid, target)?;
    let leader_holds = holding.contains(&pid);
    let trusted = trusted_uids(&leader, leader_holds, pidfds.values(), target.user)?;
    let listeners = duplicate_all(by_group, &leader, &pidfds, target)?;
    // The owners of listeners are members already; the other descendants are members if
    // their uids are trusted. Every one must be tracked: running out of descriptors
    // refuses the promote rather than leaving members untracked.
    let mut descendants = Vec::with_capacity(tree.len().saturating_sub(1));
    for p in &tree[1..] {
        if let Some(m) = pidfds.remove(p) {
            descendants.push(m);
            continue;
        }
        let holds = leader_holds && holding.contains(p);
        if let Some(m) = descendant(*p, &leader, holds, &trusted)? {
            descendants.push(m);
        }
    }
    Ok(Candidate {
        leader,
        descendants,
        listeners,
        trusted,
    })
}

/// A listener found in the candidate's tree: its group, cookie and holder.
type Held = (GroupKey, u64, discover::FdRef);

/// Sorts the listeners into the service's groups, refusing any outside them.
fn sort_into_groups(
    held: Vec<(crate::discover::diag::DiagSocket, discover::FdRef)>,
    target: &Target<'_>,
) -> Result<Vec<Vec<Held>>, CandidateError> {
    let mut by_group: Vec<Vec<Held>> = target.listen.iter().map(|_| Vec::new()).collect();
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
    Ok(by_group)
}

/// Opens every holder but the leader (`pid`).
fn open_holders(
    by_group: &[Vec<Held>],
    pid: i32,
    target: &Target<'_>,
) -> Result<HashMap<i32, Member>, CandidateError> {
    let mut pidfds: HashMap<i32, Member> = HashMap::new();
    for (_, _, at) in by_group.iter().flatten() {
        if at.pid == pid || pidfds.contains_key(&at.pid) {
            continue;
        }
        let owner = Member::open(at.pid).map_err(|e| match e {
            MemberError::NoSuchProcess { .. } => CandidateError::Raced {
                pid: at.pid,
                addr: target.listen[0],
            },
            e => CandidateError::Member(e),
        })?;
        pidfds.insert(at.pid, owner);
    }
    Ok(pidfds)
}

/// Duplicates every listener from its holder, group by group.
fn duplicate_all(
    by_group: Vec<Vec<Held>>,
    leader: &Member,
    pidfds: &HashMap<i32, Member>,
    target: &Target<'_>,
) -> Result<Vec<Vec<TakenListener>>, CandidateError> {
    let pid = leader.pid;
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
                leader
            } else {
                pidfds
                    .get(&at.pid)
                    .ok_or(CandidateError::Raced { pid: at.pid, addr })?
            };
            let fd = duplicate(owner, at, cookie, addr)?;
            taken.push(TakenListener { key, cookie, fd });
        }
        listeners.push(taken);
    }
    Ok(listeners)
}

/// Descendant `p` of `leader`, if it is a member: it holds a service listener
/// (`holds`), or its uids are trusted.
fn descendant(
    p: i32,
    leader: &Member,
    holds: bool,
    trusted: &[u32],
) -> Result<Option<Member>, CandidateError> {
    match Member::open(p) {
        // The snapshot's pid may have been reused before the pidfd pinned it.
        Ok(m) if !crate::discover::members::member_descends_from(&m, leader, TREE_DEPTH) => {
            tracing::info!(
                pid = m.pid,
                "a pid of the snapshot no longer descends from the leader: not a member"
            );
            Ok(None)
        }
        // Holding a service listener ties it to the service, whatever its uid.
        Ok(m) if holds || m.uids.within(trusted) => Ok(Some(m)),
        Ok(m) => {
            tracing::info!(pid = m.pid, uids = ?m.uids, ?trusted, "a descendant of another uid holding no listener is not a member (never signalled)");
            Ok(None)
        }
        Err(e @ MemberError::FdLimit { .. }) => Err(e.into()),
        Err(MemberError::Excluded { pid, why }) => {
            tracing::info!(pid, %why, "a descendant is not a member");
            Ok(None)
        }
        // Exited meanwhile.
        Err(_) => Ok(None),
    }
}

/// How many parent steps a member may be below its leader.
const TREE_DEPTH: usize = 64;

/// The uids a generation trusts (see [`Candidate::trusted`]), or the confused-deputy
/// refusal: a leader holding no listener whose holders have uids that are neither its
/// own nor the configured one. The daemon's restart computes `trusted` with this same
/// function, so a restarted daemon trusts no more uids than promote did.
pub(crate) fn trusted_uids<'a>(
    leader: &Member,
    leader_holds: bool,
    holders: impl Iterator<Item = &'a Member>,
    user: Option<u32>,
) -> Result<Vec<u32>, CandidateError> {
    let mine = leader.uids.effective;
    let mut trusted: Vec<u32> = user.into_iter().collect();
    if leader_holds {
        // nginx, gunicorn: the promoted process holds the listeners; its workers (of any
        // uid) are members because they hold them too.
        trusted.push(mine);
        return Ok(trusted);
    }
    let with_mine = [trusted.as_slice(), &[mine]].concat();
    let mut mine_holds = false;
    for h in holders {
        if !h.uids.within(&with_mine) {
            let holder_uid = [h.uids.real, h.uids.effective, h.uids.saved]
                .into_iter()
                .find(|u| !with_mine.contains(u))
                .unwrap_or(h.uids.effective);
            return Err(CandidateError::ForeignHolder {
                pid: leader.pid,
                uid: mine,
                holder: h.pid,
                holder_uid,
            });
        }
        mine_holds |= h.uids.within(&[mine]);
    }
    // Listeners only in descendants of the configured uid: the leader's own uid earns
    // nothing (an unrelated child of its uid is no member).
    if mine_holds {
        trusted.push(mine);
    }
    Ok(trusted)
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
            Some(libc::EMFILE) | Some(libc::ENFILE) => {
                CandidateError::Member(MemberError::FdLimit {
                    pid: at.pid,
                    source,
                })
            }
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
