//! The steering program's decisions on a real reuseport group: canary weights and check
//! connections (root only).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use handoff_common::maps::{GEN_SLOTS, SteerRecord};
use handoff_tests::privileged;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
    sockopt,
};

use crate::kernel::check::{self, ConnectError};
use crate::kernel::loader::GroupProgram;

/// A pin directory of the test's own, removed when dropped (also when the test fails).
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `n` SO_REUSEPORT listeners on `port` of 127.0.0.1 (0: a free port), non-blocking.
fn group(n: usize, port: u16) -> (Vec<TcpListener>, u16) {
    let mut out = Vec::new();
    let mut port = port;
    for _ in 0..n {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .expect("socket");
        setsockopt(&fd, sockopt::ReusePort, &true).expect("SO_REUSEPORT");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let SocketAddr::V4(v4) = addr else {
            unreachable!()
        };
        bind(fd.as_raw_fd(), &SockaddrIn::from(v4)).expect("bind");
        listen(&fd, Backlog::new(1024).expect("backlog")).expect("listen");
        let l = TcpListener::from(fd);
        port = l.local_addr().expect("addr").port();
        out.push(l);
    }
    (out, port)
}

/// Which listener of `all` accepts the next connection (waiting at most 1 s).
fn accepted_by(all: &[TcpListener]) -> Option<usize> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        for (i, l) in all.iter().enumerate() {
            if l.accept().is_ok() {
                return Some(i);
            }
        }
        std::thread::yield_now();
    }
    None
}

/// A loaded program with `active` in block 0 and `canary` in block 1, attached.
fn steered(
    name: &str,
    active: &[TcpListener],
    canary: &[TcpListener],
    weight: u32,
) -> (GroupProgram, Pins) {
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/handoff-test-{name}-{}",
        std::process::id()
    )));
    let mut program = GroupProgram::load(&pins.0).expect("loading the steering program");
    for (k, l) in active.iter().enumerate() {
        program.insert(k as u32, l.as_fd()).expect("insert");
    }
    for (k, l) in canary.iter().enumerate() {
        program
            .insert(GEN_SLOTS + k as u32, l.as_fd())
            .expect("insert");
    }
    program
        .publish(SteerRecord {
            canary_first: GEN_SLOTS,
            canary_len: canary.len() as u32,
            active_first: 0,
            active_len: active.len() as u32,
            weight,
            ..SteerRecord::default()
        })
        .expect("publish");
    program.attach(active[0].as_fd()).expect("attach");
    (program, pins)
}

/// `--weight 10` over 5000 connections: 10 % ± 2 % to the canary, and every listener
/// of both generations gets a share (the canary's bits are independent of the pick).
#[test]
fn a_canary_weight_splits_new_connections_over_every_listener() {
    if !privileged("a_canary_weight_splits_new_connections_over_every_listener") {
        return;
    }
    let (mut all, port) = group(25, 0);
    let (canary, _) = group(5, port);
    all.extend(canary);
    let (_program, _pins) = steered("weight", &all[..25], &all[25..], 10);
    let mut per = [0u32; 30];
    let total = 5000;
    for _ in 0..total {
        let _c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let i = accepted_by(&all).expect("accepted");
        per[i] += 1;
    }
    let to_canary: u32 = per[25..].iter().sum();
    let share = f64::from(to_canary) / f64::from(total);
    eprintln!("canary share {share:.4} over {total}; per listener {per:?}");
    assert!(
        (0.08..=0.12).contains(&share),
        "canary share {share}: {per:?}"
    );
    assert!(
        per.iter().all(|&n| n > 0),
        "a listener got nothing: {per:?}"
    );
}

/// A check connection reaches exactly the slot it names, which no client reaches; an
/// empty slot answers `Gone`.
#[test]
fn a_check_connection_reaches_only_its_listener() {
    if !privileged("a_check_connection_reaches_only_its_listener") {
        return;
    }
    let (mut all, port) = group(2, 0);
    let (candidate, _) = group(3, port);
    all.extend(candidate);
    // Weight 0: the candidate's block is named but takes no client.
    let (program, _pins) = steered("check", &all[..2], &all[2..], 0);
    let target: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = || Instant::now() + Duration::from_secs(1);
    let mut map = program.probe_map().expect("probe map");
    for k in 0..3u32 {
        let _s = check::connect(&mut map, target, GEN_SLOTS + k, deadline()).expect("check");
        assert_eq!(accepted_by(&all), Some(2 + k as usize));
    }
    for _ in 0..200 {
        let _c = TcpStream::connect(target).expect("connect");
        assert!(
            accepted_by(&all).expect("accepted") < 2,
            "a client reached the candidate"
        );
    }
    let gone = check::connect(&mut map, target, GEN_SLOTS + 7, deadline());
    assert!(matches!(gone, Err(ConnectError::Gone)), "{gone:?}");
}
