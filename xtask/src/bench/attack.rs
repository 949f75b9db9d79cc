//! `cargo xtask bench-flood` (hidden): the attacker of the flood benchmark. The benchmark
//! starts it as uid 65534 inside its network namespace; it floods until its stdin closes or
//! `--seconds` pass, whichever comes first, then prints `done ok=N failed=N other=N peak=N`
//! and exits at once (threads blocked on the daemon are not waited for).
//!
//! Kinds: `bind-taken` binds the service's own address over and over (every call fails with
//! EADDRINUSE: the service's listeners belong to another uid); `bind-free` binds another
//! address on the same port (each succeeds, then closes); `scrape` runs `--count` clients
//! that fetch `/metrics` in a loop (`peak`: most scrapes under way at once); `hold` keeps `--count` idle connections open to the
//! metrics address, reopening those the daemon closes; `listen` holds `--count` listeners
//! on an address of the service's port (a reuseport group of its own).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, listen, setsockopt,
    socket, sockopt,
};

/// Connections one `hold` thread keeps.
const PER_HOLDER: usize = 100;
/// Connect and read deadlines of the clients: short enough to notice the end of the flood.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a `hold` thread looks for connections the daemon closed.
const HOLD_CHECK: Duration = Duration::from_millis(200);
/// A holder counts as flooding after its first pass, or after this long: a server that
/// takes few connections at a time leaves the rest of them timing out in connect().
const HOLD_READY: Duration = Duration::from_secs(2);
/// Failing binds on one socket before a fresh one (a bind that fails leaves it unbound).
const BINDS_PER_SOCKET: u32 = 1024;

/// What a flood process does.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    /// Binds of the service's own address: every one fails.
    BindTaken,
    /// Binds of another address on the service's port: every one succeeds.
    BindFree,
    /// `GET /metrics` in a loop, `--count` clients at once.
    Scrape,
    /// `--count` idle connections to the metrics address.
    Hold,
    /// `--count` listeners on `--addr`.
    Listen,
}

/// Command line of `bench-flood`.
#[derive(Debug, clap::Args)]
pub struct FloodArgs {
    /// What to flood.
    #[arg(long, value_enum)]
    kind: Kind,
    /// The address to bind, connect to or listen on.
    #[arg(long)]
    addr: SocketAddr,
    /// Threads (binds, scrapes), connections (hold) or listeners (listen).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=5_000))]
    count: u32,
    /// Stop after this long at the latest, in seconds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
}

/// Counters of a flood, printed at its end.
#[derive(Default)]
struct Counts {
    /// Binds, scrapes answered 200, connections opened, listeners.
    ok: AtomicU64,
    /// Binds refused with EADDRINUSE, scrapes without a 200 answer, failed connects.
    failed: AtomicU64,
    /// Any other error.
    other: AtomicU64,
    /// Connections held now (hold), scrapes under way (scrape).
    held: AtomicU64,
    /// Most connections held at once (hold), most scrapes under way at once (scrape).
    peak: AtomicU64,
}

