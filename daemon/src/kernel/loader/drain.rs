//! The drain accounting programs: one set per daemon, attached at the cgroup v2 root.
//! This module and `events` (the bind watch, the rings and their counters) are the only
//! code that knows the object's maps.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::Btf;
use aya::maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSock, Iter, ProgramError};
use aya::{Ebpf, EbpfLoader};
use handoff_common::maps::{
    DrainMember, GLOBAL_NETNS, ListenerRaw, MAP_BINDS, MAP_COUNTS, MAP_MEMBERS, MAP_PORTS,
    MAP_STATS, MAP_WATCHED, MAP_ZERO_PENDING, MAP_ZEROS, PROG_LISTENERS, PROG_POST_BIND4,
    PROG_POST_BIND6, PROG_PROCS, PROG_RELEASE, PROG_TAG, ProcRaw, Watch, WatchKey, records,
};

use super::events::EventRings;
use super::features::Refusal;
use super::{LoaderError, take};
use crate::kernel::ProgramKind;

/// The inode of the root of a cgroup v2 hierarchy (kernfs numbers its root 1).
pub const CGROUP_ROOT_INODE: u64 = 1;
/// The loaded and attached drain programs and their maps.
pub struct DrainProgram {
    /// Owns the programs and their cgroup links (dropped: detached).
    ebpf: Ebpf,
    counts: HashMap<MapData, u32, i64>,
    /// tgid -> `struct handoff_member`.
    members: HashMap<MapData, u32, [u8; DrainMember::SIZE]>,
    pub(super) ports: HashMap<MapData, u32, u32>,
    /// `struct handoff_addr` -> `struct handoff_watch`.
    pub(super) watched: HashMap<MapData, [u8; WatchKey::SIZE], [u8; Watch::SIZE]>,
    /// Tags with an unread zero event.
    pub(super) zero_pending: HashMap<MapData, u32, u32>,
    /// The per-CPU event counters.
    pub(super) stats: PerCpuArray<MapData, u64>,
    /// Taken by the task that waits on them.
    rings: Option<EventRings>,
    /// Why each tag pass and listener search walks every process on the host, if it
    /// does (`None`: the kernel runs an iterator over one process, Linux >= 6.1).
    whole_host: Option<WholeHost>,
    /// The cgroup v2 root, until the programs are attached there.
    cgroup: Option<File>,
    /// Why the bind watch reports binds in every network namespace, if it does (`None`:
    /// only in handoffd's).
    netns_error: Option<std::io::Error>,
}

/// A TCP listener that the listener iterator found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// The process holding it.
    pub pid: i32,
    /// Its fd number in that process.
    pub fd: i32,
    /// The socket's inode.
    pub inode: u64,
}

/// Why the tag pass walks the whole host.
#[derive(Debug)]
enum WholeHost {
    /// `HANDOFF_FORCE_WHOLE_HOST` asked for it.
    Forced,
    /// The kernel refused an iterator over one process (the error).
    Kernel(std::io::Error),
}

impl std::fmt::Debug for DrainProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainProgram").finish_non_exhaustive()
    }
}

pub(super) fn program_err(name: &'static str) -> impl Fn(ProgramError) -> LoaderError {
    move |source| LoaderError::Program { name, source }
}

pub(super) fn map_err(name: &'static str) -> impl Fn(MapError) -> LoaderError {
    move |source| LoaderError::Map { name, source }
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on a unified system,
/// `/sys/fs/cgroup/unified` on a hybrid one).
///
/// Of several cgroup2 mounts (a bind mount of a subtree besides the hierarchy's own), the
/// first that shows the root (inode 1), else the first: the start-up check then says why
/// it is not the root.
pub fn cgroup2_root() -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let all: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .collect();
    all.iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == CGROUP_ROOT_INODE))
        .or(all.first())
        .cloned()
}

/// The root of the cgroup v2 hierarchy, opened to attach programs that see every socket:
/// `explicit` (`--cgroup-root`, e.g. a hostPath mount of the host's root in a pod) or the
/// mounted one. That it is the real root is checked at start ([`crate::kernel::host`]).
pub fn open_cgroup2_root(explicit: Option<&Path>) -> Result<File, LoaderError> {
    let root = match explicit {
        Some(path) => path.to_path_buf(),
        None => cgroup2_root().ok_or(LoaderError::NoCgroup2)?,
    };
    File::open(&root).map_err(|source| LoaderError::Io {
        op: "opening",
        path: root,
        source,
    })
}

