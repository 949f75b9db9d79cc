//! Steering on the real kernel: an unpromoted generation gets nothing, a promoted one
//! everything, under load too, for every master/worker layout and address family.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use handoff_common::proto::GenerationState;
use handoff_tests::load::{self, LoadConfig};
use handoff_tests::{scaled, scaled_down};
use support::{Handoffd, answers, answers_by_pid, loopback, only, privileged, testsrv, wait_until};

#[test]
fn unpromoted_generation_gets_nothing_then_everything() {
    if !privileged("unpromoted_generation_gets_nothing_then_everything") {
        return;
    }
    let addr = loopback();
    let a = testsrv("A", &[addr], &[]);
    let d = Handoffd::start("steer", &[addr]);
    d.promote(a.pid);
    // A holds a connection, so nothing may stop it.
    let (_held, name, _) = load::hold(addr).expect("a connection to A");
    assert_eq!(name, "A");

    let b = testsrv("B", &[addr], &[]);
    let before = d.service().steering;
    assert_eq!(
        answers(addr, 300),
        only("A", 300),
        "B was started, not promoted"
    );
    let mid = d.service().steering;
    // Counters count decisions: a retransmitted SYN (or a SYN cookie's ACK, on a loaded
    // machine) is decided again, so at least one per connection.
    assert!(
        mid.active - before.active >= 300,
        "the program chose A for each connection"
    );

    d.promote(b.pid);
    let after_promote = d.service().steering;
    assert_eq!(
        answers(addr, 300),
        only("B", 300),
        "after promote every connection goes to B"
    );
    let s = d.service();
    assert!(
        s.steering.active - after_promote.active >= 300,
        "the program chose B each time"
    );
    assert_eq!(
        s.steering.kernel_hash, 0,
        "no connection was left to the kernel's hash"
    );
    assert_eq!(
        s.steering.fallback, 0,
        "no fallback: both generations listen"
    );
    assert!(
        s.steering.probe >= 2,
        "each promote was verified by a probe"
    );

    let gens: Vec<_> = s
        .generations
        .iter()
        .map(|g| (g.pid as u32, g.state, g.listeners))
        .collect();
    assert_eq!(
        gens,
        vec![
            (a.pid, GenerationState::Draining, 1),
            (b.pid, GenerationState::Active, 1)
        ],
        "A is draining, still alive and listening; B active"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{}", a.pid)).exists(),
        "A is alive"
    );
}

#[test]
fn promote_under_load_loses_nothing() {
    if !privileged("promote_under_load_loses_nothing") {
        return;
    }
    handoff_tests::raise_fd_limit().expect("raising the fd limit");
    let addr = loopback();
    let a = testsrv("A", &[addr], &["--workers", "2", "--mode", "per-worker"]);
    let d = Handoffd::start("load", &[addr]);
    d.promote(a.pid);
    let b = testsrv("B", &[addr], &["--workers", "2", "--mode", "per-worker"]);

    let log = std::env::temp_dir().join(format!("handoff-load-{}.log", std::process::id()));
    // Sized for this machine; with HANDOFF_TEST_SLOWDOWN=N: clients and the connections
    // made before the promote /N (at least 32 and 250), timeouts xN. The 1.5 s after the
    // promote (longer until 100 connections started after it) and every assertion on
    // where connections went stay.
    let clients = scaled_down(256u32, 32);
    let warm_up = scaled_down(2000usize, 250);
    let mut cfg = LoadConfig::new(addr, clients);
    cfg.timeout_ms *= u64::from(handoff_tests::slowdown());
    // Bounds in case the stop flag is never set; the run ends by the flag.
    cfg.duration_ms = Some(scaled(Duration::from_secs(10)).as_millis() as u64);
    cfg.count = Some(2_000_000);
    cfg.log = Some(log.clone());
    let stop = AtomicBool::new(false);
    let (report, promoted_at) = std::thread::scope(|s| {
        let load = s.spawn(|| load::run(&cfg, Some(&stop)));
        // Let the load reach full speed on A first.
        wait_until("the load to reach A", Duration::from_secs(10), || {
            std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) >= warm_up
        });
        d.promote(b.pid);
        let promoted_at = load::monotonic_ns();
        std::thread::sleep(Duration::from_millis(1500));
        // A slow runner makes fewer connections in that window: the load goes on until
        // 100 have started after the promote.
        wait_until(
            "100 connections after the promote",
            Duration::from_secs(10),
            || started_after(&log, promoted_at) >= 100,
        );
        stop.store(true, Ordering::SeqCst);
        (load.join().expect("load thread"), promoted_at)
    });
    let entries = load::read_log(&log).expect("reading the load log");
    let _ = std::fs::remove_file(&log);
    all_after_the_promote_reach_b(&report, &entries, promoted_at, warm_up);
}

/// How many connections in the load log `log` started after `promoted_at`.
fn started_after(log: &std::path::Path, promoted_at: u64) -> usize {
    // Buffered: the last line may be partial, and its time is then not counted.
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .filter(|&start_ns| start_ns > promoted_at)
        .count()
}

