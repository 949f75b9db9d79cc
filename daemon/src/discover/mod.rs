//! Finding a process tree's listeners: /proc for processes and their socket fds,
//! sock_diag for what those sockets are.

pub mod candidate;
pub mod diag;
pub mod group;
pub mod members;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::os::unix::fs::MetadataExt;

use netlink_packet_sock_diag::inet::StateFlags;

use diag::{DiagError, DiagSocket};

/// Whether `e` says the daemon ran out of descriptors (not that the process is gone).
pub fn is_fd_limit(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Errors of process and socket discovery.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// /proc could not be read.
    #[error("reading {path} failed")]
    Proc {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another user's process may not be inspected without privileges.
    #[error(
        "reading {path} is not permitted: handoffd needs root, or CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"
    )]
    Denied {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The sock_diag dump failed.
    #[error(transparent)]
    Diag(#[from] DiagError),
}

/// A process of a generation with one of its socket fds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdRef {
    /// The process holding the fd.
    pub pid: i32,
    /// The fd number in that process.
    pub fd: i32,
}

/// Where process trees and the fds of listeners come from. Pids are the host's: the
/// kernel's iterators and the bind watch report init-namespace pids, so handoffd runs in
/// the host's pid namespace (as pidfds of the services need anyway).
pub trait Processes {
    /// `pid` and every live descendant, `pid` first.
    fn tree(&mut self, pid: i32) -> Result<Vec<i32>, DiscoverError>;

    /// An fd of `pids` for each socket inode they hold; at least every TCP listener on
    /// `port` (other sockets may be included).
    fn listener_fds(
        &mut self,
        port: u16,
        pids: &[i32],
    ) -> Result<HashMap<u64, FdRef>, DiscoverError>;

    /// Every (socket inode, fd) of `pids`: at least every TCP listener on `port`, with
    /// each process that holds one (a listener shared by a master and its workers is
    /// listed once per holder).
    fn socket_holders(
        &mut self,
        port: u16,
        pids: &[i32],
    ) -> Result<Vec<(u64, FdRef)>, DiscoverError> {
        let mut out = Vec::new();
        for &pid in pids {
            for (inode, at) in self.listener_fds(port, &[pid])? {
                out.push((inode, at));
            }
        }
        Ok(out)
    }
}

/// Read from /proc: a process tree is a read of every /proc/PID/stat, a process's fds a
/// readlink of each.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcFs;

impl Processes for ProcFs {
    fn tree(&mut self, pid: i32) -> Result<Vec<i32>, DiscoverError> {
        process_tree(pid)
    }

    fn listener_fds(
        &mut self,
        _port: u16,
        pids: &[i32],
    ) -> Result<HashMap<u64, FdRef>, DiscoverError> {
        let mut fds = HashMap::new();
        for &pid in pids {
            socket_fds(pid, &mut fds)?;
        }
        Ok(fds)
    }
}

/// `pid` and every live descendant, `pid` first, from /proc.
pub fn process_tree(pid: i32) -> Result<Vec<i32>, DiscoverError> {
    let dir = fs::read_dir("/proc").map_err(|source| DiscoverError::Proc {
        path: "/proc".into(),
        source,
    })?;
    let mut parents = Vec::new();
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // A process may exit between readdir and read: skip it. Out of descriptors is an
        // error: a tree missing members must not pass for the whole one.
        match fs::read_to_string(format!("/proc/{child}/stat")) {
            Ok(text) => {
                if let Some(stat) = parse_stat(&text) {
                    parents.push((child, stat.ppid));
                }
            }
            Err(source) if fd_limit(&source) => {
                return Err(DiscoverError::Proc {
                    path: format!("/proc/{child}/stat"),
                    source,
                });
            }
            Err(_) => {}
        }
    }
    Ok(tree_of(pid, parents))
}

