//! `testsrv`: a stand-in service generation.
//!
//! Every accepted connection gets one line `NAME PID\n` (PID: the process that accepted it),
//! then the server reads until the client closes, so the client decides how long a connection
//! lives. With `--workers N` a master forks N workers like nginx does; the listener layout
//! follows `--mode`. With `--no-accept` it listens but never accepts: connections complete
//! the handshake and stay queued in the accept queue (for tests of what happens to them when
//! the listener closes).
//!
//! For benchmarks: `--log-close` stamps every close of an accepted connection; `--warmup-ms`
//! listens at once but accepts only later (a generation warming up); `--hold` keeps
//! connections without a thread each (100 k of them would exceed `pid_max` as threads) until
//! SIGUSR1 closes them all; `--drain-on-term` makes SIGTERM a graceful stop (close the
//! listeners, finish the accepted connections, exit), as nginx's QUIT or Go's `Shutdown`.
//!
//! Lines on stderr, each `KIND NAME key=value...`, for tests to wait on:
//! `term NAME pid=PID ns=NS` (SIGTERM arrived, CLOCK_MONOTONIC; ` ignored` with --ignore-term), `worker-exit NAME pid=PID status=STATUS`,
//! `respawn NAME old=PID new=PID`, `close NAME pid=PID ns=NS` (`--log-close`: NS just before
//! the close), `closed NAME pid=PID count=N first_ns=NS last_ns=NS` (`--hold`, after SIGUSR1:
//! NS just before the first and the last close).

