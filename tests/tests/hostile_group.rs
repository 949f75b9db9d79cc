//! The group stays handoff's (issue 10, item 5): an intruder with the service's uid that
//! joins the group cannot attach or detach a reuseport program (the guard refuses it);
//! when the guard is not there (modelled by HANDOFF_TEST_NO_GUARD, as a 32-bit setsockopt
//! would bypass it), the probes put handoff's program back within a second, `status`
//! says so, and promote and rollback keep working, also after the group re-formed.

mod support;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use handoff_tests::{Proc, Stream, bin_path, load};
use support::{Handoffd, answers, loopback, only, privileged, wait_until};

const NOBODY: u32 = 65534;

/// A testsrv generation running as nobody.
fn nobody_testsrv(name: &str, addr: SocketAddr) -> Proc {
    let mut cmd = Command::new(bin_path("testsrv"));
    cmd.args(["--name", name, "--listen", &addr.to_string()])
        .uid(NOBODY)
        .gid(NOBODY);
    let proc = Proc::spawn(&mut cmd);
    assert!(
        proc.wait_line(Stream::Stdout, "ready ", Duration::from_secs(10))
            .is_some(),
        "testsrv {name} (uid {NOBODY}) not ready: {:?}",
        proc.lines(Stream::Stderr)
    );
    proc
}

/// The intruder, as nobody, joining the group on `addr` and trying `action`; returns it
/// and the line saying how the attempt went.
fn intruder(addr: SocketAddr, action: &str, delay_ms: u32) -> (Proc, String) {
    intruder_with(addr, action, &[&delay_ms.to_string()])
}

/// The intruder with `rest` after ADDR and ACTION.
fn intruder_with(addr: SocketAddr, action: &str, rest: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(bin_path("intruder"));
    cmd.args([&addr.to_string(), action])
        .args(rest)
        .uid(NOBODY)
        .gid(NOBODY);
    let proc = Proc::spawn(&mut cmd);
    let line = proc
        .wait_line(Stream::Stdout, action, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("intruder said nothing: {:?}", proc.lines(Stream::Stderr)));
    (proc, line)
}

fn wall_ms() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| d.as_millis() as u64)
}

#[test]
fn intruder_cannot_attach_or_detach() {
    if !privileged("intruder_cannot_attach_or_detach") {
        return;
    }
    let addr = loopback();
    let d = Handoffd::start("hgroup-guard", &[addr]);
    let a = nobody_testsrv("A", addr);
    d.promote(a.pid);
    let b = nobody_testsrv("B", addr);
    d.promote(b.pid);

    for action in ["cbpf", "detach"] {
        let (_intruder, line) = intruder(addr, action, 0);
        assert!(
            line.contains("EPERM"),
            "the guard refuses {action} from uid {NOBODY} on the service port: {line}"
        );
        assert_eq!(
            answers(addr, 100),
            only("B", 100),
            "steering unchanged after the intruder's {action}"
        );
    }
    // Every other option passes the guard untouched, also with an optval larger than a
    // page (which a cgroup program must hand back with optlen 0), on the service port too.
    let beside = SocketAddr::from(([127, 0, 0, 2], addr.port()));
    let own = handoff_tests::reuseport_listener(beside).expect("a socket on the service port");
    for (level, name) in [
        (libc::SOL_SOCKET, libc::SO_SNDBUF),
        (libc::SOL_IP, libc::IP_FREEBIND),
    ] {
        for len in [4, 4096, 8192, 65536] {
            handoff_tests::setsockopt_oversized(&own, level, name, len).unwrap_or_else(|e| {
                panic!("setsockopt({level}, {name}) with {len} bytes passes the guard: {e}")
            });
        }
    }
    drop(own);
    // The guard covers the service's address in the daemon's namespace only: the same
    // port on another address, or in another network namespace (a container), is someone
    // else's group, whose program its owners may change.
    let own = handoff_tests::reuseport_listener(beside).expect("a socket beside the service");
    handoff_tests::attach_reuseport_cbpf(&own, 0).expect("attach on another address passes");
    handoff_tests::detach_reuseport(&own).expect("detach on another address passes");
    drop(own);
    let ns = support::netns::Netns::create("hgroup-guard");
    ns.run(|| {
        let own = handoff_tests::reuseport_listener(addr).expect("the same address in a netns");
        handoff_tests::attach_reuseport_cbpf(&own, 0)
            .expect("attach in another network namespace passes the guard");
        handoff_tests::detach_reuseport(&own)
            .expect("detach in another network namespace passes the guard");
    });
    drop(ns);
    // The reuseport options themselves on an unwatched port also pass, with optlen beyond
    // a page handed back (the guard clamps it on every pass-through path).
    let other = loopback();
    let own = handoff_tests::reuseport_listener(other).expect("a socket on another port");
    handoff_tests::attach_reuseport_cbpf(&own, 0).expect("attach on an unwatched port");
    handoff_tests::setsockopt_oversized(
        &own,
        libc::SOL_SOCKET,
        libc::SO_DETACH_REUSEPORT_BPF,
        8192,
    )
    .expect("a detach with an 8192-byte optval on an unwatched port passes the guard");
    drop(own);
    let s = d.service();
    assert_eq!(
        s.steering_watch.lost, 0,
        "the probes never found steering lost"
    );
    assert_eq!(
        s.steering.kernel_hash, 0,
        "nothing was left to the kernel's hash"
    );
}

