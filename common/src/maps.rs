//! BPF map layouts, mirrored once from `ebpf/handoff.h`.
//!
//! Sizes are checked at compile time so that a change on one side breaks the build
//! instead of the steering.

/// Sockarray slots given to one generation in one group.
pub const GEN_SLOTS: u32 = 64;
/// Blocks of [`GEN_SLOTS`] in a group's sockarray.
pub const BLOCKS: u32 = 64;
/// Entries of the `socks` REUSEPORT_SOCKARRAY.
pub const SOCK_SLOTS: u32 = GEN_SLOTS * BLOCKS;
/// Entries of the `records` ring.
pub const RECORDS: u32 = 16;
/// Entries of the `probes` hash map: probes registered at once.
pub const PROBE_SLOTS: u32 = 16;
/// A probe slot not yet written by the program.
pub const PROBE_UNSET: u32 = 0xffff_ffff;
/// The program saw the probe but found no socket to select.
pub const PROBE_NO_SOCKET: u32 = 0xffff_fffe;

/// Name of the steering program in the object.
pub const PROGRAM: &str = "handoff_select";
/// Name of the REUSEPORT_SOCKARRAY map.
pub const MAP_SOCKS: &str = "socks";
/// Name of the steering record ring.
pub const MAP_RECORDS: &str = "records";
/// Name of the mmapable one-entry array holding the index of the record in force.
pub const MAP_CURRENT: &str = "current";
/// Name of the per-CPU counter array.
pub const MAP_COUNTERS: &str = "counters";
/// Name of the probe result array.
pub const MAP_PROBES: &str = "probes";

/// Name of the guard program in `guard.bpf.o`.
pub const PROG_GUARD: &str = "handoff_guard";
/// The guard's watched service addresses (network namespace, address, port).
pub const MAP_GUARD_PORTS: &str = "guard_ports";
/// The processes the guard lets change reuseport programs.
pub const MAP_GUARD_ALLOWED: &str = "guard_allowed";
/// The guard's refusal counter.
pub const MAP_GUARD_REFUSED: &str = "guard_refused";

/// Names in `drain.bpf.o`: the tag pass.
pub const PROG_TAG: &str = "handoff_tag";
/// The release countdown.
pub const PROG_RELEASE: &str = "handoff_release";
/// The IPv4 bind watch (`cgroup/post_bind4`: successful binds only).
pub const PROG_POST_BIND4: &str = "handoff_post_bind4";
/// The IPv6 bind watch (`cgroup/post_bind6`).
pub const PROG_POST_BIND6: &str = "handoff_post_bind6";
/// The process table iterator.
pub const PROG_PROCS: &str = "handoff_procs";
/// The listener iterator.
pub const PROG_LISTENERS: &str = "handoff_listeners";
/// Per-tag connection counts.
pub const MAP_COUNTS: &str = "counts";
/// Processes the next pass tags for.
pub const MAP_MEMBERS: &str = "members";
/// Ports whose bind() may be reported (the first test of every bind).
pub const MAP_PORTS: &str = "ports";
/// Watched service addresses: [`WatchKey`] -> [`Watch`].
pub const MAP_WATCHED: &str = "watched";
/// Tags with an unread zero event.
pub const MAP_ZERO_PENDING: &str = "zero_pending";
/// The ring buffer of count-reached-zero events (cannot overflow).
pub const MAP_ZEROS: &str = "zeros";
/// The ring buffer of bind events (rate-limited).
pub const MAP_BINDS: &str = "binds";
/// The per-CPU event counters, indexed by the `STAT_*` constants.
pub const MAP_STATS: &str = "stats";
/// The global holding the daemon's network namespace cookie, set at load.
pub const GLOBAL_NETNS: &str = "daemon_netns";
/// `HANDOFF_STAT_LOST_ZEROS`: a zero event did not fit its ring.
pub const STAT_LOST_ZEROS: u32 = 0;
/// `HANDOFF_STAT_LOST_BINDS`: a bind event did not fit its ring.
pub const STAT_LOST_BINDS: u32 = 1;
/// `HANDOFF_STAT_SUPPRESSED`: a bind event over the rate limit, not written.
pub const STAT_SUPPRESSED: u32 = 2;
/// `HANDOFF_STAT_FILTERED`: a bind of a watched port from another namespace, address or uid.
pub const STAT_FILTERED: u32 = 3;
/// `HANDOFF_STATS`: entries of the stats map.
pub const STATS: u32 = 4;
/// `HANDOFF_ANY_UID`: a watch's first uid before the service's uid is known.
pub const ANY_UID: u32 = u32::MAX;
/// `HANDOFF_EV_ZERO`: a tag's count reached zero.
pub const EV_ZERO: u32 = 1;
/// `HANDOFF_EV_BIND`: a watched port was bound.
pub const EV_BIND: u32 = 2;
/// `HANDOFF_EV_HELD`: the first bind event of a window held back by the rate limit.
pub const EV_HELD: u32 = 3;

