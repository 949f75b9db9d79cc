//! `--http` attempts: one request each, on kept-alive connections that are reopened, like a
//! client pool's, when the server closed them while idle.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};

use super::http_response::{HttpResponse, first_line, parse_head, parse_response};
use super::{Answer, FailureKind, LoadReport, remaining};

/// A kept-alive `--http` connection and the requests it has carried.
pub(super) struct HttpConn {
    stream: TcpStream,
    sent: u32,
}

/// One `--http` attempt: one request on the client's kept-alive connection, or on a new one
/// when there is none or the server closed it while idle (counted in `report.reopened`;
/// a request hit by the keep-alive race is counted in `report.keepalive_race` and, with
/// `retry`, sent once more on a new connection before the same deadline). The connection is
/// kept for the next attempt only after a full 200 response, when neither side asked to
/// close it.
pub(super) fn http_attempt(
    conn: &mut Option<HttpConn>,
    addr: SocketAddr,
    timeout: Duration,
    per_connection: u32,
    retry: bool,
    report: &mut LoadReport,
) -> Result<Answer, FailureKind> {
    let started = Instant::now();
    let deadline = started + timeout;
    if conn.as_ref().is_some_and(|c| closed_by_peer(&c.stream)) {
        // What a browser or an HTTP client pool does with a pooled connection found closed:
        // use a new one. No request was sent on it, so nothing was lost.
        *conn = None;
        report.reopened += 1;
    }
    let mut c = match conn.take() {
        Some(c) => c,
        None => HttpConn {
            stream: connect(addr, deadline)?,
            sent: 0,
        },
    };
    let reused = c.sent > 0;
    c.sent += 1;
    let mut last = c.sent >= per_connection;
    let head = match http_exchange(&c.stream, last, deadline) {
        Ok(head) => head,
        Err((kind, answered)) => {
            // The keep-alive race: the server closed (or reset) the reused connection without
            // a byte of answer, so it never processed the request.
            let race = reused && !answered && matches!(kind, FailureKind::Reset | FailureKind::Eof);
            if !race {
                return Err(kind);
            }
            report.keepalive_race += 1;
            if !retry {
                return Err(kind);
            }
            // RFC 9112 §9.3.1: a client may send an idempotent request again on a new
            // connection when its connection closed prematurely. Once; the retry's outcome,
            // whatever it is, is the attempt's.
            c = HttpConn {
                stream: connect(addr, deadline)?,
                sent: 1,
            };
            last = c.sent >= per_connection;
            http_exchange(&c.stream, last, deadline).map_err(|(kind, _)| kind)?
        }
    };
    let latency = started.elapsed();
    if head.status != 200 {
        return Err(FailureKind::Status);
    }
    let name = first_line(&head.body).ok_or(FailureKind::Eof)?;
    if !last && !head.close && !head.extra {
        *conn = Some(c);
    }
    Ok(Answer {
        name,
        pid: head.pid,
        latency,
    })
}

/// Connects before `deadline`, with Nagle off (requests are one small write each).
fn connect(addr: SocketAddr, deadline: Instant) -> Result<TcpStream, FailureKind> {
    let stream =
        TcpStream::connect_timeout(&addr, remaining(deadline)?).map_err(|e| FailureKind::of(&e))?;
    stream.set_nodelay(true).map_err(|e| FailureKind::of(&e))?;
    Ok(stream)
}

/// Whether the server has closed (or reset, or unexpectedly written to) an idle connection:
/// a non-blocking peek that finds anything but "no data yet".
fn closed_by_peer(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    !matches!(
        recv(
            stream.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        ),
        Err(Errno::EAGAIN)
    )
}

/// The request of [`http_attempt`]: `Connection: close` on the last one of a connection.
fn http_request(last: bool) -> &'static [u8] {
    if last {
        b"GET / HTTP/1.1\r\nHost: handoff\r\nConnection: close\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: handoff\r\nConnection: keep-alive\r\n\r\n"
    }
}

