//! Listening, accepting and serving: the accepting threads, the `NAME PID` answer (or the
//! HTTP one), `--hold`, `--log-close`, `--log-accept`, `--drain-on-term`, and the signal
//! loop of a process that accepts.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::{ServerConfig, ServerError, http, sys_err};
use crate::sys;

/// Stack of a connection thread: it only sleeps, writes a line and reads into a small buffer.
const CONN_STACK: usize = 128 * 1024;

/// How long `--drain-on-term` waits for accepted connections to finish after SIGTERM; below
/// [`WORKER_EXIT_GRACE`](super::master::WORKER_EXIT_GRACE) so that a worker finishes before
/// its master gives up on it.
const DRAIN_GRACE: Duration = Duration::from_millis(1500);

/// Accepted connections being served (by a thread each) in this process.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Set once `--drain-on-term` shut the listeners: accept errors are then the end, not a fault.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// `--hold`: the connections this process holds, closed by SIGUSR1.
static HELD: Mutex<Vec<TcpStream>> = Mutex::new(Vec::new());

/// One listener per `--listen` address.
pub(super) fn bind_all(cfg: &ServerConfig) -> Result<Vec<TcpListener>, ServerError> {
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
    /// `--http-status`: the whole HTTP response, given after the request head.
    http: Option<Arc<[u8]>>,
    /// `--log-accept`: the name to log accepts under.
    log_accept: Option<Arc<str>>,
}

/// Starts one accepting thread per listener; answers carry the pid of the calling process.
/// With `--no-accept` each thread only holds its copy of the listener open.
pub(super) fn start_acceptors(
    cfg: &ServerConfig,
    listeners: &[TcpListener],
) -> Result<(), ServerError> {
    let serve = Serve {
        answer: format!("{} {}\n", cfg.name, std::process::id())
            .into_bytes()
            .into(),
        delay: Duration::from_millis(cfg.delay_ms),
        log_close: cfg.log_close.then(|| cfg.name.as_str().into()),
        hold: cfg.hold,
        http: cfg
            .http_status
            .map(|code| http::response(code, &cfg.name, std::process::id()).into()),
        log_accept: cfg.log_accept.then(|| cfg.name.as_str().into()),
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
        let accepted = listener.accept();
        if let (Ok((_, peer)), Some(name)) = (&accepted, &serve.log_accept) {
            log_line(&format!(
                "accept {name} pid={} peer={peer}",
                std::process::id()
            ));
        }
        match accepted {
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

/// Answers `stream` (after its request head with `--http-status`), then reads until the
/// client closes (with `--http-status` at most [`http::HTTP_TIMEOUT`] more: the answer
/// said `Connection: close`).
fn serve_connection(mut stream: TcpStream, serve: &Serve) {
    if serve.http.is_some() && http::read_head(&mut stream).is_err() {
        finish(stream, serve);
        return;
    }
    if !serve.delay.is_zero() {
        thread::sleep(serve.delay);
    }
    let answered = match &serve.http {
        Some(response) => {
            stream.write_all(response).is_ok()
                && stream.shutdown(std::net::Shutdown::Write).is_ok()
                && stream.set_read_timeout(Some(http::HTTP_TIMEOUT)).is_ok()
        }
        None => stream.write_all(&serve.answer).is_ok(),
    };
    if answered {
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
    finish(stream, serve);
}

/// Closes `stream`, logging the close with `--log-close`.
fn finish(stream: TcpStream, serve: &Serve) {
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

/// `--shut-on-term`: shuts `listeners` and leaves the accepted connections be.
fn shut(listeners: &[TcpListener]) {
    STOPPING.store(true, Ordering::SeqCst);
    for l in listeners {
        // Wakes the thread blocked in accept(2); ENOTCONN when already shut.
        let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

/// Logs a SIGTERM: `term NAME pid=PID ns=CLOCK_MONOTONIC` (plus ` ignored` when ignored).
pub(super) fn log_term(cfg: &ServerConfig) {
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
pub(super) fn log_line(line: &str) {
    let mut buf = String::with_capacity(line.len() + 1);
    buf.push_str(line);
    buf.push('\n');
    let _ = io::stderr().write_all(buf.as_bytes());
}

/// Waits for SIGTERM or SIGINT (blocked in all threads, so taken here synchronously); with
/// `--drain-on-term`, SIGTERM then drains `listeners` first. SIGUSR1 closes held connections.
pub(super) fn wait_for_term(cfg: &ServerConfig, listeners: &[TcpListener]) {
    let set = sys::handled_signals();
    loop {
        match set.wait() {
            Ok(Signal::SIGTERM) => {
                log_term(cfg);
                if cfg.drain_on_term {
                    drain(listeners);
                }
                if cfg.shut_on_term {
                    shut(listeners);
                    continue;
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