/// Floods until stdin closes or `--seconds` pass; prints the counts.
pub fn run(args: &FloodArgs) -> Result<()> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising the open file limit")?;
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            stop.store(true, Ordering::Relaxed);
        });
    }
    let count = args.count as usize;
    // Small stacks: a few hundred threads that only wait on sockets.
    let spawn = |f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(f)
            .context("cannot start a flood thread")
    };
    let mut held = Vec::new();
    match args.kind {
        Kind::BindTaken | Kind::BindFree => {
            let taken = matches!(args.kind, Kind::BindTaken);
            for _ in 0..count {
                let (stop, counts, addr) = (Arc::clone(&stop), Arc::clone(&counts), args.addr);
                spawn(Box::new(move || bind_loop(addr, taken, &stop, &counts)))?;
            }
        }
        Kind::Scrape => {
            for _ in 0..count {
                let (stop, counts, addr) = (Arc::clone(&stop), Arc::clone(&counts), args.addr);
                spawn(Box::new(move || scrape_loop(addr, &stop, &counts)))?;
            }
        }
        Kind::Hold => {
            let ready = Arc::new(AtomicU64::new(0));
            let threads = count.div_ceil(PER_HOLDER);
            for t in 0..threads {
                let n = PER_HOLDER.min(count - t * PER_HOLDER);
                let (stop, counts, addr) = (Arc::clone(&stop), Arc::clone(&counts), args.addr);
                let ready = Arc::clone(&ready);
                spawn(Box::new(move || hold_loop(addr, n, &stop, &counts, &ready)))?;
            }
            // Ready once every thread has tried each of its connections once.
            while ready.load(Ordering::Relaxed) < threads as u64 && !finished(&stop, deadline) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Kind::Listen => held = listeners(args.addr, count, &counts),
    }
    say("ready")?;
    while !finished(&stop, deadline) {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    say(&format!(
        "done ok={} failed={} other={} peak={}",
        get(&counts.ok),
        get(&counts.failed),
        get(&counts.other),
        get(&counts.peak)
    ))?;
    drop(held);
    // Threads blocked on the daemon are not waited for.
    std::process::exit(0)
}

/// `count` listeners on `addr`, each counted as made or refused.
fn listeners(addr: SocketAddr, count: usize, counts: &Counts) -> Vec<OwnedFd> {
    let mut held = Vec::new();
    for _ in 0..count {
        match listener(addr) {
            Ok(fd) => {
                held.push(fd);
                counts.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    held
}

fn finished(stop: &AtomicBool, deadline: Instant) -> bool {
    stop.load(Ordering::Relaxed) || Instant::now() >= deadline
}

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// A TCP socket of `addr`'s family with SO_REUSEPORT (so that the only reason a bind of
/// the service's address fails is the other uid, and the floods' own binds share).
fn tcp_socket(addr: SocketAddr) -> nix::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    Ok(fd)
}

fn bind_to(fd: &OwnedFd, addr: SocketAddr) -> nix::Result<()> {
    match addr {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    }
}

/// Binds `addr` until stopped: on one socket while the binds fail (`taken`), on a fresh
/// socket each time while they succeed.
fn bind_loop(addr: SocketAddr, taken: bool, stop: &AtomicBool, counts: &Counts) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(fd) = tcp_socket(addr) else {
            counts.other.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        for _ in 0..if taken { BINDS_PER_SOCKET } else { 1 } {
            match bind_to(&fd, addr) {
                Ok(()) => {
                    counts.ok.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(Errno::EADDRINUSE) => counts.failed.fetch_add(1, Ordering::Relaxed),
                Err(_) => counts.other.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

/// Fetches `/metrics` from `addr` until stopped.
fn scrape_loop(addr: SocketAddr, stop: &AtomicBool, counts: &Counts) {
    while !stop.load(Ordering::Relaxed) {
        let answered = scrape(addr, counts).unwrap_or(false);
        let counter = if answered { &counts.ok } else { &counts.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        if !answered {
            // A refused connect returns at once: do not spin.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One scrape; whether it was answered `200`. Counted as under way once connected.
fn scrape(addr: SocketAddr, counts: &Counts) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    let now = counts.held.fetch_add(1, Ordering::Relaxed) + 1;
    counts.peak.fetch_max(now, Ordering::Relaxed);
    let answer = (|| {
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: handoff\r\n\r\n")?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        std::io::Result::Ok(answer)
    })();
    counts.held.fetch_sub(1, Ordering::Relaxed);
    Ok(answer?.starts_with(b"HTTP/1.1 200"))
}

/// Keeps `n` idle connections to `addr` open until stopped; bumps `ready` after its first
/// pass.
fn hold_loop(addr: SocketAddr, n: usize, stop: &AtomicBool, counts: &Counts, ready: &AtomicU64) {
    let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut first = true;
    let mut mine = 0u64;
    let started = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        for slot in &mut conns {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if first && started.elapsed() >= HOLD_READY {
                ready.fetch_add(1, Ordering::Relaxed);
                first = false;
            }
            if slot.as_ref().is_some_and(closed) {
                *slot = None;
            }
            if slot.is_none() {
                match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                {
                    Ok(s) => {
                        *slot = Some(s);
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let open = conns.iter().flatten().count() as u64;
        let now = if open >= mine {
            counts.held.fetch_add(open - mine, Ordering::Relaxed) + (open - mine)
        } else {
            counts.held.fetch_sub(mine - open, Ordering::Relaxed) - (mine - open)
        };
        mine = open;
        counts.peak.fetch_max(now, Ordering::Relaxed);
        if first {
            ready.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        std::thread::sleep(HOLD_CHECK);
    }
}

/// Whether the peer closed a non-blocking connection (or it failed).
fn closed(s: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match s.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// A listener on `addr`, in the flood's own reuseport group.
fn listener(addr: SocketAddr) -> nix::Result<OwnedFd> {
    let fd = tcp_socket(addr)?;
    bind_to(&fd, addr)?;
    listen(&fd, Backlog::new(16)?)?;
    Ok(fd)
}
