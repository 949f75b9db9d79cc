//! Types shared by the handoff daemon, its control client and the kernel program.
//!
//! # Layout
//!
//! - [`check`]: a promote's health check (`tcp`, `http:/PATH[:STATUS]`, `https:…`).
//! - [`maps`]: the BPF map layouts, mirroring `ebpf/handoff.h` and `ebpf/drain.h`: the
//!   constants and kernel object names the daemon looks up, one mirror per record with
//!   its decoder ([`maps::records`]), one enum per counter array ([`maps::counters`]).
//! - [`proto`]: the control protocol spoken over handoffd's Unix socket: requests,
//!   responses, typed errors and the framing with its size limit.

pub mod check;
pub mod maps;
pub mod proto;
