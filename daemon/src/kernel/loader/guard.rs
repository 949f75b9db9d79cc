//! The guard: a `cgroup/setsockopt` program at the cgroup v2 root that refuses
//! `SO_ATTACH_REUSEPORT_{C,E}BPF` and `SO_DETACH_REUSEPORT_BPF` on TCP sockets bound to a
//! watched service address (in handoffd's network namespace: the same port number in a
//! container, or on another address, is not refused) to every process but handoffd
//! (Linux >= 5.14 for the namespace cookie). Dropped, it is detached (the attachment is
//! a link owned by the object).

use std::net::{IpAddr, SocketAddr};

use aya::maps::{HashMap, MapData};
use aya::programs::{CgroupAttachMode, CgroupSockopt};
use aya::{Ebpf, EbpfLoader};
use handoff_common::maps::{GuardKey, MAP_GUARD_ALLOWED, MAP_GUARD_PORTS, PROG_GUARD, records};

use super::drain::open_cgroup2_root;
use super::{LoaderError, take};

/// The loaded and attached guard and its maps.
pub struct GuardProgram {
    /// Owns the program and its cgroup link (dropped: detached).
    _ebpf: Ebpf,
    ports: HashMap<MapData, [u8; GuardKey::SIZE], u32>,
    /// The cookie of handoffd's network namespace.
    netns: u64,
}

impl std::fmt::Debug for GuardProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardProgram").finish_non_exhaustive()
    }
}

fn program_err(source: aya::programs::ProgramError) -> LoaderError {
    LoaderError::Program {
        name: PROG_GUARD,
        source,
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoaderError {
    move |source| LoaderError::Map { name, source }
}

impl GuardProgram {
    /// Loads the guard, lets this process (handoffd) through, and attaches it at the root
    /// of the cgroup v2 hierarchy: `cgroup`, or the mounted one.
    pub fn load(cgroup: Option<&std::path::Path>) -> Result<Self, LoaderError> {
        let cgroup = open_cgroup2_root(cgroup)?;
        // Without it no socket would match a watched address: nothing would be guarded.
        let netns = crate::sys::netns_cookie().map_err(|source| LoaderError::Io {
            op: "reading the network namespace cookie (SO_NETNS_COOKIE, Linux >= 5.14) of",
            path: "handoffd's namespace".into(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .load(handoff_ebpf::GUARD_BPF)
            .map_err(|source| LoaderError::Load {
                what: "the guard program",
                source,
            })?;
        let ports = HashMap::try_from(take(&mut ebpf, MAP_GUARD_PORTS)?)
            .map_err(map_err(MAP_GUARD_PORTS))?;
        let mut allowed = HashMap::try_from(take(&mut ebpf, MAP_GUARD_ALLOWED)?)
            .map_err(map_err(MAP_GUARD_ALLOWED))?;
        // Before the attach: from its first run the guard lets the daemon through.
        allowed
            .insert(std::process::id(), 1, 0)
            .map_err(map_err(MAP_GUARD_ALLOWED))?;
        let program: &mut CgroupSockopt = ebpf
            .program_mut(PROG_GUARD)
            .ok_or(LoaderError::MissingMap(PROG_GUARD))?
            .try_into()
            .map_err(program_err)?;
        program.load().map_err(program_err)?;
        // aya attaches with a bpf_link where the kernel has them (5.7+): a link takes no
        // flags and always runs beside other programs (as BPF_F_ALLOW_MULTI would).
        program
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(program_err)?;
        Ok(Self {
            _ebpf: ebpf,
            ports,
            netns,
        })
    }

    /// Guards the service addresses `addrs` in handoffd's network namespace from now on.
    pub fn watch(&mut self, addrs: &[SocketAddr]) -> Result<(), LoaderError> {
        for a in addrs {
            self.ports
                .insert(guard_key(self.netns, *a), 1, 0)
                .map_err(map_err(MAP_GUARD_PORTS))?;
        }
        Ok(())
    }
}

/// The key of `addr` in the namespace `netns`.
fn guard_key(netns: u64, addr: SocketAddr) -> [u8; GuardKey::SIZE] {
    let family = match addr.ip() {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    };
    GuardKey {
        netns,
        family: family as u32,
        port: u32::from(addr.port()),
        addr: records::addr_words(addr.ip()),
    }
    .to_bytes()
}
