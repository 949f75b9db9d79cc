//! Checks against real loopback servers, each a thread serving one connection.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use handoff_common::check::CheckSpec;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{setsockopt, sockopt};
use rustls::pki_types::PrivateKeyDer;
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use super::http::final_status;
use super::{CheckFailure, run};

/// How long a test server waits for its client at most.
const SERVER_WAIT: Duration = Duration::from_secs(5);

/// A deadline no passing check comes near.
const GENEROUS: Duration = Duration::from_secs(5);

/// What a check returned, what its server read, and how long the check took.
struct Outcome {
    result: Result<(), CheckFailure>,
    request: String,
    took: Duration,
}

/// Runs the check `spec` within `within` against a server on `bind` that handles the one
/// connection with `serve` (which returns what it read).
fn check_on<F>(bind: &str, spec: &str, within: Duration, serve: F) -> Outcome
where
    F: FnOnce(TcpStream) -> String + Send + 'static,
{
    let spec = spec.parse().expect("a valid check");
    let listener = TcpListener::bind(bind).expect("bind a loopback listener");
    let target = listener.local_addr().expect("its address");
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept the check");
        stream.set_read_timeout(Some(SERVER_WAIT)).expect("timeout");
        stream
            .set_write_timeout(Some(SERVER_WAIT))
            .expect("timeout");
        serve(stream)
    });
    let begun = Instant::now();
    let stream = TcpStream::connect(target).expect("connect to the test server");
    let result = run(&spec, stream, target, begun + within);
    let took = begun.elapsed();
    let request = server.join().expect("the server thread ends");
    Outcome {
        result,
        request,
        took,
    }
}

fn check<F>(spec: &str, serve: F) -> Outcome
where
    F: FnOnce(TcpStream) -> String + Send + 'static,
{
    check_on("127.0.0.1:0", spec, GENEROUS, serve)
}

