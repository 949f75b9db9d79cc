//! A release of unmodified nginx through handoff (issue 14, point 6), under HTTP load with
//! keep-alive clients: the new nginx is a canary at 10 %, then takes every new connection
//! with a watch window, and is rolled back inside the window; not one request fails.
//!
//! handoffd runs with `--drain-signal SIGQUIT`, which makes nginx close its listeners at
//! once: during the watch window the previous nginx gets no signal, so it still listens
//! when the rollback comes. The rolled-back nginx gets its SIGQUIT and quits.
//!
//! The load is loadgen's HTTP client (20 requests per keep-alive connection), the test
//! suite's stand-in for wrk: it logs every request with its start time, so the test can
//! tell which generation answered in each phase. Like HTTP clients, it retries once a
//! request that nginx closed unread on a reused keep-alive connection (see nginx.rs); those
//! retries are bounded by the kernel's count of such resets. Everything runs in a network
//! namespace of the test's own (the nginx tests' helpers), so those counters are its own.

#[path = "nginx/netns.rs"]
mod netns;
#[path = "nginx/server.rs"]
mod server;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use handoff_common::proto::GenerationState;
use handoff_tests::load::{self, LoadConfig, LogEntry};
use handoff_tests::{TempDir, free_port, scaled, scaled_down, slowdown};
use netns::{counter, in_new_netns, tcp_ext};
use server::{Nginx, nginx_binary};
use support::release::under_load;
use support::{Handoffd, privileged, wait_until};

/// Deadline for a new nginx's workers to listen (times the slowdown); read by `server`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
use netns::LOSS_COUNTERS;
/// Requests the program's steering must see in each phase (connections, in fact: each
/// carries up to 20 requests).
fn per_phase() -> u64 {
    scaled_down(200u64, 40)
}

/// The CLOCK_MONOTONIC times that split the load log into phases.
#[derive(Debug, Default)]
struct Times {
    canary_sent: u64,
    canary_done: u64,
    complete_sent: u64,
    complete_done: u64,
    rollback_done: u64,
    /// When g2's master was seen to have exited (after its SIGQUIT).
    g2_gone: u64,
}

/// Runs `handoffctl ARGS` against `d`, asserting success; the times before and after.
fn timed(d: &Handoffd, args: &[&str]) -> (u64, u64) {
    let sent = load::monotonic_ns();
    let out = d.ctl(args);
    let done = load::monotonic_ns();
    assert!(
        out.status.success(),
        "handoffctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "handoffctl {args:?} took {} ms: {}",
        (done - sent) / 1_000_000,
        String::from_utf8_lossy(&out.stdout).trim_end()
    );
    (sent, done)
}

/// Waits until the program's `which` counter (canary or active) grew by `n`.
fn counted(d: &Handoffd, canary: bool, n: u64, what: &str) {
    let get = |d: &Handoffd| {
        let c = d.service().steering;
        if canary { c.canary } else { c.active }
    };
    let from = get(d);
    wait_until(what, Duration::from_secs(20), || get(d) >= from + n);
}

/// The HTTP load on `addr`, logged to `log`, ended by the test (bounded in time anyway).
fn http_load(addr: SocketAddr, log: &std::path::Path) -> LoadConfig {
    let mut cfg = LoadConfig::new(addr, scaled_down(64u32, 16));
    cfg.http = true;
    cfg.requests_per_connection = 20;
    cfg.retry_keepalive_race = true;
    cfg.timeout_ms = 3000 * u64::from(slowdown());
    cfg.duration_ms = Some((120_000 * u64::from(slowdown())).min(load::MAX_DURATION_MS));
    cfg.count = Some(5_000_000);
    cfg.log = Some(log.to_path_buf());
    cfg
}

/// Canary, completion with a watch window, rollback: what the body of the load does.
fn release(
    nginx: &std::path::Path,
    dir: &std::path::Path,
    addr: SocketAddr,
    d: &Handoffd,
) -> (Times, Nginx) {
    counted(d, false, per_phase(), "the load to reach g1");
    let mut g2 = Nginx::start(nginx, dir, 2, addr);
    g2.wait_ready(addr);
    let g2_pid = g2.proc.pid.to_string();
    let mut t = Times::default();
    (t.canary_sent, t.canary_done) = timed(d, &["promote", &g2_pid, "--weight", "10"]);
    counted(
        d,
        true,
        per_phase() / 4,
        "the canary to get new connections",
    );
    counted(d, false, per_phase(), "g1 to get the rest");
    (t.complete_sent, t.complete_done) = timed(d, &["promote", &g2_pid, "--watch", "60s"]);
    counted(d, false, per_phase(), "the load to reach g2");
    (_, t.rollback_done) = timed(d, &["rollback"]);
    let exited = g2.proc.wait_exit(scaled(Duration::from_secs(10)));
    t.g2_gone = load::monotonic_ns();
    assert!(
        exited.is_some(),
        "g2 quit on its SIGQUIT after the rollback"
    );
    counted(d, false, per_phase(), "the load to reach g1 again");
    (t, g2)
}