/// Sends one request and reads its full response, both before `deadline`. A response that
/// is not 200 is returned as soon as its head is read (its body does not matter). A failure
/// comes with whether any byte of the answer had arrived.
fn http_exchange(
    mut stream: &TcpStream,
    last: bool,
    deadline: Instant,
) -> Result<HttpResponse, (FailureKind, bool)> {
    let mut buf = Vec::with_capacity(512);
    let fail = |buf: &Vec<u8>, kind| (kind, !buf.is_empty());
    let io_fail = |buf: &Vec<u8>, e: io::Error| (FailureKind::of(&e), !buf.is_empty());
    let left = |buf: &Vec<u8>| remaining(deadline).map_err(|kind| fail(buf, kind));
    stream
        .set_write_timeout(Some(left(&buf)?))
        .map_err(|e| io_fail(&buf, e))?;
    stream
        .write_all(http_request(last))
        .map_err(|e| io_fail(&buf, e))?;
    let mut chunk = [0u8; 4096];
    loop {
        stream
            .set_read_timeout(Some(left(&buf)?))
            .map_err(|e| io_fail(&buf, e))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(fail(&buf, FailureKind::Eof)),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                match parse_head(&buf) {
                    Err(_) => return Err(fail(&buf, FailureKind::Eof)),
                    Ok(None) => {}
                    Ok(Some(head)) if head.status != 200 => {
                        return Ok(HttpResponse::from_head(head, Vec::new(), false));
                    }
                    Ok(Some(_)) => match parse_response(&buf) {
                        Err(_) => return Err(fail(&buf, FailureKind::Eof)),
                        Ok(None) => {}
                        Ok(Some(response)) => return Ok(response),
                    },
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_fail(&buf, e)),
        }
    }
}

