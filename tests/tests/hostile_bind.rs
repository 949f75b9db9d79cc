//! An unprivileged user's bind() flood on a service port cannot slow a drain or reach the
//! daemon: failing binds never reach the bind watch (`cgroup/post_bind`), successful binds
//! of another address, from another network namespace or by another uid are filtered in
//! the kernel, and zero events have a ring of their own.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use handoff_common::proto::GenerationState;
use handoff_tests::load;
use handoff_tests::{Proc, Stream, bin_path, scaled, slowdown};
use support::{Handoffd, answers, loopback, only, privileged, respawned, testsrv, wait_until};

/// The unprivileged user every attack runs as.
const NOBODY: u32 = 65534;

/// Starts a bind flood on `addr` for `seconds`, as `uid`, from a new network namespace
/// with `netns`; returns once it floods.
fn flood(addr: SocketAddr, netns: bool, uid: u32, seconds: u32) -> Proc {
    flood_with(addr, netns, uid, seconds, &[])
}

/// [`flood`] with extra arguments of bindflood.
fn flood_with(addr: SocketAddr, netns: bool, uid: u32, seconds: u32, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin_path("bindflood"));
    cmd.args([
        "--addr",
        &addr.to_string(),
        "--seconds",
        &seconds.to_string(),
    ])
    .args(extra);
    if netns {
        cmd.arg("--netns");
    }
    if uid != 0 {
        cmd.uid(uid).gid(uid);
    }
    let p = Proc::spawn(&mut cmd);
    if p.wait_line(Stream::Stdout, "ready ", scaled(Duration::from_secs(10)))
        .is_none()
    {
        panic!(
            "bindflood {addr} netns={netns} uid={uid} did not start: {}",
            p.lines(Stream::Stderr).join("\n")
        );
    }
    p
}

/// `(ok, failed)` from a flood's `done` line.
fn done(p: &mut Proc) -> (u64, u64) {
    assert!(
        p.wait_exit(Duration::from_secs(70)).is_some(),
        "bindflood ends within its --seconds"
    );
    let line = p
        .wait_line(Stream::Stdout, "done ", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no done line: {}", p.lines(Stream::Stderr).join("\n")));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    (field("ok="), field("failed="))
}

/// `line` without its ANSI colour sequences (`ESC [ ... m`).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `name=` in a log line.
fn log_field(line: &str, name: &str) -> Option<u64> {
    plain(line)
        .split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        .and_then(|n| n.parse().ok())
}

/// The daemon's `bind event` log lines (one per bind event it received).
fn bind_events(d: &mut Handoffd) -> Vec<String> {
    d.proc()
        .lines(Stream::Stderr)
        .into_iter()
        .filter(|l| l.contains("bind event"))
        .collect()
}

/// A bind of `addr` by the test's uid (root, the service's), joining B's port as a
/// reuseport sibling would: reported to the daemon.
fn own_bind(addr: SocketAddr) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("a TCP socket");
    setsockopt(&fd, sockopt::ReusePort, &true).expect("SO_REUSEPORT");
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )
    .expect("root binds the service address beside B");
    fd
}

#[test]
fn bind_flood_neither_delays_retirement_nor_reaches_the_daemon() {
    if !privileged("bind_flood_neither_delays_retirement_nor_reaches_the_daemon") {
        return;
    }
    let addr = loopback();
    let other = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), addr.port());
    let a = testsrv("A", &[addr], &[]);
    let mut d = Handoffd::start("hostile-bind", &[addr]);
    d.promote(a.pid);
    let held = load::hold(addr).expect("a connection to A");
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    let gen_a = |d: &Handoffd| d.generation_of(a.pid).expect("A listed");
    wait_until(
        "A to drain holding one connection",
        Duration::from_secs(5),
        || {
            let g = gen_a(&d);
            g.state == GenerationState::Draining && g.connections == 1
        },
    );
    let before = bind_events(&mut d).len();
    assert!(before > 0, "B's own binds were reported: the watch works");

    // Long enough to outlast the five starts and the drain, on a slow runner too.
    let secs = (4 * slowdown()).min(60);
    let mut floods = five_floods(addr, other, secs);

    let closed = load::monotonic_ns();
    drop(held);
    let line = a
        .wait_line(Stream::Stderr, "term ", scaled(Duration::from_secs(5)))
        .expect("A got its retire signal after its last connection closed");
    let ms = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("ns="))
        .and_then(|n| n.parse::<u64>().ok())
        .expect("ns= in the term line")
        .saturating_sub(closed) as f64
        / 1e6;
    eprintln!("last close -> retire signal in A under a bind flood: {ms:.2} ms");
    for (p, what) in &mut floods {
        assert!(
            p.wait_exit(Duration::ZERO).is_none(),
            "the flood ({what}) was over before the retire signal"
        );
    }
    // The benchmark measures the real figure (a few ms); before the fix this was the
    // drain timeout. A shared test machine gets a margin noise cannot break.
    let bound = 1000.0 * f64::from(slowdown());
    assert!(ms < bound, "retire signal {ms:.1} ms after the last close");
    wait_until("A to be retired", Duration::from_secs(5), || {
        d.state_of(a.pid) == Some(GenerationState::Retired)
    });

    let totals = flood_totals(&mut floods);
    // The daemon reads the kernel's counters whenever it wakes; a bind by the service's
    // uid (root) of its address wakes it (one bind event, which it receives).
    let floods_filtered: u64 = totals.iter().map(|t| t.0).sum();
    counters_after_the_floods(&mut d, addr, before, floods_filtered);
    assert_eq!(answers(addr, 20), only("B", 20));
}

