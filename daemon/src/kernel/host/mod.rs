//! The start-up check that handoffd runs on the host, not in a container's view of it.
//!
//! The kernel programs see the host: pids in the initial pid namespace, every socket
//! from the root of the cgroup v2 hierarchy, pins on the host's bpffs. handoffd refuses to
//! start, with one line saying what to run instead, unless
//! - it is in the initial pid namespace (a promote would otherwise name pids the BPF side
//!   does not know, and fail with "holds no TCP listener");
//! - the cgroup v2 directory the drain programs attach to is the real root (the root's
//!   inode is 1; a cgroup namespace shows its own root, another cgroup, at its mount);
//! - `/sys/fs/bpf` is the host's bpffs (a bpffs mounted in a container is a file system
//!   of its own: pins there would be gone with the container).
//!
//! [`Facts::gather`] reads everything; [`check`] is a pure function of the facts.
//!
//! Why the bpffs comparison holds: every `mount -t bpf` makes a new superblock, so a new
//! device number, while a bind mount (a hostPath volume, `-v /sys/fs/bpf:...`) shares the
//! host's. `/proc/1/root` is the host's root because the pid check has passed first:
//! `/proc/self` resolves only in a proc of our own pid namespace or an ancestor, and the
//! initial namespace has none, so `/proc` is the host's and pid 1 is the host's init.
//! Reading `/proc/1/root` needs ptrace read access to pid 1 (CAP_SYS_PTRACE and no LSM
//! saying no, e.g. a container runtime's AppArmor profile): when it is refused the
//! comparison cannot be made, and the start goes on with a note, since a refusal then
//! would refuse hosts that are fine.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, FsType, statfs};

/// The inode of the initial pid namespace (`PROC_PID_INIT_INO`), the same on every Linux.
pub const INITIAL_PID_NS_INODE: u64 = 0xEFFF_FFFC;
/// Where handoffd's pins live.
const BPFFS: &str = crate::persist::pins::BPFFS;
/// The host's view of [`BPFFS`], through the root of the host's pid 1.
const HOST_BPFFS: &str = "/proc/1/root/sys/fs/bpf";

/// What [`check`] needs to know, gathered in one place.
#[derive(Debug, Clone)]
pub struct Facts {
    /// handoffd's pid namespace, or why it could not be read.
    pub pid_ns: Result<PidNs, String>,
    /// The cgroup v2 directory the programs attach to (see [`cgroup_dir`]).
    pub cgroup: PathBuf,
    /// What that directory is, or why it could not be inspected.
    pub cgroup_node: Result<Node, String>,
    /// What `/sys/fs/bpf` is here, or why it could not be inspected.
    pub bpffs: Result<Node, String>,
    /// What `/sys/fs/bpf` is for the host's pid 1.
    pub host_bpffs: HostView,
    /// handoffd's mount namespace and the host's pid 1's (inodes), when both are readable.
    pub mnt_ns: Option<(u64, u64)>,
}

/// A pid namespace, as /proc shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidNs {
    /// The inode of `/proc/self/ns/pid`.
    pub inode: u64,
    /// How many pids `NSpid` in /proc/self/status lists (one per nesting level).
    pub levels: usize,
}

/// A file, as far as the checks care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    /// Its file system's magic number.
    pub fs: FsType,
    /// The device of that file system.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
}

/// What the host's pid 1 sees at `/sys/fs/bpf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostView {
    /// The file there.
    Seen(Node),
    /// Nothing: the host has no `/sys/fs/bpf`.
    Missing,
    /// `/proc/1/root` could not be read (the error).
    Unreadable(String),
}