/// One `--http` request on a new connection (`Connection: close`): the generation name and
/// the `X-Pid` header. For tests polling an HTTP server.
pub fn http_once(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(String, Option<u32>), FailureKind> {
    let mut conn = None;
    let mut report = LoadReport::default();
    http_attempt(&mut conn, addr, timeout, 1, false, &mut report).map(|a| (a.name, a.pid))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::thread;

    use super::*;
    use crate::load::{LoadConfig, run};

    /// What [`tiny_http_then`] does after its answers on a connection.
    #[derive(Clone, Copy)]
    enum After {
        /// Close the connection while it is idle.
        Close,
        /// Wait for the next request, read it, close without answering (the client sees EOF).
        ReadAndClose,
        /// Wait for the next request and close without reading it (the kernel resets).
        CloseUnread,
    }

    /// A minimal HTTP server on a thread: each connection gets `response` for each of up to
    /// `per_connection` requests, then is closed by the server (idle, after a response).
    /// Returns its address and the count of accepted connections.
    fn tiny_http(response: &'static str, per_connection: usize) -> (SocketAddr, Arc<AtomicU64>) {
        tiny_http_then(response, per_connection, After::Close)
    }

    /// [`tiny_http`], doing `after` once the answers are given.
    fn tiny_http_then(
        response: &'static str,
        per_connection: usize,
        after: After,
    ) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&accepted);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    for _ in 0..per_connection {
                        let end = loop {
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break end + 4;
                            }
                            match stream.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        buf.drain(..end);
                        if stream.write_all(response.as_bytes()).is_err() {
                            return;
                        }
                    }
                    match after {
                        After::Close => {}
                        After::ReadAndClose => {
                            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                                match stream.read(&mut chunk) {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                }
                            }
                        }
                        After::CloseUnread => {
                            let _ = stream.peek(&mut chunk);
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn http_cfg(addr: SocketAddr, per_connection: u32, count: u64) -> LoadConfig {
        let mut cfg = LoadConfig::new(addr, 1);
        cfg.http = true;
        cfg.requests_per_connection = per_connection;
        cfg.count = Some(count);
        cfg
    }

    const OK_200: &str =
        "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Pid: 7\r\nConnection: keep-alive\r\n\r\ngen\n";

    #[test]
    fn http_keeps_connections_alive() {
        let (addr, accepted) = tiny_http(OK_200, usize::MAX);
        assert_eq!(
            http_once(addr, Duration::from_secs(2)),
            Ok(("gen".to_owned(), Some(7)))
        );
        let report = run(&http_cfg(addr, 5, 20), None);
        assert_eq!(
            (report.ok, report.failures.total(), report.reopened),
            (20, 0, 0),
            "{report:?}"
        );
        assert_eq!(report.by_name, [("gen".to_owned(), 20)].into());
        assert_eq!(report.by_pid, [(7, 20)].into());
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1 + 4,
            "http_once, then 20 requests over connections of 5"
        );

        // One request per connection: a connection each.
        let (addr, accepted) = tiny_http(OK_200, usize::MAX);
        let report = run(&http_cfg(addr, 1, 10), None);
        assert_eq!((report.ok, report.failures.total()), (10, 0));
        assert_eq!(accepted.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn http_reopens_connections_the_server_closed_while_idle() {
        // The server closes each connection after 2 answers, without saying so: the client
        // finds it closed before its next request and opens another, failing nothing.
        let (addr, accepted) = tiny_http(OK_200, 2);
        let mut cfg = http_cfg(addr, 5, 20);
        cfg.hold_ms = 20; // time for the server's FIN to arrive before the next request
        let report = run(&cfg, None);
        assert_eq!(
            (report.ok, report.failures.total(), report.reopened),
            (20, 0, 9),
            "{report:?}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 10);

        // A server that says `Connection: close` is not asked again on that connection.
        let close = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\ngen\n";
        let (addr, accepted) = tiny_http(close, 1);
        let report = run(&http_cfg(addr, 5, 6), None);
        assert_eq!(
            (report.ok, report.failures.total(), report.reopened),
            (6, 0, 0),
            "{report:?}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 6);
        assert!(report.by_pid.is_empty(), "no X-Pid, no pid");
    }

    #[test]
    fn http_failures_are_classified() {
        let (addr, _) = tiny_http(
            "HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy",
            usize::MAX,
        );
        let report = run(&http_cfg(addr, 3, 6), None);
        assert_eq!((report.ok, report.failures.status), (0, 6), "{report:?}");
        assert_eq!(
            http_once(addr, Duration::from_secs(2)),
            Err(FailureKind::Status)
        );

        // The request was sent and the server closed without an answer.
        let (addr, _) = tiny_http("", 1);
        let report = run(&http_cfg(addr, 3, 6), None);
        assert_eq!((report.ok, report.failures.eof), (0, 6), "{report:?}");
        assert_eq!(report.keepalive_race, 0, "new connections: no race");
    }

    #[test]
    fn http_keepalive_races_are_counted() {
        // Requests sent on a reused connection which the server closes or resets instead of
        // answering: the keep-alive race, counted as such (and as failures).
        for (after, kind) in [
            (After::ReadAndClose, FailureKind::Eof),
            (After::CloseUnread, FailureKind::Reset),
        ] {
            let (addr, accepted) = tiny_http_then(OK_200, 1, after);
            let report = run(&http_cfg(addr, 5, 6), None);
            assert_eq!(
                (
                    report.ok,
                    report.failures.of_kind(kind),
                    report.failures.total()
                ),
                (3, 3, 3),
                "{kind}: {report:?}"
            );
            assert_eq!((report.keepalive_race, report.reopened), (3, 0), "{kind}");
            assert_eq!(accepted.load(Ordering::SeqCst), 3);
        }
        // With the retry, each such request is sent once more on a new connection, which
        // answers: no failure, each race counted.
        for after in [After::ReadAndClose, After::CloseUnread] {
            let (addr, accepted) = tiny_http_then(OK_200, 1, after);
            let mut cfg = http_cfg(addr, 5, 6);
            cfg.retry_keepalive_race = true;
            let report = run(&cfg, None);
            assert_eq!(
                (report.ok, report.failures.total(), report.keepalive_race),
                (6, 0, 5),
                "{report:?}"
            );
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                6,
                "one connection per retry"
            );
        }
    }

    #[test]
    fn http_keepalive_race_retry_is_made_once() {
        // A retry is made once and may fail: its failure is the attempt's. The server answers
        // one request, stops listening, then drops the next one unread.
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = listener.local_addr().expect("address");
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accepting");
            let mut chunk = [0u8; 1024];
            let mut buf = Vec::new();
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut chunk).expect("reading the request");
                buf.extend_from_slice(&chunk[..n]);
            }
            stream.write_all(OK_200.as_bytes()).expect("answering");
            drop(listener);
            let _ = stream.peek(&mut chunk);
        });
        let mut cfg = http_cfg(addr, 5, 2);
        cfg.retry_keepalive_race = true;
        let report = run(&cfg, None);
        server.join().expect("server thread");
        assert_eq!(
            (
                report.ok,
                report.failures.refused,
                report.failures.total(),
                report.keepalive_race
            ),
            (1, 1, 1, 1),
            "{report:?}"
        );

        // On a new connection it is a plain failure, never retried.
        let (addr, _) = tiny_http_then(OK_200, 0, After::CloseUnread);
        let mut cfg = http_cfg(addr, 5, 3);
        cfg.retry_keepalive_race = true;
        let report = run(&cfg, None);
        assert_eq!(
            (report.failures.reset, report.keepalive_race),
            (3, 0),
            "{report:?}"
        );
    }

    #[test]
    fn http_once_failures_are_classified() {
        // A truncated answer.
        let (addr, _) = tiny_http("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\ng", 1);
        assert_eq!(
            http_once(addr, Duration::from_secs(2)),
            Err(FailureKind::Eof)
        );
        // A 200 with an empty body names no generation.
        let (addr, _) = tiny_http("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 1);
        assert_eq!(
            http_once(addr, Duration::from_secs(2)),
            Err(FailureKind::Eof)
        );
        // No answer in time.
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = listener.local_addr().expect("address");
        assert_eq!(
            http_once(addr, Duration::from_millis(100)),
            Err(FailureKind::Timeout)
        );
        // Nothing listening.
        drop(listener);
        assert_eq!(
            http_once(addr, Duration::from_secs(1)),
            Err(FailureKind::Refused)
        );
    }
}