/// Five floods of `secs` seconds: by nobody on `addr`, on `other` and in its own
/// namespaces; by root in another namespace and on `other`.
fn five_floods(addr: SocketAddr, other: SocketAddr, secs: u32) -> [(Proc, &'static str); 5] {
    [
        // Every bind fails (EADDRINUSE): a cgroup/bind4 program saw each of them.
        (
            flood(addr, false, NOBODY, secs),
            "nobody, the service address (EADDRINUSE)",
        ),
        // Every bind succeeds: another address on the service port.
        (
            flood(other, false, NOBODY, secs),
            "nobody, 127.0.0.2 on the port",
        ),
        // Every bind succeeds: the service address, in the attacker's own namespaces.
        (
            flood(addr, true, NOBODY, secs),
            "nobody, user+network namespace",
        ),
        // The same by root's uid: the namespace filter alone stops it.
        (
            flood(addr, true, 0, secs),
            "root, another network namespace",
        ),
        // By root's uid on another address: the address filter alone stops it.
        (flood(other, false, 0, secs), "root, 127.0.0.2 on the port"),
    ]
}

/// Each flood's (succeeded, failed) binds once it is done: the first flood's binds fail,
/// the others' succeed.
fn flood_totals(floods: &mut [(Proc, &'static str)]) -> Vec<(u64, u64)> {
    let mut totals = Vec::new();
    for (p, what) in floods {
        let (ok, failed) = done(p);
        eprintln!("flood {what}: {ok} binds succeeded, {failed} failed");
        totals.push((ok, failed));
    }
    assert!(
        totals[0].1 > 0 && totals[0].0 == 0,
        "the first flood's binds fail"
    );
    for (i, (ok, _)) in totals.iter().enumerate().skip(1) {
        assert!(*ok > 0, "flood {i}'s binds succeed");
    }
    totals
}

/// After the floods, one own bind of `addr` wakes the daemon: its kernel counters show
/// `floods_filtered` binds filtered, and it received one bind event more than `before`.
fn counters_after_the_floods(
    d: &mut Handoffd,
    addr: SocketAddr,
    before: usize,
    floods_filtered: u64,
) {
    let own = own_bind(addr);
    let mut counters = String::new();
    wait_until(
        "the daemon to log the kernel's bind counters after the floods",
        Duration::from_secs(5),
        || {
            counters = d
                .proc()
                .lines(Stream::Stderr)
                .into_iter()
                .rfind(|l| l.contains("event counters"))
                .unwrap_or_default();
            log_field(&counters, "binds_received") == Some(before as u64 + 1)
        },
    );
    drop(own);
    // Each successful bind of a flood was seen and filtered in the kernel; failed ones
    // never reached the watch.
    assert_eq!(
        log_field(&counters, "filtered"),
        Some(floods_filtered),
        "{counters}"
    );
    assert_eq!(log_field(&counters, "lost_zeros"), Some(0), "{counters}");
    assert_eq!(log_field(&counters, "suppressed"), Some(0), "{counters}");
    let after = bind_events(d);
    assert_eq!(
        after.len(),
        before + 1,
        "the daemon received bind events during the flood: {:?}",
        &after[before..]
    );
}

/// The latest `event counters` line of the daemon, once one satisfies `f`.
fn counters_when(d: &mut Handoffd, what: &str, f: impl Fn(&str) -> bool) -> String {
    let mut counters = String::new();
    wait_until(what, Duration::from_secs(10), || {
        counters = d
            .proc()
            .lines(Stream::Stderr)
            .into_iter()
            .rfind(|l| l.contains("event counters"))
            .unwrap_or_default();
        f(&counters)
    });
    counters
}

/// Binds by the service's own uid pass every filter: the kernel lets through at most its
/// budget (32 per 100 ms per address) and counts the rest; a worker respawned during the
/// flood still joins its generation, whether its own bind event got through or not.
#[test]
fn bind_flood_by_the_services_uid_is_rate_limited_and_a_respawned_worker_still_joins() {
    if !privileged(
        "bind_flood_by_the_services_uid_is_rate_limited_and_a_respawned_worker_still_joins",
    ) {
        return;
    }
    let addr = loopback();
    let mut d = Handoffd::start("bind-rate", &[addr]);
    let m = testsrv(
        "M",
        &[addr],
        &["--workers", "2", "--mode", "after-fork", "--respawn"],
    );
    d.promote(m.pid);
    let before = bind_events(&mut d).len();
    let started = std::time::Instant::now();
    // Long enough for the respawned worker to join during it, on a slow runner too.
    let mut f = flood_with(addr, false, 0, (3 * slowdown()).min(60), &["--reuseport"]);
    let victim = m.workers[0];
    let fresh = respawned(&m, victim);
    wait_until(
        "the respawned worker to get connections during the flood",
        Duration::from_secs(5),
        || support::answers_by_pid(addr, 20).contains_key(&fresh),
    );
    assert!(
        f.wait_exit(Duration::ZERO).is_none(),
        "the flood was over before the worker joined"
    );
    let (ok, _) = done(&mut f);
    let flood_secs = started.elapsed().as_secs_f64();
    assert!(ok > 1000, "the flood's binds succeed ({ok})");
    // The daemon reads the counters again while binds are held back; a last bind of the
    // service's uid wakes it too.
    let own = own_bind(addr);
    // Every successful bind of the flood was reported, held back or (a ring the daemon
    // did not empty in time: a slow runner) lost, and counted: the daemon's counters,
    // read when the last bind woke it, account for all of them.
    let counters = counters_when(
        &mut d,
        "the daemon to account for every bind of the flood",
        |c| {
            let received = log_field(c, "binds_received").unwrap_or(0);
            let suppressed = log_field(c, "suppressed").unwrap_or(0);
            let lost = log_field(c, "lost_binds").unwrap_or(0);
            suppressed > 0 && received.saturating_sub(before as u64) + suppressed + lost >= ok
        },
    );
    drop(own);
    let received = log_field(&counters, "binds_received").unwrap_or(0) - before as u64;
    let suppressed = log_field(&counters, "suppressed").unwrap_or(0);
    let lost = log_field(&counters, "lost_binds").unwrap_or(0);
    eprintln!(
        "flood of {ok} binds in {flood_secs:.1} s: {received} reported, {suppressed} held back, {lost} lost"
    );
    // One window more than the span for the edges, and 32 more for the windows'
    // unlocked reset (see drain.bpf.c).
    let budget = ((flood_secs / 0.1).ceil() as u64 + 2) * 32 + 32;
    assert!(
        received <= budget,
        "{received} bind events reached the daemon (budget {budget}): {counters}"
    );
    assert_eq!(log_field(&counters, "lost_zeros"), Some(0), "{counters}");
}

/// The watch's IPv6 side: a generation's bind of the service's IPv6 address is reported
/// (the key's byte order matches the kernel's), and a flood of EADDRINUSE binds of it by
/// another user reaches nothing.
#[test]
fn ipv6_binds_of_the_service_are_reported_and_failed_ones_are_not() {
    if !privileged("ipv6_binds_of_the_service_are_reported_and_failed_ones_are_not") {
        return;
    }
    let port = handoff_tests::free_port();
    let addr: SocketAddr = format!("[::1]:{port}").parse().expect("an address");
    let a = testsrv("A", &[addr], &[]);
    let mut d = Handoffd::start("bind-v6", &[addr]);
    d.promote(a.pid);
    let b = testsrv("B", &[addr], &[]);
    let needle = format!("pid={}", b.pid);
    wait_until(
        "B's IPv6 bind to be reported",
        Duration::from_secs(5),
        || {
            bind_events(&mut d)
                .iter()
                .any(|l| plain(l).contains(&needle))
        },
    );
    let before = bind_events(&mut d).len();
    let mut f = flood(addr, false, NOBODY, 2);
    let (ok, failed) = done(&mut f);
    assert!(ok == 0 && failed > 0, "the flood's binds fail ({ok} ok)");
    d.promote(b.pid);
    assert_eq!(
        bind_events(&mut d).len(),
        before,
        "a failed bind reached the daemon"
    );
}
