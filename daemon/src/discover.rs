//! Finding a process tree's listeners: /proc for processes and their socket fds,
//! sock_diag for what those sockets are.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::os::unix::fs::MetadataExt;

use netlink_packet_sock_diag::inet::StateFlags;

use crate::diag::{self, DiagError, DiagSocket};

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

/// `pid` and every live descendant, `pid` first.
pub fn process_tree(pid: i32) -> Result<Vec<i32>, DiscoverError> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    let dir = fs::read_dir("/proc").map_err(|source| DiscoverError::Proc {
        path: "/proc".into(),
        source,
    })?;
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // A process may exit between readdir and read: skip it.
        if let Some(stat) = read_stat(child) {
            children.entry(stat.ppid).or_default().push(child);
        }
    }
    let mut out = vec![pid];
    let mut queue = VecDeque::from([pid]);
    let mut seen = HashSet::from([pid]);
    while let Some(p) = queue.pop_front() {
        for &c in children.get(&p).into_iter().flatten() {
            if seen.insert(c) {
                out.push(c);
                queue.push_back(c);
            }
        }
    }
    Ok(out)
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
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
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
pub fn listeners(port: u16, pids: &[i32]) -> Result<Vec<Listener>, DiscoverError> {
    let mut fds = HashMap::new();
    for &pid in pids {
        socket_fds(pid, &mut fds)?;
    }
    Ok(diag::dump_tcp(StateFlags::LISTEN, port)?
        .into_iter()
        .map(|diag| Listener {
            held_by: fds.get(&u64::from(diag.inode)).copied(),
            diag,
        })
        .collect())
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

/// A process holding the socket with `inode`, found by scanning every process's fds
/// (costly: for reports only).
pub fn owner_of(inode: u64) -> Option<i32> {
    if inode == 0 {
        return None;
    }
    let needle = format!("socket:[{inode}]");
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        fds.flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == needle.as_str()))
            .then_some(pid)
    })
}