/// Whether `e` says the daemon ran out of file descriptors (EMFILE, ENFILE).
fn fd_limit(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// `root` and its descendants, `root` first, from (pid, parent pid) pairs.
pub fn tree_of(root: i32, parents: impl IntoIterator<Item = (i32, i32)>) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (pid, ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = vec![root];
    let mut queue = VecDeque::from([root]);
    let mut seen = HashSet::from([root]);
    while let Some(p) = queue.pop_front() {
        for &c in children.get(&p).into_iter().flatten() {
            if seen.insert(c) {
                out.push(c);
                queue.push_back(c);
            }
        }
    }
    out
}

/// The fields of /proc/PID/stat handoff uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Parent pid.
    pub ppid: i32,
    /// Start time in clock ticks after boot: with the pid, names a process for good.
    pub start_time: u64,
    /// The state letter (`Z` for a zombie).
    pub state: char,
}

/// Reads /proc/PID/stat; `None` if the process is gone.
pub fn read_stat(pid: i32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The fields handoff uses of a /proc/PID/stat line.
fn parse_stat(text: &str) -> Option<Stat> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The socket inodes among `pid`'s fds, each with one fd that refers to it. A process
/// that has exited meanwhile has none; one the daemon may not inspect is an error (a
/// missing capability must not read as "no listener").
pub fn socket_fds(pid: i32, out: &mut HashMap<u64, FdRef>) -> Result<(), DiscoverError> {
    let path = format!("/proc/{pid}/fd");
    let dir = match fs::read_dir(&path) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(DiscoverError::Denied { path, source: e });
        }
        // Out of descriptors is not "no socket".
        Err(source) if fd_limit(&source) => return Err(DiscoverError::Proc { path, source }),
        // Exited (or a zombie): nothing to count.
        Err(_) => return Ok(()),
    };
    for entry in dir.flatten() {
        let Ok(link) = fs::read_link(entry.path()) else {
            continue;
        };
        let Some(inode) = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|l| l.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(fd) = entry.file_name().to_str().and_then(|f| f.parse().ok()) else {
            continue;
        };
        out.entry(inode).or_insert(FdRef { pid, fd });
    }
    Ok(())
}

/// The inode of `pid`'s network namespace.
pub fn netns(pid: i32) -> Result<u64, DiscoverError> {
    let path = format!("/proc/{pid}/ns/net");
    fs::metadata(&path)
        .map(|m| m.ino())
        .map_err(|source| DiscoverError::Proc { path, source })
}

/// A LISTEN socket on the service port and, if a member holds it, where.
#[derive(Debug, Clone)]
pub struct Listener {
    /// What sock_diag says about it.
    pub diag: DiagSocket,
    /// A member fd referring to it, when a member holds it.
    pub held_by: Option<FdRef>,
}

/// TCP LISTEN sockets on `port`, each marked with the fd of `pids` that holds it, if any.
pub fn listeners(
    port: u16,
    pids: &[i32],
    procs: &mut impl Processes,
) -> Result<Vec<Listener>, DiscoverError> {
    new_listeners(port, pids, &HashSet::new(), procs)
}

/// TCP LISTEN sockets on `port` whose cookie is not in `known`, each marked with the fd
/// of `pids` that holds it, if any. `pids`' fds are read only when there is such a
/// listener: the common case (no new one yet) costs one small sock_diag dump.
pub fn new_listeners(
    port: u16,
    pids: &[i32],
    known: &HashSet<u64>,
    procs: &mut impl Processes,
) -> Result<Vec<Listener>, DiscoverError> {
    let new: Vec<DiagSocket> = diag::dump_tcp(StateFlags::LISTEN, port)?
        .into_iter()
        .filter(|d| !known.contains(&d.cookie))
        .collect();
    let fds = if new.is_empty() || pids.is_empty() {
        HashMap::new()
    } else {
        procs.listener_fds(port, pids)?
    };
    Ok(new
        .into_iter()
        .map(|diag| Listener {
            held_by: fds.get(&u64::from(diag.inode)).copied(),
            diag,
        })
        .collect())
}

