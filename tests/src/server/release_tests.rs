//! Unit tests of the release-test options of `testsrv`: `--http-status` against the load
//! client's `--http`, `--log-accept`, and `--notify-ready` on a real notify socket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;

use super::ServerConfig;
use super::http::{MAX_HEAD, response};
use crate::load::{self, FailureKind, LoadConfig};
use crate::{Proc, Stream, TempDir, bin_path, free_port, scaled};

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

#[test]
fn cli_parses_the_release_flags() {
    let base = ["testsrv", "--name", "A", "--listen", "127.0.0.1:1"];
    let args = [
        &base[..],
        &["--notify-ready", "--http-status", "503", "--log-accept"],
    ]
    .concat();
    let cfg = ServerConfig::try_parse_from(&args).expect("valid command line");
    assert!(cfg.notify_ready && cfg.log_accept);
    assert_eq!(cfg.http_status, Some(503));
    let cfg = ServerConfig::try_parse_from(base).expect("defaults");
    assert!(!cfg.notify_ready && !cfg.log_accept && cfg.http_status.is_none());
    for extra in [
        &["--http-status", "204"][..],
        &["--http-status", "304"],
        &["--http-status", "199"],
        &["--http-status", "600"],
        &["--http-status", "OK"],
        &["--http-status", "200", "--hold"],
        &["--http-status", "200", "--no-accept"],
    ] {
        let args = [&base[..], extra].concat();
        assert!(
            ServerConfig::try_parse_from(&args).is_err(),
            "{args:?} accepted"
        );
    }
}

#[test]
fn http_responses_are_what_the_load_client_reads() {
    let ok = response(200, "g7", 4242);
    let parsed = load::parse_response(&ok).expect("valid").expect("complete");
    assert_eq!(
        (parsed.status, parsed.pid, parsed.close),
        (200, Some(4242), true)
    );
    assert_eq!(parsed.body, b"g7\n");
    assert!(!parsed.extra);
    let bad = response(503, "g7", 1);
    assert!(bad.starts_with(b"HTTP/1.1 503 Service Unavailable\r\n"));
    let odd = response(299, "g7", 1);
    assert!(odd.starts_with(b"HTTP/1.1 299 Status\r\n"));
}

#[test]
fn http_status_serves_the_http_load_client() {
    let addr = loopback();
    let srv = Proc::spawn_testsrv(&[
        "--name",
        "H",
        "--listen",
        &addr.to_string(),
        "--http-status",
        "200",
        "--workers",
        "2",
    ]);
    let mut cfg = LoadConfig::new(addr, 8);
    cfg.count = Some(200);
    cfg.http = true;
    cfg.requests_per_connection = 3;
    let report = load::run(&cfg, None);
    assert_eq!((report.ok, report.failures.total()), (200, 0), "{report:?}");
    assert_eq!(report.by_name, [("H".to_owned(), 200)].into());
    let pids: Vec<u32> = report.by_pid.keys().copied().collect();
    assert!(
        pids.iter().all(|p| srv.workers.contains(p)),
        "X-Pid names the workers: {pids:?} of {:?}",
        srv.workers
    );
}

#[test]
fn http_status_answers_after_the_head_and_only_then() {
    let addr = loopback();
    let _srv = Proc::spawn_testsrv(&[
        "--name",
        "E",
        "--listen",
        &addr.to_string(),
        "--http-status",
        "503",
    ]);
    let timeout = scaled(Duration::from_secs(5));
    assert_eq!(load::http_once(addr, timeout), Err(FailureKind::Status));

    // A head in pieces: answered once the blank line came, with exactly the response.
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(timeout)).expect("timeout");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    std::thread::sleep(Duration::from_millis(50));
    stream.write_all(b"\r\n").expect("write");
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .expect("the answer, then the end");
    let pid = String::from_utf8_lossy(&answer)
        .lines()
        .find_map(|l| l.strip_prefix("X-Pid: ")?.parse::<u32>().ok())
        .expect("X-Pid");
    assert_eq!(answer, response(503, "E", pid));

    // A head longer than 8 KiB, or none before the client stops sending: no answer.
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(timeout)).expect("timeout");
    let long = vec![b'x'; MAX_HEAD + 2048];
    let _ = stream.write_all(&long);
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(rest.is_empty(), "answered a head of {} bytes", long.len());
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.write_all(b"GET / HTTP/1.1\r\n").expect("write");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    stream.set_read_timeout(Some(timeout)).expect("timeout");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(rest.is_empty(), "answered an incomplete head");
    // Still serving.
    assert_eq!(load::http_once(addr, timeout), Err(FailureKind::Status));
}