/// Reads a request up to its empty line (or EOF, or 8 KiB).
fn read_request(io: &mut impl Read) -> String {
    let mut got = Vec::new();
    let mut buf = [0; 1024];
    while !got.ends_with(b"\r\n\r\n") && got.len() < 8192 {
        match io.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A plain server that reads the request, writes `answer` and closes.
fn answer(answer: &'static str) -> impl FnOnce(TcpStream) -> String + Send + 'static {
    move |mut stream| {
        let request = read_request(&mut stream);
        stream
            .write_all(answer.as_bytes())
            .expect("write the answer");
        request
    }
}

#[test]
fn http_200_passes_and_the_request_is_a_plain_get() {
    let out = check("http:/healthz?x=1", answer("HTTP/1.1 200 OK\r\n\r\n"));
    out.result.expect("200 passes");
    let port = out.request.split("127.0.0.1:").nth(1).unwrap_or_default();
    let port = port.split("\r\n").next().unwrap_or_default();
    assert_eq!(
        out.request,
        format!(
            "GET /healthz?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: handoff-check\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n"
        )
    );
    assert!(port.parse::<u16>().is_ok(), "{:?}", out.request);
}

#[test]
fn ipv6_host_is_bracketed() {
    let out = check_on(
        "[::1]:0",
        "http:/",
        GENEROUS,
        answer("HTTP/1.0 204 No Content\r\n\r\n"),
    );
    out.result.expect("204 is a 2xx");
    assert!(
        out.request.contains("\r\nHost: [::1]:"),
        "{:?}",
        out.request
    );
}

#[test]
fn http_503_fails_with_its_status() {
    let out = check("http:/", answer("HTTP/1.1 503 Service Unavailable\r\n\r\n"));
    let err = out.result.expect_err("503 fails");
    assert!(
        matches!(err, CheckFailure::Status { got: 503, .. }),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "status 503, wanted 2xx");
}

#[test]
fn an_explicit_status_takes_that_status_only() {
    let out = check("http:/ready:204", answer("HTTP/1.1 204 No Content\r\n\r\n"));
    out.result.expect("204 wanted and answered");
    let out = check(
        "http:/ready:204",
        answer("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    );
    let err = out.result.expect_err("200 is not 204");
    assert!(
        matches!(err, CheckFailure::Status { got: 200, .. }),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "status 200, wanted 204");
}

#[test]
fn interim_answers_are_skipped() {
    let interim = "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 500 Oops\r\n\r\n";
    let err = check("http:/", answer(interim))
        .result
        .expect_err("500 fails");
    assert!(
        matches!(err, CheckFailure::Status { got: 500, .. }),
        "{err:?}"
    );
}

#[test]
fn a_server_that_closes_at_once_fails() {
    let out = check("http:/", |stream| {
        drop(stream);
        String::new()
    });
    let err = out.result.expect_err("closed");
    assert!(
        matches!(err, CheckFailure::Closed | CheckFailure::Reset),
        "{err:?}"
    );
}

#[test]
fn a_reset_is_a_reset() {
    let out = check("http:/", |mut stream| {
        let request = read_request(&mut stream);
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        setsockopt(&stream, sockopt::Linger, &linger).expect("SO_LINGER 0: close resets");
        request
    });
    let err = out.result.expect_err("reset");
    assert!(matches!(err, CheckFailure::Reset), "{err:?}");
    assert_eq!(err.to_string(), "the connection was reset");
}

/// A server that reads until the client goes (or [`SERVER_WAIT`]) and never answers.
fn silent(mut stream: TcpStream) -> String {
    let mut sink = Vec::new();
    let _ = stream.read_to_end(&mut sink);
    String::from_utf8_lossy(&sink).into_owned()
}

#[test]
fn a_server_that_never_answers_times_out_at_the_deadline() {
    for spec in ["http:/", "https:/"] {
        let out = check_on("127.0.0.1:0", spec, Duration::from_millis(200), silent);
        let err = out.result.expect_err("no answer");
        let CheckFailure::Timeout { waited_ms } = err else {
            panic!("{spec}: {err:?}");
        };
        let ms = out.took.as_millis();
        assert!((200..1000).contains(&ms), "{spec}: returned after {ms} ms");
        assert!(
            (190..1000).contains(&waited_ms),
            "{spec}: waited {waited_ms} ms"
        );
    }
}

#[test]
fn garbage_is_malformed() {
    let err = check("http:/", answer("hello there\r\n"))
        .result
        .expect_err("garbage");
    assert!(matches!(err, CheckFailure::Malformed { .. }), "{err:?}");
    assert_eq!(err.to_string(), "malformed answer: not an HTTP/1 answer");
}

#[test]
fn an_endless_status_line_is_malformed_after_8_kib() {
    let out = check("http:/", |mut stream| {
        let request = read_request(&mut stream);
        let _ = stream.write_all(b"HTTP/1.1 200 ");
        // 64 KiB at most: the client stops reading after 8 KiB; socket buffers take it.
        for _ in 0..64 {
            if stream.write_all(&[b'a'; 1024]).is_err() {
                break;
            }
        }
        request
    });
    let err = out.result.expect_err("no line end");
    assert_eq!(
        err.to_string(),
        "malformed answer: no status line in the first 8192 bytes"
    );
    assert!(out.took < GENEROUS / 2, "took {:?}", out.took);
}

#[test]
fn tcp_passes_on_a_connection_and_sees_a_reset_already_there() {
    check("tcp", |_| String::new()).result.expect("connected");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = listener.local_addr().expect("address");
    let client = TcpStream::connect(target).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&server, sockopt::Linger, &linger).expect("SO_LINGER 0");
    drop(server);
    // Wait (bounded) until the reset has reached the client.
    let mut fds = [PollFd::new(client.as_fd(), PollFlags::POLLIN)];
    let ready = poll(&mut fds, PollTimeout::from(1000u16)).expect("poll");
    assert_eq!(ready, 1, "the reset arrives");
    let deadline = Instant::now() + GENEROUS;
    let err = run(&"tcp".parse().expect("tcp"), client, target, deadline).expect_err("reset");
    assert!(matches!(err, CheckFailure::Reset), "{err:?}");
}

/// A TLS server config with a fresh self-signed certificate for "localhost" (not for
/// the address the check uses), with only `version`.
fn tls_server(version: &'static rustls::SupportedProtocolVersion) -> Arc<ServerConfig> {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("a self-signed certificate");
    let der = PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("the version")
        .with_no_client_auth()
        .with_single_cert(vec![key.cert.der().clone()], der)
        .expect("the certificate");
    Arc::new(config)
}

/// A TLS server that answers `answer` over `config` and closes with close_notify.
fn tls_answer(
    config: Arc<ServerConfig>,
    answer: &'static str,
) -> impl FnOnce(TcpStream) -> String + Send + 'static {
    move |stream| {
        let conn = ServerConnection::new(config).expect("a server connection");
        let mut tls = StreamOwned::new(conn, stream);
        let request = read_request(&mut tls);
        tls.write_all(answer.as_bytes()).expect("write the answer");
        tls.conn.send_close_notify();
        tls.flush().expect("flush");
        request
    }
}

#[test]
fn https_passes_with_a_self_signed_certificate_on_tls_1_2_and_1_3() {
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let server = tls_answer(tls_server(version), "HTTP/1.1 204 No Content\r\n\r\n");
        let out = check("https:/healthz:204", server);
        out.result.expect("https 204");
        assert!(
            out.request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{:?}",
            out.request
        );
        let server = tls_answer(tls_server(version), "HTTP/1.1 204 No Content\r\n\r\n");
        let err = check("https:/healthz:200", server)
            .result
            .expect_err("204 is not 200");
        assert!(
            matches!(err, CheckFailure::Status { got: 204, .. }),
            "{err:?}"
        );
    }
}

#[test]
fn https_to_a_plain_server_is_a_tls_failure() {
    // Like a real HTTP server: a ClientHello is no request line, so 400 at once.
    let out = check("https:/", |mut stream| {
        let mut hello = [0; 512];
        let n = stream.read(&mut hello).expect("the ClientHello");
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
        format!("{:02x?}", &hello[..n.min(3)])
    });
    let err = out.result.expect_err("not TLS");
    assert!(matches!(err, CheckFailure::Tls { .. }), "{err:?}");
    assert!(err.to_string().starts_with("tls: "), "{err}");
    // A TLS handshake record (0x16, version 3.x) was what the server got.
    assert!(out.request.starts_with("[16, 03,"), "{}", out.request);
}

#[test]
fn status_lines_parse() {
    let ok = |text: &str| final_status(text.as_bytes()).expect(text);
    assert_eq!(ok("HTTP/1.1 200 OK\r\n"), Some(200));
    assert_eq!(ok("HTTP/1.0 404\r\n"), Some(404));
    assert_eq!(ok("HTTP/1.1 302 Found\n"), Some(302));
    assert_eq!(ok("HTTP/1.1 101 Switching Protocols\r\n"), Some(101));
    assert_eq!(
        ok("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"),
        Some(201)
    );
    assert_eq!(ok("HTTP/1.1 100 Continue\n\nHTTP/1.1 202 \n"), Some(202));
    // Not complete yet.
    for partial in [
        "",
        "HT",
        "HTTP/1.1 20",
        "HTTP/1.1 200 OK\r",
        "HTTP/1.1 100 Go\r\n\r",
    ] {
        assert_eq!(ok(partial), None, "{partial:?}");
    }
    for bad in [
        "HTTP/2 200\r\n",
        "http/1.1 200 OK\r\n",
        "HTTP/1.1 2000 OK\r\n",
        "HTTP/1.1 20 OK\r\n",
        "HTTP/1.1 2x0 OK\r\n",
        "HTTP/1.1  200 OK\r\n",
        "HTTP/1.1 200\tOK\r\n",
        "HTTP/1.1 099 Low\r\n",
        "HTTP/1.1 600 High\r\n",
        "HTTP/1.x 200 OK\r\n",
    ] {
        let err = final_status(bad.as_bytes()).expect_err(bad);
        assert!(
            matches!(err, CheckFailure::Malformed { .. }),
            "{bad:?}: {err:?}"
        );
    }
}

#[test]
fn a_hand_built_path_that_could_inject_a_header_is_not_sent() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = listener.local_addr().expect("address");
    let client = TcpStream::connect(target).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    let spec = CheckSpec::Http {
        path: "/\r\nX-Injected: 1".to_owned(),
        status: None,
    };
    let err = run(&spec, client, target, Instant::now() + GENEROUS).expect_err("refused");
    assert!(matches!(err, CheckFailure::Spec(_)), "{err:?}");
    // The client is dropped: the server reads EOF and nothing before it.
    server.set_read_timeout(Some(SERVER_WAIT)).expect("timeout");
    let mut got = Vec::new();
    server.read_to_end(&mut got).expect("EOF");
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn a_non_blocking_stream_is_checked_all_the_same() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = listener.local_addr().expect("address");
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(SERVER_WAIT)).expect("timeout");
        answer("HTTP/1.1 200 OK\r\n\r\n")(stream)
    });
    let client = TcpStream::connect(target).expect("connect");
    client.set_nonblocking(true).expect("non-blocking");
    let spec = "http:/".parse().expect("spec");
    run(&spec, client, target, Instant::now() + GENEROUS).expect("200 passes");
    server.join().expect("server");
}
