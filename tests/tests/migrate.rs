//! Migration on the real kernel: when an old generation's listener closes, the connections
//! queued on it and the handshakes in flight to it (SYN_RECV) are moved to the active
//! generation by handoff's SELECT_OR_MIGRATE program instead of being reset.
//!
//! Each test runs in a network namespace of its own, where `net.ipv4.tcp_migrate_req` is 0
//! whatever the host says (the kernel does not migrate by itself there), and shows the
//! baseline first: the same scenario without handoff resets every client. The program's
//! `migrated` counter shows that the migrations with handoff were its decisions.

mod support;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use handoff_tests::{Proc, Stream};
use nix::sys::signal::Signal;
use support::netns::{Netns, run_ok};
use support::{Handoffd, loopback, only, privileged, testsrv};

/// Clients per scenario.
const N: usize = 50;
/// A client (that sent a byte, for a handshake in flight) must have its answer this long
/// after the old listener was killed.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// A handshake left to the SYN-ACK retransmission completes this long after the kill: the
/// retransmissions come 1 s, 3 s, 7 s… after the SYN-ACK, and A dies well before 3 s.
const RETRANSMIT_WITHIN: Duration = Duration::from_millis(4500);
/// Deadline of the polls for kernel state (queue lengths, SYN_RECV counts).
const POLL_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn queued_connections_migrate_to_the_new_generation() {
    if !privileged("queued_connections_migrate_to_the_new_generation") {
        return;
    }
    const TAG: &str = "mig-queued";
    let ns = Netns::create(TAG);
    ns.run(|| {
        migrate_req_off();

        // Without handoff: A's queued clients are reset when A dies, B listening or not.
        let addr = loopback();
        let mut a = testsrv("A", &[addr], &["--no-accept"]);
        let mut clients = connect_all(addr, N);
        wait_for("the clients queued on A", N, || accept_queue(addr));
        let _b = testsrv("B", &[addr], &[]);
        let killed = kill_and_wait(&mut a);
        let (got, _) = answers_of(&mut clients, false, killed, ANSWER_WITHIN);
        eprintln!("{TAG}: without handoff: {got:?}");
        assert_eq!(
            got,
            only("!reset", N),
            "baseline: without handoff (tcp_migrate_req=0) every queued client is reset"
        );

        // With handoff: the same, but B is promoted before A dies.
        let addr = loopback();
        let mut a = testsrv("A", &[addr], &["--no-accept"]);
        let d = Handoffd::start("migrate-queued", &[addr]);
        d.promote(a.pid);
        let mut clients = connect_all(addr, N);
        wait_for("the clients queued on A", N, || accept_queue(addr));
        let b = testsrv("B", &[addr], &[]);
        assert_eq!(accept_queue(addr), N, "B, not promoted, took none of them");
        // From the promote on, the daemon may retire A itself (its retire signal closes the
        // listener too): count from here.
        let before = d.service().steering;
        d.promote(b.pid);
        let killed = kill_and_wait(&mut a);
        let (got, took) = answers_of(&mut clients, false, killed, ANSWER_WITHIN);
        let after = d.service().steering;
        eprintln!(
            "{TAG}: with handoff: {got:?}, last answer {took:?} after the kill{}; counters before {before:?}, after {after:?}",
            retired_note(&a)
        );
        assert_eq!(
            got,
            only(&format!("B {}", b.pid), N),
            "every client queued on A is answered by B within {ANSWER_WITHIN:?}: none reset, none EOF"
        );
        assert_eq!(accept_queue(addr), 0, "B accepted them all");
        assert_migrations_were_ours(&before, &after);
    });
}

