//! One health check on one listener: what a promote's `--check` does on a connection that
//! the kernel program has already steered to that listener.
//!
//! The caller opens the connection (a socket whose exact source the program knows, so its
//! SYN reaches the one listener under test and no other) and hands it over connected;
//! [`run`] then does what the [`CheckSpec`] asks on it: nothing more for `tcp`, a
//! `GET PATH` and its status line for `http`, the same inside TLS for `https`. Every
//! socket read and write is bounded by the deadline: none starts after it and none blocks
//! past it.
//!
//! Only the status line is read (at most [`MAX_ANSWER`] bytes, the body never). Interim
//! `1xx` answers (`100 Continue`, `103 Early Hints`) are skipped; `101` is final.

mod http;
mod tls;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use handoff_common::check::{CheckSpec, CheckSpecError};

/// The most of an answer read while looking for its status line.
pub const MAX_ANSWER: usize = 8192;

/// Why a listener failed its check. Each message is one short line that can follow
/// "listener 127.0.0.1:8080 (slot 130) failed its check: ".
#[derive(Debug, thiserror::Error)]
pub enum CheckFailure {
    /// The deadline passed before the check was done.
    #[error("no answer within {waited_ms} ms")]
    Timeout {
        /// How long the check had run when it gave up.
        waited_ms: u64,
    },
    /// The listener's side closed the connection before a whole status line.
    #[error("the connection was closed before a status line")]
    Closed,
    /// The listener's side reset the connection.
    #[error("the connection was reset")]
    Reset,
    /// The status line came, with a status the check does not take.
    #[error("status {got}, wanted {want}")]
    Status {
        /// The status answered.
        got: u16,
        /// What the check takes: `204`, or `2xx`.
        want: String,
    },
    /// The answer is not an HTTP/1 status line.
    #[error("malformed answer: {what}")]
    Malformed {
        /// What is wrong with it.
        what: &'static str,
    },
    /// The TLS handshake or a TLS record failed.
    #[error("tls: {reason}")]
    Tls {
        /// rustls's error, as text.
        reason: String,
    },
    /// Another socket error.
    #[error("socket error: {0}")]
    Io(io::Error),
    /// The spec was built by hand with a path a parsed one cannot have (one that could
    /// end the request line); nothing was sent.
    #[error("{0}")]
    Spec(CheckSpecError),
}

/// Runs `spec` on `stream`, a connection to the listener at `target` (its `Host`, and for
/// https its server name). Returns by `deadline`, give or take a scheduling delay.
pub fn run(
    spec: &CheckSpec,
    stream: TcpStream,
    target: SocketAddr,
    deadline: Instant,
) -> Result<(), CheckFailure> {
    spec.validate().map_err(CheckFailure::Spec)?;
    let mut conn = Timed::new(stream, deadline)?;
    let status = match spec {
        CheckSpec::Tcp => return conn.pending_error(),
        CheckSpec::Http { path, .. } => http::status(&mut conn, path, target),
        CheckSpec::Https { path, .. } => tls::status(conn, path, target),
    }?;
    if spec.accepts(status) {
        Ok(())
    } else {
        Err(CheckFailure::Status {
            got: status,
            want: spec.wanted(),
        })
    }
}

/// The connection, each read and write bounded by the deadline: its socket timeouts are
/// set to the time left before every call, and a call after the deadline fails with
/// `TimedOut` without touching the socket. rustls reads and writes through it too, so the
/// handshake is bounded as well.
struct Timed {
    /// The connected socket, in blocking mode.
    stream: TcpStream,
    /// When the check started, for [`CheckFailure::Timeout`]'s `waited_ms`.
    started: Instant,
    /// When the check must be over.
    deadline: Instant,
}

impl Timed {
    /// Puts `stream` in blocking mode (the timeouts bound each call; a non-blocking
    /// socket would fail every read at once).
    fn new(stream: TcpStream, deadline: Instant) -> Result<Self, CheckFailure> {
        let started = Instant::now();
        stream
            .set_nonblocking(false)
            .map_err(|e| failure(e, started))?;
        Ok(Timed {
            stream,
            started,
            deadline,
        })
    }

    /// Sets the socket's timeouts to the time left; `TimedOut` when none is.
    fn arm(&self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.set_write_timeout(Some(left))
    }

    /// An error the connection already has (a reset that came after the handshake), taken
    /// without blocking.
    fn pending_error(&self) -> Result<(), CheckFailure> {
        match self.stream.take_error() {
            Ok(None) => Ok(()),
            Ok(Some(error)) | Err(error) => Err(failure(error, self.started)),
        }
    }
}

/// What an I/O error on a check's connection means for the check started at `started`.
fn failure(error: io::Error, started: Instant) -> CheckFailure {
    use io::ErrorKind::*;
    if let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return CheckFailure::Tls {
            reason: tls.to_string(),
        };
    }
    match error.kind() {
        TimedOut | WouldBlock => CheckFailure::Timeout {
            waited_ms: millis(started.elapsed()),
        },
        ConnectionReset | ConnectionAborted => CheckFailure::Reset,
        // EPIPE: the peer's side is gone; rustls's EOF without close_notify.
        BrokenPipe | UnexpectedEof => CheckFailure::Closed,
        _ => CheckFailure::Io(error),
    }
}

/// Whole milliseconds, saturating.
fn millis(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

/// A socket timeout (`EAGAIN` once `SO_RCVTIMEO`/`SO_SNDTIMEO` runs out) becomes
/// `TimedOut`, so rustls does not take the socket for a non-blocking one.
fn timed_out(result: io::Result<usize>) -> io::Result<usize> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::ErrorKind::TimedOut.into()),
        other => other,
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        timed_out(self.stream.read(buf))
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        timed_out(self.stream.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
