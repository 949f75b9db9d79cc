//! Absurd numbers are refused where they are parsed, with one line, before anything
//! starts: durations beyond 30 days (flags and TOML), too many addresses. Numbers at the
//! limit work through a whole drain, and absurd requests leave the daemon serving the
//! next one.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use handoff_common::proto::GenerationState;
use handoff_tests::{Proc, Stream, TempDir, bin_path};
use support::{Handoffd, answers, loopback, only, privileged, testsrv, wait_until};

/// Runs handoffd with `args` in a fresh directory, expecting it to exit with `code` at
/// once, having created nothing; returns its stderr.
fn refused(name: &str, args: &[&str], code: i32) -> String {
    let tmp = TempDir::new(&format!("absurd-{name}"));
    let dir = &tmp.0;
    let state = dir.join("state");
    let mut cmd = Command::new(bin_path("handoffd"));
    cmd.args(args)
        .arg("--state-dir")
        .arg(&state)
        .arg("--control-socket")
        .arg(dir.join("ctl.sock"))
        .args(["--metrics-addr", "off"]);
    let mut p = Proc::spawn(&mut cmd);
    let status = p.wait_exit(Duration::from_secs(10));
    let _ = p.wait_line(Stream::Stderr, "\0", Duration::from_secs(5));
    let stderr = p.lines(Stream::Stderr).join("\n");
    let started = state.exists();
    let status = status.unwrap_or_else(|| panic!("handoffd {args:?} started: {stderr}"));
    assert_eq!(status.code(), Some(code), "handoffd {args:?}: {stderr}");
    assert!(!started, "handoffd {args:?} created its state dir");
    stderr
}

#[test]
fn absurd_durations_on_the_command_line_are_refused_at_parse() {
    if !privileged("absurd_durations_on_the_command_line_are_refused_at_parse") {
        return;
    }
    let listen = loopback().to_string();
    for (flag, value) in [
        ("--drain-timeout", "9300000000000000000s"),
        ("--kill-after", "9300000000000000000s"),
        ("--drain-timeout", "721h"),
        ("--kill-after", "2592000001ms"),
        (
            "--drain-timeout",
            "99999999999999999999999999999999999999999h",
        ),
    ] {
        let stderr = refused("flag", &["--listen", &listen, flag, value], 2);
        // clap's usage hint follows; the refusal itself is its first line.
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.starts_with("error: invalid value"), "{stderr}");
        assert!(first.contains(flag), "{stderr}");
        assert!(first.contains("longer than 30 days"), "{stderr}");
    }
}

#[test]
fn absurd_numbers_in_the_config_file_are_refused_at_parse() {
    if !privileged("absurd_numbers_in_the_config_file_are_refused_at_parse") {
        return;
    }
    let tmp = TempDir::new("absurd-config");
    let dir = &tmp.0;
    let port = loopback().port();
    let many: Vec<String> = (1..=65)
        .map(|i| format!("\"127.0.0.{i}:{port}\""))
        .collect();
    let cases = [
        (
            format!(
                "[defaults]\ndrain_timeout = \"9300000000000000000s\"\n[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:{port}\"]\n"
            ),
            ":2:17:",
            "longer than 30 days",
        ),
        (
            format!(
                "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:{port}\"]\nkill_after = \"100000h\"\n"
            ),
            ":4:14:",
            "longer than 30 days",
        ),
        (
            format!(
                "[[service]]\nname = \"a\"\nlisten = [{}]\n",
                many.join(", ")
            ),
            ":3:",
            "65 addresses; at most 64",
        ),
    ];
    for (i, (text, place, needle)) in cases.iter().enumerate() {
        let file = dir.join(format!("c{i}.toml"));
        std::fs::write(&file, text).expect("writing the config");
        let stderr = refused("toml", &["--config", &file.display().to_string()], 1);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("Error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(!stderr.contains("Caused by"), "{stderr}");
        let line = errors[0];
        assert!(
            line.contains(&format!("{}{place}", file.display())),
            "{line}"
        );
        assert!(line.contains(needle), "{line}");
    }
}

#[test]
fn the_longest_durations_drain_without_overflow() {
    if !privileged("the_longest_durations_drain_without_overflow") {
        return;
    }
    let addr = loopback();
    let d = Handoffd::start_with(
        "longest",
        &[addr],
        &["--drain-timeout", "720h", "--kill-after", "720h"],
    );
    let a = testsrv("A", &[addr], &[]);
    d.promote(a.pid);
    let held = handoff_tests::load::hold(addr).expect("a connection to A");
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid); // A drains with a 30-day deadline
    assert_eq!(d.state_of(a.pid), Some(GenerationState::Draining));
    assert_eq!(answers(addr, 20), only("B", 20));
    drop(held.0);
    // Drained: the retire signal (SIGTERM) ends A; kill-after 30 days later is moot.
    wait_until("A to retire", Duration::from_secs(10), || {
        d.state_of(a.pid) == Some(GenerationState::Retired)
    });
    assert_eq!(answers(addr, 20), only("B", 20));
}

/// Sends raw bytes to the control socket and returns the daemon's reply.
fn raw_exchange(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).expect("connecting to the control socket");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("setting a timeout");
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply
}

#[test]
fn absurd_requests_fail_alone_and_the_next_one_works() {
    if !privileged("absurd_requests_fail_alone_and_the_next_one_works") {
        return;
    }
    let addr = loopback();
    let d = Handoffd::start("absreq", &[addr]);
    let a = testsrv("A", &[addr], &[]);
    let long_name = "x".repeat(100_000);
    let requests = [
        (
            r#"{"request":"promote","pid":99999999999}"#.to_string(),
            "bad_request",
        ),
        (
            r#"{"request":"promote","pid":-1}"#.to_string(),
            "\"response\":\"error\"",
        ),
        (
            r#"{"request":"promote","pid":-2147483648}"#.to_string(),
            "\"response\":\"error\"",
        ),
        (
            format!(
                r#"{{"request":"promote","pid":{},"service":"{long_name}"}}"#,
                a.pid
            ),
            "unknown_service",
        ),
        (
            format!(r#"{{"request":"rollback","service":"{long_name}"}}"#),
            "unknown_service",
        ),
    ];
    for (request, kind) in &requests {
        let reply = raw_exchange(&d.socket, format!("{request}\n").as_bytes());
        assert!(
            reply.contains(kind),
            "reply to {:.80}: {reply:.300}",
            request
        );
        // After each failed request the next one works.
        assert!(
            d.ctl(&["status"]).status.success(),
            "status after {request:.80}"
        );
    }
    d.promote(a.pid);
    assert_eq!(answers(addr, 20), only("A", 20));
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    assert_eq!(answers(addr, 20), only("B", 20));
}
