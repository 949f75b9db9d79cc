//! `scrapeflood`: what an unprivileged local user can throw at handoffd's `/metrics`
//! (the tests run it as uid 65534). Every mode is bounded in count and time.
//!
//! - `listen ADDR N SECS`: holds `N` LISTEN sockets on `ADDR` (one SO_REUSEPORT group of
//!   this uid: foreign listeners on a service port, or the metrics address taken first);
//!   prints `listening N` once they are up, exits after `SECS`.
//! - `flood ADDR HOLD SCRAPERS SECS`: opens up to `HOLD` idle connections to `ADDR` and
//!   keeps them, and runs `SCRAPERS` threads scraping `/metrics` in a loop; prints
//!   `flooding held=H` once the connections are up, and at the end one line
//!   `done held=H scrapes_ok=N scrapes_failed=M`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

/// The most of anything this program opens or runs, whatever it is asked.
const MAX_COUNT: usize = 5000;
const MAX_SECS: u64 = 120;

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Hold N listeners on ADDR for SECS seconds.
    Listen {
        addr: SocketAddr,
        count: usize,
        secs: u64,
    },
    /// Hold HOLD connections to ADDR and scrape it from SCRAPERS threads for SECS seconds.
    Flood {
        addr: SocketAddr,
        hold: usize,
        scrapers: usize,
        secs: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let _ = handoff_tests::raise_fd_limit();
    match Args::parse().mode {
        Mode::Listen { addr, count, secs } => {
            let (count, secs) = (count.min(MAX_COUNT), secs.min(MAX_SECS));
            let listeners = (0..count)
                .map(|_| listener(addr))
                .collect::<anyhow::Result<Vec<_>>>()?;
            println!("listening {}", listeners.len());
            thread::sleep(Duration::from_secs(secs));
            Ok(())
        }
        Mode::Flood {
            addr,
            hold,
            scrapers,
            secs,
        } => flood(
            addr,
            hold.min(MAX_COUNT),
            scrapers.min(MAX_COUNT),
            secs.min(MAX_SECS),
        ),
    }
}

/// A listener on `addr` in this uid's SO_REUSEPORT group there.
fn listener(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).with_context(|| format!("bind {addr}"))?;
    listen(&fd, Backlog::new(128)?)?;
    Ok(TcpListener::from(fd))
}

fn flood(addr: SocketAddr, hold: usize, scrapers: usize, secs: u64) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    // The held connections: opened from a few threads, each attempt short, the whole
    // phase at most a quarter of the run (past the accept backlog, SYNs are dropped).
    let phase_end = Instant::now() + Duration::from_secs(secs / 4 + 1);
    let openers = 8;
    let held: Vec<TcpStream> = (0..openers)
        .map(|i| {
            let n = hold / openers + usize::from(i < hold % openers);
            thread::spawn(move || {
                let mut mine = Vec::with_capacity(n);
                while mine.len() < n && Instant::now() < phase_end {
                    if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                        mine.push(s);
                    }
                }
                mine
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|t| t.join().unwrap_or_default())
        .collect();
    println!("flooding held={}", held.len());
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..scrapers)
        .map(|_| {
            let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
            thread::spawn(move || {
                while Instant::now() < end {
                    let counter = if scrape(addr, end).unwrap_or(false) {
                        &ok
                    } else {
                        &failed
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        if t.join().is_err() {
            bail!("a scraper thread panicked");
        }
    }
    println!(
        "done held={} scrapes_ok={} scrapes_failed={}",
        held.len(),
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}

/// One scrape, given up at `end`; true if it answered 200.
fn scrape(addr: SocketAddr, end: Instant) -> std::io::Result<bool> {
    let left = end.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(false);
    }
    let mut s = TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(1)))?;
    let left = end
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))?;
    s.set_write_timeout(Some(left))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    Ok(&head == b"HTTP/1.1 200")
}
