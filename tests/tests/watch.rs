//! The watch window's other two failures (issue 14, "automatic rollback"): a new
//! generation that stops answering its health check, and one that closes its listeners
//! while it runs on, hand traffic back to the standby, counted by reason; and a window
//! that ends cleanly lets the standby drain then, not before.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use handoff_common::proto::GenerationState;
use handoff_tests::free_port;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use support::release::{metrics, sample};
use support::{Handoffd, loopback, privileged, testsrv, wait_until};

/// A daemon on `addr` serving metrics on a port of its own; the port.
fn daemon(name: &str, addr: SocketAddr) -> (Handoffd, u16) {
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let d = Handoffd::start_with(name, &[addr], &["--metrics-addr", &metrics_addr]);
    (d, port)
}

/// Runs `handoffctl ARGS`, asserting that it succeeds.
fn ctl_ok(d: &Handoffd, args: &[&str]) {
    let out = d.ctl(args);
    assert!(
        out.status.success(),
        "handoffctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The count of rollbacks of `d`'s service for `reason` (0 if none yet).
fn rollbacks(d: &Handoffd, port: u16, reason: &str) -> f64 {
    let service = format!("service=\"{}\"", d.service().name);
    let reason = format!("reason=\"{reason}\"");
    sample(
        &metrics(port),
        "handoff_rollbacks_total",
        &[&service, &reason],
    )
    .unwrap_or(0.0)
}

#[test]
fn a_generation_that_stops_answering_its_check_is_rolled_back() {
    if !privileged("a_generation_that_stops_answering_its_check_is_rolled_back") {
        return;
    }
    let addr = loopback();
    let (d, port) = daemon("watch-check", addr);
    let a = testsrv("A", &[addr], &["--http-status", "200"]);
    d.promote(a.pid);
    let b = testsrv("B", &[addr], &["--http-status", "200"]);
    let pid = b.pid.to_string();
    ctl_ok(
        &d,
        &[
            "promote",
            "--check",
            "http:/healthz",
            "--watch",
            "60s",
            &pid,
        ],
    );
    assert_eq!(d.state_of(b.pid), Some(GenerationState::Active));
    // B hangs: its listeners stay open (the kernel still steers to them), but its check
    // times out at the next run of the window's checks.
    killpg(Pid::from_raw(b.pid as i32), Signal::SIGSTOP).expect("stopping B");
    wait_until("A to be active again", Duration::from_secs(10), || {
        d.state_of(a.pid) == Some(GenerationState::Active)
    });
    assert_eq!(rollbacks(&d, port, "check_failed"), 1.0);
    assert_eq!(rollbacks(&d, port, "exited"), 0.0);
    let s = d.service();
    let last = s.rollbacks.expect("status shows the rollback");
    assert_eq!((last.count, last.reason.as_str()), (1, "check_failed"));
    let _ = killpg(Pid::from_raw(b.pid as i32), Signal::SIGCONT);
}

#[test]
fn a_generation_that_closes_its_listeners_is_rolled_back() {
    if !privileged("a_generation_that_closes_its_listeners_is_rolled_back") {
        return;
    }
    let addr = loopback();
    let (d, port) = daemon("watch-shut", addr);
    let a = testsrv("A", &[addr], &[]);
    d.promote(a.pid);
    // On SIGTERM B closes its listeners and runs on (as nginx's master on SIGQUIT).
    let b = testsrv("B", &[addr], &["--shut-on-term"]);
    ctl_ok(&d, &["promote", "--watch", "60s", &b.pid.to_string()]);
    kill(Pid::from_raw(b.pid as i32), Signal::SIGTERM).expect("SIGTERM to B");
    wait_until("A to be active again", Duration::from_secs(10), || {
        d.state_of(a.pid) == Some(GenerationState::Active)
    });
    assert_eq!(rollbacks(&d, port, "listeners_lost"), 1.0);
    assert!(
        d.state_of(b.pid)
            .is_some_and(|s| s != GenerationState::Active),
        "B still active"
    );
}

#[test]
fn a_clean_window_drains_the_standby_when_it_ends() {
    if !privileged("a_clean_window_drains_the_standby_when_it_ends") {
        return;
    }
    let addr = loopback();
    let (d, port) = daemon("watch-clean", addr);
    let a = testsrv("A", &[addr], &[]);
    d.promote(a.pid);
    let b = testsrv("B", &[addr], &[]);
    ctl_ok(&d, &["promote", "--watch", "1s", &b.pid.to_string()]);
    // Standing by: listed with its listeners, not retired, no drain signal yet.
    let g = d.generation_of(a.pid).expect("A listed");
    assert_eq!(g.listeners, 1, "{g:?}");
    assert_ne!(g.state, GenerationState::Retired);
    // The window ends: A drains, has no connection, and retires.
    wait_until(
        "A to retire after the window",
        Duration::from_secs(10),
        || d.state_of(a.pid) == Some(GenerationState::Retired),
    );
    assert_eq!(d.state_of(b.pid), Some(GenerationState::Active));
    for reason in ["operator", "exited", "listeners_lost", "check_failed"] {
        assert_eq!(rollbacks(&d, port, reason), 0.0, "{reason}");
    }
}
