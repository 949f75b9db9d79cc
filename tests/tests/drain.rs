//! Drain and retirement on the real kernel: a draining generation keeps every connection,
//! is signalled the moment its last one closes, and nothing is lost across many handoffs.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use handoff_common::proto::GenerationState;
use handoff_tests::load::{self, LoadConfig, LoadReport};
use handoff_tests::{Proc, Stream, scaled, scaled_down, slowdown};
use nix::sys::signal::Signal;
use support::netns::{Netns, tcp_ext};
use support::{
    Handoffd, alive, answers, loopback, only, privileged, respawned, testsrv, wait_until,
};

/// The CLOCK_MONOTONIC stamp of the `term` line testsrv logs on SIGTERM.
fn term_ns(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("ns="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ns= in {line:?}"))
}

/// An old generation holding 3 connections drains: `connections: 3`, no signal while any
/// is open, the retire signal right after the last one closes.
fn waits_for_last_connection(name: &str, extra: &[&str]) {
    let addr = loopback();
    let a = testsrv("A", &[addr], extra);
    let d = Handoffd::start(name, &[addr]);
    d.promote(a.pid);
    let mut held: Vec<_> = (0..3)
        .map(|_| load::hold(addr).expect("a connection to A"))
        .collect();
    if !a.workers.is_empty() {
        assert!(
            held.iter().all(|(_, _, pid)| a.workers.contains(pid)),
            "a child accepted them"
        );
    }
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);

    let gen_a = |d: &Handoffd| d.generation_of(a.pid).expect("A listed");
    let g = gen_a(&d);
    assert_eq!(
        (g.state, g.connections),
        (GenerationState::Draining, 3),
        "{g:?}"
    );
    assert!(
        g.drain_age_ms.is_some() && g.drain_deadline_ms.is_some(),
        "drain age and deadline shown"
    );
    assert!(
        a.wait_line(Stream::Stderr, "term ", Duration::from_secs(3))
            .is_none(),
        "A was signalled while it held 3 connections"
    );
    held.truncate(1);
    wait_until("A's count to drop to 1", Duration::from_secs(5), || {
        gen_a(&d).connections == 1
    });
    assert!(
        a.wait_line(Stream::Stderr, "term ", Duration::from_millis(500))
            .is_none(),
        "A was signalled while it held a connection"
    );
    let closed = load::monotonic_ns();
    held.clear();
    let line = a
        .wait_line(Stream::Stderr, "term ", scaled(Duration::from_secs(5)))
        .expect("A got its retire signal after its last connection closed");
    let ms = term_ns(&line).saturating_sub(closed) as f64 / 1e6;
    eprintln!("last close -> retire signal in A: {ms:.2} ms");
    // Event-driven, not timer-driven: the signal follows the close, far inside the drain
    // timeout (300 s). The 50 ms goal is measured by `cargo xtask bench` (about 5 ms
    // here); a test on a shared machine asserts only what noise cannot break (252 ms
    // was seen with benchmarks running beside the tests).
    let bound = 2000.0 * f64::from(slowdown());
    assert!(ms < bound, "retire signal {ms:.1} ms after the last close");
    wait_until("A to be retired", Duration::from_secs(5), || {
        d.state_of(a.pid) == Some(GenerationState::Retired)
    });
    assert_eq!(answers(addr, 20), only("B", 20));
}

#[test]
fn draining_generation_waits_for_its_last_connection() {
    if privileged("draining_generation_waits_for_its_last_connection") {
        waits_for_last_connection("drain3", &[]);
    }
}

#[test]
fn draining_generation_waits_for_connections_of_its_children() {
    if privileged("draining_generation_waits_for_connections_of_its_children") {
        waits_for_last_connection("drain3-child", &["--workers", "1", "--mode", "shared"]);
    }
}

/// Kernel counters that grow when a connection is refused or dropped at the listener.
const DROP_COUNTERS: [&str; 4] = [
    "ListenOverflows",
    "ListenDrops",
    "TCPMigrateReqFailure",
    "TCPReqQFullDrop",
];

fn drop_counters() -> Vec<u64> {
    DROP_COUNTERS.iter().map(|c| tcp_ext(c)).collect()
}