impl DrainProgram {
    /// Loads the programs and attaches them ([`Self::prepare`], then [`Self::attach`]).
    #[cfg(test)]
    pub fn load() -> Result<Self, LoaderError> {
        let mut program = Self::prepare(false)?;
        program.log_modes();
        program.attach()?;
        Ok(program)
    }

    /// Loads every program, attaching none: what the kernel refuses shows here, before
    /// the daemon takes its state directory. Every program is tried, so that a refusal
    /// lists all that failed ([`LoaderError::Refused`]). The bind watch will report binds
    /// in the daemon's own network namespace only (needs SO_NETNS_COOKIE, Linux >= 5.14;
    /// without it, it warns and watches every namespace). `whole_host`: walk every
    /// process in each tag pass, as on a kernel without the per-process iterator.
    #[cfg(test)]
    pub fn prepare(whole_host: bool) -> Result<Self, LoaderError> {
        Self::prepare_probing(whole_host, None, None)
    }

    /// [`Self::prepare`], and if `steer` is given, the steering probe (see
    /// [`super::steer::probe_with`]) made with the same loader: aya's loader parses the
    /// kernel's BTF when it is made (some 20 ms here, seconds under emulation), once
    /// for both objects. `steer` stays `None` if the loader was never made. `cgroup`:
    /// the cgroup v2 root to attach at, if not the mounted one (see [`open_cgroup2_root`]).
    pub(super) fn prepare_probing(
        whole_host: bool,
        cgroup: Option<&Path>,
        steer: Option<&mut Option<Result<(), LoaderError>>>,
    ) -> Result<Self, LoaderError> {
        let cgroup = open_cgroup2_root(cgroup)?;
        // The kernel's BTF is parsed once, for both the CO-RE relocations and the
        // iterator's attach point.
        let btf = Btf::from_sys_fs().map_err(|e| LoaderError::Load {
            what: "the kernel's BTF",
            source: e.into(),
        })?;
        let (netns, netns_error) = match crate::sys::netns_cookie() {
            Ok(cookie) => (cookie, None),
            Err(e) => (0, Some(e)),
        };
        let mut loader = EbpfLoader::new();
        // Not `must_exist`: the steering object, loaded by the same loader, has no such
        // global (the drain object's is checked by its use in drain.bpf.c).
        let loaded = loader
            .btf(Some(&btf))
            .override_global(GLOBAL_NETNS, &netns, false)
            .load(handoff_ebpf::DRAIN_BPF);
        if let Some(steer) = steer {
            *steer = Some(super::steer::probe_with(loader.btf(None)));
        }
        let mut ebpf = loaded.map_err(|source| LoaderError::Load {
            what: "the drain accounting programs",
            source,
        })?;
        load_programs(&mut ebpf, &btf)?;
        let counts =
            HashMap::try_from(take(&mut ebpf, MAP_COUNTS)?).map_err(map_err(MAP_COUNTS))?;
        let members =
            HashMap::try_from(take(&mut ebpf, MAP_MEMBERS)?).map_err(map_err(MAP_MEMBERS))?;
        let ports = HashMap::try_from(take(&mut ebpf, MAP_PORTS)?).map_err(map_err(MAP_PORTS))?;
        let watched =
            HashMap::try_from(take(&mut ebpf, MAP_WATCHED)?).map_err(map_err(MAP_WATCHED))?;
        let zero_pending = HashMap::try_from(take(&mut ebpf, MAP_ZERO_PENDING)?)
            .map_err(map_err(MAP_ZERO_PENDING))?;
        let stats =
            PerCpuArray::try_from(take(&mut ebpf, MAP_STATS)?).map_err(map_err(MAP_STATS))?;
        let rings = EventRings {
            zeros: RingBuf::try_from(take(&mut ebpf, MAP_ZEROS)?).map_err(map_err(MAP_ZEROS))?,
            binds: RingBuf::try_from(take(&mut ebpf, MAP_BINDS)?).map_err(map_err(MAP_BINDS))?,
        };
        drop(btf);
        crate::sys::release_free_memory();
        let whole_host = if whole_host {
            Some(WholeHost::Forced)
        } else {
            per_process_supported(&mut ebpf)?
                .err()
                .map(WholeHost::Kernel)
        };
        Ok(Self {
            ebpf,
            cgroup: Some(cgroup),
            counts,
            members,
            ports,
            watched,
            zero_pending,
            stats,
            rings: Some(rings),
            whole_host,
            netns_error,
        })
    }