/// `struct handoff_member`: a process the tag pass counts for.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainMember {
    /// The draining generation's tag (never 0).
    pub tag: u32,
    /// The service port.
    pub port: u32,
}

const _: () = assert!(size_of::<DrainMember>() == 8);

/// `struct handoff_addr`: a bound local address, the key of the `watched` map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchKey {
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Host byte order.
    pub port: u32,
    /// Network byte order; IPv4 in the first word, the rest zero.
    pub addr: [u32; 4],
}

const _: () = assert!(size_of::<WatchKey>() == 24);

impl WatchKey {
    /// The key as the map takes it (the same bytes as the struct).
    pub fn words(&self) -> [u32; 6] {
        let [a, b, c, d] = self.addr;
        [self.family, self.port, a, b, c, d]
    }
}

/// `struct handoff_watch`: whose binds of a watched address are reported, and its rate
/// limit's state (written by the program).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watch {
    /// The uids whose binds are reported ([`ANY_UID`] first: any).
    pub uids: [u32; 2],
    /// The rate limit's current window.
    pub window: u64,
    /// Events let through in that window.
    pub used: u64,
}

const _: () = assert!(size_of::<Watch>() == 24);

impl Watch {
    /// A fresh watch reporting binds by `uids` (window and count zero), as the map takes it.
    pub fn words(uids: [u32; 2]) -> [u32; 6] {
        [uids[0], uids[1], 0, 0, 0, 0]
    }
}

/// `struct handoff_event`, as the ring buffer carries it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainEventRaw {
    /// `EV_ZERO` or `EV_BIND`.
    pub kind: u32,
    /// The tag or the port.
    pub value: u32,
    /// `EV_BIND`: the process (tgid) that bound the port; 0 otherwise.
    pub pid: u32,
    /// Zero.
    pub reserved: u32,
}

const _: () = assert!(size_of::<DrainEventRaw>() == 16);

/// `struct handoff_listener`: a listening socket as the listener iterator writes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerRaw {
    /// The process holding it.
    pub tgid: u32,
    /// The fd number in that process.
    pub fd: u32,
    /// The socket's inode.
    pub inode: u64,
}

const _: () = assert!(size_of::<ListenerRaw>() == 16);

/// `struct handoff_proc`: one process as the process table iterator writes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcRaw {
    /// The process (thread group) id.
    pub tgid: u32,
    /// Its parent's tgid; 0 for the roots.
    pub ppid: u32,
}

const _: () = assert!(size_of::<ProcRaw>() == 8);

/// `struct handoff_probe_key`: a registered probe connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeKey {
    /// IP source address: IPv6 in 16 bytes, IPv4 in the first 4 and zeros.
    pub saddr: [u8; 16],
    /// TCP source port, host order.
    pub sport: u16,
    /// TCP destination port, host order.
    pub dport: u16,
    /// 4 or 6.
    pub family: u32,
}

/// Size of `struct handoff_probe_key`.
pub const PROBE_KEY_SIZE: usize = 24;

impl ProbeKey {
    /// The probe from `source` to `target` (one family).
    pub fn new(source: std::net::SocketAddr, target: std::net::SocketAddr) -> Self {
        let mut saddr = [0u8; 16];
        let family = match source.ip() {
            std::net::IpAddr::V4(a) => {
                saddr[..4].copy_from_slice(&a.octets());
                4
            }
            std::net::IpAddr::V6(a) => {
                saddr.copy_from_slice(&a.octets());
                6
            }
        };
        Self {
            saddr,
            sport: source.port(),
            dport: target.port(),
            family,
        }
    }

    /// The key as the kernel's hash map holds it.
    pub fn to_bytes(self) -> [u8; PROBE_KEY_SIZE] {
        let mut out = [0u8; PROBE_KEY_SIZE];
        out[..16].copy_from_slice(&self.saddr);
        out[16..18].copy_from_slice(&self.sport.to_ne_bytes());
        out[18..20].copy_from_slice(&self.dport.to_ne_bytes());
        out[20..24].copy_from_slice(&self.family.to_ne_bytes());
        out
    }
}

/// `struct handoff_record`: one group's steering state, immutable while in force.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SteerRecord {
    /// First slot of the active generation's block.
    pub active_first: u32,
    /// Listeners of the active generation, from `active_first` on.
    pub active_len: u32,
    /// First slot of the previous generation's block.
    pub prev_first: u32,
    /// Listeners of the previous generation (0: none).
    pub prev_len: u32,
}

const _: () = assert!(size_of::<SteerRecord>() == 16);

impl SteerRecord {
    /// The record as the bytes the kernel's array holds.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (i, v) in [
            self.active_first,
            self.active_len,
            self.prev_first,
            self.prev_len,
        ]
        .into_iter()
        .enumerate()
        {
            out[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        out
    }
}

