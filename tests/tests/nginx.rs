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
#[path = "nginx/server.rs"]
mod server;
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use handoff_common::proto::GenerationState;
use handoff_tests::load::{self, LoadConfig, LoadReport};
use handoff_tests::{Stream, TempDir, free_port, scaled, scaled_down, slowdown};
use netns::{counter, in_new_netns, tcp_ext};
use nix::errno::Errno;
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use server::{Nginx, nginx_binary};
use support::{Handoffd, privileged};

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
/// Kernel counters (TcpExt in /proc/net/netstat) that must not grow: any of them means a
/// connection was dropped or reset by the kernel.
const LOSS_COUNTERS: [&str; 4] = [
    "ListenOverflows",
    "ListenDrops",
    "TCPMigrateReqFailure",
    "TCPReqQFullDrop",
];

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

/// Runs the handoffs under load in a network namespace of its own, asserts what every
/// scenario must hold (no failed request, the keep-alive race's retries apart, which the
/// scenario judges; no drain ended by its timeout; no generation left running; no kernel
/// drop) and prints the figures.
fn handoffs_under_load(s: &Scenario) -> RunResult {
    handoff_tests::raise_fd_limit().expect("raising the fd limit");
    let nginx = nginx_binary();
    in_new_netns(|| {
        let counters_before = tcp_ext();
        let dir = TempDir::new(s.tag);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));

        let mut first = Nginx::start(&nginx, dir.path(), 1, addr);
        first.wait_ready(addr);
        assert_eq!(
            load::http_once(addr, scaled(Duration::from_secs(2))).map(|a| a.0),
            Ok("g1".to_owned()),
            "g1 answers before handoffd steers"
        );
        let args: Vec<&str> = s.handoffd_args.iter().map(String::as_str).collect();
        let mut d = Handoffd::start_with(s.tag, &[addr], &args);
        d.promote(first.proc.pid);

        let clients = scaled_down(CLIENTS, 16);
        let mut cfg = LoadConfig::new(addr, clients);
        cfg.http = true;
        cfg.requests_per_connection = s.requests_per_connection;
        // See `nginx_keepalive_drain_signal`: HTTP clients retry a request the server closed
        // unanswered on a reused connection; nothing else is retried.
        cfg.retry_keepalive_race = true;
        cfg.timeout_ms = REQUEST_TIMEOUT_MS * u64::from(slowdown());
        // Bounds in case the stop flag is never set; the run ends by the flag.
        cfg.duration_ms = Some(load::MAX_DURATION_MS);
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let mut current = first;
        // The old generations, watched by a thread of their own for their exits.
        let old: Mutex<Vec<Draining>> = Mutex::new(Vec::new());
        let watched = AtomicBool::new(false);
        let mut promote_times = Vec::new();
        let mut ready_times = Vec::new();
        let mut load_time = Duration::ZERO;
        let report = std::thread::scope(|scope| {
            // Stop the load and the watcher even when an assertion below fails, so that the
            // scope can end (and the guards kill what is left).
            let _stop = SetOnDrop(&stop);
            let _watched = SetOnDrop(&watched);
            scope.spawn(|| watch_exits(&old, &watched));
            let load = scope.spawn(|| load::run(&cfg, Some(&stop)));
            std::thread::sleep(DWELL);
            for n in 2..=HANDOFFS + 1 {
                let t = Instant::now();
                let mut next = Nginx::start(&nginx, dir.path(), n, addr);
                next.wait_ready(addr);
                ready_times.push(t.elapsed());
                let promoted = Instant::now();
                d.promote(next.proc.pid);
                promote_times.push(promoted.elapsed());
                lock(&old).push(Draining {
                    nginx: std::mem::replace(&mut current, next),
                    promoted,
                    exited: None,
                });
                std::thread::sleep(DWELL);
            }
            stop.store(true, Ordering::SeqCst);
            let report = load.join().expect("load thread");
            load_time = started.elapsed();
            // Give the last drains time to finish: an exit later than any test's bound is a
            // failure anyway, reported with how long it took.
            let deadline = Instant::now() + scaled(Duration::from_secs(30));
            while lock(&old).iter().any(|o| o.exited.is_none()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            report
        });
        let old = old.into_inner().unwrap_or_else(|p| p.into_inner());
        let counters_after = tcp_ext();
        let service = d.service();
        let timeouts: Vec<String> = d
            .proc()
            .lines(Stream::Stderr)
            .into_iter()
            .filter(|l| l.contains("drain timeout"))
            .collect();

        eprintln!(
            "\n{}: {} handoffs in {:.1} s, {} clients, {} request(s) per connection, \
             slowdown {}",
            s.tag,
            HANDOFFS,
            load_time.as_secs_f64(),
            clients,
            s.requests_per_connection,
            slowdown()
        );
        eprintln!(
            "{}: {} requests, {} ok, failures {:?} (keep-alive race, retried: {}), max latency {} ms, \
             keep-alive connections found closed and reopened {}",
            s.tag,
            report.attempts,
            report.ok,
            report.failures,
            report.keepalive_race,
            report.max_latency_ms,
            report.reopened
        );
        eprintln!("{}: per generation {:?}", s.tag, report.by_name);
        // Answers per worker (X-Pid) of each generation: the program's `hash % n` spreads
        // the connections over a generation's listeners, one per worker with nginx.
        let generations: Vec<&Nginx> = old
            .iter()
            .map(|o| &o.nginx)
            .chain(std::iter::once(&current))
            .collect();
        let per_worker: Vec<(usize, Vec<u64>)> = generations
            .iter()
            .map(|g| {
                let counts = g.workers.iter();
                let counts = counts.map(|w| report.by_pid.get(w).copied().unwrap_or(0));
                (g.generation, counts.collect())
            })
            .collect();
        eprintln!("{}: per generation and worker {per_worker:?}", s.tag);
        let ms = |v: &[Duration]| v.iter().map(|t| t.as_millis()).collect::<Vec<_>>();
        eprintln!(
            "{}: new nginx ready after (ms) {:?}",
            s.tag,
            ms(&ready_times)
        );
        eprintln!("{}: promote took (ms) {:?}", s.tag, ms(&promote_times));
        eprintln!(
            "{}: old master exited after its promote (ms) {:?}",
            s.tag,
            old.iter()
                .map(|o| o.exited.map(|t| t.as_millis()))
                .collect::<Vec<_>>()
        );
        let names = [
            "ListenOverflows",
            "ListenDrops",
            "TCPMigrateReqFailure",
            "TCPReqQFullDrop",
            "TCPMigrateReqSuccess",
            "TCPAbortOnData",
            "TCPAbortOnClose",
        ];
        let delta: BTreeMap<&str, i128> = names
            .iter()
            .map(|n| {
                (
                    *n,
                    counter(&counters_after, n) - counter(&counters_before, n),
                )
            })
            .collect();
        eprintln!(
            "{}: kernel counters, growth during the run: {delta:?}",
            s.tag
        );
        eprintln!("{}: steering {:?}\n", s.tag, service.steering);

        // Requests retried after the keep-alive race are the scenario's to judge; any
        // failure, a failed retry included, is a loss.
        assert_eq!(
            report.failures.total(),
            0,
            "no request failed ({} retried after the keep-alive race): {:?}",
            report.keepalive_race,
            report.failures
        );
        assert_eq!(report.ok + report.failures.total(), report.attempts);
        for n in 1..=HANDOFFS + 1 {
            assert!(
                report.by_name.get(&format!("g{n}")).copied().unwrap_or(0) > 0,
                "generation g{n} served requests: {:?}",
                report.by_name
            );
        }
        assert_eq!(
            report.by_name.len(),
            HANDOFFS + 1,
            "only our generations answered: {:?}",
            report.by_name
        );
        let workers: Vec<u32> = generations.iter().flat_map(|g| g.workers.clone()).collect();
        assert!(
            report.by_pid.keys().all(|pid| workers.contains(pid)),
            "only our workers answered: {:?}",
            report.by_pid
        );
        assert_eq!(
            report.by_pid.values().sum::<u64>(),
            report.ok,
            "every answer named its worker"
        );
        assert!(
            per_worker
                .iter()
                .all(|(_, counts)| counts.iter().all(|&n| n > 0)),
            "both workers of every generation served: {per_worker:?}"
        );
        assert!(
            timeouts.is_empty(),
            "every drain ended by its count, none by the drain timeout: {timeouts:?}"
        );
        for name in LOSS_COUNTERS {
            assert_eq!(
                delta[name], 0,
                "kernel counter {name} grew during the run: {delta:?}"
            );
        }
        // No old generation is left running: its master has been reaped and no process of
        // its group (the workers) lives.
        for o in &old {
            if o.exited.is_some() {
                assert_eq!(
                    killpg(Pid::from_raw(o.nginx.proc.pid as i32), None),
                    Err(Errno::ESRCH),
                    "g{}: a process of the old nginx (pgid {}) still lives",
                    o.nginx.generation,
                    o.nginx.proc.pid
                );
            }
        }
        // handoffd agrees: the exited generations it still lists are retired (it learns of an
        // exit through a pidfd, so allow it a moment), the last one is the active one.
        let expected = |pid: u32| {
            if pid == current.proc.pid {
                Some(GenerationState::Active)
            } else if old
                .iter()
                .any(|o| o.exited.is_some() && o.nginx.proc.pid == pid)
            {
                Some(GenerationState::Retired)
            } else {
                None
            }
        };
        let deadline = Instant::now() + scaled(Duration::from_secs(5));
        let mut service = service;
        while !service
            .generations
            .iter()
            .all(|g| expected(g.pid as u32).is_none_or(|want| g.state == want))
        {
            assert!(
                Instant::now() < deadline,
                "handoffd's view of the generations: {service:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
            service = d.service();
        }
        let active: Vec<u32> = service
            .generations
            .iter()
            .filter(|g| g.state == GenerationState::Active)
            .map(|g| g.pid as u32)
            .collect();
        assert_eq!(active, [current.proc.pid], "{service:?}");
        RunResult {
            abort_on_close: delta["TCPAbortOnClose"],
            abort_on_data: delta["TCPAbortOnData"],
            report,
            drains: old
                .iter()
                .map(|o| (format!("g{}", o.nginx.generation), o.exited))
                .collect(),
        }
    })
}

/// An old generation, from its promote on.
struct Draining {
    nginx: Nginx,
    /// When `handoffctl promote` of its successor started.
    promoted: Instant,
    /// How long after `promoted` its master had exited, once it has (seen within 5 ms; an
    /// exit during the promote call is seen when the call returns).
    exited: Option<Duration>,
}

/// Notes every 5 ms which old nginx masters have exited (and reaps them), until `done`.
fn watch_exits(old: &Mutex<Vec<Draining>>, done: &AtomicBool) {
    while !done.load(Ordering::SeqCst) {
        for o in lock(old).iter_mut().filter(|o| o.exited.is_none()) {
            if o.nginx.proc.wait_exit(Duration::ZERO).is_some() {
                o.exited = Some(o.promoted.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets the flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