    /// Logs the degraded modes this kernel (or the environment) puts the daemon in: a
    /// warning each. Not done while loading, so that a start refused for a missing
    /// feature prints its one line alone.
    pub fn log_modes(&self) {
        match &self.whole_host {
            Some(WholeHost::Forced) => tracing::warn!(
                "HANDOFF_FORCE_WHOLE_HOST is set: each tag pass and listener search walks every process on the host, as on Linux < 6.1"
            ),
            Some(WholeHost::Kernel(e)) => {
                tracing::warn!(error = %e, "this kernel cannot run an iterator over one process (Linux < 6.1): each tag pass and listener search walks every process on the host")
            }
            None => {}
        }
        if let Some(e) = &self.netns_error {
            tracing::warn!(error = %e, "cannot read the daemon's network namespace cookie (SO_NETNS_COOKIE, Linux < 5.14?): binds on a service port in every network namespace are reported, not only in handoffd's");
        }
    }

    /// Attaches the release countdown and the bind watch at the root of the cgroup v2
    /// hierarchy, so they see every socket (accepted sockets belong to their listener's
    /// cgroup). Detached when the object is dropped. A second call does nothing.
    pub fn attach(&mut self) -> Result<(), LoaderError> {
        let Some(cgroup) = self.cgroup.take() else {
            return Ok(());
        };
        for name in [PROG_RELEASE, PROG_POST_BIND4, PROG_POST_BIND6] {
            let sock: &mut CgroupSock = program(&mut self.ebpf, name)?;
            sock.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
        }
        Ok(())
    }

    /// Whether each tag pass iterates the generation's processes only (Linux >= 6.1, and
    /// not forced off); otherwise it walks every process on the host.
    pub fn per_process(&self) -> bool {
        self.whole_host.is_none()
    }

    /// Whether the bind watch reports binds in handoffd's network namespace only.
    pub fn netns_filter(&self) -> bool {
        self.netns_error.is_none()
    }

    /// The event rings, for the task that waits on them (once).
    pub fn take_events(&mut self) -> Option<EventRings> {
        self.rings.take()
    }

    /// Starts counting for `tag` from zero.
    pub fn start(&mut self, tag: u32) -> Result<(), LoaderError> {
        self.counts.insert(tag, 0, 0).map_err(map_err(MAP_COUNTS))
    }

    /// Stops counting for `tag`; its sockets' releases no longer count.
    pub fn forget(&mut self, tag: u32) {
        let _ = self.counts.remove(&tag);
        self.ack_zero(tag);
    }

    /// The count of `tag`.
    pub fn count(&self, tag: u32) -> Result<i64, LoaderError> {
        self.counts.get(&tag, 0).map_err(map_err(MAP_COUNTS))
    }

    /// Tags and counts for `tag` every TCP socket on `port` that `pids` hold and that is
    /// not counted yet; returns the count after the pass.
    pub fn pass(&mut self, tag: u32, port: u16, pids: &[i32]) -> Result<i64, LoaderError> {
        self.over_members(PROG_TAG, tag, port, pids)?;
        self.count(tag)
    }

    /// The TCP listeners on `port` that `pids` hold, one for each fd.
    pub fn listeners(&mut self, port: u16, pids: &[i32]) -> Result<Vec<Listener>, LoaderError> {
        let bytes = self.over_members(PROG_LISTENERS, 0, port, pids)?;
        Ok(
            records::decode_all(&bytes, ListenerRaw::SIZE, ListenerRaw::from_bytes)
                .into_iter()
                .filter_map(|raw| {
                    Some(Listener {
                        pid: i32::try_from(raw.tgid).ok()?,
                        fd: i32::try_from(raw.fd).ok()?,
                        inode: raw.inode,
                    })
                })
                .collect(),
        )
    }

    /// Runs the task_file iterator `name` over `pids` (entered in the members map with
    /// `tag` and `port` for the run) and returns what it wrote.
    fn over_members(
        &mut self,
        name: &'static str,
        tag: u32,
        port: u16,
        pids: &[i32],
    ) -> Result<Vec<u8>, LoaderError> {
        let member = DrainMember {
            tag,
            port: u32::from(port),
        };
        for &pid in pids {
            self.members
                .insert(pid as u32, member.to_bytes(), 0)
                .map_err(map_err(MAP_MEMBERS))?;
        }
        let result = self.run_over(name, pids);
        for &pid in pids {
            let _ = self.members.remove(&(pid as u32));
        }
        result
    }

