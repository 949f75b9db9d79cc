//! Rollback under load on the real kernel (issue 14, point 1): `handoffctl rollback` while
//! clients connect all the time loses no connection, and every connection started after it
//! returns reaches the previous generation; so does every switch of a back-and-forth run.
//!
//! The previous generation must still listen to be rolled back to: it holds a connection, so
//! it drains without retiring, and the daemon runs with no drain signal (the default), so
//! nothing tells it to close its listeners.

mod support;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use handoff_common::proto::GenerationState;
use handoff_tests::load::{self, LoadReport, LogEntry};
use handoff_tests::{Proc, TempDir, scaled_down};
use support::{Handoffd, answers, loopback, only, privileged, testsrv, wait_until};

/// One change of the active generation made while the load runs.
#[derive(Debug)]
struct Switch {
    /// The handoffctl arguments.
    command: String,
    /// CLOCK_MONOTONIC ns just before handoffctl was started.
    sent_ns: u64,
    /// CLOCK_MONOTONIC ns just after it returned successfully.
    returned_ns: u64,
    /// How long the command took, handoffctl's own start and exit included.
    took: Duration,
    /// The generation every connection started after `returned_ns` (and before the next
    /// switch was sent) must reach.
    to: &'static str,
}

/// The two generations and the connection each holds so that it drains without retiring.
struct Generations {
    a: Proc,
    b: Proc,
    held_a: TcpStream,
    held_b: TcpStream,
}

/// Connections the program must steer to the active generation between two switches (and
/// before the first), so that every phase of the run is seen by the load.
fn per_phase() -> u64 {
    scaled_down(500u64, 60)
}

/// Starts handoffd on `addr` with A active and holding a connection, and B started but
/// not promoted yet.
fn start(name: &str, addr: SocketAddr) -> (Handoffd, Proc, TcpStream, Proc) {
    let a = testsrv("A", &[addr], &["--workers", "2", "--mode", "per-worker"]);
    let d = Handoffd::start(name, &[addr]);
    d.promote(a.pid);
    let (held_a, first, _) = load::hold(addr).expect("a connection to A");
    assert_eq!(first, "A");
    let b = testsrv("B", &[addr], &["--workers", "3", "--mode", "after-fork"]);
    (d, a, held_a, b)
}

/// Runs `handoffctl ARGS`, asserting that it succeeds, and times it.
fn switch(d: &Handoffd, args: &[&str], to: &'static str) -> Switch {
    let sent_ns = load::monotonic_ns();
    let started = Instant::now();
    let out = d.ctl(args);
    let took = started.elapsed();
    let returned_ns = load::monotonic_ns();
    assert!(
        out.status.success(),
        "handoffctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "handoffctl {args:?} took {took:?}: {}",
        String::from_utf8_lossy(&out.stdout).trim_end()
    );
    Switch {
        command: args.join(" "),
        sent_ns,
        returned_ns,
        took,
        to,
    }
}

/// Waits until the program has steered `n` more connections to the active generation
/// (the kernel's own count, read through `status`).
fn steered(d: &Handoffd, n: u64, what: &str) {
    let from = d.service().steering.active;
    wait_until(what, Duration::from_secs(10), || {
        d.service().steering.active >= from + n
    });
}

/// Runs the load on `addr`, logging every attempt to `log`, while `body` makes its
/// switches; stops it when `body` returns (or panics). Sized for this machine; with
/// HANDOFF_TEST_SLOWDOWN=N: clients /N (at least 16).
fn under_load(
    addr: SocketAddr,
    log: &Path,
    body: impl FnOnce() -> Vec<Switch>,
) -> (LoadReport, Vec<Switch>) {
    let cfg = support::release::logged_load(addr, scaled_down(128u32, 16), log);
    support::release::under_load(&cfg, body)
}

/// Checks every logged attempt against the switches: none failed, and each one started
/// after a switch returned and before the next was sent reached that switch's generation
/// (`first` for those before the first switch). Returns how many connections started in
/// each such phase, after each switch, and while a command was under way.
fn check(entries: &[LogEntry], first: &'static str, switches: &[Switch]) -> (Vec<u64>, u64) {
    let failed: Vec<_> = entries.iter().filter(|e| e.outcome.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} connections failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let mut phases = vec![0u64; switches.len() + 1];
    let mut in_flight = 0;
    for e in entries {
        // The last switch that returned before this connection started, if any.
        let done = switches.partition_point(|s| s.returned_ns < e.start_ns);
        if switches
            .get(done)
            .is_some_and(|next| next.sent_ns <= e.start_ns)
        {
            in_flight += 1; // started while that command ran: either generation may answer
            continue;
        }
        let (to, after) = match done.checked_sub(1).map(|i| &switches[i]) {
            Some(s) => (s.to, s.command.as_str()),
            None => (first, "the start"),
        };
        assert_eq!(
            e.outcome.as_deref(),
            Ok(to),
            "a connection started {} µs after `{after}` returned did not reach {to}",
            e.start_ns
                .saturating_sub(done.checked_sub(1).map_or(0, |i| switches[i].returned_ns))
                / 1000
        );
        phases[done] += 1;
    }
    (phases, in_flight)
}