#[test]
fn backstop_restores_steering_and_promote_rollback_keep_working() {
    if !privileged("backstop_restores_steering_and_promote_rollback_keep_working") {
        return;
    }
    let addr = loopback();
    let mut d = Handoffd::new("hgroup-backstop");
    d.env.push(("HANDOFF_TEST_NO_GUARD".into(), "1".into()));
    d.spawn(&[addr], &[]);
    let a = nobody_testsrv("A", addr);
    d.promote(a.pid);
    // A holds a connection so that it keeps draining, and listening: a rollback target.
    let (held, _, _) = load::hold(addr).expect("a connection to A");
    let b = nobody_testsrv("B", addr);
    d.promote(b.pid);

    // The detach right after the intruder's bind: the probe that follows the bind sees it.
    // The attach 300 ms later: only the once-a-second backstop does.
    for (action, delay_ms) in [("detach", 0), ("cbpf", 300)] {
        backstop_restores(&d, addr, action, delay_ms);
    }

    // An intruder's program in force again, then a rollback: it attaches ours again.
    let (intruder, line) = intruder(addr, "cbpf", 0);
    assert!(line.ends_with("ok"));
    let out = d.ctl(&["rollback"]);
    assert!(
        out.status.success(),
        "rollback works: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(answers(addr, 100), only("A", 100), "after rollback");
    drop(intruder);

    // Every listener of the group closes; a new group forms on the port.
    drop(held);
    drop(a);
    drop(b);
    wait_until("the group to be gone", Duration::from_secs(5), || {
        std::net::TcpStream::connect(addr).is_err()
    });
    let c = nobody_testsrv("C", addr);
    d.promote(c.pid);
    assert_eq!(
        answers(addr, 100),
        only("C", 100),
        "promote after the group re-formed"
    );
    let (_held_c, _, _) = load::hold(addr).expect("a connection to C");
    let e = nobody_testsrv("E", addr);
    d.promote(e.pid);
    assert_eq!(answers(addr, 100), only("E", 100));
    let out = d.ctl(&["rollback"]);
    assert!(out.status.success(), "rollback after the group re-formed");
    assert_eq!(answers(addr, 100), only("C", 100));
}

/// An intruder's `action` after `delay_ms` takes steering away from B; the backstop
/// restores it within its second, and status reports the loss and the restoration.
fn backstop_restores(d: &Handoffd, addr: SocketAddr, action: &str, delay_ms: u32) {
    let before = d.service().steering_watch;
    let (intruder, line) = intruder(addr, action, delay_ms);
    let attacked = Instant::now();
    let attacked_ms = wall_ms();
    assert!(
        line.ends_with("ok"),
        "without the guard the {action} succeeds: {line}"
    );
    // Restored once a run of new connections all go to B again.
    let mut run = 0;
    wait_until("steering restored", Duration::from_secs(3), || {
        match load::connect_once(addr, Duration::from_secs(2)) {
            Ok((name, _)) if name == "B" => run += 1,
            _ => run = 0,
        }
        run >= 20
    });
    let took = attacked.elapsed();
    let s = d.service().steering_watch;
    let restored_after_ms = s.last_restored_ms.unwrap_or(0).saturating_sub(attacked_ms);
    eprintln!(
        "{action}: restored {restored_after_ms} ms after the intruder's report; 20 answers in a row from B after {took:?} ({s:?})"
    );
    assert!(
        s.lost > before.lost && s.restored > before.restored,
        "status reports the loss and the restoration: {s:?}"
    );
    assert!(!s.lost_now);
    assert!(s.last_lost_ms.is_some_and(|t| t + 5 >= attacked_ms));
    // The backstop's period is 1 s; the probe and re-attach take a few ms more.
    assert!(
        restored_after_ms <= 1100,
        "restored within the backstop's second (took {restored_after_ms} ms)"
    );
    assert_eq!(answers(addr, 100), only("B", 100), "after {action}");
    drop(intruder);
}

/// Review of issue 10: an intruder's program that sends handoff's probe to a listener
/// whose accept queue is full (the kernel drops the SYN, no answer) is found lost and
/// replaced within the backstop's second, and the daemon keeps answering meanwhile (each
/// probe waits at most its deadline, with the daemon's lock held).
#[test]
fn probe_sent_to_a_full_queue_counts_as_lost_and_daemon_answers() {
    if !privileged("probe_sent_to_a_full_queue_counts_as_lost_and_daemon_answers") {
        return;
    }
    let addr = loopback();
    let mut d = Handoffd::new("hgroup-full");
    d.env.push(("HANDOFF_TEST_NO_GUARD".into(), "1".into()));
    d.spawn(&[addr], &[]);
    let a = nobody_testsrv("A", addr);
    d.promote(a.pid);
    let before = d.service().steering_watch;
    // One listener of A, then the intruder's: its place in the group is 1.
    let (intruder, line) = intruder_with(addr, "full", &["300", "1"]);
    let attacked = Instant::now();
    assert!(line.ends_with("full ok"), "the intruder's program: {line}");
    let mut slowest = Duration::ZERO;
    let mut s = before.clone();
    wait_until("steering restored", Duration::from_secs(3), || {
        let asked = Instant::now();
        s = d.service().steering_watch;
        slowest = slowest.max(asked.elapsed());
        s.restored > before.restored
    });
    let took = attacked.elapsed();
    eprintln!("restored after {took:?}; slowest status {slowest:?}; {s:?}");
    assert!(s.lost > before.lost, "the loss is counted: {s:?}");
    assert!(
        took <= Duration::from_millis(1300),
        "restored within the backstop's second: {took:?}"
    );
    // A probe waits at most 100 ms (twice for a lost group); a blocking one held the
    // lock for 3 s.
    assert!(
        slowest <= Duration::from_millis(600),
        "status answered within 600 ms during the attack: {slowest:?}"
    );
    assert_eq!(
        answers(addr, 100),
        only("A", 100),
        "steering is handoff's again"
    );
    drop(intruder);
}
