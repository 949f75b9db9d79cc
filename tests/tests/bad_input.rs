//! Refusals: one clear line, a non-zero exit, and nothing changed — status and steering
//! identical before and after, the daemon still serving.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use handoff_common::proto::Status;
use support::{Handoffd, answers, loopback, only, privileged, testsrv};

/// What must not change: per generation, its pid, state and listeners.
fn shape(s: &Status) -> Vec<Vec<(i32, &'static str, usize)>> {
    s.services
        .iter()
        .map(|svc| {
            svc.generations
                .iter()
                .map(|g| (g.pid, g.state.as_str(), g.listeners))
                .collect()
        })
        .collect()
}

#[test]
fn refusals_change_nothing() {
    if !privileged("refusals_change_nothing") {
        return;
    }
    let addr = loopback();
    let a = testsrv("A", &[addr], &[]);
    let d = Handoffd::start("bad", &[addr]);
    d.promote(a.pid);
    // A holds a connection: it drains, and stays to be promoted again at the end.
    let (_held, name, _) = handoff_tests::load::hold(addr).expect("a connection to A");
    assert_eq!(name, "A");
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    let before = d.status();
    let mut sleeper = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("starting sleep");
    let no_reuseport = testsrv("N", &[loopback()], &["--no-reuseport"]);
    let exited = exited_pid();

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "unknown pid",
            vec!["promote".into(), "4000000".into()],
            "no process with pid 4000000",
        ),
        (
            "pid 0",
            vec!["promote".into(), "0".into()],
            "no process with pid 0",
        ),
        (
            "exited pid",
            vec!["promote".into(), exited.to_string()],
            "no process",
        ),
        (
            "pid without listener",
            vec!["promote".into(), sleeper.id().to_string()],
            "holds no TCP listener",
        ),
        (
            "listener on another port",
            vec!["promote".into(), no_reuseport.pid.to_string()],
            "holds no TCP listener",
        ),
        (
            "already active",
            vec!["promote".into(), b.pid.to_string()],
            "already the active generation",
        ),
        (
            "unknown service",
            vec![
                "promote".into(),
                a.pid.to_string(),
                "--service".into(),
                "nope".into(),
            ],
            "no service \"nope\"",
        ),
        (
            "rollback of unknown service",
            vec!["rollback".into(), "--service".into(), "nope".into()],
            "no service",
        ),
    ];
    refused_cleanly(&d, &cases);

    malformed_messages_are_refused(&d);

    let after = d.status();
    assert_eq!(shape(&before), shape(&after), "status changed by bad input");
    assert_eq!(answers(addr, 100), only("B", 100), "steering unchanged");
    d.promote(a.pid); // and the daemon still acts on good input: A is active again
    assert_eq!(answers(addr, 20), only("A", 20));
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// The pid of a process that has exited and been reaped.
fn exited_pid() -> u32 {
    let mut c = Command::new("true").spawn().expect("starting true");
    c.wait().expect("reaping true");
    c.id()
}

/// Each of `cases` (what, handoffctl arguments, expected error) is refused with its error.
fn refused_cleanly(d: &Handoffd, cases: &[(&str, Vec<String>, &str)]) {
    for (what, args, expect) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = d.refused(&args);
        assert!(
            err.contains(expect),
            "{what}: expected {expect:?} in {err:?}"
        );
        assert!(err.starts_with("handoffctl: "), "{what}: {err}");
    }
    // Not a number: clap's usage error (exit 2).
    let out = d.ctl(&["promote", "abc"]);
    assert_eq!(out.status.code(), Some(2), "non-numeric pid");
}

/// Malformed control messages, sent raw, are answered with bad_request.
fn malformed_messages_are_refused(d: &Handoffd) {
    for raw in [
        &b"garbage\n"[..],
        b"{\"request\":\"promote\"",
        b"{\"request\":\"promote\",\"pid\":\"x\"}\n",
        b"\n",
    ] {
        let reply = raw_exchange(d, raw);
        assert!(
            reply.contains("\"kind\":\"bad_request\""),
            "reply to {raw:?}: {reply}"
        );
    }
    let oversized = vec![b'x'; (1 << 20) + 10];
    let reply = raw_exchange(d, &oversized);
    assert!(
        reply.contains("bad_request") && reply.contains("longer"),
        "oversized: {reply}"
    );
}

#[test]
fn listener_without_reuseport_is_refused() {
    if !privileged("listener_without_reuseport_is_refused") {
        return;
    }
    let addr = loopback();
    let n = testsrv("N", &[addr], &["--no-reuseport"]);
    let d = Handoffd::start("noreuse", &[addr]);
    let err = d.refused(&["promote", &n.pid.to_string()]);
    assert!(err.contains("SO_REUSEPORT"), "{err}");
    assert!(d.service().generations.is_empty(), "nothing was promoted");
    assert_eq!(
        answers(addr, 10),
        only("N", 10),
        "the server still serves, unsteered"
    );
}

/// Sends raw bytes to the control socket and returns the daemon's reply.
fn raw_exchange(d: &Handoffd, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(&d.socket).expect("connecting to the control socket");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("setting a timeout");
    // The daemon may answer (and close) before reading an oversized message entirely.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply
}
