//! handoffd and handoffctl: zero-downtime restarts of any Linux network service, steered
//! in the kernel by an `sk_reuseport` program.
//!
//! # Layout
//!
//! Layers, lowest first; a module uses only modules of its own layer or below it, never
//! one above (`cargo xtask layers` checks this and that no modules import each other in
//! a cycle):
//!
//! 1. `sys` (every raw syscall and `unsafe` block) and [`logging`] (the log format for a
//!    terminal, a file or journald).
//! 2. [`config`]: services, drain settings and paths, from flags or the TOML file,
//!    checked before anything starts. Above it, a layer of its own: [`health`], one check.
//! 3. `lifecycle`: the generation lifecycle as a pure state machine (events in, effects
//!    out; no I/O, no clock). The only place that changes a generation's state.
//! 4. `discover`: processes and sockets as /proc and sock_diag show them (`diag`), the
//!    reuseport group tuple (`group`), processes held as pidfds (`members`), and a pid
//!    turned into a promote candidate (`candidate`).
//! 5. `persist`: what survives the daemon: directories root can trust (`dirs`), the
//!    generation table (`state`), the maps pinned on bpffs (`pins`).
//! 6. `kernel`: what the kernel offers (the feature check), the host check (`host`), the
//!    BPF programs and maps (`loader`, the only user of aya), the probe connection
//!    (`probe`), detaching what a service left in the kernel (`detach`).
//! 7. `runtime`: the daemon at work. `service` applies the lifecycle's effects with the
//!    kernel and the processes, `daemon` holds the table of services and answers
//!    requests, `supervise` is the event loop, `control` the Unix control socket (server
//!    and client), `metrics` Prometheus, `notify` systemd, `cleanup` `handoffd
//!    --cleanup`, and `run` starts it all.
//! 8. The binaries, `handoffd` and `handoffctl`, parse flags and call [`run`], [`cleanup`]
//!    or the [`client`].
//!
//! The public API is what the binaries need: everything else is private.

pub mod config;
mod discover;
mod health;
mod kernel;
mod lifecycle;
pub mod logging;
mod persist;
mod runtime;
mod sys;

pub use runtime::cleanup::run as cleanup;
pub use runtime::metrics::MetricsAddr;
pub use runtime::run::{Options, RunError, on_signal, run};

/// What `handoffctl` uses to talk to the daemon.
pub mod client {
    pub use crate::runtime::control::{
        CallerPidfdError, ClientError, ControlError, caller_pidfd, request, request_with_fd,
    };
}

/// Keeps the allocator compact (one malloc arena, freed memory returned): the daemon's
/// memory then follows its live data, not the peak of a tag pass or a status dump. Call
/// first thing in `main`, before any thread starts.
pub fn compact_malloc() {
    sys::compact_malloc();
}