use std::io::{self, PipeReader, PipeWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::sys::{self, Forked};

/// Most workers one master may run.
pub const MAX_WORKERS: u32 = 256;

/// How long a master gives its workers to exit after SIGTERM before it SIGKILLs them.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(2);

/// Stack of a connection thread: it only sleeps, writes a line and reads into a small buffer.
const CONN_STACK: usize = 128 * 1024;

/// How long `--drain-on-term` waits for accepted connections to finish after SIGTERM; below
/// [`WORKER_EXIT_GRACE`] so that a worker finishes before its master gives up on it.
const DRAIN_GRACE: Duration = Duration::from_millis(1500);

/// Accepted connections being served (by a thread each) in this process.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Set once `--drain-on-term` shut the listeners: accept errors are then the end, not a fault.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// `--hold`: the connections this process holds, closed by SIGUSR1.
static HELD: Mutex<Vec<TcpStream>> = Mutex::new(Vec::new());

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

/// Why the test server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be created.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address from `--listen`.
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// A worker died or failed before it reported readiness.
    #[error("worker {pid} exited before it was ready (its error is above)")]
    WorkerNotReady {
        /// The worker's pid.
        pid: i32,
    },
    /// Any other system call failed.
    #[error("{what} failed")]
    Sys {
        /// The operation.
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn sys_err(what: &'static str) -> impl FnOnce(io::Error) -> ServerError {
    move |source| ServerError::Sys { what, source }
}

fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || s.chars().any(char::is_whitespace) {
        return Err("the name must be 1 to 64 characters without whitespace".to_owned());
    }
    Ok(s.to_owned())
}

/// The line the master prints on stdout once every listener of every process listens.
pub fn format_ready(master: u32, workers: &[u32]) -> String {
    let list: Vec<String> = workers.iter().map(u32::to_string).collect();
    format!("ready pid={master} workers={}", list.join(","))
}

/// Parses a [`format_ready`] line into the master pid and the worker pids.
pub fn parse_ready(line: &str) -> Option<(u32, Vec<u32>)> {
    let rest = line.trim_end().strip_prefix("ready pid=")?;
    let (master, workers) = rest.split_once(" workers=")?;
    let workers = match workers {
        "" => Vec::new(),
        list => list
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?,
    };
    Some((master.parse().ok()?, workers))
}

/// Runs the server until SIGTERM or SIGINT. Forks when `cfg.workers > 0`, so it must be called
/// from a single-threaded process (the `testsrv` binary); it refuses otherwise. Worker
/// processes never return from it.
pub fn run(cfg: &ServerConfig) -> Result<(), ServerError> {
    if let Err(e) = sys::raise_nofile_limit() {
        eprintln!(
            "testsrv {}: cannot raise the open file limit: {e}",
            cfg.name
        );
    }
    sys::block_handled_signals().map_err(sys_err("blocking signals"))?;
    if cfg.workers == 0 {
        let listeners = bind_all(cfg)?;
        start_acceptors(cfg, &listeners)?;
        print_ready(std::process::id(), &[]);
        wait_for_term(cfg, &listeners);
        return Ok(());
    }
    let mut master = Master::start(cfg)?;
    let pids: Vec<u32> = master
        .workers
        .iter()
        .flatten()
        .map(|p| p.as_raw().unsigned_abs())
        .collect();
    print_ready(std::process::id(), &pids);
    master.supervise()
}

fn print_ready(master: u32, workers: &[u32]) {
    let mut out = io::stdout().lock();
    // Nobody may be reading stdout (e.g. a demo in the background); serving matters more.
    let _ = writeln!(out, "{}", format_ready(master, workers)).and_then(|()| out.flush());
}

/// One listener per `--listen` address.
fn bind_all(cfg: &ServerConfig) -> Result<Vec<TcpListener>, ServerError> {
    cfg.listen
        .iter()
        .map(|&addr| {
            sys::tcp_listener(addr, !cfg.no_reuseport, cfg.v6only)
                .map_err(|source| ServerError::Listen { addr, source })
        })
        .collect()
}

/// What an accepting thread does with each connection.
#[derive(Clone)]
struct Serve {
    /// `NAME PID\n`, PID of the accepting process.
    answer: Arc<[u8]>,
    /// `--delay-ms`.
    delay: Duration,
    /// `--log-close`: the name to log closes under.
    log_close: Option<Arc<str>>,
    /// `--hold`.
    hold: bool,
}

/// Starts one accepting thread per listener; answers carry the pid of the calling process.
/// With `--no-accept` each thread only holds its copy of the listener open.
fn start_acceptors(cfg: &ServerConfig, listeners: &[TcpListener]) -> Result<(), ServerError> {
    let serve = Serve {
        answer: format!("{} {}\n", cfg.name, std::process::id())
            .into_bytes()
            .into(),
        delay: Duration::from_millis(cfg.delay_ms),
        log_close: cfg.log_close.then(|| cfg.name.as_str().into()),
        hold: cfg.hold,
    };
    let warmup = Duration::from_millis(cfg.warmup_ms);
    let no_accept = cfg.no_accept;
    for listener in listeners {
        let listener = listener.try_clone().map_err(sys_err("dup of a listener"))?;
        let serve = serve.clone();
        thread::Builder::new()
            .name("accept".to_owned())
            .spawn(move || {
                if no_accept {
                    // Holds `listener` open for good; the queue only grows.
                    loop {
                        thread::park();
                    }
                }
                thread::sleep(warmup);
                accept_loop(&listener, &serve)
            })
            .map_err(sys_err("starting an accept thread"))?;
    }
    Ok(())
}

fn accept_loop(listener: &TcpListener, serve: &Serve) {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) if serve.hold => {
                // Answer under the lock, so that a SIGUSR1 sent once the answer arrived finds
                // the connection held. A fresh socket takes the short answer without blocking.
                let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
                if stream.write_all(&serve.answer).is_ok() {
                    held.push(stream);
                }
            }
            Ok((stream, _)) => {
                let serve = serve.clone();
                LIVE.fetch_add(1, Ordering::SeqCst);
                let spawned = thread::Builder::new()
                    .stack_size(CONN_STACK)
                    .spawn(move || {
                        serve_connection(stream, &serve);
                        LIVE.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    LIVE.fetch_sub(1, Ordering::SeqCst);
                    eprintln!("testsrv: cannot start a connection thread: {e}");
                }
            }
            // `--drain-on-term` shut the listener: accepting is over.
            Err(_) if STOPPING.load(Ordering::SeqCst) => return,
            Err(e) => {
                eprintln!("testsrv: accept: {e}");
                // Out of descriptors or memory: back off instead of spinning.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve_connection(mut stream: TcpStream, serve: &Serve) {
    if !serve.delay.is_zero() {
        thread::sleep(serve.delay);
    }
    if stream.write_all(&serve.answer).is_ok() {
        let mut buf = [0u8; 512];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
    if let Some(name) = &serve.log_close {
        // Stamped and written before the close: the retire signal that the close may bring
        // can end the process before a line written after it.
        let ns = crate::load::monotonic_ns();
        log_line(&format!("close {name} pid={} ns={ns}", std::process::id()));
    }
    drop(stream);
}

/// `--hold`: closes every held connection and logs `closed ...` (nothing held: count=0).
fn close_held(cfg: &ServerConfig) {
    let held = std::mem::take(&mut *HELD.lock().unwrap_or_else(|p| p.into_inner()));
    let count = held.len();
    let first = crate::load::monotonic_ns();
    let mut last = first;
    for (i, stream) in held.into_iter().enumerate() {
        if i + 1 == count {
            last = crate::load::monotonic_ns();
        }
        drop(stream);
    }
    log_line(&format!(
        "closed {} pid={} count={count} first_ns={first} last_ns={last}",
        cfg.name,
        std::process::id()
    ));
}

/// `--drain-on-term`: shuts `listeners` (for every process holding them) and waits, at most
/// [`DRAIN_GRACE`], until no accepted connection is being served.
fn drain(listeners: &[TcpListener]) {
    STOPPING.store(true, Ordering::SeqCst);
    for l in listeners {
        // Like close(2) for the queue, but it also wakes the thread blocked in accept(2). A
        // listener that another process (the master, a worker) shut already gives ENOTCONN.
        let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
    let deadline = Instant::now() + DRAIN_GRACE;
    while LIVE.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
}

/// Logs a SIGTERM: `term NAME pid=PID ns=CLOCK_MONOTONIC` (plus ` ignored` when ignored).
fn log_term(cfg: &ServerConfig) {
    let ignored = if cfg.ignore_term { " ignored" } else { "" };
    log_line(&format!(
        "term {} pid={} ns={}{ignored}",
        cfg.name,
        std::process::id(),
        crate::load::monotonic_ns()
    ));
}

/// Writes one line to stderr with a single write(2): a master and its workers share the
/// pipe, and `eprintln!` may split a line into several writes that interleave with theirs.
fn log_line(line: &str) {
    let mut buf = String::with_capacity(line.len() + 1);
    buf.push_str(line);
    buf.push('\n');
    let _ = io::stderr().write_all(buf.as_bytes());
}

/// Waits for SIGTERM or SIGINT (blocked in all threads, so taken here synchronously); with
/// `--drain-on-term`, SIGTERM then drains `listeners` first. SIGUSR1 closes held connections.
fn wait_for_term(cfg: &ServerConfig, listeners: &[TcpListener]) {
    let set = sys::handled_signals();
    loop {
        match set.wait() {
            Ok(Signal::SIGTERM) => {
                log_term(cfg);
                if cfg.drain_on_term {
                    drain(listeners);
                }
                if !cfg.ignore_term {
                    return;
                }
            }
            Ok(Signal::SIGINT) => return,
            Ok(Signal::SIGUSR1) if cfg.hold => close_held(cfg),
            _ => {}
        }
    }
}

/// A master process and the workers it forked.
struct Master<'a> {
    /// Mode, listen addresses and respawn policy of the workers.
    cfg: &'a ServerConfig,
    /// Listener sets the master holds: one shared set, one per worker, or none (after-fork).
    sets: Vec<Vec<TcpListener>>,
    /// Worker pid by slot; `None` once reaped and not replaced.
    workers: Vec<Option<Pid>>,
}

impl<'a> Master<'a> {
    /// Creates the listeners the mode gives to the master, forks every worker and waits until
    /// all of them report readiness.
    fn start(cfg: &'a ServerConfig) -> Result<Self, ServerError> {
        let sets = match cfg.mode {
            Mode::Shared => vec![bind_all(cfg)?],
            Mode::PerWorker => (0..cfg.workers)
                .map(|_| bind_all(cfg))
                .collect::<Result<_, _>>()?,
            Mode::AfterFork => Vec::new(),
        };
        let mut master = Master {
            cfg,
            sets,
            workers: Vec::new(),
        };
        // Fork all workers first so they start in parallel, then collect their readiness.
        let mut pending = Vec::new();
        for slot in 0..cfg.workers as usize {
            let (pid, ready) = master.fork_worker(slot)?;
            master.workers.push(Some(pid));
            pending.push((pid, ready));
        }
        for (pid, ready) in pending {
            await_ready(pid, ready)?;
        }
        Ok(master)
    }

    /// Forks the worker of `slot`; returns its pid and the pipe it reports readiness on.
    fn fork_worker(&self, slot: usize) -> Result<(Pid, PipeReader), ServerError> {
        let (reader, writer) = io::pipe().map_err(sys_err("pipe"))?;
        let parent = nix::unistd::getpid();
        match sys::fork().map_err(sys_err("fork"))? {
            Forked::Parent(pid) => Ok((pid, reader)),
            Forked::Child => {
                drop(reader);
                let own = match self.cfg.mode {
                    Mode::Shared => self.sets.first(),
                    Mode::PerWorker => self.sets.get(slot),
                    Mode::AfterFork => None,
                };
                worker_main(self.cfg, parent, own.map(Vec::as_slice), writer)
            }
        }
    }

    /// Takes signals until SIGTERM or SIGINT: logs dead workers and respawns them if asked.
    fn supervise(&mut self) -> Result<(), ServerError> {
        let set = sys::handled_signals();
        loop {
            match set.wait() {
                Ok(Signal::SIGCHLD) => self.reap_and_respawn()?,
                Ok(Signal::SIGTERM) => {
                    log_term(self.cfg);
                    if !self.cfg.ignore_term {
                        break;
                    }
                }
                Ok(Signal::SIGINT) => break,
                Ok(Signal::SIGUSR1) => {
                    for pid in self.workers.iter().flatten() {
                        let _ = kill(*pid, Signal::SIGUSR1);
                    }
                }
                _ => {}
            }
        }
        self.stop_workers();
        Ok(())
    }

    fn reap_and_respawn(&mut self) -> Result<(), ServerError> {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(()),
                Ok(status) => status,
                Err(e) => return Err(sys_err("waitpid")(e.into())),
            };
            let (pid, how) = match status {
                WaitStatus::Exited(pid, code) => (pid, format!("exited({code})")),
                WaitStatus::Signaled(pid, sig, _) => (pid, format!("killed({sig})")),
                _ => continue,
            };
            let name = &self.cfg.name;
            log_line(&format!("worker-exit {name} pid={pid} status={how}"));
            let Some(slot) = self.workers.iter().position(|w| *w == Some(pid)) else {
                continue;
            };
            self.workers[slot] = None;
            if self.cfg.respawn {
                let (new, ready) = self.fork_worker(slot)?;
                self.workers[slot] = Some(new);
                match await_ready(new, ready) {
                    Ok(()) => log_line(&format!("respawn {name} old={pid} new={new}")),
                    Err(e) => {
                        // Out of its slot, it is reaped on the next SIGCHLD but not respawned:
                        // a worker that cannot start would otherwise be respawned forever.
                        self.workers[slot] = None;
                        eprintln!("testsrv {name}: {e}");
                    }
                }
            }
        }
    }

    /// SIGTERMs every worker and reaps them, leaving the stragglers to `Drop`.
    fn stop_workers(&mut self) {
        for pid in self.workers.iter().flatten() {
            let _ = kill(*pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + WORKER_EXIT_GRACE;
        while self.workers.iter().any(Option::is_some) && Instant::now() < deadline {
            for worker in &mut self.workers {
                if let Some(pid) = *worker
                    && !matches!(
                        waitpid(pid, Some(WaitPidFlag::WNOHANG)),
                        Ok(WaitStatus::StillAlive)
                    )
                {
                    *worker = None;
                }
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Master<'_> {
    /// Workers must never outlive a master that failed or stopped.
    fn drop(&mut self) {
        for pid in self.workers.iter().flatten() {
            let _ = kill(*pid, Signal::SIGKILL);
            let _ = waitpid(*pid, None);
        }
    }
}

/// Waits for the one byte a worker writes once it listens; EOF means it died before.
fn await_ready(pid: Pid, mut ready: PipeReader) -> Result<(), ServerError> {
    let mut byte = [0u8; 1];
    match ready.read(&mut byte) {
        Ok(1) => Ok(()),
        _ => Err(ServerError::WorkerNotReady { pid: pid.as_raw() }),
    }
}

/// Body of a forked worker: accept on `own` (or on new listeners), report readiness, serve
/// until SIGTERM. Never returns.
fn worker_main(
    cfg: &ServerConfig,
    parent: Pid,
    own: Option<&[TcpListener]>,
    mut ready: PipeWriter,
) -> ! {
    let mut created = Vec::new();
    let started = (|| {
        sys::die_with_parent(parent).map_err(sys_err("PR_SET_PDEATHSIG"))?;
        let listeners = match own {
            Some(listeners) => listeners,
            None => {
                created = bind_all(cfg)?;
                &created
            }
        };
        start_acceptors(cfg, listeners)?;
        ready
            .write_all(&[1])
            .map_err(sys_err("reporting readiness"))
    })();
    if let Err(e) = started {
        eprintln!(
            "testsrv {} worker {}: {}",
            cfg.name,
            std::process::id(),
            error_chain(&e)
        );
        std::process::exit(1);
    }
    drop(ready);
    wait_for_term(cfg, own.unwrap_or(&created));
    std::process::exit(0);
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use clap::{CommandFactory, Parser};
    use nix::sys::signal::Signal;

    use super::*;
    use crate::load::{self, LoadConfig, LoadReport};
    use crate::{Proc, Stream, free_port};

    #[test]
    fn cli_is_consistent() {
        ServerConfig::command().debug_assert();
    }

    #[test]
    fn cli_parses_every_option() {
        let cfg = ServerConfig::try_parse_from([
            "testsrv",
            "--name",
            "A",
            "--listen",
            "127.0.0.1:1",
            "--listen",
            "[::1]:2",
            "--workers",
            "3",
            "--mode",
            "per-worker",
            "--no-reuseport",
            "--v6only",
            "false",
            "--delay-ms",
            "5",
            "--respawn",
            "--no-accept",
        ])
        .expect("valid command line");
        assert_eq!(
            cfg.listen,
            ["127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap()]
        );
        assert_eq!(
            (cfg.workers, cfg.mode, cfg.v6only),
            (3, Mode::PerWorker, Some(false))
        );
        assert!(cfg.no_reuseport && cfg.respawn && cfg.no_accept && cfg.delay_ms == 5);

        let cfg = ServerConfig::try_parse_from(["testsrv", "--name", "B", "--listen", "[::]:9"])
            .expect("defaults");
        assert_eq!((cfg.workers, cfg.mode, cfg.v6only), (0, Mode::Shared, None));
        assert!(!cfg.no_reuseport && !cfg.respawn && !cfg.no_accept && cfg.delay_ms == 0);
    }

    #[test]
    fn cli_rejects_bad_input() {
        for args in [
            &["testsrv", "--name", "A"][..],
            &["testsrv", "--name", "A B", "--listen", "127.0.0.1:1"],
            &["testsrv", "--name", "A", "--listen", "::1:1"],
            &[
                "testsrv",
                "--name",
                "A",
                "--listen",
                "127.0.0.1:1",
                "--workers",
                "257",
            ],
            &[
                "testsrv",
                "--name",
                "A",
                "--listen",
                "127.0.0.1:1",
                "--mode",
                "prefork",
            ],
        ] {
            assert!(
                ServerConfig::try_parse_from(args).is_err(),
                "{args:?} accepted"
            );
        }
    }

    #[test]
    fn ready_line_round_trips() {
        assert_eq!(format_ready(7, &[]), "ready pid=7 workers=");
        assert_eq!(format_ready(7, &[8, 9]), "ready pid=7 workers=8,9");
        assert_eq!(parse_ready("ready pid=7 workers=\n"), Some((7, vec![])));
        assert_eq!(
            parse_ready("ready pid=7 workers=8,9"),
            Some((7, vec![8, 9]))
        );
        assert_eq!(parse_ready("ready pid=7"), None);
        assert_eq!(parse_ready("ready pid=7 workers=8,x"), None);
    }

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], free_port()))
    }

    fn load(addr: SocketAddr, count: u64) -> LoadReport {
        let mut cfg = LoadConfig::new(addr, 8);
        cfg.count = Some(count);
        load::run(&cfg, None)
    }

    /// True once `pid` no longer runs (missing, or a zombie left to a non-reaping init).
    fn gone(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
        }
    }

    fn assert_gone(pids: &[u32]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pids.iter().all(|&p| gone(p)) {
            assert!(Instant::now() < deadline, "processes left behind: {pids:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn single_process_answers_and_exits_on_sigterm() {
        let addr = loopback();
        let mut srv = Proc::spawn_testsrv(&["--name", "solo", "--listen", &addr.to_string()]);
        assert!(srv.workers.is_empty());
        let report = load(addr, 50);
        assert_eq!(
            (report.attempts, report.ok, report.failures.total()),
            (50, 50, 0),
            "{report:?}"
        );
        assert_eq!(report.by_name, [("solo".to_owned(), 50)].into());
        assert_eq!(report.by_pid, [(srv.pid, 50)].into());

        srv.signal(Signal::SIGTERM);
        let status = srv
            .wait_exit(Duration::from_secs(5))
            .expect("testsrv exits on SIGTERM");
        assert!(status.success(), "{status}");
        let term = format!("term solo pid={}", srv.pid);
        assert!(
            srv.wait_line(Stream::Stderr, &term, Duration::from_secs(5))
                .is_some()
        );
    }

    fn workers_answer(mode: &str, every_worker: bool) {
        let addr = loopback();
        let args = [
            "--name",
            mode,
            "--listen",
            &addr.to_string(),
            "--workers",
            "2",
            "--mode",
            mode,
        ];
        let srv = Proc::spawn_testsrv(&args);
        assert_eq!(srv.workers.len(), 2);
        let report = load(addr, 200);
        assert_eq!((report.ok, report.failures.total()), (200, 0), "{report:?}");
        assert_eq!(report.by_name, [(mode.to_owned(), 200)].into());
        for pid in report.by_pid.keys() {
            assert!(
                srv.workers.contains(pid),
                "{pid} is no worker of {:?}",
                srv.workers
            );
        }
        if every_worker {
            for pid in &srv.workers {
                assert!(
                    report.by_pid.contains_key(pid),
                    "worker {pid} never answered: {report:?}"
                );
            }
        }
        let pids: Vec<u32> = srv.workers.iter().copied().chain([srv.pid]).collect();
        drop(srv);
        assert_gone(&pids);
    }

    #[test]
    fn shared_workers_answer() {
        // One listener: how the kernel spreads connections over the accepting workers is its
        // business, so only check that workers answer.
        workers_answer("shared", false);
    }

    #[test]
    fn per_worker_listeners_all_answer() {
        workers_answer("per-worker", true);
    }

    #[test]
    fn after_fork_listeners_all_answer() {
        workers_answer("after-fork", true);
    }

    #[test]
    fn dead_worker_is_respawned() {
        let addr = loopback();
        let args = [
            "--name",
            "R",
            "--listen",
            &addr.to_string(),
            "--workers",
            "2",
        ];
        let srv =
            Proc::spawn_testsrv(&[&args[..], &["--mode", "after-fork", "--respawn"]].concat());
        let dead = srv.workers[0];
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(dead as i32), Signal::SIGKILL)
            .expect("kill a worker");
        let line = srv
            .wait_line(
                Stream::Stderr,
                &format!("respawn R old={dead} new="),
                Duration::from_secs(5),
            )
            .expect("the worker is respawned");
        let new: u32 = line
            .rsplit_once("new=")
            .and_then(|(_, p)| p.parse().ok())
            .expect("new pid");
        assert!(
            srv.lines(Stream::Stderr)
                .iter()
                .any(|l| l.starts_with(&format!("worker-exit R pid={dead} ")))
        );
        let report = load(addr, 200);
        assert_eq!((report.ok, report.failures.total()), (200, 0), "{report:?}");
        assert!(
            report.by_pid.contains_key(&new) && !report.by_pid.contains_key(&dead),
            "{report:?}"
        );
        let pids = [srv.pid, srv.workers[1], new];
        drop(srv);
        assert_gone(&pids);
    }

    #[test]
    fn worker_failing_to_listen_fails_the_master() {
        // Without SO_REUSEPORT the second worker's bind fails.
        let addr = loopback().to_string();
        let mut srv = Proc::spawn(
            std::process::Command::new(crate::bin_path("testsrv")).args([
                "--name",
                "F",
                "--listen",
                &addr,
                "--workers",
                "2",
                "--mode",
                "after-fork",
                "--no-reuseport",
            ]),
        );
        let status = srv
            .wait_exit(Duration::from_secs(10))
            .expect("the master gives up");
        assert_eq!(status.code(), Some(1));
        let stderr = srv.lines(Stream::Stderr).join("\n");
        assert!(
            stderr.contains("cannot listen on") && stderr.contains("exited before it was ready"),
            "{stderr}"
        );
        assert!(
            srv.lines(Stream::Stdout).is_empty(),
            "ready printed despite the failure"
        );
    }

    #[test]
    fn no_accept_leaves_connections_queued() {
        let addr = loopback();
        let _srv =
            Proc::spawn_testsrv(&["--name", "Q", "--listen", &addr.to_string(), "--no-accept"]);
        // The kernel completes the handshake; nobody accepts, so no answer ever comes.
        let mut stream = std::net::TcpStream::connect(addr).expect("the handshake completes");
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("read timeout");
        let err = stream
            .read(&mut [0u8; 16])
            .expect_err("no answer from a server that never accepts");
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{err}"
        );
    }

    #[test]
    fn ipv6_listener_with_v6only() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("skipped: no IPv6 loopback");
            return;
        }
        let port = free_port();
        let addr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
        let _srv = Proc::spawn_testsrv(&[
            "--name",
            "six",
            "--listen",
            &addr.to_string(),
            "--v6only",
            "true",
        ]);
        let (name, _) = load::connect_once(addr, Duration::from_secs(2)).expect("answer over IPv6");
        assert_eq!(name, "six");
    }

    #[test]
    fn cli_parses_the_benchmark_flags() {
        let cfg = ServerConfig::try_parse_from([
            "testsrv",
            "--name",
            "A",
            "--listen",
            "127.0.0.1:1",
            "--log-close",
            "--warmup-ms",
            "250",
            "--hold",
            "--drain-on-term",
        ])
        .expect("valid command line");
        assert!(cfg.log_close && cfg.hold && cfg.drain_on_term && cfg.warmup_ms == 250);
        let base = ["testsrv", "--name", "A", "--listen", "127.0.0.1:1"];
        for extra in [
            &["--hold", "--no-accept"],
            &["--drain-on-term", "--ignore-term"],
        ] {
            let args = [&base[..], extra].concat();
            assert!(
                ServerConfig::try_parse_from(&args).is_err(),
                "{args:?} accepted"
            );
        }
    }

    /// The `ns=` value of a stderr line.
    fn ns_field(line: &str, key: &str) -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(key)?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    }

    #[test]
    fn log_close_stamps_the_close() {
        let addr = loopback();
        let srv =
            Proc::spawn_testsrv(&["--name", "L", "--listen", &addr.to_string(), "--log-close"]);
        let (stream, name, pid) = load::hold(addr).expect("an answer");
        assert_eq!((name.as_str(), pid), ("L", srv.pid));
        let before = load::monotonic_ns();
        drop(stream);
        let line = srv
            .wait_line(
                Stream::Stderr,
                &format!("close L pid={} ", srv.pid),
                Duration::from_secs(5),
            )
            .expect("the close is logged");
        let ns = ns_field(&line, "ns=");
        assert!(
            ns >= before,
            "close stamped at {ns}, before the client closed at {before}"
        );
    }

    #[test]
    fn warmup_delays_accepting() {
        let addr = loopback();
        let _srv = Proc::spawn_testsrv(&[
            "--name",
            "W",
            "--listen",
            &addr.to_string(),
            "--warmup-ms",
            "400",
        ]);
        // Listening at once: the handshake completes, the answer waits for the warm-up.
        let started = Instant::now();
        let (name, _) = load::connect_once(addr, Duration::from_secs(5)).expect("answered");
        assert_eq!(name, "W");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200),
            "answered after {waited:?}"
        );
    }

    #[test]
    fn hold_closes_every_connection_on_sigusr1() {
        let addr = loopback();
        let srv = Proc::spawn_testsrv(&[
            "--name",
            "H",
            "--listen",
            &addr.to_string(),
            "--workers",
            "2",
            "--mode",
            "per-worker",
            "--hold",
        ]);
        let mut held: Vec<TcpStream> = (0..6)
            .map(|_| load::hold(addr).expect("an answer").0)
            .collect();
        srv.signal(Signal::SIGUSR1);
        let lines = srv
            .wait_lines(Stream::Stderr, "closed H pid=", 2, Duration::from_secs(5))
            .expect("each worker closes its connections");
        let count: u64 = lines.iter().map(|l| ns_field(l, "count=")).sum();
        assert_eq!(count, 6, "{lines:?}");
        for line in &lines {
            assert!(
                ns_field(line, "last_ns=") >= ns_field(line, "first_ns="),
                "{line}"
            );
        }
        for stream in &mut held {
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("read timeout");
            assert_eq!(stream.read(&mut [0u8; 8]).expect("EOF"), 0, "not closed");
        }
    }

    #[test]
    fn drain_on_term_refuses_new_and_finishes_accepted_connections() {
        let addr = loopback();
        let mut srv = Proc::spawn_testsrv(&[
            "--name",
            "D",
            "--listen",
            &addr.to_string(),
            "--drain-on-term",
        ]);
        let (stream, _, _) = load::hold(addr).expect("an answer");
        srv.signal(Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match load::connect_once(addr, Duration::from_secs(1)) {
                Err(load::FailureKind::Refused) => break,
                other => assert!(Instant::now() < deadline, "still accepting: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            srv.wait_exit(Duration::from_millis(100)).is_none(),
            "exited with a connection still open"
        );
        drop(stream);
        let status = srv
            .wait_exit(Duration::from_secs(5))
            .expect("exits once the connection is done");
        assert!(status.success(), "{status}");
    }
}
