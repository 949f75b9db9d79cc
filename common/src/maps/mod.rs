//! BPF map layouts, mirrored once from `ebpf/handoff.h` and `ebpf/drain.h`: their
//! constants and the kernel object names here, their records in [`records`] (checked
//! against the objects' BTF by `common/tests/btf.rs`), their counters in [`counters`].
//!
//! Sizes are checked at compile time so that a change on one side breaks the build
//! instead of the steering.

pub mod counters;
mod legacy;
pub mod records;

pub use counters::{Counter, Counters, Stat};
pub use legacy::LegacyRecord;
pub use records::{
    DrainEventRaw, DrainMember, EventKind, GuardKey, ListenerRaw, PROBE_KEY_SIZE, ProbeKey,
    ProbeValue, ProcRaw, SteerRecord, Watch, WatchKey,
};

/// Sockarray slots given to one generation in one group.
pub const GEN_SLOTS: u32 = 64;
/// Blocks of [`GEN_SLOTS`] in a group's sockarray.
pub const BLOCKS: u32 = 64;
/// Entries of the `socks` REUSEPORT_SOCKARRAY.
pub const SOCK_SLOTS: u32 = GEN_SLOTS * BLOCKS;
/// Entries of the `records` ring.
pub const RECORDS: u32 = 16;
/// Entries of the `probes` hash map: probes registered at once.
pub const PROBE_SLOTS: u32 = 64;
/// A probe's `chosen` not yet written by the program; as its `target`: a probe, not a
/// health check.
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
/// The per-CPU event counters, indexed by [`Stat`].
pub const MAP_STATS: &str = "stats";
/// The global holding the daemon's network namespace cookie, set at load.
pub const GLOBAL_NETNS: &str = "daemon_netns";
/// `HANDOFF_STATS`: entries of the stats map.
pub const STATS: u32 = Stat::ALL.len() as u32;
/// `HANDOFF_ANY_UID`: a watch's first uid before the service's uid is known.
pub const ANY_UID: u32 = u32::MAX;

#[cfg(test)]
mod tests {
    use super::*;

    /// `#define NAME VALUE` of `header`.
    fn define(header: &str, name: &str) -> u64 {
        let line = header
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} not in the header"));
        let value = line.split_whitespace().nth(2).expect("a value");
        let value = value.trim_end_matches(['u', 'U', 'L']);
        match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).expect("hex"),
            None => value.parse().unwrap_or(0),
        }
    }

    /// The constants and enumerators must agree with ebpf/*.h (the objects carry no
    /// BTF for them): read the headers and compare.
    #[test]
    fn constants_match_headers() {
        let header = include_str!("../../../ebpf/handoff.h");
        let def = |name| define(header, name);
        assert_eq!(def("HANDOFF_GEN_SLOTS"), u64::from(GEN_SLOTS));
        assert_eq!(def("HANDOFF_BLOCKS"), u64::from(BLOCKS));
        assert_eq!(def("HANDOFF_RECORDS"), u64::from(RECORDS));
        assert_eq!(def("HANDOFF_PROBE_SLOTS"), u64::from(PROBE_SLOTS));
        assert_eq!(def("HANDOFF_PROBE_UNSET"), u64::from(PROBE_UNSET));
        assert_eq!(def("HANDOFF_PROBE_NO_SOCKET"), u64::from(PROBE_NO_SOCKET));
        let mut enumerators: Vec<(&str, u32)> = Counter::ALL
            .iter()
            .map(|c| (c.c_name(), c.index()))
            .collect();
        enumerators.push(("HANDOFF_CTR_MAX", Counter::ALL.len() as u32));
        for (name, value) in enumerators {
            let line = format!("{name} = {value},");
            assert!(header.contains(&line), "handoff.h lacks `{line}`");
        }

        let header = include_str!("../../../ebpf/drain.h");
        assert_eq!(define(header, "HANDOFF_ANY_UID"), u64::from(ANY_UID));
        let mut enumerators: Vec<(&str, u32)> =
            Stat::ALL.iter().map(|s| (s.c_name(), s.index())).collect();
        enumerators.push(("HANDOFF_STATS", STATS));
        enumerators.extend(EventKind::ALL.iter().map(|k| (k.c_name(), *k as u32)));
        for (name, value) in enumerators {
            let line = format!("{name} = {value},");
            assert!(header.contains(&line), "drain.h lacks `{line}`");
        }
    }
}