#[test]
fn handshakes_in_flight_migrate() {
    if !privileged("handshakes_in_flight_migrate") {
        return;
    }
    const TAG: &str = "mig-synrecv";
    let ns = Netns::create(TAG);
    ns.run(|| {
        migrate_req_off();

        // Without handoff: A dies with the handshakes in flight; when they complete, the
        // final ACK finds B's listener, which knows nothing of them and resets them.
        let addr = loopback();
        let mut a = testsrv("A", &[addr], &[]);
        let filter = ns.drop_final_acks(addr.port());
        let mut clients = connect_all(addr, N);
        wait_for("the handshakes in SYN_RECV on A", N, || syn_recv(addr));
        let _b = testsrv("B", &[addr], &[]);
        let killed = kill_and_wait(&mut a);
        filter.remove();
        let (got, _) = answers_of(&mut clients, true, killed, ANSWER_WITHIN);
        eprintln!("{TAG}: without handoff: {got:?}");
        assert_eq!(
            got,
            only("!reset", N),
            "baseline: without handoff (tcp_migrate_req=0) every handshake in flight is reset"
        );

        // With handoff.
        let addr = loopback();
        let mut a = testsrv("A", &[addr], &[]);
        let d = Handoffd::start("migrate-synrecv", &[addr]);
        d.promote(a.pid);
        let filter = ns.drop_final_acks(addr.port());
        let mut clients = connect_all(addr, N);
        wait_for("the handshakes in SYN_RECV on A", N, || syn_recv(addr));
        let b = testsrv("B", &[addr], &[]);
        // From the promote on, the daemon may retire A itself: count from here.
        let before = d.service().steering;
        d.promote(b.pid);
        let killed = kill_and_wait(&mut a);
        assert_eq!(
            syn_recv(addr),
            N,
            "the handshakes are still in flight after A closed its listener"
        );
        filter.remove();
        // Both ways a handshake completes after its listener closed: half the clients send
        // a byte, whose segment carries the ACK (migrated when it arrives, in tcp_v4_rcv);
        // the other half wait for the SYN-ACK retransmission (migrated by the request's
        // timer, about 1 s after the SYN-ACK), which they answer with an ACK.
        let mut waiting = clients.split_off(N / 2);
        let (mut got, acked) = answers_of(&mut clients, true, killed, ANSWER_WITHIN);
        let (by_timer, timed) = answers_of(&mut waiting, false, killed, RETRANSMIT_WITHIN);
        for (k, v) in by_timer {
            *got.entry(k).or_default() += v;
        }
        let after = d.service().steering;
        eprintln!(
            "{TAG}: with handoff: {got:?}, last answer {acked:?} (sent a byte) and {timed:?} (waited) after the kill{}; counters before {before:?}, after {after:?}",
            retired_note(&a)
        );
        assert_eq!(
            got,
            only(&format!("B {}", b.pid), N),
            "every handshake in flight to A completes on B: none reset"
        );
        assert!(
            acked <= ANSWER_WITHIN,
            "the clients that sent a byte were answered within {ANSWER_WITHIN:?}"
        );
        assert_eq!(syn_recv(addr), 0, "no handshake left in flight");
        assert_migrations_were_ours(&before, &after);
    });
}

/// Says whether the daemon had retired (SIGTERMed) `a` before the test killed it.
fn retired_note(a: &Proc) -> &'static str {
    let term = format!("term A pid={}", a.pid);
    if a.lines(Stream::Stderr).iter().any(|l| l.contains(&term)) {
        " (the daemon had retired A with SIGTERM before)"
    } else {
        ""
    }
}

/// The program made (at least) one migration decision per client, each time selecting the
/// active generation itself rather than leaving the choice to the kernel.
fn assert_migrations_were_ours(
    before: &handoff_common::maps::Counters,
    after: &handoff_common::maps::Counters,
) {
    let migrated = after.migrated - before.migrated;
    assert!(
        migrated >= N as u64,
        "the program migrated {migrated} requests, expected {N}: before {before:?}, after {after:?}"
    );
    let selected = (after.active + after.active_retry) - (before.active + before.active_retry);
    assert!(
        selected >= N as u64,
        "the program selected the active generation {selected} times, expected {N}: before {before:?}, after {after:?}"
    );
    assert_eq!(
        (after.fallback, after.kernel_hash),
        (before.fallback, before.kernel_hash),
        "no migration fell back or was left to the kernel's hash"
    );
}

impl Netns {
    /// Drops every bare ACK (TCP flags exactly ACK) sent to `port` on loopback, so that the
    /// final ACK of a handshake never arrives and the server side stays in SYN_RECV while
    /// the client is ESTABLISHED. SYNs, data segments (PSH|ACK) and FINs pass.
    fn drop_final_acks(&self, port: u16) -> AckFilter<'_> {
        // Classic BPF run by cls_bpf in direct-action mode (the kernel has no gact action
        // for `u32 … action drop`). At tc ingress the data starts at the Ethernet header
        // loopback fakes (14 bytes), then a 20-byte IPv4 header (no options on loopback).
        let insns = [
            "40 0 0 12".to_string(),        // ldh [12]          EtherType
            "21 0 7 2048".to_string(),      // jeq #IPv4 else pass
            "48 0 0 23".to_string(),        // ldb [14 + 9]      IP protocol
            "21 0 5 6".to_string(),         // jeq #TCP else pass
            "40 0 0 36".to_string(),        // ldh [34 + 2]      TCP destination port
            format!("21 0 3 {port}"),       // jeq #port else pass
            "48 0 0 47".to_string(),        // ldb [34 + 13]     TCP flags
            "21 0 1 16".to_string(),        // jeq #ACK alone else pass
            "6 0 0 2".to_string(),          // ret TC_ACT_SHOT
            "6 0 0 4294967295".to_string(), // pass: ret TC_ACT_UNSPEC (next filter, then accept)
        ];
        let bytecode = format!("{},{}", insns.len(), insns.join(","));
        let pref = port.to_string();
        self.tc(&[
            "filter", "add", "dev", "lo", "ingress", "protocol", "ip", "pref", &pref, "bpf", "da",
            "bytecode", &bytecode,
        ]);
        AckFilter {
            ns: self,
            pref,
            removed: false,
        }
    }
}

