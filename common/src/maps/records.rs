//! The records of `ebpf/handoff.h` and `ebpf/drain.h`: one `#[repr(C)]` mirror per C
//! struct, with its size checked at compile time and its decoder and encoder here, so
//! that no other code reads or writes a record's bytes by hand.
//!
//! Every mirror's field offsets come from `offset_of!`, and [`MIRRORS`] lists them all for
//! the test that compares them with the BTF of the committed `ebpf/*.bpf.o` objects.

use std::mem::offset_of;
use std::net::{IpAddr, SocketAddr};

/// A field type of a record: read and written in native byte order, as the kernel does.
trait Field: Sized + Copy {
    /// The field at byte `at` of `bytes`; `None` when `bytes` ends before it.
    fn read(bytes: &[u8], at: usize) -> Option<Self>;
    /// Writes the field at byte `at` of `out` (which the record's size makes long enough).
    fn write(self, out: &mut [u8], at: usize);
}

macro_rules! int_field {
    ($($t:ty),+) => {$(
        impl Field for $t {
            fn read(bytes: &[u8], at: usize) -> Option<Self> {
                let raw = bytes.get(at..at + size_of::<$t>())?;
                Some(<$t>::from_ne_bytes(raw.try_into().ok()?))
            }
            fn write(self, out: &mut [u8], at: usize) {
                if let Some(dst) = out.get_mut(at..at + size_of::<$t>()) {
                    dst.copy_from_slice(&self.to_ne_bytes());
                }
            }
        }
    )+};
}

int_field!(u8, u16, u32, u64);

impl<T: Field + Default, const N: usize> Field for [T; N] {
    fn read(bytes: &[u8], at: usize) -> Option<Self> {
        let mut out = [T::default(); N];
        for (i, v) in out.iter_mut().enumerate() {
            *v = T::read(bytes, at + i * size_of::<T>())?;
        }
        Some(out)
    }
    fn write(self, out: &mut [u8], at: usize) {
        for (i, v) in self.into_iter().enumerate() {
            v.write(out, at + i * size_of::<T>());
        }
    }
}

/// One field of a mirrored record, as the BTF test compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldLayout {
    /// The field's name, the same in Rust and C.
    pub name: &'static str,
    /// Its offset in bytes.
    pub offset: usize,
    /// Its size in bytes.
    pub size: usize,
}

/// A mirrored record's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The C struct's name, without `struct`.
    pub c_name: &'static str,
    /// Its size in bytes.
    pub size: usize,
    /// Its fields, in order.
    pub fields: Vec<FieldLayout>,
}

/// The size of the field that `f` borrows (only its type matters).
fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// The size assert, [`Field`]-based decoder and encoder, and [`Layout`] of a mirror: the
/// field list must name every field (the struct literal in `from_bytes` fails to build
/// otherwise).
macro_rules! record {
    ($ty:ident, $c:literal, $size:literal, [$($f:ident),+ $(,)?]) => {
        const _: () = assert!(size_of::<$ty>() == $size);

        impl $ty {
            #[doc = concat!("Size of `struct ", $c, "`.")]
            pub const SIZE: usize = $size;

            /// Decodes the record from the bytes the kernel holds or wrote (native byte
            /// order); `None` when `bytes` is too short.
            pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
                Some(Self { $($f: Field::read(bytes, offset_of!($ty, $f))?),+ })
            }

            /// The record as the bytes the kernel reads (native byte order, padding zero).
            pub fn to_bytes(self) -> [u8; $size] {
                let mut out = [0u8; $size];
                $(Field::write(self.$f, &mut out, offset_of!($ty, $f));)+
                out
            }

            /// The layout, for the test against the objects' BTF.
            pub fn layout() -> Layout {
                Layout {
                    c_name: $c,
                    size: $size,
                    fields: vec![$(FieldLayout {
                        name: stringify!($f),
                        offset: offset_of!($ty, $f),
                        size: field_size(|s: &$ty| &s.$f),
                    }),+],
                }
            }
        }
    };
}

/// Every mirror of a record of `ebpf/*.h`.
pub const MIRRORS: &[fn() -> Layout] = &[
    ProbeKey::layout,
    ProbeValue::layout,
    SteerRecord::layout,
    DrainMember::layout,
    WatchKey::layout,
    Watch::layout,
    DrainEventRaw::layout,
    ListenerRaw::layout,
    ProcRaw::layout,
    GuardKey::layout,
];