    /// Runs iterator `name` over each of `pids`, or once over the whole host on a kernel
    /// that cannot iterate one process.
    fn run_over(&mut self, name: &'static str, pids: &[i32]) -> Result<Vec<u8>, LoaderError> {
        if self.whole_host.is_some() {
            return self.run_whole(name);
        }
        let prog = program::<Iter>(&mut self.ebpf, name)?
            .fd()
            .map_err(program_err(name))?;
        let mut out = Vec::new();
        for &pid in pids {
            // An exited pid is no error to the kernel: it has no task to visit.
            let fd = crate::sys::iter_task_of(prog.as_fd(), pid as u32).map_err(|source| {
                LoaderError::Io {
                    op: "starting an iterator over",
                    path: PathBuf::from(format!("/proc/{pid}")),
                    source,
                }
            })?;
            read_iter(File::from(fd), name, &mut out)?;
        }
        Ok(out)
    }

    /// Every process on the host as (pid, parent pid), from one run of the process
    /// table iterator.
    pub fn processes(&mut self) -> Result<Vec<(i32, i32)>, LoaderError> {
        let bytes = self.run_whole(PROG_PROCS)?;
        Ok(
            records::decode_all(&bytes, ProcRaw::SIZE, ProcRaw::from_bytes)
                .into_iter()
                .filter_map(|raw| {
                    Some((i32::try_from(raw.tgid).ok()?, i32::try_from(raw.ppid).ok()?))
                })
                .collect(),
        )
    }

    /// One run of iterator `name` over every task: a link, a file, read to its end.
    fn run_whole(&mut self, name: &'static str) -> Result<Vec<u8>, LoaderError> {
        let iter: &mut Iter = program(&mut self.ebpf, name)?;
        let link_id = iter.attach().map_err(program_err(name))?;
        let link = iter.take_link(link_id).map_err(program_err(name))?;
        let file = link.into_file().map_err(LoaderError::Iter)?;
        let mut out = Vec::new();
        read_iter(file, name, &mut out)?;
        Ok(out)
    }
}

/// Loads every program of the drain object (the iterators against the kernel's `btf`),
/// trying them all, so that a refusal lists every one the kernel refused.
fn load_programs(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), LoaderError> {
    let mut refused = Vec::new();
    for (name, target) in [
        (PROG_TAG, "task_file"),
        (PROG_LISTENERS, "task_file"),
        (PROG_PROCS, "task"),
    ] {
        let iter: &mut Iter = program(ebpf, name)?;
        if let Err(e) = iter.load(target, btf) {
            refused.push(Refusal::new(name, ProgramKind::Iterator, e));
        }
    }
    for (name, kind) in [
        (PROG_RELEASE, ProgramKind::SockRelease),
        (PROG_POST_BIND4, ProgramKind::PostBind),
        (PROG_POST_BIND6, ProgramKind::PostBind),
    ] {
        let sock: &mut CgroupSock = program(ebpf, name)?;
        if let Err(e) = sock.load() {
            refused.push(Refusal::new(name, kind, e));
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        Err(LoaderError::Refused(refused))
    }
}

/// Whether the kernel runs an iterator over one process (`bpf_iter_link_info.task`, Linux
/// 6.1): tried once, over the daemon itself, with the listener iterator (which writes
/// nothing while the members map is empty). Older kernels refuse the larger link info
/// with E2BIG, or EINVAL.
/// Ok(Err(why)) when not.
fn per_process_supported(ebpf: &mut Ebpf) -> Result<Result<(), std::io::Error>, LoaderError> {
    let prog = program::<Iter>(ebpf, PROG_LISTENERS)?
        .fd()
        .map_err(program_err(PROG_LISTENERS))?;
    match crate::sys::iter_task_of(prog.as_fd(), std::process::id()) {
        Ok(fd) => {
            read_iter(File::from(fd), PROG_LISTENERS, &mut Vec::new())?;
            Ok(Ok(()))
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::E2BIG | libc::EINVAL)) => Ok(Err(e)),
        Err(source) => Err(LoaderError::Io {
            op: "trying an iterator over one process on",
            path: PathBuf::from("/proc/self"),
            source,
        }),
    }
}

/// Reads iterator `name`'s file to its end, which runs the program.
fn read_iter(mut file: File, name: &'static str, out: &mut Vec<u8>) -> Result<(), LoaderError> {
    file.read_to_end(out)
        .map(drop)
        .map_err(|source| LoaderError::Io {
            op: "running",
            path: Path::new(name).to_path_buf(),
            source,
        })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoaderError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoaderError::MissingMap(name))?
        .try_into()
        .map_err(program_err(name))
}
