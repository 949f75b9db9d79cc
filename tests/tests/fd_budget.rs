//! The fd budget: a generation of 400 processes under the usual soft limit of 1024 open
//! files is fully tracked (one pidfd per member, the soft limit raised at start), and
//! under a hard limit too small for it the promote is refused with one line, never
//! silently partial.
//!
//! One test per binary: it lowers this process's own soft RLIMIT_NOFILE (inherited by
//! the daemon it starts) and puts it back when done.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use handoff_common::proto::GenerationState;
use handoff_tests::{Proc, Stream};
use support::{Handoffd, alive, answers, loopback, only, privileged, testsrv, wait_until};

/// Members besides the leader.
const CHILDREN: usize = 400;

/// A root process holding a SO_REUSEPORT listener on `addr` that forks `n` children
/// (`sleep`, with SIGTERM ignored like the parent). Returns it and the children's pids.
fn big_generation(addr: SocketAddr, n: usize) -> (Proc, Vec<u32>) {
    let script = "import os, signal, socket, sys, time\n\
        host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n\
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
        s.bind((host, port))\n\
        s.listen(128)\n\
        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
        kids = []\n\
        for _ in range(n):\n\
        \x20   pid = os.fork()\n\
        \x20   if pid == 0:\n\
        \x20       os.execv('/bin/sleep', ['sleep', '300'])\n\
        \x20   kids.append(pid)\n\
        print('ready', ' '.join(map(str, kids)), flush=True)\n\
        while True:\n\
        \x20   time.sleep(3600)\n";
    let proc = Proc::spawn(Command::new("python3").args([
        "-c",
        script,
        &addr.ip().to_string(),
        &addr.port().to_string(),
        &n.to_string(),
    ]));
    let line = proc
        .wait_line(Stream::Stdout, "ready", Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "the generation of {n} did not start: {:?}",
                proc.lines(Stream::Stderr)
            )
        });
    let kids: Vec<u32> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(kids.len(), n, "{line}");
    (proc, kids)
}

/// Sets this process's soft RLIMIT_NOFILE with `prlimit` (children started meanwhile
/// inherit it); puts the previous limits back when dropped.
struct NoFile {
    before: String,
}

impl NoFile {
    fn set(limits: &str) -> NoFile {
        let me = std::process::id().to_string();
        let out = Command::new("prlimit")
            .args([
                "--pid",
                &me,
                "--nofile",
                "--output",
                "SOFT,HARD",
                "--noheadings",
            ])
            .output()
            .expect("running prlimit");
        let now = String::from_utf8_lossy(&out.stdout);
        let before = now.split_whitespace().collect::<Vec<_>>().join(":");
        let guard = NoFile { before };
        let ok = Command::new("prlimit")
            .args(["--pid", &me, &format!("--nofile={limits}")])
            .status()
            .expect("running prlimit");
        assert!(ok.success(), "prlimit --nofile={limits}");
        guard
    }
}

impl Drop for NoFile {
    fn drop(&mut self) {
        let me = std::process::id().to_string();
        let _ = Command::new("prlimit")
            .args(["--pid", &me, &format!("--nofile={}", self.before)])
            .status();
    }
}

/// Members the state file names for the generation led by `leader`.
fn saved_members(d: &Handoffd, leader: u32) -> usize {
    let path = std::env::temp_dir()
        .join(format!("handoff-test-{}", d.service))
        .join("state")
        .join("state.json");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("reading state.json")).expect("JSON");
    state["services"][0]["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .find(|g| g["leader"]["pid"] == leader)
        .map_or(0, |g| 1 + g["descendants"].as_array().map_or(0, Vec::len))
}

#[test]
fn four_hundred_members_are_tracked_or_the_promote_is_refused() {
    if !privileged("four_hundred_members_are_tracked_or_the_promote_is_refused") {
        return;
    }
    // Part 1: soft limit 1024 (what a unit without LimitNOFILE gets), hard as it is.
    let addr = loopback();
    let (big, kids) = big_generation(addr, CHILDREN);
    let mut d = {
        let _soft = NoFile::set("1024:");
        Handoffd::start_with(
            "fd-budget",
            &[addr],
            &["--drain-timeout", "1s", "--kill-after", "1s"],
        )
    };
    let raised = d
        .proc()
        .wait_line(Stream::Stderr, "open file limit", Duration::from_secs(5))
        .expect("handoffd logs its open file limit");
    eprintln!("{raised}");
    assert!(raised.contains("1024"), "{raised}");
    d.promote(big.pid);
    let tracked = saved_members(&d, big.pid);
    eprintln!("members tracked: {tracked} of {}", CHILDREN + 1);
    assert_eq!(tracked, CHILDREN + 1, "every member is tracked");
    assert_eq!(d.service().generations.len(), 1, "status works");

    // The tag pass over every member, the retire signal (ignored), then SIGKILL to all
    // 401: the generation retires only if every one of them was tracked.
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    wait_until(
        "the 401-process generation to be killed and retired",
        Duration::from_secs(20),
        || d.state_of(big.pid) == Some(GenerationState::Retired),
    );
    let left: Vec<u32> = kids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "members left alive: {left:?}");
    assert_eq!(answers(addr, 10), only("B", 10));
    drop(d);
    drop(b);
    drop(big);

    // Part 2: a hard limit too small for 401 pidfds: the promote is refused with one
    // line naming the limit (not "no process"), and the daemon goes on.
    let addr = loopback();
    let (big, _kids) = big_generation(addr, CHILDREN);
    let mut d = Handoffd::start("fd-budget-small", &[addr]);
    // Lowered on the running daemon (raising a hard limit back needs CAP_SYS_RESOURCE,
    // which this process may not have).
    let daemon = d.proc().pid.to_string();
    let lowered = Command::new("prlimit")
        .args(["--pid", &daemon, "--nofile=300:300"])
        .status()
        .expect("running prlimit");
    assert!(lowered.success(), "prlimit --nofile=300:300 on handoffd");
    let line = d.refused(&["promote", &big.pid.to_string()]);
    eprintln!("refusal: {line}");
    assert!(line.contains("file descriptors"), "{line}");
    assert!(!line.contains("no process"), "{line}");
    assert!(d.service().generations.is_empty(), "nothing half-promoted");
    // A second try fails the same way (nothing leaked), and status still answers.
    let again = d.refused(&["promote", &big.pid.to_string()]);
    assert!(again.contains("file descriptors"), "{again}");
    assert!(d.service().generations.is_empty());
    // A generation that fits is promoted as usual.
    let c = testsrv("C", &[addr], &[]);
    d.promote(c.pid);
    assert_eq!(answers(addr, 10), only("C", 10));
}