/// Reads the load log and checks it (see [`check`]); prints what the run measured.
fn verify(report: &LoadReport, log: &Path, first: &'static str, switches: &[Switch]) -> Vec<u64> {
    let entries = load::read_log(log).expect("reading the load log");
    let (phases, in_flight) = check(&entries, first, switches);
    eprintln!(
        "load: {} connections, {} failed, {:?} per generation; per phase {phases:?}, \
         {in_flight} started while a command ran; commands took {:?}",
        report.attempts,
        report.failures.total(),
        report.by_name,
        switches.iter().map(|s| s.took).collect::<Vec<_>>()
    );
    assert_eq!(
        report.failures.total(),
        0,
        "no connection failed: {:?}",
        report.failures
    );
    assert_eq!(
        entries.len() as u64,
        report.attempts,
        "every attempt is logged"
    );
    phases
}

#[test]
fn rollback_under_load_loses_nothing_and_new_connections_reach_a() {
    if !privileged("rollback_under_load_loses_nothing_and_new_connections_reach_a") {
        return;
    }
    let addr = loopback();
    let (d, a, held_a, b) = start("rollback", addr);
    let dir = TempDir::new("rollback-load");
    let log = dir.path().join("load.log");
    let mut held_b = None;
    let (report, switches) = under_load(addr, &log, || {
        steered(&d, per_phase(), "the load to reach A");
        let promote = switch(&d, &["promote", &b.pid.to_string()], "B");
        // B holds a connection too: after the rollback it drains and stays listed.
        let (held, name, _) = load::hold(addr).expect("a connection to B");
        assert_eq!(name, "B", "a connection made after the promote");
        held_b = Some(held);
        steered(&d, per_phase(), "the load to reach B");
        let g = d.generation_of(a.pid).expect("A listed");
        assert_eq!(
            (g.state, g.listeners),
            (GenerationState::Draining, 2),
            "A drains, every listener in place: a rollback target"
        );
        let rollback = switch(&d, &["rollback"], "A");
        steered(&d, per_phase(), "the load to reach A after the rollback");
        vec![promote, rollback]
    });
    let phases = verify(&report, &log, "A", &switches);
    let took = switches[1].took;
    eprintln!(
        "rollback: {} connections started after it returned, all answered by A; \
         the command took {took:?}",
        phases[2]
    );
    assert!(phases[0] > 0, "A served before the promote: {phases:?}");
    assert!(phases[1] > 0, "B served before the rollback: {phases:?}");
    assert!(
        phases[2] > 0,
        "connections started after the rollback: {phases:?}"
    );
    after_the_rollback(
        &d,
        addr,
        Generations {
            a,
            b,
            held_a,
            held_b: held_b.expect("B held a connection"),
        },
        &report,
    );
}

/// `status` lists A active and B draining, and nothing else.
fn a_active_b_draining(d: &Handoffd, a: &Proc, b: &Proc, what: &str) {
    let states: Vec<_> = d
        .service()
        .generations
        .iter()
        .map(|x| (x.pid as u32, x.state))
        .collect();
    let expected = [
        (a.pid, GenerationState::Active),
        (b.pid, GenerationState::Draining),
    ];
    assert_eq!(states, expected, "{what}");
}

/// After the rollback A is active and B draining; every worker of both generations served
/// during the run; B retires once its held connection closes, and A keeps everything.
fn after_the_rollback(d: &Handoffd, addr: SocketAddr, g: Generations, report: &LoadReport) {
    a_active_b_draining(d, &g.a, &g.b, "status after the rollback");
    let served: BTreeSet<u32> = report.by_pid.keys().copied().collect();
    let workers: BTreeSet<u32> = g.a.workers.iter().chain(&g.b.workers).copied().collect();
    assert_eq!(served, workers, "every worker of both generations served");
    drop(g.held_b);
    wait_until(
        "B to retire after its last connection closed",
        Duration::from_secs(5),
        || d.state_of(g.b.pid) == Some(GenerationState::Retired),
    );
    assert_eq!(answers(addr, 50), only("A", 50), "A keeps every connection");
    assert_eq!(d.state_of(g.a.pid), Some(GenerationState::Active));
    drop(g.held_a);
}

#[test]
fn back_and_forth_under_load_each_switch_holds() {
    if !privileged("back_and_forth_under_load_each_switch_holds") {
        return;
    }
    const ROUNDS: usize = 3;
    let addr = loopback();
    let (d, a, _held_a, b) = start("rollback-flip", addr);
    let dir = TempDir::new("rollback-flip-load");
    let log = dir.path().join("load.log");
    let b_pid = b.pid.to_string();
    let mut held_b = None;
    let (report, switches) = under_load(addr, &log, || {
        steered(&d, per_phase(), "the load to reach A");
        let mut switches = vec![switch(&d, &["promote", &b_pid], "B")];
        held_b = Some(load::hold(addr).expect("a connection to B"));
        for round in 0..ROUNDS {
            steered(&d, per_phase(), "the load to reach B");
            switches.push(switch(&d, &["rollback"], "A"));
            steered(&d, per_phase(), "the load to reach A");
            if round + 1 < ROUNDS {
                // B drains with its listeners in place: promoting it again reactivates it.
                switches.push(switch(&d, &["promote", &b_pid], "B"));
            }
        }
        switches
    });
    let phases = verify(&report, &log, "A", &switches);
    assert!(
        phases.iter().all(|&n| n > 0),
        "every phase saw connections: {phases:?}"
    );
    let slowest = switches.iter().map(|s| s.took).max();
    eprintln!("{} switches, the slowest took {slowest:?}", switches.len());
    a_active_b_draining(&d, &a, &b, "status after the last switch, a rollback");
    drop(held_b);
}
