//! Probes only from handoffd (issue 10, item 4): remote clients whose source ports are
//! 600–699 (what the old reserved probe range took for probes and dropped) are served by
//! the active generation and never counted as probes; a local user holding those ports
//! does not block a promote.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use handoff_tests::{free_port, load};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;
use support::netns::{Netns, run_ok};
use support::{Handoffd, answers, only, privileged, testsrv};

/// A veth pair between this namespace and `ns`; dropped, it is deleted.
struct Veth {
    host: String,
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .output();
    }
}

/// Links `ns` to the host: 10.X.Y.1 here, 10.X.Y.2 there. Returns the pair's guard and
/// both addresses.
fn veth(ns: &Netns) -> (Veth, Ipv4Addr, Ipv4Addr) {
    let pid = std::process::id();
    let host = format!("hpv{}h", pid % 1_000_000);
    let peer = format!("hpv{}n", pid % 1_000_000);
    let _ = Command::new("ip").args(["link", "del", &host]).output();
    run_ok(Command::new("ip").args([
        "link", "add", &host, "type", "veth", "peer", "name", &peer, "netns", &ns.name,
    ]));
    let guard = Veth { host: host.clone() };
    let (x, y) = (100 + (pid / 256) % 100, pid % 256);
    let here = Ipv4Addr::new(10, x as u8, y as u8, 1);
    let there = Ipv4Addr::new(10, x as u8, y as u8, 2);
    run_ok(Command::new("ip").args(["addr", "add", &format!("{here}/30"), "dev", &host]));
    run_ok(Command::new("ip").args(["link", "set", &host, "up"]));
    run_ok(Command::new("ip").args([
        "-n",
        &ns.name,
        "addr",
        "add",
        &format!("{there}/30"),
        "dev",
        &peer,
    ]));
    run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", &peer, "up"]));
    (guard, here, there)
}

/// One connection from `source` to `target`; the answering generation's name.
fn answer_from(source: SocketAddr, target: SocketAddr) -> String {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    let timeout = TimeVal::from(libc::timeval {
        tv_sec: 3,
        tv_usec: 0,
    });
    setsockopt(&fd, sockopt::SendTimeout, &timeout).expect("SO_SNDTIMEO");
    let SocketAddr::V4(source) = source else {
        unreachable!()
    };
    let SocketAddr::V4(target) = target else {
        unreachable!()
    };
    bind(fd.as_raw_fd(), &SockaddrIn::from(source)).expect("binding the source port");
    if let Err(e) = connect(fd.as_raw_fd(), &SockaddrIn::from(target)) {
        return format!("!connect {e}");
    }
    let stream = TcpStream::from(fd);
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("read timeout");
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(n) if n > 0 => load::parse_answer(line.trim_end())
            .map_or_else(|| format!("!bad answer {line:?}"), |(name, _)| name.into()),
        Ok(_) => "!eof".into(),
        Err(e) => format!("!read {e}"),
    }
}

#[test]
fn remote_clients_on_old_probe_ports_are_served() {
    if !privileged("remote_clients_on_old_probe_ports_are_served") {
        return;
    }
    let ns = Netns::create("hprobe");
    let (_veth, here, there) = veth(&ns);
    let port = free_port();
    let listen = SocketAddr::from(([0, 0, 0, 0], port));
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let d = Handoffd::start("hprobe", &[listen]);
    let a = testsrv("A", &[listen], &[]);
    d.promote(a.pid);
    let (_held, _, _) = load::hold(local).expect("a connection to A");
    let b = testsrv("B", &[listen], &[]);
    d.promote(b.pid);

    let before = d.service().steering;
    let started = Instant::now();
    let target = SocketAddr::from((here, port));
    let got: BTreeMap<String, usize> = ns.run(|| {
        let mut got = BTreeMap::new();
        for sport in 600..700 {
            let name = answer_from(SocketAddr::from((there, sport)), target);
            *got.entry(name).or_default() += 1;
        }
        got
    });
    let elapsed = started.elapsed();
    let after = d.service().steering;
    eprintln!("remote clients from source ports 600-699: {got:?} in {elapsed:?}");
    assert_eq!(
        got,
        only("B", 100),
        "every remote client on ports 600-699 is served by the active generation"
    );
    assert!(
        after.active - before.active >= 100,
        "the program chose B for each ({before:?} -> {after:?})"
    );
    // The daemon's own backstop probes at most once a second; the 100 remote SYNs do not
    // count.
    let probes = after.probe - before.probe;
    assert!(
        probes <= elapsed.as_secs() + 2,
        "{probes} probes counted in {elapsed:?}: remote SYNs were taken for probes"
    );
}

#[test]
fn local_holder_of_old_probe_ports_does_not_block_promote() {
    if !privileged("local_holder_of_old_probe_ports_does_not_block_promote") {
        return;
    }
    // What blocked every promote before: someone holding the whole 600-699 range.
    let mut held = Vec::new();
    for port in 600..700u16 {
        for ip in [Ipv4Addr::UNSPECIFIED, Ipv4Addr::LOCALHOST] {
            if let Ok(l) = std::net::TcpListener::bind((ip, port)) {
                held.push(l);
            }
        }
    }
    assert!(
        held.len() >= 100,
        "the test holds the old probe range ({} sockets)",
        held.len()
    );
    let addr = support::loopback();
    let d = Handoffd::start("hprobe-hold", &[addr]);
    let a = testsrv("A", &[addr], &[]);
    d.promote(a.pid);
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    assert_eq!(answers(addr, 100), only("B", 100));
    drop(held);
}
