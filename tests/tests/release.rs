//! Release safety on the real kernel (issue 14, points 2, 3 and 4): a candidate that fails
//! its health check is sent no client and the refusal names the listener, while one that
//! passes is checked through every worker's listener and promoted; a canary at 10 % gets
//! 10 % of new connections on every worker and its completion all of them; killing the new
//! generation inside its watch window puts traffic back on the previous one within 100 ms.
//!
//! The tests of this file run one at a time ([`exclusive`]): their loads and the times they
//! measure would otherwise share this machine's two CPUs.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use handoff_common::proto::GenerationState;
use handoff_tests::load::{self, LoadConfig, LoadReport, LogEntry};
use handoff_tests::{Proc, TempDir, free_port, scaled, scaled_down, slowdown};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use support::release::{
    Accept, CLIENT_SOURCE, accepts, beside, exclusive, log_time_of_day, metrics, sample,
    sourced_load, time_of_day_now, under_load,
};
use support::{Handoffd, loopback, privileged, testsrv, wait_until};

/// New connections made while B is a canary at 10 % (point 3 asks for at least 5000).
const CANARY_CONNECTIONS: u64 = 6000;
/// How far the canary's share may be from 10 %, in percent.
const SHARE_TOLERANCE: f64 = 2.0;
/// Within how long of the new generation's death traffic must be back (times the slowdown).
const BACK_WITHIN: Duration = Duration::from_millis(100);

/// Connections the program must steer to the active generation in each phase of a run.
fn per_phase() -> u64 {
    scaled_down(300u64, 60)
}

/// Waits until the program has steered `n` more connections to the active generation.
fn steered(d: &Handoffd, n: u64, what: &str) {
    let from = d.service().steering.active;
    wait_until(what, Duration::from_secs(10), || {
        d.service().steering.active >= from + n
    });
}

