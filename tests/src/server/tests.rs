//! Unit tests of `testsrv`: command-line parsing, the ready line, and real `testsrv`
//! processes on loopback (unprivileged).

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use nix::sys::signal::Signal;

use super::{Mode, ServerConfig, format_ready, parse_ready};
use crate::load::{self, LoadConfig, LoadReport};
use crate::{Proc, Stream, free_port};

#[test]
fn cli_is_consistent() {
    ServerConfig::command().debug_assert();
}

#[test]
fn cli_parses_every_option() {
    let cfg = ServerConfig::try_parse_from([
        "testsrv",
        "--name",
        "A",
        "--listen",
        "127.0.0.1:1",
        "--listen",
        "[::1]:2",
        "--workers",
        "3",
        "--mode",
        "per-worker",
        "--no-reuseport",
        "--v6only",
        "false",
        "--delay-ms",
        "5",
        "--respawn",
        "--no-accept",
    ])
    .expect("valid command line");
    assert_eq!(
        cfg.listen,
        ["127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap()]
    );
    assert_eq!(
        (cfg.workers, cfg.mode, cfg.v6only),
        (3, Mode::PerWorker, Some(false))
    );
    assert!(cfg.no_reuseport && cfg.respawn && cfg.no_accept && cfg.delay_ms == 5);

    let cfg = ServerConfig::try_parse_from(["testsrv", "--name", "B", "--listen", "[::]:9"])
        .expect("defaults");
    assert_eq!((cfg.workers, cfg.mode, cfg.v6only), (0, Mode::Shared, None));
    assert!(!cfg.no_reuseport && !cfg.respawn && !cfg.no_accept && cfg.delay_ms == 0);
}

#[test]
fn cli_rejects_bad_input() {
    for args in [
        &["testsrv", "--name", "A"][..],
        &["testsrv", "--name", "A B", "--listen", "127.0.0.1:1"],
        &["testsrv", "--name", "A", "--listen", "::1:1"],
        &[
            "testsrv",
            "--name",
            "A",
            "--listen",
            "127.0.0.1:1",
            "--workers",
            "257",
        ],
        &[
            "testsrv",
            "--name",
            "A",
            "--listen",
            "127.0.0.1:1",
            "--mode",
            "prefork",
        ],
    ] {
        assert!(
            ServerConfig::try_parse_from(args).is_err(),
            "{args:?} accepted"
        );
    }
}

#[test]
fn ready_line_round_trips() {
    assert_eq!(format_ready(7, &[]), "ready pid=7 workers=");
    assert_eq!(format_ready(7, &[8, 9]), "ready pid=7 workers=8,9");
    assert_eq!(parse_ready("ready pid=7 workers=\n"), Some((7, vec![])));
    assert_eq!(
        parse_ready("ready pid=7 workers=8,9"),
        Some((7, vec![8, 9]))
    );
    assert_eq!(parse_ready("ready pid=7"), None);
    assert_eq!(parse_ready("ready pid=7 workers=8,x"), None);
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn load(addr: SocketAddr, count: u64) -> LoadReport {
    let mut cfg = LoadConfig::new(addr, 8);
    cfg.count = Some(count);
    load::run(&cfg, None)
}

/// True once `pid` no longer runs (missing, or a zombie left to a non-reaping init).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn assert_gone(pids: &[u32]) {
    let deadline = Instant::now() + crate::scaled(Duration::from_secs(5));
    while !pids.iter().all(|&p| gone(p)) {
        assert!(Instant::now() < deadline, "processes left behind: {pids:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn single_process_answers_and_exits_on_sigterm() {
    let addr = loopback();
    let mut srv = Proc::spawn_testsrv(&["--name", "solo", "--listen", &addr.to_string()]);
    assert!(srv.workers.is_empty());
    let report = load(addr, 50);
    assert_eq!(
        (report.attempts, report.ok, report.failures.total()),
        (50, 50, 0),
        "{report:?}"
    );
    assert_eq!(report.by_name, [("solo".to_owned(), 50)].into());
    assert_eq!(report.by_pid, [(srv.pid, 50)].into());

    srv.signal(Signal::SIGTERM);
    let status = srv
        .wait_exit(crate::scaled(Duration::from_secs(5)))
        .expect("testsrv exits on SIGTERM");
    assert!(status.success(), "{status}");
    let term = format!("term solo pid={}", srv.pid);
    assert!(
        srv.wait_line(Stream::Stderr, &term, crate::scaled(Duration::from_secs(5)))
            .is_some()
    );
}

fn workers_answer(mode: &str, every_worker: bool) {
    let addr = loopback();
    let args = [
        "--name",
        mode,
        "--listen",
        &addr.to_string(),
        "--workers",
        "2",
        "--mode",
        mode,
    ];
    let srv = Proc::spawn_testsrv(&args);
    assert_eq!(srv.workers.len(), 2);
    let report = load(addr, 200);
    assert_eq!((report.ok, report.failures.total()), (200, 0), "{report:?}");
    assert_eq!(report.by_name, [(mode.to_owned(), 200)].into());
    for pid in report.by_pid.keys() {
        assert!(
            srv.workers.contains(pid),
            "{pid} is no worker of {:?}",
            srv.workers
        );
    }
    if every_worker {
        for pid in &srv.workers {
            assert!(
                report.by_pid.contains_key(pid),
                "worker {pid} never answered: {report:?}"
            );
        }
    }
    let pids: Vec<u32> = srv.workers.iter().copied().chain([srv.pid]).collect();
    drop(srv);
    assert_gone(&pids);
}

#[test]
fn shared_workers_answer() {
    // One listener: how the kernel spreads connections over the accepting workers is its
    // business, so only check that workers answer.
    workers_answer("shared", false);
}

#[test]
fn per_worker_listeners_all_answer() {
    workers_answer("per-worker", true);
}

#[test]
fn after_fork_listeners_all_answer() {
    workers_answer("after-fork", true);
}

#[test]
fn dead_worker_is_respawned() {
    let addr = loopback();
    let args = [
        "--name",
        "R",
        "--listen",
        &addr.to_string(),
        "--workers",
        "2",
    ];
    let srv = Proc::spawn_testsrv(&[&args[..], &["--mode", "after-fork", "--respawn"]].concat());
    let dead = srv.workers[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(dead as i32), Signal::SIGKILL)
        .expect("kill a worker");
    let line = srv
        .wait_line(
            Stream::Stderr,
            &format!("respawn R old={dead} new="),
            crate::scaled(Duration::from_secs(5)),
        )
        .expect("the worker is respawned");
    let new: u32 = line
        .rsplit_once("new=")
        .and_then(|(_, p)| p.parse().ok())
        .expect("new pid");
    assert!(
        srv.lines(Stream::Stderr)
            .iter()
            .any(|l| l.starts_with(&format!("worker-exit R pid={dead} ")))
    );
    let report = load(addr, 200);
    assert_eq!((report.ok, report.failures.total()), (200, 0), "{report:?}");
    assert!(
        report.by_pid.contains_key(&new) && !report.by_pid.contains_key(&dead),
        "{report:?}"
    );
    let pids = [srv.pid, srv.workers[1], new];
    drop(srv);
    assert_gone(&pids);
}

#[test]
fn worker_failing_to_listen_fails_the_master() {
    // Without SO_REUSEPORT the second worker's bind fails.
    let addr = loopback().to_string();
    let mut srv = Proc::spawn(
        std::process::Command::new(crate::bin_path("testsrv")).args([
            "--name",
            "F",
            "--listen",
            &addr,
            "--workers",
            "2",
            "--mode",
            "after-fork",
            "--no-reuseport",
        ]),
    );
    let status = srv
        .wait_exit(crate::scaled(Duration::from_secs(10)))
        .expect("the master gives up");
    assert_eq!(status.code(), Some(1));
    // The master's last line may still be on its way through the reader thread.
    assert!(
        srv.wait_closed(Stream::Stderr, crate::scaled(Duration::from_secs(5))),
        "testsrv's stderr stayed open after its master exited: {:?}",
        srv.lines(Stream::Stderr)
    );
    assert!(srv.wait_closed(Stream::Stdout, crate::scaled(Duration::from_secs(5))));
    let stderr = srv.lines(Stream::Stderr).join("\n");
    assert!(
        stderr.contains("cannot listen on") && stderr.contains("exited before it was ready"),
        "{stderr}"
    );
    assert!(
        srv.lines(Stream::Stdout).is_empty(),
        "ready printed despite the failure"
    );
}

#[test]
fn no_accept_leaves_connections_queued() {
    let addr = loopback();
    let _srv = Proc::spawn_testsrv(&["--name", "Q", "--listen", &addr.to_string(), "--no-accept"]);
    // The kernel completes the handshake; nobody accepts, so no answer ever comes.
    let mut stream = std::net::TcpStream::connect(addr).expect("the handshake completes");
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("read timeout");
    let err = stream
        .read(&mut [0u8; 16])
        .expect_err("no answer from a server that never accepts");
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{err}"
    );
}

#[test]
fn ipv6_listener_with_v6only() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    let port = free_port();
    let addr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    let _srv = Proc::spawn_testsrv(&[
        "--name",
        "six",
        "--listen",
        &addr.to_string(),
        "--v6only",
        "true",
    ]);
    let (name, _) =
        load::connect_once(addr, crate::scaled(Duration::from_secs(2))).expect("answer over IPv6");
    assert_eq!(name, "six");
}

#[test]
fn cli_parses_the_benchmark_flags() {
    let cfg = ServerConfig::try_parse_from([
        "testsrv",
        "--name",
        "A",
        "--listen",
        "127.0.0.1:1",
        "--log-close",
        "--warmup-ms",
        "250",
        "--hold",
        "--drain-on-term",
    ])
    .expect("valid command line");
    assert!(cfg.log_close && cfg.hold && cfg.drain_on_term && cfg.warmup_ms == 250);
    let base = ["testsrv", "--name", "A", "--listen", "127.0.0.1:1"];
    for extra in [
        &["--hold", "--no-accept"],
        &["--drain-on-term", "--ignore-term"],
    ] {
        let args = [&base[..], extra].concat();
        assert!(
            ServerConfig::try_parse_from(&args).is_err(),
            "{args:?} accepted"
        );
    }
}

/// The `ns=` value of a stderr line.
fn ns_field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn log_close_stamps_the_close() {
    let addr = loopback();
    let srv = Proc::spawn_testsrv(&["--name", "L", "--listen", &addr.to_string(), "--log-close"]);
    let (stream, name, pid) = load::hold(addr).expect("an answer");
    assert_eq!((name.as_str(), pid), ("L", srv.pid));
    let before = load::monotonic_ns();
    drop(stream);
    let line = srv
        .wait_line(
            Stream::Stderr,
            &format!("close L pid={} ", srv.pid),
            crate::scaled(Duration::from_secs(5)),
        )
        .expect("the close is logged");
    let ns = ns_field(&line, "ns=");
    assert!(
        ns >= before,
        "close stamped at {ns}, before the client closed at {before}"
    );
}

#[test]
fn warmup_delays_accepting() {
    let addr = loopback();
    let _srv = Proc::spawn_testsrv(&[
        "--name",
        "W",
        "--listen",
        &addr.to_string(),
        "--warmup-ms",
        "400",
    ]);
    // Listening at once: the handshake completes, the answer waits for the warm-up.
    let started = Instant::now();
    let (name, _) =
        load::connect_once(addr, crate::scaled(Duration::from_secs(5))).expect("answered");
    assert_eq!(name, "W");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200),
        "answered after {waited:?}"
    );
}