/// Why handoffd refuses to start here. Each is one line ending with what to run instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    /// `/proc/self/ns/pid` or /proc/self/status could not be read.
    #[error(
        "cannot read handoffd's pid namespace ({0}): mount the host's /proc on /proc and run handoffd in the host's pid namespace"
    )]
    PidNsUnreadable(String),
    /// handoffd is in a pid namespace of its own.
    #[error(
        "handoffd runs in a pid namespace of its own (pid:[{inode}], {levels} levels), not the host's: the kernel programs see host pids, so a promote would find no listener; run handoffd in the host's pid namespace (on the host or under systemd, `docker run --pid=host`, `hostPID: true` in a Kubernetes pod; not under `unshare --pid` or systemd-nspawn)"
    )]
    PidNs {
        /// The inode of its pid namespace.
        inode: u64,
        /// The nesting levels `NSpid` shows.
        levels: usize,
    },
    /// The cgroup v2 directory could not be inspected.
    #[error("cannot inspect the cgroup v2 root {path}: {error}")]
    CgroupUnreadable {
        /// The directory.
        path: PathBuf,
        /// The error.
        error: String,
    },
    /// The directory is not on a cgroup v2 file system.
    #[error(
        "{path} is not a cgroup v2 file system: pass the host's cgroup v2 root (its mount point, e.g. /sys/fs/cgroup) with --cgroup-root"
    )]
    NotCgroup2 {
        /// The directory.
        path: PathBuf,
    },
    /// The directory is a cgroup below the root (or a cgroup namespace's root).
    #[error(
        "{path} is not the root of the cgroup v2 hierarchy (its inode is {ino}, the root's is 1: a cgroup namespace or a cgroup below the root), and the drain programs attached there would miss every socket outside it; run handoffd in the host's cgroup namespace (`docker run --cgroupns=host`), or mount the host's cgroup v2 root (a hostPath volume of /sys/fs/cgroup in a Kubernetes pod) and pass it with --cgroup-root"
    )]
    CgroupNotRoot {
        /// The directory.
        path: PathBuf,
        /// Its inode.
        ino: u64,
    },
    /// /sys/fs/bpf could not be inspected.
    #[error(
        "cannot inspect {BPFFS} ({0}): mount the host's bpffs there (a hostPath volume of /sys/fs/bpf in a Kubernetes pod)"
    )]
    BpffsUnreadable(String),
    /// /sys/fs/bpf is a bpffs, but not the host's.
    #[error(
        "{BPFFS} is a bpf file system of its own (device {dev}), not the host's ({host}): pins there would be lost with this mount namespace; mount the host's /sys/fs/bpf there instead (a hostPath volume in a Kubernetes pod, `-v /sys/fs/bpf:/sys/fs/bpf` for a container)"
    )]
    NotHostBpffs {
        /// Its device.
        dev: Device,
        /// What the host has there.
        host: HostBpffs,
    },
    /// /sys/fs/bpf is no bpffs, and one mounted by handoffd would not be the host's.
    #[error(
        "{BPFFS} is not a bpf file system, and handoffd is not in the host's mount namespace (a bpffs it mounted would not be the host's): mount a bpffs on the host (`mount -t bpf bpf /sys/fs/bpf`) and the host's /sys/fs/bpf into handoffd's mount namespace"
    )]
    NoBpffs,
}

/// What passed without being verified, to be logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    /// Why the bpffs could not be compared with the host's, if it could not.
    pub bpffs_unverified: Option<Unverified>,
}

/// Why `/sys/fs/bpf` passed without being compared with the host's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unverified {
    /// No bpffs is there yet, and pid 1's mount namespace is unreadable.
    NoBpffsYet,
    /// The host's `/sys/fs/bpf` could not be read (the error).
    HostUnreadable(String),
}

impl std::fmt::Display for Unverified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unverified::NoBpffsYet => f.write_str(
                "no bpffs at /sys/fs/bpf yet, and pid 1's mount namespace is unreadable: a bpffs mounted now may not be the host's",
            ),
            Unverified::HostUnreadable(e) => write!(f, "{HOST_BPFFS}: {e}"),
        }
    }
}

/// The cgroup v2 directory the drain programs and the guard attach to: `explicit`
/// (`--cgroup-root`) or the mounted hierarchy ([`crate::kernel::loader::cgroup2_root`]).
pub fn cgroup_dir(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(path) => Some(path.to_path_buf()),
        None => crate::kernel::loader::cgroup2_root(),
    }
}

impl Facts {
    /// Reads what the checks need: /proc/self, the cgroup directory `explicit` or the
    /// mounted one, /sys/fs/bpf here and for pid 1.
    pub fn gather(explicit_cgroup: Option<&Path>) -> Self {
        let cgroup = cgroup_dir(explicit_cgroup);
        let cgroup_node = match &cgroup {
            Some(path) => node(path),
            None => Err("no cgroup2 file system is mounted".to_owned()),
        };
        // Not found: the host's root was read, and has no /sys/fs/bpf. Anything else
        // (EACCES: no ptrace read access to pid 1) says nothing about the host.
        let host_bpffs = match std::fs::metadata(HOST_BPFFS) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HostView::Missing,
            Err(e) => HostView::Unreadable(e.to_string()),
            Ok(_) => match node(Path::new(HOST_BPFFS)) {
                Ok(node) => HostView::Seen(node),
                Err(e) => HostView::Unreadable(e),
            },
        };
        let ns = |path: &str| std::fs::metadata(path).map(|m| m.ino()).ok();
        Self {
            pid_ns: pid_ns(),
            cgroup: cgroup.unwrap_or_default(),
            cgroup_node,
            bpffs: node(Path::new(BPFFS)),
            host_bpffs,
            mnt_ns: ns("/proc/self/ns/mnt").zip(ns("/proc/1/ns/mnt")),
        }
    }
}