/// Runs `handoffctl ARGS`, asserting that it succeeds; returns what it printed.
fn ctl_ok(d: &Handoffd, args: &[&str]) -> String {
    let out = d.ctl(args);
    assert!(
        out.status.success(),
        "handoffctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
    eprintln!("handoffctl {args:?}: {text}");
    text
}

/// A load of `count` connections (the line protocol) on `addr`, bounded in time too.
fn line_load(addr: SocketAddr, count: u64) -> LoadConfig {
    let mut cfg = LoadConfig::new(addr, scaled_down(32u32, 8));
    cfg.timeout_ms *= u64::from(slowdown());
    cfg.count = Some(count);
    cfg.duration_ms = Some((120_000 * u64::from(slowdown())).min(load::MAX_DURATION_MS));
    cfg
}

/// Answers per worker of `p`, from `report`.
fn per_worker(report: &LoadReport, p: &Proc) -> Vec<u64> {
    let n = |w: &u32| report.by_pid.get(w).copied().unwrap_or(0);
    p.workers.iter().map(n).collect()
}

#[test]
fn a_canary_at_10_percent_gets_10_percent_on_every_worker_and_completion_all() {
    if !privileged("a_canary_at_10_percent_gets_10_percent_on_every_worker_and_completion_all") {
        return;
    }
    let _one = exclusive();
    let addr = loopback();
    // Each worker its own listener: the program's pick of a worker is a pick of a slot.
    // 25 of them, the example: were the canary's share taken from the same bits of
    // the hash as the pick of a worker (`hash % 100 < 10` and `hash % 25`), only 10 of
    // each generation's 25 workers would get canary connections.
    let layout = ["--workers", "25", "--mode", "after-fork"];
    let a = testsrv("A", &[addr], &layout);
    let d = Handoffd::start("canary", &[addr]);
    d.promote(a.pid);
    let b = testsrv("B", &[addr], &layout);
    let said = ctl_ok(&d, &["promote", &b.pid.to_string(), "--weight", "10"]);
    assert!(said.contains("takes 10 % of new connections"), "{said}");
    assert_eq!(d.state_of(a.pid), Some(GenerationState::Active));

    let before = d.service().steering;
    let report = load::run(&line_load(addr, CANARY_CONNECTIONS), None);
    let after = d.service().steering;
    assert_eq!(report.failures.total(), 0, "{:?}", report.failures);
    assert_eq!(report.ok, CANARY_CONNECTIONS, "every connection answered");
    let to_b = report.by_name.get("B").copied().unwrap_or(0);
    let share = 100.0 * to_b as f64 / report.ok as f64;
    let (wa, wb) = (per_worker(&report, &a), per_worker(&report, &b));
    let canary = after.canary - before.canary;
    eprintln!(
        "canary at 10 %: {} connections, {to_b} to B ({share:.2} %); per worker A {wa:?}, \
         B {wb:?}; the program counted {canary} canary decisions and {} others, {} probes; slowest \
         answer {} ms",
        report.ok,
        after.active - before.active,
        after.probe - before.probe,
        report.max_latency_ms
    );
    assert!(
        (share - 10.0).abs() <= SHARE_TOLERANCE,
        "B got {share:.2} % of new connections, not 10 % ± {SHARE_TOLERANCE}"
    );
    assert_eq!(
        report
            .by_name
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["A", "B"],
        "{:?}",
        report.by_name
    );
    assert!(
        wa.iter().chain(&wb).all(|&n| n > 0),
        "every worker of both generations got a share: A {wa:?}, B {wb:?}"
    );
    // The program also decides a few times more than the load connects (0 to 51 per 6000
    // seen, with no probe, syncookie, SYN retransmit or listen drop counted meanwhile; not
    // explained yet): B's answers must be its canary decisions but for those.
    let extra = (canary + after.active - before.active).saturating_sub(report.ok);
    assert!(
        (to_b..=to_b + extra).contains(&canary) && extra <= report.ok / 100,
        "the program's {canary} canary decisions are B's {to_b} answers ({extra} extra)"
    );

    // `promote PID` again: the canary takes every new connection.
    let said = ctl_ok(&d, &["promote", &b.pid.to_string()]);
    assert!(said.contains("is active"), "{said}");
    let n = scaled_down(2000u64, 500);
    let report = load::run(&line_load(addr, n), None);
    let wb = per_worker(&report, &b);
    eprintln!("completed: {:?}, per worker of B {wb:?}", report.by_name);
    assert_eq!(report.failures.total(), 0, "{:?}", report.failures);
    assert_eq!(report.by_name, BTreeMap::from([("B".to_owned(), n)]));
    assert!(wb.iter().all(|&n| n > 0), "every worker of B: {wb:?}");
}

/// When the new generation was killed, on the load's clock and the log's.
struct Death {
    /// CLOCK_MONOTONIC ns just before the SIGKILL.
    ns: u64,
    /// Seconds since midnight UTC then.
    time_of_day: f64,
}

/// What the load log shows after a death at `t0_ns`.
#[derive(Debug)]
struct Back {
    /// Connections started after the death.
    after: usize,
    /// Of those, the ones that failed or reached the dead generation.
    bad: usize,
    /// From the death to the start of the first connection answered by the old generation.
    first_old: Duration,
    /// From the death to the start of the last connection that failed or reached the dead
    /// generation, if any: every one started later was answered by the old generation.
    last_bad: Option<Duration>,
    /// Connections started after `last_bad`.
    good_after: usize,
}

fn back_after(entries: &[LogEntry], t0_ns: u64, old: &str) -> Back {
    let after: Vec<&LogEntry> = entries.iter().filter(|e| e.start_ns >= t0_ns).collect();
    let is_old = |e: &&&LogEntry| e.outcome.as_deref() == Ok(old);
    let since = |ns: u64| Duration::from_nanos(ns - t0_ns);
    let first_old = after.iter().filter(is_old).map(|e| e.start_ns).min();
    let bad: Vec<u64> = after
        .iter()
        .filter(|e| !is_old(e))
        .map(|e| e.start_ns)
        .collect();
    let last_bad = bad.iter().copied().max();
    Back {
        after: after.len(),
        bad: bad.len(),
        first_old: since(first_old.expect("a connection answered by the old generation")),
        last_bad: last_bad.map(since),
        good_after: after
            .iter()
            .filter(|e| last_bad.is_none_or(|b| e.start_ns > b))
            .count(),
    }
}

#[test]
fn killing_the_new_generation_in_its_watch_window_puts_traffic_back_within_100_ms() {
    if !privileged("killing_the_new_generation_in_its_watch_window_puts_traffic_back_within_100_ms")
    {
        return;
    }
    let _one = exclusive();
    let addr = loopback();
    let mport = free_port();
    let a = testsrv("A", &[addr], &["--workers", "2", "--mode", "per-worker"]);
    let metrics_addr = format!("127.0.0.1:{mport}");
    let mut d = Handoffd::start_with("watch-exit", &[addr], &["--metrics-addr", &metrics_addr]);
    d.promote(a.pid);
    let b = testsrv("B", &[addr], &["--workers", "3", "--mode", "after-fork"]);
    let dir = TempDir::new("watch-exit-load");
    let mut cfg = line_load(addr, 2_000_000);
    cfg.concurrency = scaled_down(64u32, 16);
    cfg.duration_ms = Some((60_000 * u64::from(slowdown())).min(load::MAX_DURATION_MS));
    cfg.log = Some(dir.path().join("load.log"));
    let (report, death) = under_load(&cfg, || {
        steered(&d, per_phase(), "the load to reach A");
        ctl_ok(&d, &["promote", &b.pid.to_string(), "--watch", "30s"]);
        steered(&d, per_phase(), "the load to reach B");
        let g = d.generation_of(a.pid).expect("A listed");
        assert_eq!(g.listeners, 2, "A stands by with its listeners: {g:?}");
        let death = Death {
            ns: load::monotonic_ns(),
            time_of_day: time_of_day_now(),
        };
        killpg(Pid::from_raw(b.pid as i32), Signal::SIGKILL).expect("killing B");
        wait_until("A to be active again", Duration::from_secs(5), || {
            d.state_of(a.pid) == Some(GenerationState::Active)
        });
        steered(&d, per_phase(), "the load to reach A again");
        death
    });
    let entries = load::read_log(cfg.log.as_deref().expect("a log")).expect("the load log");
    let back = back_after(&entries, death.ns, "A");
    let rolled_back = "traffic rolled back";
    let logged = d
        .proc()
        .wait_line(
            handoff_tests::Stream::Stderr,
            rolled_back,
            scaled(Duration::from_secs(5)),
        )
        .expect("handoffd logs the rollback");
    let logged_after = log_time_of_day(&logged).map(|t| t - death.time_of_day);
    eprintln!(
        "B killed under load ({} connections, {:?} per generation, failures {:?}); of the \
         {} connections started after the kill, {} failed or reached B (the last of them \
         started {:?} after it); the first answered by A started {:?} after it, and the {} \
         started after the last bad one (or the kill) all reached A; handoffd logged the \
         rollback {:?} ms after the kill",
        report.attempts,
        report.by_name,
        report.failures,
        back.after,
        back.bad,
        back.last_bad,
        back.first_old,
        back.good_after,
        logged_after.map(|s| (s * 1000.0).round())
    );
    assert!(
        back.last_bad.is_none_or(|t| t <= scaled(BACK_WITHIN)),
        "a connection started {:?} after B's death failed or reached B: {back:?}",
        back.last_bad
    );
    assert!(back.good_after > 0, "{back:?}");
    after_the_death(&d, mport, &a, &b);
}

/// After B's death: counted once as an exit, A active and B retired in `status`.
fn after_the_death(d: &Handoffd, mport: u16, a: &Proc, b: &Proc) {
    wait_until("B to be retired", Duration::from_secs(5), || {
        d.state_of(b.pid) == Some(GenerationState::Retired)
    });
    assert_eq!(d.state_of(a.pid), Some(GenerationState::Active));
    let service = format!("service=\"{}\"", d.service);
    let text = metrics(mport);
    assert_eq!(
        sample(
            &text,
            "handoff_rollbacks_total",
            &[&service, "reason=\"exited\""]
        ),
        Some(1.0),
        "one rollback because B exited:\n{text}"
    );
    for other in ["operator", "listeners_lost", "check_failed"] {
        let reason = format!("reason=\"{other}\"");
        let n = sample(&text, "handoff_rollbacks_total", &[&service, &reason]);
        assert!(n.unwrap_or(0.0) == 0.0, "no rollback for {other}: {n:?}");
    }
}

/// A candidate's layout: each worker its own listener (its own slot), every accept logged.
const CANDIDATE: [&str; 5] = ["--workers", "3", "--mode", "after-fork", "--log-accept"];

/// What the check gate saw of the candidates.
struct Gate {
    /// The failing promote's error line.
    refusal: String,
    /// Check connections the program steered for B's promote, and for C's.
    checks: (u64, u64),
}

/// With clients connecting all the time: B's promote fails its check, clients go on
/// reaching A; C's passes and clients reach C.
fn gate(d: &Handoffd, b: &Proc, c: &Proc) -> Gate {
    steered(d, per_phase(), "the clients to reach A");
    let check = |d: &Handoffd| d.service().steering.check;
    let from = check(d);
    let refusal = d.refused(&["promote", &b.pid.to_string(), "--check", "http:/healthz"]);
    let b_checks = check(d) - from;
    steered(d, per_phase(), "the clients to reach A after the refusal");
    let from = check(d);
    let said = ctl_ok(
        d,
        &["promote", &c.pid.to_string(), "--check", "http:/healthz"],
    );
    let c_checks = check(d) - from;
    assert!(said.contains("is active"), "{said}");
    steered(d, per_phase(), "the clients to reach C");
    Gate {
        refusal,
        checks: (b_checks, c_checks),
    }
}

/// The workers of `p` that accepted a connection from `ip`, and how many such accepts.
fn accepted_from(accepts: &[Accept], ip: IpAddr) -> (BTreeSet<u32>, usize) {
    let from: Vec<&Accept> = accepts.iter().filter(|a| a.peer.ip() == ip).collect();
    (from.iter().map(|a| a.pid).collect(), from.len())
}

#[test]
fn a_failing_check_sends_no_client_to_the_candidate_and_a_passing_one_reaches_every_worker() {
    if !privileged(
        "a_failing_check_sends_no_client_to_the_candidate_and_a_passing_one_reaches_every_worker",
    ) {
        return;
    }
    let _one = exclusive();
    let v4 = loopback();
    // Two groups: every listener of every group is checked, each group through its own
    // address (so from 127.0.0.1 or ::1).
    let listen = [v4, SocketAddr::from((Ipv6Addr::LOCALHOST, v4.port()))];
    let a = testsrv("A", &listen, &["--http-status", "200"]);
    let d = Handoffd::start("check-gate", &listen);
    d.promote(a.pid);
    let status = |code| [&CANDIDATE[..], &["--http-status", code]].concat();
    let b = testsrv("B", &listen, &status("503"));
    let c = testsrv("C", &listen, &status("200"));
    let limit = scaled(Duration::from_secs(60));
    let (tally, g) = beside(
        |stop| sourced_load(v4, 8, 1_000_000, limit, stop),
        || gate(&d, &b, &c),
    );
    assert_eq!(d.state_of(c.pid), Some(GenerationState::Active));
    assert_eq!(d.generation_of(b.pid), None, "B was never promoted");
    // Every accept line of B and C read: they are stopped and their stderr has ended.
    let (b_all, c_all) = (all_accepts(&b), all_accepts(&c));
    let client = IpAddr::V4(CLIENT_SOURCE);
    let (_, b_clients) = accepted_from(&b_all, client);
    let (_, c_clients) = accepted_from(&c_all, client);
    eprintln!(
        "clients: {tally:?}; B accepted {} connections, {b_clients} of them clients' (the \
         program steered {} check connections to it); C accepted {}, {c_clients} of them \
         clients' (the program steered {} check connections to it); refusal: {}",
        b_all.len(),
        g.checks.0,
        c_all.len(),
        g.checks.1,
        g.refusal.trim_end()
    );
    let named = listen
        .iter()
        .any(|addr| g.refusal.contains(&format!("listener {addr} (slot ")));
    assert!(named, "the refusal names the listener: {:?}", g.refusal);
    let reason = "failed its http:/healthz check: status 503, wanted 2xx";
    assert!(g.refusal.contains(reason), "{:?}", g.refusal);
    assert_eq!(b_clients, 0, "B accepted no client connection: {b_all:?}");
    assert_eq!(tally.answers.get("B"), None, "no client was answered by B");
    assert!(tally.failures.is_empty(), "no client failed: {tally:?}");
    assert!(tally.answers.get("A").is_some_and(|&n| n > 0), "{tally:?}");
    assert_eq!(
        tally.answers.get("C").copied(),
        Some(c_clients as u64),
        "every client C accepted was answered"
    );
    every_listener_checked(&listen, &b, &b_all, g.checks.0 / 6);
    every_listener_checked(&listen, &c, &c_all, 1);
    assert_eq!(g.checks.1, 6, "one check connection per listener of C");
}

/// Every connection testsrv `p` accepted: it is killed, and its stderr read to the end.
fn all_accepts(p: &Proc) -> Vec<Accept> {
    killpg(Pid::from_raw(p.pid as i32), Signal::SIGKILL).expect("stopping a testsrv");
    let closed = p.wait_closed(
        handoff_tests::Stream::Stderr,
        scaled(Duration::from_secs(5)),
    );
    assert!(closed, "testsrv {} stopped and its stderr ended", p.pid);
    accepts(p)
}

/// Each worker of `p` accepted `rounds` check connections on its listener of each group
/// (`listen`), each from that group's own address, and nothing else from those addresses.
fn every_listener_checked(listen: &[SocketAddr], p: &Proc, seen: &[Accept], rounds: u64) {
    let workers: BTreeSet<u32> = p.workers.iter().copied().collect();
    assert!(rounds > 0, "the program steered no check to every listener");
    for addr in listen {
        let (checked, n) = accepted_from(seen, addr.ip());
        let on = |a: &&Accept| a.peer.ip() == addr.ip() && a.local == *addr;
        let listeners: BTreeSet<u32> = seen.iter().filter(on).map(|a| a.pid).collect();
        assert_eq!(
            checked, workers,
            "the checks through {addr} reached every worker"
        );
        assert_eq!(listeners, workers, "each on its listener of {addr}");
        assert_eq!(
            n as u64,
            rounds * workers.len() as u64,
            "checks through {addr}"
        );
    }
}
