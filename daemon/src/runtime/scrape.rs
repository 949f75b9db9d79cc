//! The `/metrics` endpoint, which every local user may reach: it runs on plain threads of
//! its own, never on the daemon's runtime or its blocking pool, so that no scraper can
//! hold up control requests, the supervisor or a drain.
//!
//! - Connections reach `accept` only once their client has sent data
//!   (`TCP_DEFER_ACCEPT`): idle connections held open by another user wait in the kernel.
//! - At most [`WORKERS`] clients are served at a time: each worker thread blocks in
//!   `accept` on the same socket (the kernel wakes one per connection); others wait in
//!   the kernel's accept queue, which costs the daemon no fd, or are refused by the
//!   kernel when it is full.
//! - Each client gets [`READ_DEADLINE`] to send a request head of at most [`MAX_HEAD`]
//!   bytes and [`WRITE_DEADLINE`] to take the answer; a deadline, not a per-read timeout,
//!   so that a client trickling a byte at a time is dropped as surely as a silent one.
//! - The answer is built at most once per [`FRESH`] and shared by every scraper: one copy
//!   of small numbers under the daemon's lock, two socket dumps on the service port and
//!   the active generation's process tree, whatever the number of scrapers or of other
//!   users' listeners.
//! - Accept errors (EMFILE, ENFILE, ENOBUFS) back off from 10 ms to 1 s per worker and
//!   are logged at most once per [`LOG_EVERY`], with how many there were.
//! - The address taken (another user's listener, another handoffd) does not stop the
//!   daemon: one warning, then binding is retried in the background with backoff.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use handoff_common::proto::Status;

use crate::runtime::daemon::Daemon;
use crate::runtime::metrics::Metrics;

/// Clients served at the same time.
pub const WORKERS: usize = 4;
/// How long a client has to send its request head.
pub const READ_DEADLINE: Duration = Duration::from_secs(1);
/// How long a client has to take the answer.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(2);
/// The longest request head read; a scraper sends a few hundred bytes.
pub const MAX_HEAD: usize = 8192;
/// How long one answer is served to every scraper before it is built again.
pub const FRESH: Duration = Duration::from_secs(1);
/// At most one log line about accept errors per this long.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const BIND_RETRY_FIRST: Duration = Duration::from_millis(500);
const BIND_RETRY_MAX: Duration = Duration::from_secs(4);

/// What the worker threads share.
struct Shared {
    daemon: Arc<Mutex<Daemon>>,
    metrics: Metrics,
    /// The last answer (none: building it failed) and when it was built.
    cache: Mutex<Option<(Instant, Option<Arc<str>>)>>,
    /// Accept errors since the last line about them.
    accept_errors: AtomicU64,
    /// When the last line about accept errors was logged.
    last_log: Mutex<Option<Instant>>,
}

/// Serves `GET /metrics` on `addr` from threads of its own, for the daemon's life;
/// returns at once. If `addr` cannot be bound now, warns once and keeps trying.
pub fn spawn(addr: SocketAddr, daemon: Arc<Mutex<Daemon>>) -> io::Result<()> {
    let metrics = daemon
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .metrics();
    let shared = Arc::new(Shared {
        daemon,
        metrics,
        cache: Mutex::new(None),
        accept_errors: AtomicU64::new(0),
        last_log: Mutex::new(None),
    });
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || run(addr, shared))?;
    Ok(())
}

fn run(addr: SocketAddr, shared: Arc<Shared>) {
    let listener = bind_with_retry(addr);
    for i in 1..WORKERS {
        let spawned = listener.try_clone().and_then(|l| {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("metrics-{i}"))
                .spawn(move || worker(&l, &shared))
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "starting a metrics worker failed: fewer clients served at once");
        }
    }
    worker(&listener, &shared);
}

/// Binds `addr`, retrying with backoff for as long as it takes.
fn bind_with_retry(addr: SocketAddr) -> TcpListener {
    let mut wait = BIND_RETRY_FIRST;
    let mut failures = 0u64;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => {
                // An idle connection (a scraper's is never idle: it sends its request at
                // once) stays in the kernel instead of taking one of the WORKERS for
                // READ_DEADLINE; one that never sends anything is accepted after ~2 s.
                if let Err(e) = crate::sys::tcp_defer_accept(listener.as_fd(), 2) {
                    tracing::debug!(error = %e, "TCP_DEFER_ACCEPT on the metrics listener");
                }
                if failures == 0 {
                    tracing::info!(%addr, "metrics on /metrics");
                } else {
                    tracing::info!(%addr, failures, "metrics on /metrics: the address is free now");
                }
                return listener;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(%addr, error = %e, "metrics address unavailable (another user's listener or another handoffd?): steering runs without metrics, binding is retried every few seconds (--metrics-addr ADDR:PORT or off to change it)");
                }
                failures += 1;
                thread::sleep(wait);
                wait = (wait * 2).min(BIND_RETRY_MAX);
            }
        }
    }
}

