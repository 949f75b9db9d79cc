//! The pre-built steering program of handoff.
//!
//! `handoff.bpf.c` is compiled by `cargo xtask build-ebpf` (clang for the bpf target) and
//! the object is committed, so that building handoff needs stable Rust alone. CI rebuilds
//! it and fails when the committed object does not match its source.

/// The ELF object holding the `sk_reuseport/migrate` program and its maps.
///
/// Aligned to 8 bytes because the ELF parser reads its headers in place.
pub static HANDOFF_BPF: &[u8] = &AlignedObject(*include_bytes!("../handoff.bpf.o")).0;

#[repr(C, align(8))]
struct AlignedObject<T: ?Sized>(T);

/// The ELF object holding the drain accounting programs (`iter/task_file` tag pass,
/// `cgroup/sock_release` countdown, `cgroup/bind4`/`bind6` watch), the discovery
/// iterators (`iter/task` process table, `iter/task_file` listeners) and their maps.
pub static DRAIN_BPF: &[u8] = &AlignedObject(*include_bytes!("../drain.bpf.o")).0;

/// The ELF object holding the guard (`cgroup/setsockopt`): only handoffd attaches or
/// detaches sk_reuseport programs on TCP sockets bound to a watched service port.
pub static GUARD_BPF: &[u8] = &AlignedObject(*include_bytes!("../guard.bpf.o")).0;

/// Every committed object, by file name (what the BTF test of `handoff-common` reads).
pub static OBJECTS: [(&str, &[u8]); 3] = [
    ("handoff.bpf.o", HANDOFF_BPF),
    ("drain.bpf.o", DRAIN_BPF),
    ("guard.bpf.o", GUARD_BPF),
];
