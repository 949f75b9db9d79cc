//! nginx as it ships (Debian's `nginx-light`: a master and 2 workers, `listen … reuseport`),
//! restarted again and again under HTTP load through handoff, losing no request. With
//! keep-alive clients nginx itself drops the requests that race its close of idle
//! connections; the client retries those, as HTTP clients do, and the test bounds them by
//! the kernel's count (see `nginx_keepalive_drain_signal`).
//!
//! Each generation is a fresh nginx with a prefix directory of its own, answering `gN`. A
//! handoff is: start generation N+1, wait until its workers listen, `handoffctl promote` its
//! master; handoffd then steers every new connection to it and stops the old nginx with
//! SIGQUIT (graceful quit), either as the retire signal once the old generation has no
//! connection left, or as the drain signal at once (keep-alive clients: nginx closes idle
//! connections only when told).
//!
//! Sized for this machine: with `HANDOFF_TEST_SLOWDOWN=N` the clients are divided by N (at
//! least 16) and the request timeout, the readiness and exit deadlines and the drain timeout
//! are N times longer; handoffs, dwell and every assertion stay.
//!
//! Each test runs in a network namespace of its own: the kernel's TCP counters checked at the
//! end (listen queue overflows and drops, failed migrations) are then this test's alone, and
//! nothing else can listen on its port. The namespace lives as long as the test's thread and
//! the processes it started; nothing needs removing afterwards.

// In nginx/: a file next to this one would be a test binary of its own.
#[path = "nginx/netns.rs"]
mod netns;
#[path = "nginx/run.rs"]
mod run;
#[path = "nginx/server.rs"]
mod server;
mod support;

use std::time::Duration;

use handoff_tests::load::LoadReport;
use handoff_tests::{scaled, slowdown};
use run::handoffs_under_load;
use support::privileged;

/// Handoffs per test.
const HANDOFFS: usize = 12;
/// Concurrent HTTP clients on this machine (divided by the slowdown, at least 16).
const CLIENTS: u32 = 128;
/// How long each generation serves the load before the next handoff.
const DWELL: Duration = Duration::from_millis(400);
/// A request slower than this is a failure (times the slowdown).
const REQUEST_TIMEOUT_MS: u64 = 3000;
/// Deadline for a new nginx's workers to listen (times the slowdown).
const READY_TIMEOUT: Duration = Duration::from_secs(10);
use netns::LOSS_COUNTERS;

#[test]
fn nginx_close_per_request() {
    if !privileged("nginx_close_per_request") {
        return;
    }
    let run = handoffs_under_load(&Scenario {
        tag: "nginx-close",
        requests_per_connection: 1,
        handoffd_args: vec!["--retire-signal".into(), "SIGQUIT".into()],
    });
    // No drain signal: each old nginx quits when handoffd has counted its last connection.
    // Nothing holds a connection long here, so that is soon after its promote.
    run.assert_all_exited(scaled(Duration::from_secs(30)));
    // No connection is reused, so the keep-alive race cannot happen: nothing was retried.
    assert_eq!(run.report.keepalive_race, 0, "{:?}", run.report);
}

/// Keep-alive clients, and `--drain-signal SIGQUIT`: nginx closes its idle keep-alive
/// connections at once (it would keep them until the keep-alive timeout otherwise).
///
/// What nginx cannot avoid on SIGQUIT, decided to be the client's to handle: a connection it
/// closes as idle may already hold the client's next request, unread (the kernel resets it:
/// `TCPAbortOnClose`), or receive it just after the close (the kernel resets it:
/// `TCPAbortOnData`, though the client may read the FIN first: EOF). The server never read
/// such a request, and HTTP clients send it again (RFC 9112 §9.3.1). So does this test's
/// client (`loadgen --retry-keepalive-race`), once, and only for a request sent on a reused
/// keep-alive connection of which no byte of the answer came back; every other failure,
/// and a failed retry, counts, and the total must be 0 (asserted in
/// [`handoffs_under_load`]). To keep the race visible and bounded, the test counts the
/// retries and asserts that they are at most the growth of the kernel's `TCPAbortOnClose`
/// plus `TCPAbortOnData` in the test's network namespace during the run: each retried
/// request must be one the kernel reset unread. The output shows the three numbers.
#[test]
fn nginx_keepalive_drain_signal() {
    if !privileged("nginx_keepalive_drain_signal") {
        return;
    }
    let drain_timeout = format!("{}s", 60 * slowdown());
    let run = handoffs_under_load(&Scenario {
        tag: "nginx-keepalive",
        requests_per_connection: 20,
        handoffd_args: vec![
            "--drain-signal".into(),
            "SIGQUIT".into(),
            "--drain-timeout".into(),
            drain_timeout,
        ],
    });
    // SIGQUIT at the promote makes nginx close its idle keep-alive connections and finish the
    // requests in progress: each drain ends long before the drain timeout.
    run.assert_all_exited(scaled(Duration::from_secs(10)));
    assert!(
        run.report.reopened > 0,
        "the old generations closed idle keep-alive connections, and clients reopened them"
    );
    let aborted = run.abort_on_close + run.abort_on_data;
    eprintln!(
        "nginx-keepalive: {} requests retried after the keep-alive race; the kernel reset {} \
         sockets closed with unread data (TCPAbortOnClose) and {} receiving data after the \
         close (TCPAbortOnData), {aborted} in all",
        run.report.keepalive_race, run.abort_on_close, run.abort_on_data
    );
    assert!(
        i128::from(run.report.keepalive_race) <= aborted,
        "{} requests retried after the keep-alive race, more than the {aborted} sockets the \
         kernel reset with data unread or arriving after the close ({} + {})",
        run.report.keepalive_race,
        run.abort_on_close,
        run.abort_on_data
    );
}

/// One test's setup.
struct Scenario {
    tag: &'static str,
    /// 1: `Connection: close` on every request; more: keep-alive.
    requests_per_connection: u32,
    handoffd_args: Vec<String>,
}

/// What a run measured, for the test's own assertions.
struct RunResult {
    report: LoadReport,
    /// Per old generation: its name and how long after its promote its master exited
    /// (`None`: still running when the run ended).
    drains: Vec<(String, Option<Duration>)>,
    /// Growth of TCPAbortOnClose: sockets closed with unread data (the kernel reset them).
    abort_on_close: i128,
    /// Growth of TCPAbortOnData: closed sockets that received data (the kernel reset them).
    abort_on_data: i128,
}

impl RunResult {
    /// Every old nginx master exited within `within` of the promote that replaced it.
    fn assert_all_exited(&self, within: Duration) {
        let late: Vec<_> = self
            .drains
            .iter()
            .filter(|(_, took)| took.is_none_or(|t| t > within))
            .collect();
        assert!(
            late.is_empty(),
            "old generations that did not exit within {within:?} of their promote: {late:?}"
        );
    }
}
