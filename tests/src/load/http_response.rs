//! HTTP/1.x responses as `--http` reads them: the head, a `Content-Length` body, and
//! whether the connection may carry another request.

/// Longest HTTP response head (status line and headers) accepted.
const MAX_HTTP_HEAD: usize = 16 * 1024;
/// Longest HTTP response body accepted.
const MAX_HTTP_BODY: u64 = 64 * 1024;

/// The status line and headers of an HTTP/1.x response, as [`parse_head`] reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpHead {
    /// The status code.
    pub status: u16,
    /// `Content-Length`, if given.
    pub content_length: Option<u64>,
    /// The connection ends after this response: `Connection: close`, or HTTP/1.0 without
    /// `Connection: keep-alive`.
    pub close: bool,
    /// The `X-Pid` header, if given and a number.
    pub pid: Option<u32>,
    /// Bytes of the head, the blank line included: the body starts here.
    pub len: usize,
}

/// A full HTTP/1.x response, as [`parse_response`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
    /// See [`HttpHead::close`].
    pub close: bool,
    /// See [`HttpHead::pid`].
    pub pid: Option<u32>,
    /// Bytes followed the response in the buffer: nothing may follow (no pipelining here), so
    /// the connection is not used again.
    pub extra: bool,
}

impl HttpResponse {
    pub(super) fn from_head(head: HttpHead, body: Vec<u8>, extra: bool) -> Self {
        HttpResponse {
            status: head.status,
            body,
            close: head.close,
            pid: head.pid,
            extra,
        }
    }
}

/// Parses the head of an HTTP/1.0 or 1.1 response at the start of `buf`: `Ok(None)` while it
/// is incomplete, an error if it is malformed, too long, or uses `Transfer-Encoding` (not
/// supported: the servers of these tests send `Content-Length`).
pub fn parse_head(buf: &[u8]) -> Result<Option<HttpHead>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HTTP_HEAD {
            return Err(format!("no end of head in {} bytes", buf.len()));
        }
        return Ok(None);
    };
    if end > MAX_HTTP_HEAD {
        return Err(format!("a head of {end} bytes"));
    }
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| "a head that is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(format!("bad status line {status_line:?}")),
    };
    let code = parts.next().unwrap_or_default();
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad status code in {status_line:?}"));
    }
    let status: u16 = code.parse().map_err(|_| "bad status code")?;
    let mut head = HttpHead {
        status,
        content_length: None,
        close: http10,
        pid: None,
        len: end + 4,
    };
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(format!("bad header name in {line:?}"));
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            if head.content_length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length headers".to_owned());
            }
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("Transfer-Encoding {value:?} is not supported"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    head.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                    head.close = false;
                }
            }
        } else if name.eq_ignore_ascii_case("x-pid") {
            head.pid = value.parse().ok();
        }
    }
    Ok(Some(head))
}

/// Parses a full HTTP/1.x response at the start of `buf`: `Ok(None)` while incomplete.
/// Without `Content-Length` the body is empty for 1xx, 204 and 304 and an error otherwise
/// (reading to the end of the connection is not supported).
pub fn parse_response(buf: &[u8]) -> Result<Option<HttpResponse>, String> {
    let Some(head) = parse_head(buf)? else {
        return Ok(None);
    };
    let length = match head.content_length {
        Some(n) => n,
        None if head.status < 200 || head.status == 204 || head.status == 304 => 0,
        None => return Err(format!("status {} without Content-Length", head.status)),
    };
    if length > MAX_HTTP_BODY {
        return Err(format!("a body of {length} bytes"));
    }
    // At most MAX_HTTP_BODY (64 KiB): fits usize.
    let end = head.len + length as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let body = buf[head.len..end].to_vec();
    let extra = buf.len() > end;
    Ok(Some(HttpResponse::from_head(head, body, extra)))
}

/// The first line of a body (without `\n` or `\r\n`), if it is non-empty UTF-8.
pub(super) fn first_line(body: &[u8]) -> Option<String> {
    let line = body.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = std::str::from_utf8(line).ok()?;
    (!line.is_empty()).then(|| line.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_responses_parse() {
        let ok = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 3\r\n\
                   Connection: keep-alive\r\nX-Pid: 4242\r\n\r\ng7\n";
        let response = parse_response(ok).expect("valid").expect("complete");
        assert_eq!(
            response,
            HttpResponse {
                status: 200,
                body: b"g7\n".to_vec(),
                close: false,
                pid: Some(4242),
                extra: false
            }
        );
        assert_eq!(first_line(&response.body).as_deref(), Some("g7"));
        // Every strict prefix is incomplete, not an error.
        for cut in 0..ok.len() {
            assert_eq!(parse_response(&ok[..cut]), Ok(None), "cut at {cut}");
        }
        let head = parse_head(ok).expect("valid").expect("complete");
        assert_eq!(
            (head.status, head.content_length, head.len),
            (200, Some(3), ok.len() - 3)
        );
    }

    #[test]
    fn http_responses_parse_connection_and_status() {
        let ok = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 3\r\n\
                   Connection: keep-alive\r\nX-Pid: 4242\r\n\r\ng7\n";
        // Bytes after the body: the response is complete, the connection not reusable.
        let mut more = ok.to_vec();
        more.extend_from_slice(b"HTTP/1.1");
        assert!(
            parse_response(&more)
                .expect("valid")
                .expect("complete")
                .extra
        );

        let parsed = |text: &str| parse_response(text.as_bytes());
        let close = parsed("HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(close.close && close.body.is_empty() && close.pid.is_none());
        let tokens =
            parsed("HTTP/1.1 200 OK\r\nConnection: upgrade, close\r\nContent-Length: 0\r\n\r\n");
        assert!(tokens.expect("valid").expect("complete").close);
        // HTTP/1.0 closes unless it says keep-alive.
        let old = parsed("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(old.expect("valid").expect("complete").close);
        let old = parsed("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n");
        assert!(!old.expect("valid").expect("complete").close);
        // No reason phrase; a status other than 200; no body without Content-Length for 204.
        let nr = parsed("HTTP/1.1 503\r\nContent-Length: 2\r\n\r\nno");
        assert_eq!(nr.expect("valid").expect("complete").status, 503);
        let empty = parsed("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(empty.expect("valid").expect("complete").status, 204);
        // An X-Pid that is no number is ignored.
        let pid = parsed("HTTP/1.1 200 OK\r\nX-Pid: x\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(pid.expect("valid").expect("complete").pid, None);
        // The head of a non-200 answer is enough to judge it, even without a length.
        let head = parse_head(b"HTTP/1.1 500 Oops\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!((head.status, head.content_length), (500, None));
    }

    #[test]
    fn http_responses_refused() {
        let parsed = |text: &str| parse_response(text.as_bytes());
        for bad in [
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 20 OK\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 abc OK\r\n\r\n",
            "garbage\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\nbody until close",
            "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n",
        ] {
            assert!(parsed(bad).is_err(), "{bad:?} is refused");
        }
        // A head that never ends is refused once it is too long.
        let endless = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HTTP_HEAD));
        assert!(parsed(&endless).is_err());
        assert_eq!(parsed("HTTP/1.1 200 OK\r\nX: aaa"), Ok(None));
    }

    #[test]
    fn first_lines() {
        assert_eq!(first_line(b"g1\r\nmore"), Some("g1".to_owned()));
        assert_eq!(first_line(b"g1"), Some("g1".to_owned()));
        assert_eq!(first_line(b"\ng1"), None);
        assert_eq!(first_line(b""), None);
        assert_eq!(first_line(b"\xff\n"), None);
    }
}