/// Runs short (a new connection per request) and long-lived load on `addr` while
/// `restart` is called `n` times; returns both reports. Sized for this machine; with
/// HANDOFF_TEST_SLOWDOWN=N: short clients /N (at least 32), timeouts and the run's bound
/// xN; the 16 long-lived clients (asleep while they hold), their 1.5 s hold and the pauses
/// between restarts stay.
fn under_load(
    addr: SocketAddr,
    ns: &Netns,
    n: usize,
    mut restart: impl FnMut(usize),
) -> (LoadReport, LoadReport) {
    let bound = (120_000 * u64::from(slowdown())).min(load::MAX_DURATION_MS);
    let mut short = LoadConfig::new(addr, scaled_down(256, 32));
    short.duration_ms = Some(bound);
    short.timeout_ms = 2000 * u64::from(slowdown());
    let mut long = LoadConfig::new(addr, 16);
    long.duration_ms = Some(bound);
    long.hold_ms = 1500;
    long.timeout_ms = 2000 * u64::from(slowdown());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let short = s.spawn(|| ns.run(|| load::run(&short, Some(&stop))));
        let long = s.spawn(|| ns.run(|| load::run(&long, Some(&stop))));
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..n {
            restart(i);
            std::thread::sleep(Duration::from_millis(150));
        }
        stop.store(true, Ordering::SeqCst);
        (
            short.join().expect("short load"),
            long.join().expect("long load"),
        )
    })
}

#[test]
fn twenty_handoffs_under_load_lose_nothing() {
    if !privileged("twenty_handoffs_under_load_lose_nothing") {
        return;
    }
    handoff_tests::raise_fd_limit().expect("raising the fd limit");
    const HANDOFFS: usize = 20;
    let ns = Netns::create("zero-loss");
    let addr = SocketAddr::from(([127, 0, 0, 1], 8080));
    let start =
        |name: &str| ns.run(|| testsrv(name, &[addr], &["--workers", "2", "--mode", "per-worker"]));

    // handoff: start the next generation, promote it; handoffd retires the old one.
    let d = ns.run(|| Handoffd::start("zero-loss", &[addr]));
    let mut gens: Vec<Proc> = vec![start("g0")];
    d.promote(gens[0].pid);
    let before = ns.run(drop_counters);
    let (short, long) = under_load(addr, &ns, HANDOFFS, |i| {
        let next = start(&format!("g{}", i + 1));
        d.promote(next.pid);
        gens.push(next);
    });
    let after = ns.run(drop_counters);
    let last = gens.last().expect("generations").pid;
    wait_until(
        "every old generation to be retired",
        Duration::from_secs(10),
        || gens.iter().filter(|g| g.pid != last).all(|g| !alive(g.pid)),
    );
    let statuses: Vec<_> = d.service().generations.iter().map(|g| g.state).collect();
    eprintln!(
        "handoff, {HANDOFFS} handoffs: short {} ok / {} failed, long-lived {} ok / {} failed, max latency {} ms; states {statuses:?}",
        short.ok,
        short.failures.total(),
        long.ok,
        long.failures.total(),
        short.max_latency_ms.max(long.max_latency_ms)
    );
    drop(d);
    drop(gens);

    // The naive baseline: start the next generation, SIGTERM the old one, no handoffd.
    let mut naive: Vec<Proc> = vec![start("n0")];
    let (naive_short, naive_long) = under_load(addr, &ns, HANDOFFS, |i| {
        let next = start(&format!("n{}", i + 1));
        naive.last().expect("a generation").signal(Signal::SIGTERM);
        naive.push(next);
    });
    eprintln!(
        "naive, {HANDOFFS} restarts: short {} ok / {} failed {:?}, long-lived {} ok / {} failed",
        naive_short.ok,
        naive_short.failures.total(),
        naive_short.failures,
        naive_long.ok,
        naive_long.failures.total()
    );

    assert_eq!(
        short.failures.total(),
        0,
        "short connections failed: {:?}",
        short.failures
    );
    assert_eq!(
        long.failures.total(),
        0,
        "long-lived connections failed: {:?}",
        long.failures
    );
    assert!(
        short.ok >= scaled_down(1000, 125) && long.ok >= 16,
        "the load ran ({} short, {} long)",
        short.ok,
        long.ok
    );
    assert_eq!(before, after, "kernel drop counters {DROP_COUNTERS:?} grew");
}

#[test]
fn respawned_worker_of_the_active_generation_gets_connections() {
    if !privileged("respawned_worker_of_the_active_generation_gets_connections") {
        return;
    }
    let addr = loopback();
    let a = testsrv("A", &[addr], &[]);
    let d = Handoffd::start("respawn", &[addr]);
    d.promote(a.pid);
    let _held = load::hold(addr).expect("a connection to A, so that A stays draining");
    let m = testsrv(
        "M",
        &[addr],
        &["--workers", "2", "--mode", "after-fork", "--respawn"],
    );
    d.promote(m.pid);
    let victim = m.workers[0];
    let survivor = m.workers[1];
    let fresh = respawned(&m, victim);
    // Until the new listener joins, the survivor takes everything; A never gets any.
    let mut by_pid = std::collections::BTreeMap::<u32, usize>::new();
    wait_until(
        "the respawned worker to get connections",
        Duration::from_secs(5),
        || {
            for _ in 0..20 {
                let (name, pid) =
                    load::connect_once(addr, scaled(Duration::from_secs(2))).expect("answered");
                assert_eq!(name, "M", "a connection went to the previous generation");
                *by_pid.entry(pid).or_default() += 1;
            }
            by_pid.contains_key(&fresh)
        },
    );
    assert!(
        by_pid.keys().all(|p| *p == fresh || *p == survivor),
        "{by_pid:?}"
    );
    let g = d.generation_of(m.pid).expect("M listed");
    assert_eq!(
        g.listeners, 2,
        "the new listener took the closed one's slot"
    );
}

