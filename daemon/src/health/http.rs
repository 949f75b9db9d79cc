//! The HTTP/1.1 exchange of a check: one `GET`, then the status line of the answer.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use super::{CheckFailure, MAX_ANSWER, Timed, failure};

/// The status of `GET path` on a plain connection.
pub(super) fn status(
    conn: &mut Timed,
    path: &str,
    target: SocketAddr,
) -> Result<u16, CheckFailure> {
    let started = conn.started;
    exchange(conn, path, target, started)
}

/// Sends `GET path` on `io` (plain or TLS) and reads the answer's final status. I/O
/// errors are read as the check started at `started` sees them.
pub(super) fn exchange(
    io: &mut (impl Read + Write),
    path: &str,
    target: SocketAddr,
    started: Instant,
) -> Result<u16, CheckFailure> {
    // The path is visible ASCII (CheckSpec's rule): it cannot end the line or add a
    // header. `target` shows an IPv6 address in brackets, as Host wants it.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: handoff-check\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    io.write_all(request.as_bytes())
        .and_then(|()| io.flush())
        .map_err(|e| failure(e, started))?;
    let mut answer = vec![0; MAX_ANSWER];
    let mut len = 0;
    // Bounded: each pass reads at least one byte into `answer`, or returns, or was
    // interrupted (then the next read's `arm` still ends it at the deadline).
    loop {
        if let Some(status) = final_status(&answer[..len])? {
            return Ok(status);
        }
        if len == answer.len() {
            return Err(CheckFailure::Malformed {
                what: "no status line in the first 8192 bytes",
            });
        }
        match io.read(&mut answer[len..]) {
            Ok(0) => return Err(CheckFailure::Closed),
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failure(e, started)),
        }
    }
}

/// The final status in the start of an answer: `None` while its status line is not
/// complete. Interim answers (`1xx` but `101`) and their header blocks are skipped.
pub(super) fn final_status(answer: &[u8]) -> Result<Option<u16>, CheckFailure> {
    let mut rest = answer;
    // Bounded: each pass moves past one interim answer (at least a line) or returns.
    loop {
        let seen = rest.len().min(PREFIX.len());
        if rest[..seen] != PREFIX[..seen] {
            return Err(malformed("not an HTTP/1 answer"));
        }
        let Some(eol) = rest.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let status = status_line(&rest[..eol])?;
        if !(100..=199).contains(&status) || status == 101 {
            return Ok(Some(status));
        }
        match header_end(&rest[eol..]) {
            Some(end) => rest = &rest[eol + end..],
            None => return Ok(None),
        }
    }
}

/// How every HTTP/1 status line starts.
const PREFIX: &[u8] = b"HTTP/1.";

/// The status of `HTTP/1.x NNN[ reason]` (its LF cut off, a CR before it not yet).
fn status_line(line: &[u8]) -> Result<u16, CheckFailure> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(PREFIX).unwrap_or_default();
    let (head, reason) = rest.split_at(rest.len().min(5));
    let [minor, b' ', digits @ ..] = head else {
        return Err(malformed("short status line"));
    };
    let [a, b, c] = digits else {
        return Err(malformed("short status line"));
    };
    if !minor.is_ascii_digit() || ![a, b, c].iter().all(|d| d.is_ascii_digit()) {
        return Err(malformed("no three-digit status in the status line"));
    }
    if reason.first().is_some_and(|&b| b != b' ') {
        return Err(malformed("no space after the status"));
    }
    let status = [a, b, c]
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(**d - b'0'));
    if !(100..=599).contains(&status) {
        return Err(malformed("a status outside 100-599"));
    }
    Ok(status)
}

/// Past the empty line that ends a header block, from the end of its first line (`block`
/// starts at that line's LF); `None` while it has not come.
fn header_end(block: &[u8]) -> Option<usize> {
    (0..block.len()).find_map(|at| match &block[at..] {
        [b'\n', b'\n', ..] => Some(at + 2),
        [b'\n', b'\r', b'\n', ..] => Some(at + 3),
        _ => None,
    })
}

fn malformed(what: &'static str) -> CheckFailure {
    CheckFailure::Malformed { what }
}
