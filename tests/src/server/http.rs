//! `--http-status`: the HTTP answer of a connection, and reading the request head first.

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Longest request head read before the answer, blank line included.
pub(super) const MAX_HEAD: usize = 8 * 1024;

/// How long a client has to send its request head, and to close after the answer.
pub(super) const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// The full response of a server named `name` in process `pid` with status `code`: the
/// body is `NAME\n` and `X-Pid` the pid, as the load client (`--http`) reads nginx's.
pub(super) fn response(code: u16, name: &str, pid: u32) -> Vec<u8> {
    let body = format!("{name}\n");
    format!(
        "HTTP/1.1 {code} {}\r\nContent-Length: {}\r\nX-Pid: {pid}\r\nConnection: close\r\n\r\n{body}",
        reason(code),
        body.len()
    )
    .into_bytes()
}

/// The reason phrase of `code` (any text will do; clients read the code).
fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Reads from `stream` up to the end of a request head (`\r\n\r\n`), at most [`MAX_HEAD`]
/// bytes within [`HTTP_TIMEOUT`]: an error if it does not come (end of stream, timeout, too
/// long). Whatever follows the head in the same read (a body) is discarded.
pub(super) fn read_head(stream: &mut TcpStream) -> io::Result<()> {
    let deadline = Instant::now() + HTTP_TIMEOUT;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(io::Error::other("request head longer than 8 KiB"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
