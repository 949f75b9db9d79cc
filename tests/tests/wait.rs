//! `promote --wait` (issue 14, "promote when ready"): a deploy script starts the new
//! version and promotes it at once; handoffd waits until it listens and passes its check,
//! and never longer than the check timeout, counted from the request.

mod support;

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use handoff_tests::{Proc, bin_path, free_port, scaled};
use support::release::{metrics, sample};
use support::{Handoffd, loopback, privileged, testsrv, wait_until};

/// Runs `handoffctl ARGS` and returns whether it succeeded, what it said, and how long
/// it took.
fn timed_ctl(d: &Handoffd, args: &[&str]) -> (bool, String, Duration) {
    let begun = Instant::now();
    let out = d.ctl(args);
    let took = begun.elapsed();
    let said = String::from_utf8_lossy(if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    })
    .trim_end()
    .to_owned();
    eprintln!("handoffctl {args:?} ({took:?}): {said}");
    (out.status.success(), said, took)
}

/// The generation name the service answers with.
fn answer(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(scaled(Duration::from_secs(2))))
        .expect("timeout");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut s), &mut line).expect("read");
    line.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn wait_promotes_a_server_that_listens_later_and_gives_up_at_its_deadline() {
    if !privileged("wait_promotes_a_server_that_listens_later_and_gives_up_at_its_deadline") {
        return;
    }
    let addr = loopback();
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let d = Handoffd::start_with("wait", &[addr], &["--metrics-addr", &metrics_addr]);
    // Promoted at once, while it sleeps: it listens a second later (the same process,
    // exec'd).
    let script = format!(
        "sleep 1; exec {} --name LATE --listen {addr}",
        bin_path("testsrv").display()
    );
    let late = Proc::spawn(Command::new("sh").args(["-c", &script]));
    let pid = late.pid.to_string();
    let (ok, said, took) = timed_ctl(
        &d,
        &[
            "promote",
            "--wait",
            "--check",
            "tcp",
            "--check-timeout",
            "20s",
            &pid,
        ],
    );
    assert!(ok, "promote --wait failed: {said}");
    assert!(took >= Duration::from_millis(800), "did not wait: {took:?}");
    assert_eq!(answer(addr), "LATE");

    // A process that never listens: refused once the timeout, counted from the request,
    // has passed (not restarted with every look).
    let idle = Proc::spawn(Command::new("sleep").arg("60"));
    let pid = idle.pid.to_string();
    let (ok, said, took) = timed_ctl(
        &d,
        &[
            "promote",
            "--wait",
            "--check",
            "tcp",
            "--check-timeout",
            "700ms",
            &pid,
        ],
    );
    assert!(!ok, "a process without listeners was promoted: {said}");
    assert!(said.contains("listen"), "{said}");
    assert!(
        took >= Duration::from_millis(600),
        "gave up early: {took:?}"
    );
    assert!(took < scaled(Duration::from_secs(3)), "waited on: {took:?}");
    assert_eq!(answer(addr), "LATE", "steering changed");
    // Each request counts once, however many looks it took.
    let text = metrics(port);
    let count = |result: &str| {
        let result = format!("result=\"{result}\"");
        sample(&text, "handoff_promotions_total", &[&result]).unwrap_or(0.0)
    };
    assert_eq!((count("ok"), count("refused")), (1.0, 1.0), "{text}");
}

#[test]
fn wait_outlasts_a_warm_up_that_fails_a_single_check() {
    if !privileged("wait_outlasts_a_warm_up_that_fails_a_single_check") {
        return;
    }
    let addr = loopback();
    let d = Handoffd::start("warm", &[addr]);
    let a = testsrv("A", &[addr], &[]);
    d.promote(a.pid);
    // Listens at once, answers only after 1.5 s: a single check times out, `--wait`
    // keeps checking until it passes.
    let b = testsrv(
        "B",
        &[addr],
        &["--http-status", "200", "--warmup-ms", "1500"],
    );
    let pid = b.pid.to_string();
    let check = ["--check", "http:/healthz"];
    let once = [
        &["promote"][..],
        &check,
        &["--check-timeout", "300ms", &pid],
    ]
    .concat();
    let (ok, said, _) = timed_ctl(&d, &once);
    assert!(!ok, "a warming-up server passed: {said}");
    assert!(said.contains("failed its http:/healthz check"), "{said}");
    assert_eq!(answer(addr), "A", "a failed check changed steering");
    let waited = [
        &["promote", "--wait"][..],
        &check,
        &["--check-timeout", "20s", &pid],
    ]
    .concat();
    let (ok, said, took) = timed_ctl(&d, &waited);
    assert!(ok, "promote --wait failed: {said}");
    assert!(took >= Duration::from_millis(500), "did not wait: {took:?}");
    let s = d.service();
    let b_state = s.generations.iter().find(|g| g.pid == b.pid as i32);
    assert!(b_state.is_some_and(|g| g.state == handoff_common::proto::GenerationState::Active));
}

/// A check waits on the candidate without the daemon's lock: while a candidate that
/// never answers is being checked, a draining generation still retires the moment its
/// last connection closes, and other requests are answered at once.
#[test]
fn a_slow_check_holds_up_no_drain_and_no_other_request() {
    if !privileged("a_slow_check_holds_up_no_drain_and_no_other_request") {
        return;
    }
    let addr = loopback();
    let d = Handoffd::start("slow-check", &[addr]);
    let a = testsrv("A", &[addr], &[]);
    d.promote(a.pid);
    let (held, name, _) = handoff_tests::load::hold(addr).expect("a connection to A");
    assert_eq!(name, "A");
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    // C listens but answers nothing for 30 s: its check runs until its timeout.
    let c = testsrv(
        "C",
        &[addr],
        &["--http-status", "200", "--warmup-ms", "30000"],
    );
    let pid = c.pid.to_string();
    let slow = [
        "promote",
        "--check",
        "http:/healthz",
        "--check-timeout",
        "4s",
        &pid,
    ];
    std::thread::scope(|s| {
        let pending = s.spawn(|| timed_ctl(&d, &slow));
        wait_until("C's check to start", Duration::from_secs(5), || {
            d.service().steering.check > 0
        });
        let (ok, said, took) = timed_ctl(&d, &["promote", &b.pid.to_string()]);
        assert!(!ok && said.contains("under way"), "{said}");
        assert!(
            took < scaled(Duration::from_millis(500)),
            "busy took {took:?}"
        );
        let closed = Instant::now();
        drop(held);
        wait_until("A to retire", Duration::from_secs(2), || {
            d.state_of(a.pid) == Some(handoff_common::proto::GenerationState::Retired)
        });
        let retired = closed.elapsed();
        eprintln!("A retired {retired:?} after its last connection closed, during C's check");
        assert!(!pending.is_finished(), "C's check ended before A retired");
        let (ok, said, took) = pending.join().expect("the pending promote");
        assert!(!ok && said.contains("no answer"), "{said}");
        assert!(took >= Duration::from_secs(3), "{took:?}");
    });
    assert_eq!(
        d.state_of(b.pid),
        Some(handoff_common::proto::GenerationState::Active)
    );
}