/// The filter of [`Netns::drop_final_acks`]; removed when dropped, if not before.
struct AckFilter<'a> {
    ns: &'a Netns,
    pref: String,
    removed: bool,
}

impl AckFilter<'_> {
    /// Lets the final ACKs through again.
    fn remove(mut self) {
        self.ns.tc(&[
            "filter", "del", "dev", "lo", "ingress", "protocol", "ip", "pref", &self.pref,
        ]);
        self.removed = true;
    }
}

impl Drop for AckFilter<'_> {
    fn drop(&mut self) {
        if !self.removed {
            let _ = Command::new("tc")
                .args(["-n", &self.ns.name, "filter", "del", "dev", "lo", "ingress"])
                .args(["protocol", "ip", "pref", &self.pref])
                .output();
        }
    }
}

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Sets `net.ipv4.tcp_migrate_req` of the calling thread's netns to 0 (so that the kernel
/// alone migrates nothing) and prints what it was.
fn migrate_req_off() {
    // /proc/sys/net shows the netns of the thread that opens it.
    let found = std::fs::read_to_string(MIGRATE_REQ).expect("reading tcp_migrate_req");
    std::fs::write(MIGRATE_REQ, "0").expect("setting tcp_migrate_req to 0 in the test's netns");
    eprintln!(
        "tcp_migrate_req: {} in the test's netns, set to 0",
        found.trim()
    );
    assert_eq!(
        std::fs::read_to_string(MIGRATE_REQ).ok().as_deref(),
        Some("0\n"),
        "tcp_migrate_req is off in the test's netns"
    );
}

/// SIGKILLs `p` and waits until it has exited (its listeners closed); returns when.
fn kill_and_wait(p: &mut Proc) -> Instant {
    p.signal(Signal::SIGKILL);
    let killed = Instant::now();
    p.wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{} did not exit on SIGKILL", p.pid));
    killed
}

/// `n` client connections to `addr`, each established (connect returned); none reads or
/// writes yet.
fn connect_all(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("client {i} of {n}: connect to {addr}: {e}"))
        })
        .collect()
}

/// Polls `count` until it is `want` (deadline [`POLL_TIMEOUT`]).
fn wait_for(what: &str, want: usize, mut count: impl FnMut() -> usize) {
    let deadline = Instant::now() + POLL_TIMEOUT;
    loop {
        let n = count();
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {n}, expected {want} within {POLL_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connections waiting in the accept queues of the listeners on `addr` (sum of Recv-Q).
fn accept_queue(addr: SocketAddr) -> usize {
    let filter = format!("sport = :{}", addr.port());
    run_ok(Command::new("ss").args(["-Hltn", &filter]))
        .lines()
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|q| q.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("unexpected ss line {l:?}"))
        })
        .sum()
}

/// Server-side handshakes in SYN_RECV on `addr`.
fn syn_recv(addr: SocketAddr) -> usize {
    let filter = format!("sport = :{}", addr.port());
    run_ok(Command::new("ss").args(["-Htn", "state", "syn-recv", &filter]))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// What each client got, counted: the answer line `NAME PID`, or `!reset`, `!eof`,
/// `!timeout`, `!<other error>`. With `poke`, each client first sends one byte. Every read
/// ends `within` after `since`; also returns how long after `since` the last answer came.
fn answers_of(
    clients: &mut [TcpStream],
    poke: bool,
    since: Instant,
    within: Duration,
) -> (BTreeMap<String, usize>, Duration) {
    let deadline = since + within;
    let mut pending: Vec<Option<String>> = vec![None; clients.len()];
    if poke {
        for (c, out) in clients.iter_mut().zip(&mut pending) {
            if let Err(e) = c.write_all(b"x") {
                *out = Some(failure(&e));
            }
        }
    }
    let mut last = Duration::ZERO;
    let mut got = BTreeMap::new();
    for (c, out) in clients.iter_mut().zip(pending) {
        let outcome = out.unwrap_or_else(|| read_line(c, deadline));
        if !outcome.starts_with('!') {
            last = since.elapsed();
        }
        *got.entry(outcome).or_default() += 1;
    }
    (got, last)
}

/// Reads one line (without the newline) by `deadline`, or says why not.
fn read_line(stream: &mut TcpStream, deadline: Instant) -> String {
    let mut line = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return "!timeout".to_string();
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return "!eof".to_string(),
            Ok(n) => {
                line.extend_from_slice(&buf[..n]);
                if let Some(end) = line.iter().position(|&b| b == b'\n') {
                    return String::from_utf8_lossy(&line[..end]).into_owned();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return failure(&e),
        }
    }
}

fn failure(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionReset => "!reset".to_string(),
        io::ErrorKind::BrokenPipe => "!broken-pipe".to_string(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "!timeout".to_string(),
        _ => format!("!{e}"),
    }
}