/// An IP address as the records hold it: network byte order in native-endian words,
/// IPv4 in the first word and the rest zero (as the kernel's `src_ip4`/`src_ip6`).
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    let word = |o: [u8; 16], i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            [word(o, 0), word(o, 4), word(o, 8), word(o, 12)]
        }
    }
}

/// `struct handoff_probe_key`: a registered probe connection, the key of `probes`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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

record!(
    ProbeKey,
    "handoff_probe_key",
    24,
    [saddr, sport, dport, family]
);

/// Size of `struct handoff_probe_key`.
pub const PROBE_KEY_SIZE: usize = ProbeKey::SIZE;

impl ProbeKey {
    /// The probe from `source` to `target` (one family).
    pub fn new(source: SocketAddr, target: SocketAddr) -> Self {
        let mut saddr = [0u8; 16];
        let family = match source.ip() {
            IpAddr::V4(a) => {
                saddr[..4].copy_from_slice(&a.octets());
                4
            }
            IpAddr::V6(a) => {
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
}

/// `struct handoff_probe`: what a registered connection asks, the value of `probes`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeValue {
    /// [`super::PROBE_UNSET`]: a probe (the program records its choice and drops the
    /// SYN); else the slot a health-check connection must reach.
    pub target: u32,
    /// The slot the program chose ([`super::PROBE_UNSET`] until it saw the SYN).
    pub chosen: u32,
}

record!(ProbeValue, "handoff_probe", 8, [target, chosen]);

/// `struct handoff_record`: one group's steering state, immutable while in force.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SteerRecord {
    /// First slot of the canary's block.
    pub canary_first: u32,
    /// Listeners of the canary (0: none).
    pub canary_len: u32,
    /// First slot of the active generation's block.
    pub active_first: u32,
    /// Listeners of the active generation, from `active_first` on.
    pub active_len: u32,
    /// First slot of the previous generation's block.
    pub prev_first: u32,
    /// Listeners of the previous generation (0: none).
    pub prev_len: u32,
    /// Percent of new connections for the canary.
    pub weight: u32,
    /// Zero.
    pub reserved: u32,
}

record!(
    SteerRecord,
    "handoff_record",
    32,
    [
        canary_first,
        canary_len,
        active_first,
        active_len,
        prev_first,
        prev_len,
        weight,
        reserved
    ]
);

/// `struct handoff_member`: a process the tag pass counts for, the value of `members`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainMember {
    /// The draining generation's tag (never 0).
    pub tag: u32,
    /// The service port.
    pub port: u32,
}

record!(DrainMember, "handoff_member", 8, [tag, port]);

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

record!(WatchKey, "handoff_addr", 24, [family, port, addr]);

/// `struct handoff_watch`: whose binds of a watched address are reported, and its rate
/// limit's state (written by the program).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watch {
    /// The uids whose binds are reported ([`super::ANY_UID`] first: any).
    pub uids: [u32; 2],
    /// The rate limit's current window.
    pub window: u64,
    /// Events let through in that window.
    pub used: u64,
}

record!(Watch, "handoff_watch", 24, [uids, window, used]);

impl Watch {
    /// A fresh watch reporting binds by `uids` (window and count zero).
    pub fn new(uids: [u32; 2]) -> Self {
        Self {
            uids,
            ..Self::default()
        }
    }
}

/// `enum handoff_event_kind`: what a ring record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum EventKind {
    /// `HANDOFF_EV_ZERO`: a tag's count reached zero; the value is the tag.
    Zero = 1,
    /// `HANDOFF_EV_BIND`: a watched port was bound; the value is the port.
    Bind = 2,
    /// `HANDOFF_EV_HELD`: the first bind event of a window held back by the rate limit;
    /// the value is the port.
    Held = 3,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 3] = [EventKind::Zero, EventKind::Bind, EventKind::Held];

    /// The kind of a record's `kind` field; `None` for one this daemon does not know.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u32 == raw)
    }

    /// The name of the enumerator in `drain.h`.
    pub fn c_name(self) -> &'static str {
        match self {
            EventKind::Zero => "HANDOFF_EV_ZERO",
            EventKind::Bind => "HANDOFF_EV_BIND",
            EventKind::Held => "HANDOFF_EV_HELD",
        }
    }
}

/// `struct handoff_event`, as the ring buffers carry it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainEventRaw {
    /// An [`EventKind`].
    pub kind: u32,
    /// The tag or the port.
    pub value: u32,
    /// [`EventKind::Bind`]: the process (tgid) that bound the port; 0 otherwise.
    pub pid: u32,
    /// Zero.
    pub reserved: u32,
}