fn node(path: &Path) -> Result<Node, String> {
    let fs = statfs(path).map_err(|e| e.to_string())?;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    Ok(Node {
        fs: fs.filesystem_type(),
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

fn pid_ns() -> Result<PidNs, String> {
    let inode = std::fs::metadata("/proc/self/ns/pid")
        .map_err(|e| format!("/proc/self/ns/pid: {e}"))?
        .ino();
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("/proc/self/status: {e}"))?;
    // Kernels before 4.1 have no NSpid: one level as far as can be told.
    let levels = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map_or(1, |pids| pids.split_whitespace().count());
    Ok(PidNs { inode, levels })
}

impl PidNs {
    /// Whether this is the initial pid namespace.
    pub fn is_initial(&self) -> bool {
        self.inode == INITIAL_PID_NS_INODE && self.levels == 1
    }
}

/// Whether handoffd may run on what `facts` describe: the first thing wrong, or what could
/// not be verified. Pid namespace first: in a container it is the cause of the rest.
pub fn check(facts: &Facts) -> Result<Checked, HostError> {
    let pid_ns = facts
        .pid_ns
        .as_ref()
        .map_err(|e| HostError::PidNsUnreadable(e.clone()))?;
    if !pid_ns.is_initial() {
        return Err(HostError::PidNs {
            inode: pid_ns.inode,
            levels: pid_ns.levels,
        });
    }
    let cgroup = facts
        .cgroup_node
        .as_ref()
        .map_err(|e| HostError::CgroupUnreadable {
            path: facts.cgroup.clone(),
            error: e.clone(),
        })?;
    if cgroup.fs != CGROUP2_SUPER_MAGIC {
        return Err(HostError::NotCgroup2 {
            path: facts.cgroup.clone(),
        });
    }
    if cgroup.ino != crate::kernel::loader::CGROUP_ROOT_INODE {
        return Err(HostError::CgroupNotRoot {
            path: facts.cgroup.clone(),
            ino: cgroup.ino,
        });
    }
    check_bpffs(facts)
}

fn check_bpffs(facts: &Facts) -> Result<Checked, HostError> {
    let own = facts
        .bpffs
        .as_ref()
        .map_err(|e| HostError::BpffsUnreadable(e.clone()))?;
    if own.fs != BPF_FS_MAGIC {
        // handoffd mounts one after taking its state directory (pins::ensure_bpffs):
        // the host's only if this is the host's mount namespace.
        return match facts.mnt_ns {
            Some((mine, host)) if mine != host => Err(HostError::NoBpffs),
            Some(_) => Ok(Checked::default()),
            // Not known to be the host's mount namespace: the bpffs handoffd would mount
            // may be a private one. Said, like an unreadable /proc/1/root.
            None => Ok(Checked {
                bpffs_unverified: Some(Unverified::NoBpffsYet),
            }),
        };
    }
    match &facts.host_bpffs {
        HostView::Seen(host) if host.fs == BPF_FS_MAGIC && host.dev == own.dev => {
            Ok(Checked::default())
        }
        HostView::Seen(host) => Err(HostError::NotHostBpffs {
            dev: Device(own.dev),
            host: if host.fs == BPF_FS_MAGIC {
                HostBpffs::Other(Device(host.dev))
            } else {
                HostBpffs::NotBpf
            },
        }),
        HostView::Missing => Err(HostError::NotHostBpffs {
            dev: Device(own.dev),
            host: HostBpffs::Missing,
        }),
        HostView::Unreadable(e) => Ok(Checked {
            bpffs_unverified: Some(Unverified::HostUnreadable(e.clone())),
        }),
    }
}

/// A file system's device, shown as `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device(pub u64);

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Device(dev) = *self;
        write!(
            f,
            "{}:{}",
            nix::sys::stat::major(dev),
            nix::sys::stat::minor(dev)
        )
    }
}

/// What the host has at `/sys/fs/bpf` when it is not the bpffs handoffd sees there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostBpffs {
    /// Another bpf file system.
    Other(Device),
    /// Some other file system.
    NotBpf,
    /// Nothing.
    Missing,
}

impl std::fmt::Display for HostBpffs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostBpffs::Other(dev) => write!(f, "device {dev}"),
            HostBpffs::NotBpf => f.write_str("no bpf file system there"),
            HostBpffs::Missing => f.write_str("no /sys/fs/bpf"),
        }
    }
}

/// Gathers the facts and checks them (see the module's documentation).
pub fn check_host(explicit_cgroup: Option<&Path>) -> Result<Checked, HostError> {
    check(&Facts::gather(explicit_cgroup))
}

#[cfg(test)]
mod tests;