#[test]
fn nginx_canary_completion_and_rollback_in_the_watch_window_lose_no_request() {
    if !privileged("nginx_canary_completion_and_rollback_in_the_watch_window_lose_no_request") {
        return;
    }
    handoff_tests::raise_fd_limit().expect("raising the fd limit");
    let nginx = nginx_binary();
    in_new_netns(|| {
        let before = tcp_ext();
        let dir = TempDir::new("nginx-release-gens");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut g1 = Nginx::start(&nginx, dir.path(), 1, addr);
        g1.wait_ready(addr);
        let drain = ["--drain-signal", "SIGQUIT", "--drain-timeout"];
        let timeout = format!("{}s", 60 * slowdown());
        let args: Vec<&str> = drain.iter().copied().chain([timeout.as_str()]).collect();
        let mut d = Handoffd::start_with("nginx-release", &[addr], &args);
        d.promote(g1.proc.pid);
        let cfg = http_load(addr, &dir.path().join("load.log"));
        let (report, (times, g2)) = under_load(&cfg, || release(&nginx, dir.path(), addr, &d));
        let after = tcp_ext();
        let grew = |name: &str| counter(&after, name) - counter(&before, name);
        let aborted = grew("TCPAbortOnClose") + grew("TCPAbortOnData");
        eprintln!(
            "nginx release: {} requests, {:?} per generation, failures {:?}, {} retried after \
             the keep-alive race ({aborted} sockets reset by the kernel with data unread or \
             arriving), {} keep-alive connections reopened",
            report.attempts,
            report.by_name,
            report.failures,
            report.keepalive_race,
            report.reopened
        );
        assert_eq!(report.failures.total(), 0, "{:?}", report.failures);
        assert!(i128::from(report.keepalive_race) <= aborted, "{report:?}");
        for name in LOSS_COUNTERS {
            assert_eq!(grew(name), 0, "kernel counter {name} grew");
        }
        let entries = load::read_log(cfg.log.as_deref().expect("a log")).expect("the load log");
        phases(&entries, &times);
        assert_eq!(d.state_of(g1.proc.pid), Some(GenerationState::Active));
        wait_until("g2 to be retired", Duration::from_secs(5), || {
            d.state_of(g2.proc.pid) == Some(GenerationState::Retired)
        });
        assert!(
            g1.proc.wait_exit(Duration::ZERO).is_none(),
            "g1 was not told to quit: it is active again"
        );
        let signalled: Vec<String> = d
            .proc()
            .lines(handoff_tests::Stream::Stderr)
            .into_iter()
            .filter(|l| l.contains("signal sent") && l.contains("generation=1 "))
            .collect();
        assert!(
            signalled.is_empty(),
            "g1 got no signal in the watch window: {signalled:?}"
        );
    });
}

/// Which generation answered in each phase of the load log: only g1 before the canary;
/// both during it, g2 about a tenth of the requests; only g1 once g2 has quit.
fn phases(entries: &[LogEntry], t: &Times) {
    let count = |from: u64, to: u64, name: &str| {
        entries
            .iter()
            .filter(|e| (from..to).contains(&e.start_ns) && e.outcome.as_deref() == Ok(name))
            .count()
    };
    let before = (count(0, t.canary_sent, "g1"), count(0, t.canary_sent, "g2"));
    let canary = (
        count(t.canary_done, t.complete_sent, "g1"),
        count(t.canary_done, t.complete_sent, "g2"),
    );
    let window = (
        count(t.complete_done, t.rollback_done, "g1"),
        count(t.complete_done, t.rollback_done, "g2"),
    );
    let after = (
        count(t.g2_gone, u64::MAX, "g1"),
        count(t.g2_gone, u64::MAX, "g2"),
    );
    let share = 100.0 * canary.1 as f64 / (canary.0 + canary.1).max(1) as f64;
    eprintln!(
        "requests (g1, g2): before the canary {before:?}, during it {canary:?} ({share:.1} % \
         to g2), in the watch window {window:?}, after g2 quit {after:?}; g2 quit {} ms \
         after the rollback returned",
        (t.g2_gone - t.rollback_done) / 1_000_000
    );
    assert!(
        before.0 > 0 && before.1 == 0,
        "before the canary: {before:?}"
    );
    // Requests, not connections: each connection carries up to 20, so the share is loose.
    assert!(
        canary.1 > 0 && share < 30.0,
        "the canary got a share of about 10 %: {canary:?}"
    );
    assert!(window.1 > 0, "g2 served in the watch window: {window:?}");
    assert!(after.0 > 0 && after.1 == 0, "after g2 quit: {after:?}");
}