/// `enum handoff_counter`: what the program decided, one per-CPU counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Counter {
    /// The hashed pick in the active generation took the connection.
    Active = 0,
    /// Another listener of the active generation took it (the hashed one had closed).
    ActiveRetry = 1,
    /// The active generation had no listener left; the previous one took it.
    Previous = 2,
    /// No listener of either generation: the kernel's hash over the group decided.
    KernelHash = 3,
    /// Decisions for requests migrated off a closing listener (also counted above).
    Migrated = 4,
    /// Probe connections recognised and dropped.
    Probe = 5,
}

impl Counter {
    /// Every counter, in map order.
    pub const ALL: [Counter; 6] = [
        Counter::Active,
        Counter::ActiveRetry,
        Counter::Previous,
        Counter::KernelHash,
        Counter::Migrated,
        Counter::Probe,
    ];

    /// The label used in status output and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Counter::Active => "active",
            Counter::ActiveRetry => "active_retry",
            Counter::Previous => "fallback",
            Counter::KernelHash => "kernel_hash",
            Counter::Migrated => "migrated",
            Counter::Probe => "probe",
        }
    }
}

/// Totals of the per-CPU decision counters of one group, or summed over groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// See [`Counter::Active`].
    pub active: u64,
    /// See [`Counter::ActiveRetry`].
    pub active_retry: u64,
    /// See [`Counter::Previous`].
    pub fallback: u64,
    /// See [`Counter::KernelHash`].
    pub kernel_hash: u64,
    /// See [`Counter::Migrated`].
    pub migrated: u64,
    /// See [`Counter::Probe`].
    pub probe: u64,
}

impl Counters {
    /// Adds `n` to the field of `which`.
    pub fn add(&mut self, which: Counter, n: u64) {
        let field = match which {
            Counter::Active => &mut self.active,
            Counter::ActiveRetry => &mut self.active_retry,
            Counter::Previous => &mut self.fallback,
            Counter::KernelHash => &mut self.kernel_hash,
            Counter::Migrated => &mut self.migrated,
            Counter::Probe => &mut self.probe,
        };
        *field += n;
    }

    /// Adds every field of `other`.
    pub fn merge(&mut self, other: &Counters) {
        self.active += other.active;
        self.active_retry += other.active_retry;
        self.fallback += other.fallback;
        self.kernel_hash += other.kernel_hash;
        self.migrated += other.migrated;
        self.probe += other.probe;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The constants must agree with ebpf/handoff.h; read the header and compare.
    #[test]
    fn constants_match_header() {
        let header = include_str!("../../ebpf/handoff.h");
        let define = |name: &str| -> u64 {
            let line = header
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name} not in handoff.h"));
            let value = line.split_whitespace().nth(2).expect("a value");
            let value = value.trim_end_matches('u');
            match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).expect("hex"),
                None => value.parse().unwrap_or(0),
            }
        };
        assert_eq!(define("HANDOFF_GEN_SLOTS"), u64::from(GEN_SLOTS));
        assert_eq!(define("HANDOFF_BLOCKS"), u64::from(BLOCKS));
        assert_eq!(define("HANDOFF_RECORDS"), u64::from(RECORDS));
        assert_eq!(define("HANDOFF_PROBE_SLOTS"), u64::from(PROBE_SLOTS));
        assert_eq!(define("HANDOFF_PROBE_UNSET"), u64::from(PROBE_UNSET));
        assert_eq!(
            define("HANDOFF_PROBE_NO_SOCKET"),
            u64::from(PROBE_NO_SOCKET)
        );
        for c in Counter::ALL {
            let name = format!("HANDOFF_CTR_{} = {},", c.c_name(), c as u32);
            assert!(header.contains(&name), "handoff.h lacks `{name}`");
        }
    }

    #[test]
    fn probe_key_layout() {
        let k = ProbeKey::new(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
        );
        let b = k.to_bytes();
        assert_eq!(&b[..4], &[127, 0, 0, 1]);
        assert_eq!(&b[4..16], &[0; 12]);
        assert_eq!(u16::from_ne_bytes([b[16], b[17]]), 40000);
        assert_eq!(u16::from_ne_bytes([b[18], b[19]]), 8080);
        assert_eq!(u32::from_ne_bytes(b[20..24].try_into().unwrap()), 4);
    }

    #[test]
    fn record_bytes_are_native_u32s() {
        let r = SteerRecord {
            active_first: 1,
            active_len: 2,
            prev_first: 3,
            prev_len: 4,
        };
        let b = r.to_bytes();
        assert_eq!(u32::from_ne_bytes(b[12..16].try_into().unwrap()), 4);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 1);
    }

    impl Counter {
        fn c_name(self) -> &'static str {
            match self {
                Counter::Active => "ACTIVE",
                Counter::ActiveRetry => "ACTIVE_RETRY",
                Counter::Previous => "PREVIOUS",
                Counter::KernelHash => "KERNEL_HASH",
                Counter::Migrated => "MIGRATED",
                Counter::Probe => "PROBE",
            }
        }
    }
}