fn worker(listener: &TcpListener, shared: &Shared) {
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_FIRST;
                // Per client, below debug: a flood of bad clients must not flood the log.
                if let Err(e) = answer(stream, shared) {
                    tracing::trace!(error = %e, "metrics client dropped");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                shared.accept_failed(&e);
                thread::sleep(backoff);
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

impl Shared {
    /// Counts an accept error; logs one line with the count at most once per LOG_EVERY.
    fn accept_failed(&self, e: &io::Error) {
        let errors = self.accept_errors.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_log.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            self.accept_errors.store(0, Ordering::Relaxed);
            tracing::warn!(error = %e, errors, "accepting metrics clients failed: backing off up to 1 s (logged at most every 10 s)");
        }
    }

    /// The answer to a scrape: the shared one if it is fresh, else built now (one
    /// worker builds, the others wait for it).
    fn body(&self) -> Option<Arc<str>> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((built, body)) = cache.as_ref()
            && built.elapsed() < FRESH
        {
            return body.clone();
        }
        let body = self.build().map(Arc::from);
        *cache = Some((Instant::now(), body.clone()));
        body
    }

    fn build(&self) -> Option<String> {
        // The daemon's lock for a copy of small numbers only; the dumps run without it.
        let plans = Daemon::lock(&self.daemon).metrics_plans();
        let mut status = Status::default();
        for plan in plans {
            match plan.finish_metrics() {
                Ok(s) => status.services.push(s),
                Err(e) => {
                    tracing::debug!(error = %e, "metrics: reading the sockets failed");
                    return None;
                }
            }
        }
        Some(self.metrics.render(&status))
    }
}

fn answer(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let head = read_head(&mut stream, Instant::now() + READ_DEADLINE)?;
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let (status, body): (&str, Arc<str>) =
        if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
            match shared.body() {
                Some(body) => ("200 OK", body),
                None => (
                    "500 Internal Server Error",
                    Arc::from("daemon state unavailable\n"),
                ),
            }
        } else {
            ("404 Not Found", Arc::from("only /metrics is served here\n"))
        };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let deadline = Instant::now() + WRITE_DEADLINE;
    write_by(&mut stream, head.as_bytes(), deadline)?;
    write_by(&mut stream, body.as_bytes(), deadline)?;
    stream.shutdown(Shutdown::Write)
}

/// The time left until `deadline`, or a timeout error once it has passed.
fn left(deadline: Instant) -> io::Result<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| io::Error::from(io::ErrorKind::TimedOut))
}

/// Reads up to the end of the request head (a scraper sends no body), by `deadline` and
/// within MAX_HEAD bytes.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let room = MAX_HEAD.saturating_sub(head.len()).min(buf.len());
        if room == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head over 8 KiB",
            ));
        }
        stream.set_read_timeout(Some(left(deadline)?))?;
        let n = stream.read(&mut buf[..room])?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// Writes all of `data` by `deadline`.
fn write_by(stream: &mut TcpStream, mut data: &[u8], deadline: Instant) -> io::Result<()> {
    while !data.is_empty() {
        stream.set_write_timeout(Some(left(deadline)?))?;
        match stream.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    #[test]
    fn a_trickling_client_is_dropped_at_the_deadline() {
        let (mut c, mut s) = pair();
        let t = thread::spawn(move || {
            for _ in 0..50 {
                if c.write_all(b"G").is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let e = read_head(&mut s, Instant::now() + Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(s);
        t.join().unwrap();
    }

    #[test]
    fn an_oversized_head_is_refused() {
        let (mut c, mut s) = pair();
        c.write_all(&[b'a'; MAX_HEAD + 10]).unwrap();
        let e = read_head(&mut s, Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_request_head_is_read_to_its_end() {
        let (mut c, mut s) = pair();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let head = read_head(&mut s, Instant::now() + Duration::from_secs(5)).unwrap();
        assert!(head.starts_with(b"GET /metrics "));
    }
}