/// TCP LISTEN sockets on `port` (only those with a cookie in `only`, if given), each
/// marked with the fd of `pids` that holds it (`prefer`'s own when it holds it), and the
/// set of `pids` holding at least one of them.
pub fn held_listeners(
    port: u16,
    pids: &[i32],
    prefer: i32,
    only: Option<&HashSet<u64>>,
    procs: &mut impl Processes,
) -> Result<(Vec<Listener>, HashSet<i32>), DiscoverError> {
    let dump: Vec<DiagSocket> = diag::dump_tcp(StateFlags::LISTEN, port)?
        .into_iter()
        .filter(|d| only.is_none_or(|o| o.contains(&d.cookie)))
        .collect();
    let inodes: HashSet<u64> = dump.iter().map(|d| u64::from(d.inode)).collect();
    let mut by_inode: HashMap<u64, FdRef> = HashMap::new();
    let mut holders = HashSet::new();
    for (inode, at) in procs.socket_holders(port, pids)? {
        if !inodes.contains(&inode) {
            continue;
        }
        holders.insert(at.pid);
        let slot = by_inode.entry(inode).or_insert(at);
        if at.pid == prefer {
            *slot = at;
        }
    }
    let listeners = dump
        .into_iter()
        .map(|diag| Listener {
            held_by: by_inode.get(&u64::from(diag.inode)).copied(),
            diag,
        })
        .collect();
    Ok((listeners, holders))
}

/// Established (and closing) connections on `port` held by `pids`, plus connections
/// queued on the listeners with the given cookies.
pub fn connections(
    port: u16,
    pids: &[i32],
    listener_cookies: &HashSet<u64>,
) -> Result<u64, DiscoverError> {
    let mut fds = HashMap::new();
    for &pid in pids {
        socket_fds(pid, &mut fds)?;
    }
    let states = StateFlags::all() - StateFlags::TIME_WAIT - StateFlags::CLOSE;
    let mut n = 0;
    for s in diag::dump_tcp(states, port)? {
        if s.state == diag::TCP_LISTEN {
            if listener_cookies.contains(&s.cookie) {
                n += u64::from(s.recv_queue);
            }
        } else if s.inode != 0 && fds.contains_key(&u64::from(s.inode)) {
            n += 1;
        }
    }
    Ok(n)
}

/// Which of `pids` hold a TCP connection (not a listener) whose local port is `port`:
/// a server's accepted connection. After a restart this ties a draining generation that
/// closed its listeners on the drain signal (nginx on SIGQUIT) to the service.
pub fn connection_holders(port: u16, pids: &[i32]) -> Result<HashSet<i32>, DiscoverError> {
    let states = StateFlags::all() - StateFlags::LISTEN - StateFlags::TIME_WAIT - StateFlags::CLOSE;
    let inodes: HashSet<u64> = diag::dump_tcp(states, port)?
        .into_iter()
        .filter(|s| s.inode != 0)
        .map(|s| u64::from(s.inode))
        .collect();
    let mut holders = HashSet::new();
    if inodes.is_empty() {
        return Ok(holders);
    }
    for &pid in pids {
        let mut fds = HashMap::new();
        match socket_fds(pid, &mut fds) {
            Ok(()) => {}
            // Out of descriptors is the daemon's failure, never "holds nothing".
            Err(e @ DiscoverError::Proc { .. }) if matches!(&e, DiscoverError::Proc { source, .. } if is_fd_limit(source)) =>
            {
                return Err(e);
            }
            // Exited or unreadable: it holds nothing it can be tied by.
            Err(_) => continue,
        }
        if fds.keys().any(|i| inodes.contains(i)) {
            holders.insert(pid);
        }
    }
    Ok(holders)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_is_root_first_then_breadth_first() {
        let parents = [(1, 0), (10, 1), (11, 10), (12, 10), (13, 11), (20, 1)];
        assert_eq!(tree_of(10, parents), vec![10, 11, 12, 13]);
        assert_eq!(tree_of(13, parents), vec![13]);
        // A pid not in the table is its own tree (it may have exited meanwhile).
        assert_eq!(tree_of(99, parents), vec![99]);
    }

    #[test]
    fn proc_tree_of_this_process_holds_its_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let me = std::process::id() as i32;
        let tree = ProcFs.tree(me).expect("read /proc");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(tree[0], me);
        assert!(tree.contains(&(child.id() as i32)), "{tree:?}");
    }
}
