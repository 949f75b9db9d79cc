//! The rule of who may be a member, checked on what /proc says of a process once its
//! pidfd is open.

use std::fs;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, OnceLock};

use super::{Excluded, MemberError, Uids, is_fd_limit};
use crate::discover;

/// `PF_KTHREAD` in /proc/PID/stat's flags: a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

/// How far up the parent chain handoffd's ancestors are looked for.
const MAX_ANCESTORS: usize = 64;

/// What /proc says of a process, read after its pidfd was opened.
#[derive(Debug, Clone, Copy)]
pub(super) struct Facts {
    pub(super) ppid: i32,
    pub(super) start_time: u64,
    pub(super) zombie: bool,
    pub(super) kthread: bool,
    pub(super) uids: Uids,
}

pub(super) fn read_facts(pid: i32) -> Result<Facts, MemberError> {
    let map = |source: std::io::Error| {
        if is_fd_limit(&source) {
            MemberError::FdLimit { pid, source }
        } else if matches!(
            source.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData
        ) || source.raw_os_error() == Some(libc::ESRCH)
        {
            MemberError::NoSuchProcess { pid }
        } else {
            MemberError::Pidfd { pid, source }
        }
    };
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).map_err(map)?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).map_err(map)?;
    let gone = || MemberError::NoSuchProcess { pid };
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .ok_or_else(gone)?
        .1
        .split_whitespace()
        .collect();
    let field = |i: usize| fields.get(i).copied().ok_or_else(gone);
    let flags: u64 = field(6)?.parse().map_err(|_| gone())?;
    let uid_line = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .ok_or_else(gone)?;
    let uids: Vec<u32> = uid_line
        .split_whitespace()
        .filter_map(|u| u.parse().ok())
        .collect();
    let [real, effective, saved, ..] = uids[..] else {
        return Err(gone());
    };
    Ok(Facts {
        zombie: field(0)?.starts_with('Z'),
        ppid: field(1)?.parse().map_err(|_| gone())?,
        start_time: field(19)?.parse().map_err(|_| gone())?,
        kthread: flags & PF_KTHREAD != 0,
        uids: Uids {
            real,
            effective,
            saved,
        },
    })
}

/// handoffd's pid and its network namespace, read once (they do not change while it
/// runs).
struct SelfView {
    me: i32,
    netns: Option<u64>,
}

fn self_view() -> &'static SelfView {
    static VIEW: OnceLock<SelfView> = OnceLock::new();
    VIEW.get_or_init(|| {
        let me = std::process::id() as i32;
        SelfView {
            me,
            netns: discover::netns(me).ok(),
        }
    })
}

/// handoffd's ancestors as (pid, start time), nearest first. Read again whenever the
/// parent changed (reparented to a subreaper, say), so a new ancestor is refused too and
/// a recycled pid of a former one is not.
fn ancestors() -> Vec<(i32, u64)> {
    static CACHE: Mutex<Vec<(i32, u64)>> = Mutex::new(Vec::new());
    let parent = nix::unistd::getppid().as_raw();
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if cache.first().map(|a| a.0) != Some(parent) {
        cache.clear();
        let mut at = parent;
        while at > 0 && cache.len() < MAX_ANCESTORS {
            let Some(stat) = discover::read_stat(at) else {
                break;
            };
            cache.push((at, stat.start_time));
            at = stat.ppid;
        }
    }
    cache.clone()
}

/// The pid the pidfd names in this daemon's /proc (`Pid:` of its fdinfo; -1 or missing
/// when the process is not visible in this pid namespace).
///
/// Reading the fdinfo opens a file: out of descriptors, that error is returned (never
/// taken for a process outside our pid namespace); any other failure gives `None`.
pub(super) fn pidfd_pid(pidfd: &OwnedFd) -> Result<Option<i32>, std::io::Error> {
    use std::os::fd::AsRawFd;
    let info = match fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())) {
        Ok(info) => info,
        Err(e) if is_fd_limit(&e) => return Err(e),
        Err(_) => return Ok(None),
    };
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|p| p.trim().parse().ok()))
}

/// Checks the rule against the process `pid` (pinned by `pidfd`) with `facts`.
pub(super) fn check_rule(pid: i32, pidfd: &OwnedFd, facts: &Facts) -> Result<(), MemberError> {
    let view = self_view();
    let why = if pid == 1 {
        Some(Excluded::Init)
    } else if pid == view.me {
        Some(Excluded::Daemon)
    } else if ancestors().contains(&(pid, facts.start_time)) {
        Some(Excluded::Ancestor)
    } else if facts.kthread || pid == 2 || facts.ppid == 2 {
        Some(Excluded::KernelThread)
    } else if match pidfd_pid(pidfd) {
        Ok(seen) => seen != Some(pid),
        Err(source) => return Err(MemberError::FdLimit { pid, source }),
    } {
        Some(Excluded::OtherPidNamespace)
    } else {
        match (view.netns, discover::netns(pid)) {
            (Some(ours), Ok(theirs)) if ours != theirs => Some(Excluded::OtherNetns),
            (_, Err(discover::DiscoverError::Proc { source, .. })) if is_fd_limit(&source) => {
                return Err(MemberError::FdLimit { pid, source });
            }
            // Unreadable: it cannot be shown to share ours.
            (None, _) | (_, Err(_)) => Some(Excluded::OtherNetns),
            _ => None,
        }
    };
    match why {
        Some(why) => Err(MemberError::Excluded { pid, why }),
        None => Ok(()),
    }
}