/// Nothing failed, and every connection started after the promote reached B.
fn all_after_the_promote_reach_b(
    report: &load::LoadReport,
    entries: &[load::LogEntry],
    promoted_at: u64,
    warm_up: usize,
) {
    eprintln!("load report: {report:?}");
    assert_eq!(
        report.failures.total(),
        0,
        "no connection failed: {:?}",
        report.failures
    );
    assert!(
        report.ok >= warm_up as u64,
        "the load made enough connections ({})",
        report.ok
    );
    let late: Vec<_> = entries
        .iter()
        .filter(|e| e.start_ns > promoted_at)
        .collect();
    assert!(
        late.len() >= 100,
        "enough connections started after the promote ({})",
        late.len()
    );
    let strays: Vec<_> = late
        .iter()
        .filter(|e| e.outcome.as_deref() != Ok("B"))
        .collect();
    assert!(
        strays.is_empty(),
        "{} of {} connections started after promote returned did not reach B, e.g. {:?}",
        strays.len(),
        late.len(),
        strays.first()
    );
    assert!(
        report.by_name.get("A").copied().unwrap_or(0) > 0,
        "A served before the promote"
    );
}

/// Every worker of a promoted master answers, for each way of making listeners.
fn master_and_workers(mode: &str) {
    let addr = loopback();
    let old = testsrv("old", &[addr], &[]);
    let d = Handoffd::start(&format!("workers-{mode}"), &[addr]);
    d.promote(old.pid);
    let m = testsrv("M", &[addr], &["--workers", "3", "--mode", mode]);
    d.promote(m.pid);
    let by_pid = answers_by_pid(addr, 300);
    let workers: BTreeSet<u32> = m.workers.iter().copied().collect();
    let answered: BTreeSet<u32> = by_pid.keys().copied().collect();
    assert_eq!(
        answered, workers,
        "{mode}: every worker, and only M's workers, answered ({by_pid:?})"
    );
    let s = d.service();
    let expected_listeners = if mode == "shared" { 1 } else { 3 };
    assert_eq!(
        s.generations.last().map(|g| g.listeners),
        Some(expected_listeners)
    );
}

#[test]
fn master_with_shared_listener() {
    if privileged("master_with_shared_listener") {
        master_and_workers("shared");
    }
}

#[test]
fn master_with_listener_per_worker() {
    if privileged("master_with_listener_per_worker") {
        master_and_workers("per-worker");
    }
}

#[test]
fn workers_listening_after_fork() {
    if privileged("workers_listening_after_fork") {
        master_and_workers("after-fork");
    }
}

#[test]
fn ipv6_and_two_addresses() {
    if !privileged("ipv6_and_two_addresses") {
        return;
    }
    let port = handoff_tests::free_port();
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    let v6: SocketAddr = format!("[::1]:{port}").parse().expect("an address");
    let a = testsrv("A", &[v4, v6], &["--workers", "2", "--mode", "per-worker"]);
    let d = Handoffd::start("two", &[v4, v6]);
    d.promote(a.pid);
    assert_eq!(answers(v4, 50), only("A", 50));
    assert_eq!(answers(v6, 50), only("A", 50));
    let b = testsrv("B", &[v4, v6], &[]);
    assert_eq!(answers(v6, 50), only("A", 50), "B not promoted yet");
    d.promote(b.pid);
    assert_eq!(answers(v4, 100), only("B", 100));
    assert_eq!(answers(v6, 100), only("B", 100));
    assert_eq!(d.service().generations.last().map(|g| g.listeners), Some(2));

    // A candidate listening on one of the two addresses only is refused.
    let c = testsrv("C", &[v6], &[]);
    let err = d.refused(&["promote", &c.pid.to_string()]);
    assert!(
        err.contains(&v4.to_string()),
        "the missing address is named: {err}"
    );
    assert_eq!(answers(v6, 20), only("B", 20), "steering unchanged");
}

#[test]
fn more_specific_address_is_refused_and_reported() {
    if !privileged("more_specific_address_is_refused_and_reported") {
        return;
    }
    let port = handoff_tests::free_port();
    let any = SocketAddr::from(([0, 0, 0, 0], port));
    let lo = SocketAddr::from(([127, 0, 0, 1], port));
    let a = testsrv("A", &[any], &[]);
    let d = Handoffd::start("specific", &[any]);
    d.promote(a.pid);
    let b = testsrv("B", &[lo], &[]);
    let err = d.refused(&["promote", &b.pid.to_string()]);
    assert!(
        err.contains(&lo.to_string()) && err.contains("outside"),
        "refusal names the address: {err}"
    );
    let s = d.service();
    assert_eq!(
        s.foreign_listeners.len(),
        1,
        "the 127.0.0.1 listener is reported: {s:?}"
    );
    assert_eq!(s.foreign_listeners[0].addr, lo.to_string());
    assert_eq!(s.foreign_listeners[0].pid, Some(b.pid as i32));
    assert_eq!(s.generations.len(), 1, "nothing changed");
}

#[test]
fn dual_stack_and_v6only_are_different_groups() {
    if !privileged("dual_stack_and_v6only_are_different_groups") {
        return;
    }
    let port = handoff_tests::free_port();
    let any6: SocketAddr = format!("[::]:{port}").parse().expect("an address");
    let a = testsrv("A", &[any6], &["--v6only", "true"]);
    let d = Handoffd::start("v6only", &[any6]);
    d.promote(a.pid);
    let b = testsrv("B", &[any6], &["--v6only", "false"]);
    let err = d.refused(&["promote", &b.pid.to_string()]);
    assert!(
        err.contains("dual-stack") && err.contains("v6only"),
        "refusal names both groups: {err}"
    );
    let v6: SocketAddr = format!("[::1]:{port}").parse().expect("an address");
    assert_eq!(d.service().generations.len(), 1, "nothing changed");
    // The dual-stack socket takes IPv6 traffic itself (a group of its own), which is why
    // it is refused; status reports it.
    let s = d.service();
    assert_eq!(
        s.foreign_listeners.len(),
        1,
        "the dual-stack listener is reported: {s:?}"
    );
    drop(b);
    assert_eq!(answers(v6, 20), only("A", 20));
}