#[test]
fn drain_timeout_and_kill_after() {
    if !privileged("drain_timeout_and_kill_after") {
        return;
    }
    let addr = loopback();
    let mut a = testsrv("A", &[addr], &["--ignore-term"]);
    let d = Handoffd::start_with(
        "timeout",
        &[addr],
        &["--drain-timeout", "1s", "--kill-after", "1s"],
    );
    d.promote(a.pid);
    let _held = load::hold(addr).expect("a connection to A");
    let b = testsrv("B", &[addr], &[]);
    let promoted = Instant::now();
    d.promote(b.pid);
    let line = a
        .wait_line(Stream::Stderr, "term ", scaled(Duration::from_secs(5)))
        .expect("the drain timeout sent the retire signal");
    let after = promoted.elapsed();
    assert!(line.ends_with("ignored"), "{line}");
    assert!(
        after >= Duration::from_millis(900),
        "retire signal after {after:?}, before the timeout"
    );
    a.wait_exit(scaled(Duration::from_secs(5)))
        .expect("kill-after SIGKILLed A");
    let killed = promoted.elapsed();
    assert!(
        killed >= Duration::from_millis(1900),
        "killed after {killed:?}, before kill-after"
    );
    wait_until("A to be retired", Duration::from_secs(5), || {
        d.state_of(a.pid) == Some(GenerationState::Retired)
    });
    assert_eq!(answers(addr, 20), only("B", 20));
}

#[test]
fn crashed_generations_are_retired_and_connections_still_succeed() {
    if !privileged("crashed_generations_are_retired_and_connections_still_succeed") {
        return;
    }
    let addr = loopback();
    let a = testsrv("A", &[addr], &[]);
    let d = Handoffd::start("crash", &[addr]);
    d.promote(a.pid);
    let held = load::hold(addr).expect("a connection to A");
    let mut b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    // The active generation crashes: the previous one, still listening, takes over.
    b.signal(Signal::SIGKILL);
    b.wait_exit(scaled(Duration::from_secs(5))).expect("B died");
    wait_until("B to be retired", Duration::from_secs(5), || {
        d.state_of(b.pid) == Some(GenerationState::Retired)
    });
    let before = d.service().steering.fallback;
    assert_eq!(
        answers(addr, 50),
        only("A", 50),
        "the draining generation serves"
    );
    assert!(
        d.service().steering.fallback - before >= 50,
        "the program fell back on purpose"
    );
    // A draining generation crashes: retired, and the active one serves.
    let c = testsrv("C", &[addr], &[]);
    d.promote(c.pid);
    let mut a = a;
    a.signal(Signal::SIGKILL);
    a.wait_exit(scaled(Duration::from_secs(5))).expect("A died");
    drop(held);
    wait_until("A to be retired", Duration::from_secs(5), || {
        d.state_of(a.pid) == Some(GenerationState::Retired)
    });
    assert_eq!(answers(addr, 50), only("C", 50));
}

#[test]
fn socket_of_another_generation_is_refused() {
    if !privileged("socket_of_another_generation_is_refused") {
        return;
    }
    // As nginx's own USR2 upgrade does: a child holds the very sockets of its parent.
    let addr = loopback();
    let m = testsrv("M", &[addr], &["--workers", "2", "--mode", "shared"]);
    let d = Handoffd::start("shared-socket", &[addr]);
    d.promote(m.pid);
    let err = d.refused(&["promote", &m.workers[0].to_string()]);
    assert!(err.contains("already belongs to generation"), "{err}");
    assert_eq!(d.service().generations.len(), 1);
}

#[test]
fn bad_drain_settings_are_refused_at_start() {
    for (args, expect) in [
        (&["--retire-signal", "SIGFOO"][..], "not a signal"),
        (&["--drain-signal", "0"][..], "not a signal"),
        (&["--drain-timeout", "0s"][..], "not a positive duration"),
        (&["--kill-after=-5s"][..], "not a positive duration"),
        (
            &["--drain-timeout", "5 parsecs"][..],
            "not a positive duration",
        ),
    ] {
        let out = std::process::Command::new(handoff_tests::bin_path("handoffd"))
            .args([
                "--listen",
                "127.0.0.1:1",
                "--state-dir",
                "/nonexistent/handoff-test",
            ])
            .args(args)
            .output()
            .expect("running handoffd");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!Path::new("/nonexistent/handoff-test").exists());
    }
}
