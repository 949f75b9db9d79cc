//! handoffd and handoffctl: zero-downtime restarts of any Linux network service, steered
//! in the kernel by an `sk_reuseport` program.
//!
//! # Layout
//!
//! - [`config`]: services and paths, checked before anything starts.
//! - [`cleanup`]: `handoffd --cleanup`.
//! - [`daemon`]: the daemon's table of services and its answer to each request.
//! - [`control`]: the Unix control socket: binding it safely, peer credentials, framing.
//! - [`generation`]: services and generations; the only place that changes them
//!   (promote, rollback, retirement).
//! - [`candidate`]: turns a pid into listeners in the service's groups, or a refusal.
//! - [`group`]: the kernel's reuseport group tuple.
//! - [`kernel`]: what the kernel offers, and the one-line refusal when it lacks a feature.
//! - [`host`]: the start-up check that handoffd runs on the host: its pid namespace, the
//!   real cgroup v2 root, the host's bpffs.
//! - [`members`]: processes held as pidfds.
//! - [`loader`]: the steering program and its maps (the only module using aya).
//! - [`probe`]: the probe connection that shows what the kernel chooses.
//! - [`discover`], [`diag`]: /proc and sock_diag.
//! - [`dirs`]: directories root can trust, and files in them opened without following
//!   symlinks.
//! - [`state`], [`pins`]: what survives the daemon: the generation table in the state
//!   directory, the maps pinned on the host's bpffs.
//! - [`logging`]: the log format for a terminal, a file or journald (priority prefixes).
//! - [`notify`]: systemd's READY/STATUS notifications.
//! - [`metrics`]: Prometheus metrics and their HTTP endpoint.
//! - [`supervise`]: the event loop for drain events, member exits and deadlines.
//! - `sys`: every raw syscall and `unsafe` block.

pub mod candidate;
pub mod cleanup;
pub mod config;
pub mod control;
pub mod daemon;
pub mod diag;
pub mod dirs;
pub mod discover;
pub mod generation;
pub mod group;
pub mod host;
pub mod kernel;
pub mod lifecycle;
pub mod loader;
pub mod logging;
pub mod members;
pub mod metrics;
pub mod notify;
pub mod pins;
pub mod probe;
pub mod run;
pub mod state;
pub mod supervise;
mod sys;

pub use run::run;

/// Keeps the allocator compact (one malloc arena, freed memory returned): the daemon's
/// memory then follows its live data, not the peak of a tag pass or a status dump. Call
/// first thing in `main`, before any thread starts.
pub fn compact_malloc() {
    sys::compact_malloc();
}

/// Raises the soft open-file limit to the hard one (a pidfd per member, sockets of every
/// generation); returns (soft limit before, soft limit now).
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    sys::raise_nofile_limit()
}