record!(
    DrainEventRaw,
    "handoff_event",
    16,
    [kind, value, pid, reserved]
);

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

record!(ListenerRaw, "handoff_listener", 16, [tgid, fd, inode]);

/// `struct handoff_proc`: one process as the process table iterator writes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcRaw {
    /// The process (thread group) id.
    pub tgid: u32,
    /// Its parent's tgid; 0 for the roots.
    pub ppid: u32,
}

record!(ProcRaw, "handoff_proc", 8, [tgid, ppid]);

/// `struct guard_key` of `guard.bpf.c` (the guard has no header: this is the one record
/// that is not in `ebpf/*.h`): a watched service address, the key of `guard_ports`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardKey {
    /// The network namespace's cookie.
    pub netns: u64,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Host byte order.
    pub port: u32,
    /// See [`addr_words`].
    pub addr: [u32; 4],
}

record!(GuardKey, "guard_key", 32, [netns, family, port, addr]);

/// Decodes the records of type `T` that an iterator wrote back to back (a trailing
/// partial record is dropped).
pub fn decode_all<T>(bytes: &[u8], size: usize, decode: fn(&[u8]) -> Option<T>) -> Vec<T> {
    bytes.chunks_exact(size).filter_map(decode).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::LegacyRecord;

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
        assert_eq!(ProbeKey::from_bytes(&b), Some(k));
    }

    #[test]
    fn record_bytes_are_native_u32s() {
        let r = SteerRecord {
            canary_first: 1,
            canary_len: 2,
            active_first: 3,
            active_len: 4,
            prev_first: 5,
            prev_len: 6,
            weight: 7,
            reserved: 0,
        };
        let b = r.to_bytes();
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(b[12..16].try_into().unwrap()), 4);
        assert_eq!(u32::from_ne_bytes(b[24..28].try_into().unwrap()), 7);
        assert_eq!(SteerRecord::from_bytes(&b), Some(r));
        let old: Vec<u8> = [3u32, 4, 5, 6]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let upgraded = LegacyRecord::from_bytes(&old).unwrap().upgrade();
        assert_eq!(
            upgraded,
            SteerRecord {
                canary_first: 0,
                canary_len: 0,
                weight: 0,
                ..r
            }
        );
        assert_eq!(LegacyRecord::from_bytes(&old[..15]), None);
    }

    #[test]
    fn records_round_trip_and_refuse_short_input() {
        let l = ListenerRaw {
            tgid: 7,
            fd: 3,
            inode: u64::MAX - 1,
        };
        let b = l.to_bytes();
        assert_eq!(ListenerRaw::from_bytes(&b), Some(l));
        assert_eq!(ListenerRaw::from_bytes(&b[..15]), None);
        let w = Watch::new([1, 2]);
        assert_eq!(Watch::from_bytes(&w.to_bytes()), Some(w));
        let k = WatchKey {
            family: 10,
            port: 80,
            addr: [1, 2, 3, 4],
        };
        assert_eq!(WatchKey::from_bytes(&k.to_bytes()), Some(k));
        let two = [ProcRaw { tgid: 1, ppid: 0 }, ProcRaw { tgid: 2, ppid: 1 }];
        let mut bytes: Vec<u8> = two.iter().flat_map(|p| p.to_bytes()).collect();
        bytes.push(9);
        assert_eq!(
            decode_all(&bytes, ProcRaw::SIZE, ProcRaw::from_bytes),
            two.to_vec()
        );
    }

    #[test]
    fn addresses_in_network_order() {
        let v4 = addr_words("127.0.0.1".parse().unwrap());
        assert_eq!(v4[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(v4[1..], [0, 0, 0]);
        let v6 = addr_words("::1".parse().unwrap());
        assert_eq!(v6[3].to_ne_bytes(), [0, 0, 0, 1]);
        let key = GuardKey {
            netns: 9,
            family: 2,
            port: 80,
            addr: v4,
        };
        assert_eq!(&key.to_bytes()[16..20], &[127, 0, 0, 1]);
    }

    #[test]
    fn event_kinds_decode() {
        assert_eq!(EventKind::from_raw(1), Some(EventKind::Zero));
        assert_eq!(EventKind::from_raw(3), Some(EventKind::Held));
        assert_eq!(EventKind::from_raw(9), None);
    }
}