#[test]
fn log_accept_names_the_peer() {
    let addr = loopback();
    let srv = Proc::spawn_testsrv(&["--name", "P", "--listen", &addr.to_string(), "--log-accept"]);
    let (stream, name, pid) = load::hold(addr).expect("an answer");
    assert_eq!((name.as_str(), pid), ("P", srv.pid));
    let peer = stream.local_addr().expect("local address");
    let line = format!("accept P pid={} peer={peer} local={addr}", srv.pid);
    assert_eq!(
        srv.wait_line(Stream::Stderr, &line, scaled(Duration::from_secs(5))),
        Some(line)
    );
}

/// The next datagram on `socket` (SO_PASSCRED set) and its sender's pid, within 10 s.
fn datagram(socket: &UnixDatagram) -> (Vec<u8>, Option<i32>) {
    let (bytes, creds) = crate::recv_with_credentials(socket, scaled(Duration::from_secs(10)))
        .expect("a datagram within 10 s");
    (bytes, creds.map(|(pid, _, _)| pid))
}

/// Spawns `testsrv` with `args` and `NOTIFY_SOCKET=socket`; waits for its ready line.
fn spawn_notifying(socket: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(bin_path("testsrv"));
    cmd.args(args).env("NOTIFY_SOCKET", socket);
    let proc = Proc::spawn(&mut cmd);
    proc.wait_line(Stream::Stdout, "ready ", scaled(Duration::from_secs(10)))
        .expect("testsrv ready");
    proc
}

#[test]
fn notify_ready_sends_ready_once_accepting() {
    let dir = TempDir::new("testsrv-notify");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind");
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::PassCred, &true)
        .expect("SO_PASSCRED");
    let addr = loopback();
    let started = Instant::now();
    let srv = spawn_notifying(
        &path.display().to_string(),
        &[
            "--name",
            "N",
            "--listen",
            &addr.to_string(),
            "--notify-ready",
            "--warmup-ms",
            "300",
            "--workers",
            "2",
        ],
    );
    let (bytes, pid) = datagram(&socket);
    let waited = started.elapsed();
    assert_eq!(bytes, b"READY=1");
    assert_eq!(pid, Some(srv.pid as i32), "sent by the master");
    assert!(
        waited >= Duration::from_millis(300),
        "READY=1 before the warm-up ended: {waited:?}"
    );
    let line = format!("notify N pid={} ns=", srv.pid);
    assert!(
        srv.wait_line(Stream::Stderr, &line, scaled(Duration::from_secs(5)))
            .is_some()
    );
    // Accepting by then.
    let (name, _) = load::connect_once(addr, scaled(Duration::from_secs(1))).expect("answered");
    assert_eq!(name, "N");

    // An abstract socket, `@name`, from a single process.
    use std::os::linux::net::SocketAddrExt;
    let name = format!("handoff-testsrv-notify-{}", std::process::id());
    let abs_addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
    let abs = UnixDatagram::bind_addr(&abs_addr).expect("bind abstract");
    let addr = loopback();
    let _srv = spawn_notifying(
        &format!("@{name}"),
        &[
            "--name",
            "M",
            "--listen",
            &addr.to_string(),
            "--notify-ready",
        ],
    );
    assert_eq!(datagram(&abs).0, b"READY=1");
}

#[test]
fn notify_ready_without_a_socket_is_refused() {
    let addr = loopback();
    let mut cmd = Command::new(bin_path("testsrv"));
    cmd.args([
        "--name",
        "N",
        "--listen",
        &addr.to_string(),
        "--notify-ready",
    ])
    .env_remove("NOTIFY_SOCKET");
    let mut srv = Proc::spawn(&mut cmd);
    let status = srv
        .wait_exit(scaled(Duration::from_secs(5)))
        .expect("exits");
    assert!(!status.success());
    assert!(
        srv.wait_line(
            Stream::Stderr,
            "needs $NOTIFY_SOCKET",
            scaled(Duration::from_secs(5))
        )
        .is_some()
    );
    assert!(TcpStream::connect(addr).is_err(), "nothing listened");
}
