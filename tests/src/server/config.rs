//! The command line of `testsrv`.

use std::net::SocketAddr;

use clap::{Parser, ValueEnum};

/// Most workers one master may run.
pub const MAX_WORKERS: u32 = 256;

/// Command line of `testsrv`.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "testsrv",
    about = "Stand-in service generation for handoff tests"
)]
pub struct ServerConfig {
    /// Generation name written in every answer (no whitespace).
    #[arg(long, value_parser = parse_name)]
    pub name: String,
    /// Address to listen on, repeatable; IPv6 as [::1]:PORT.
    #[arg(long = "listen", value_name = "ADDR:PORT", required = true)]
    pub listen: Vec<SocketAddr>,
    /// Worker processes forked by a master; 0: the process accepts itself.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_WORKERS)))]
    pub workers: u32,
    /// Who creates the listeners when there are workers.
    #[arg(long, value_enum, default_value_t = Mode::Shared)]
    pub mode: Mode,
    /// Do not set SO_REUSEPORT on the listeners.
    #[arg(long)]
    pub no_reuseport: bool,
    /// Set IPV6_V6ONLY on IPv6 listeners; without it the OS default stays.
    #[arg(long, value_name = "BOOL")]
    pub v6only: Option<bool>,
    /// Delay before answering each connection, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Fork a replacement when a worker dies.
    #[arg(long)]
    pub respawn: bool,
    /// Listen but never accept: connections stay queued on the listeners.
    #[arg(long)]
    pub no_accept: bool,
    /// Log SIGTERM but keep running (a server that ignores its retire signal).
    #[arg(long)]
    pub ignore_term: bool,
    /// Log `close NAME pid=PID ns=NS` on stderr when an accepted connection is closed (NS:
    /// CLOCK_MONOTONIC just before the close).
    #[arg(long)]
    pub log_close: bool,
    /// Listen at once, but start accepting only after this many milliseconds (a generation
    /// warming up; connections sent to it meanwhile wait in its accept queue).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub warmup_ms: u64,
    /// Hold accepted connections without a thread each: answer, keep open, never read.
    /// SIGUSR1 (to the master: forwarded to every worker) closes them all and logs
    /// `closed NAME pid=PID count=N first_ns=NS last_ns=NS`.
    #[arg(long, conflicts_with = "no_accept")]
    pub hold: bool,
    /// Make SIGTERM a graceful stop: shut the listeners (queued connections are reset, or
    /// migrated with net.ipv4.tcp_migrate_req=1), let accepted connections finish (at most
    /// 1.5 s), then exit.
    #[arg(long, conflicts_with = "ignore_term")]
    pub drain_on_term: bool,
    /// On SIGTERM shut the listeners (like nginx's master on SIGQUIT) but keep running and
    /// serving the accepted connections until SIGINT.
    #[arg(long, conflicts_with_all = ["ignore_term", "drain_on_term"])]
    pub shut_on_term: bool,
    /// Speak systemd's readiness protocol: once every listener listens and `--warmup-ms`
    /// has passed (accepting has begun), the master sends `READY=1` to `$NOTIFY_SOCKET` (a
    /// path, or `@name` for an abstract socket) and logs `notify NAME pid=PID ns=NS` (NS:
    /// CLOCK_MONOTONIC just before the send), or `notify-failed NAME pid=PID error=…`.
    #[arg(long)]
    pub notify_ready: bool,
    /// Answer HTTP: read the request head (up to the blank line, at most 8 KiB, within
    /// 2 s; otherwise close without answering), then answer `HTTP/1.1 CODE` with
    /// `X-Pid: PID`, `Connection: close` and the body `NAME\n`, and close once the client
    /// has (at most 2 s later). 200 to 599, but not 204 or 304 (which have no body).
    #[arg(long, value_name = "CODE", value_parser = parse_status, conflicts_with_all = ["hold", "no_accept"])]
    pub http_status: Option<u16>,
    /// Log `accept NAME pid=PID peer=IP:PORT` on stderr for every accepted connection.
    #[arg(long)]
    pub log_accept: bool,
}

/// Listener layout of a master with workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The master creates one listener per address; every worker accepts on all of them.
    Shared,
    /// The master creates one listener per address and worker; worker i accepts only on its
    /// own, but keeps the others open (as nginx does).
    PerWorker,
    /// Each worker creates its own listeners after the fork.
    AfterFork,
}

fn parse_status(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(204 | 304) => Err("204 and 304 responses have no body: pick another status".to_owned()),
        Ok(code @ 200..=599) => Ok(code),
        _ => Err("an HTTP status from 200 to 599".to_owned()),
    }
}

fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || s.chars().any(char::is_whitespace) {
        return Err("the name must be 1 to 64 characters without whitespace".to_owned());
    }
    Ok(s.to_owned())
}