#[test]
fn hold_closes_every_connection_on_sigusr1() {
    let addr = loopback();
    let srv = Proc::spawn_testsrv(&[
        "--name",
        "H",
        "--listen",
        &addr.to_string(),
        "--workers",
        "2",
        "--mode",
        "per-worker",
        "--hold",
    ]);
    let mut held: Vec<TcpStream> = (0..6)
        .map(|_| load::hold(addr).expect("an answer").0)
        .collect();
    srv.signal(Signal::SIGUSR1);
    let lines = srv
        .wait_lines(
            Stream::Stderr,
            "closed H pid=",
            2,
            crate::scaled(Duration::from_secs(5)),
        )
        .expect("each worker closes its connections");
    let count: u64 = lines.iter().map(|l| ns_field(l, "count=")).sum();
    assert_eq!(count, 6, "{lines:?}");
    for line in &lines {
        assert!(
            ns_field(line, "last_ns=") >= ns_field(line, "first_ns="),
            "{line}"
        );
    }
    for stream in &mut held {
        stream
            .set_read_timeout(Some(crate::scaled(Duration::from_secs(5))))
            .expect("read timeout");
        assert_eq!(stream.read(&mut [0u8; 8]).expect("EOF"), 0, "not closed");
    }
}

#[test]
fn drain_on_term_refuses_new_and_finishes_accepted_connections() {
    let addr = loopback();
    let mut srv = Proc::spawn_testsrv(&[
        "--name",
        "D",
        "--listen",
        &addr.to_string(),
        "--drain-on-term",
    ]);
    let (stream, _, _) = load::hold(addr).expect("an answer");
    srv.signal(Signal::SIGTERM);
    let deadline = Instant::now() + crate::scaled(Duration::from_secs(5));
    loop {
        match load::connect_once(addr, Duration::from_secs(1)) {
            Err(load::FailureKind::Refused) => break,
            other => assert!(Instant::now() < deadline, "still accepting: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        srv.wait_exit(Duration::from_millis(100)).is_none(),
        "exited with a connection still open"
    );
    drop(stream);
    let status = srv
        .wait_exit(crate::scaled(Duration::from_secs(5)))
        .expect("exits once the connection is done");
    assert!(status.success(), "{status}");
}
