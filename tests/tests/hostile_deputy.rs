//! Who may be a generation, as an attacker would try it: a root process holding no
//! listener whose child of another uid listens (the confused deputy), handoffd's own
//! parent, pid 1 and kernel threads. Refused with one line, nothing signalled outside a
//! generation, the daemon unaffected.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use handoff_common::proto::GenerationState;
use handoff_tests::{Proc, Stream, bin_path};
use support::netns::Netns;
use support::{Handoffd, answers, loopback, only, privileged, testsrv, wait_until};

/// (state letter, start time) of `pid`, if it exists.
fn stat_of(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    Some((
        fields.first()?.chars().next()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// A log line without its colour escapes (`ESC [ … m`).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for e in chars.by_ref() {
                if e == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether the process `pid` started at `start` still runs (not a zombie).
fn still_running(pid: u32, start: u64) -> bool {
    stat_of(pid).is_some_and(|(state, s)| s == start && state != 'Z')
}

/// The attack's shape: a root `sh` (holding no listener) whose child runs testsrv as uid
/// 65534 on `addr`, and an unrelated root child (`sleep`). Returns the shell, and the
/// pids of the server and the bystander.
fn deputy(addr: SocketAddr) -> (Proc, u32, u32) {
    let script = format!(
        "setpriv --reuid 65534 --regid 65534 --clear-groups {srv} --name NOBODY --listen {addr} --ignore-term &\n\
         echo server $!\n\
         sleep 300 &\n\
         echo bystander $!\n\
         wait\n",
        srv = bin_path("testsrv").display()
    );
    let sh = Proc::spawn(Command::new("sh").arg("-c").arg(script));
    let pid_of = |what: &str| -> u32 {
        let line = sh
            .wait_line(Stream::Stdout, &format!("{what} "), Duration::from_secs(10))
            .unwrap_or_else(|| panic!("the shell did not start the {what}"));
        line.split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("malformed line {line:?}"))
    };
    let server = pid_of("server");
    let bystander = pid_of("bystander");
    assert!(
        sh.wait_line(Stream::Stdout, "ready ", Duration::from_secs(10))
            .is_some(),
        "testsrv as uid 65534 did not get ready: {:?}",
        sh.lines(Stream::Stderr)
    );
    (sh, server, bystander)
}

/// testsrv `name` on `addr` as uid 65534 (a reuseport group admits one uid only: a
/// generation after the deputy's runs as that uid too).
fn nobody_testsrv(name: &str, addr: SocketAddr) -> Proc {
    let srv = Proc::spawn(
        Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(bin_path("testsrv"))
            .args(["--name", name, "--listen", &addr.to_string()]),
    );
    assert!(
        srv.wait_line(Stream::Stdout, "ready ", Duration::from_secs(10))
            .is_some(),
        "testsrv {name} as uid 65534 did not get ready: {:?}",
        srv.lines(Stream::Stderr)
    );
    srv
}

#[test]
fn root_parent_of_a_listener_of_another_uid_is_refused() {
    if !privileged("root_parent_of_a_listener_of_another_uid_is_refused") {
        return;
    }
    let addr = loopback();
    let (sh, server, bystander) = deputy(addr);
    let d = Handoffd::start("deputy-refused", &[addr]);
    let line = d.refused(&["promote", &sh.pid.to_string()]);
    eprintln!("refusal: {line}");
    assert!(
        line.contains("holds no listener itself") && line.contains("uid 65534"),
        "{line}"
    );
    // Nothing changed: no generation, the daemon answers, and the server was untouched.
    assert!(d.service().generations.is_empty());
    assert!(stat_of(server).is_some_and(|(s, _)| s != 'Z'));
    assert!(stat_of(bystander).is_some_and(|(s, _)| s != 'Z'));
    // The process that holds the listener may be promoted itself.
    d.promote(server);
    assert_eq!(answers(addr, 10), only("NOBODY", 10));
}

#[test]
fn configured_user_is_accepted_and_nothing_outside_is_signalled() {
    if !privileged("configured_user_is_accepted_and_nothing_outside_is_signalled") {
        return;
    }
    let addr = loopback();
    let (sh, server, bystander) = deputy(addr);
    let (_, bystander_start) = stat_of(bystander).expect("the bystander runs");
    let mut d = Handoffd::start_with(
        "deputy-user",
        &[addr],
        &[
            "--user",
            "65534",
            "--drain-timeout",
            "1s",
            "--kill-after",
            "1s",
        ],
    );
    d.promote(sh.pid);
    assert_eq!(answers(addr, 10), only("NOBODY", 10));

    // A new generation: the shell's drains (nothing to wait for), gets SIGTERM, and one
    // second later every member still alive (the server ignores SIGTERM) gets SIGKILL.
    let b = nobody_testsrv("B", addr);
    d.promote(b.pid);
    wait_until(
        "the shell's generation to retire (every member exited)",
        Duration::from_secs(10),
        || d.state_of(sh.pid) == Some(GenerationState::Retired),
    );
    assert!(
        stat_of(server).is_none_or(|(s, _)| s == 'Z'),
        "the member of uid 65534 was killed"
    );
    assert!(
        still_running(bystander, bystander_start),
        "the unrelated root child of the shell was never signalled"
    );
    let logs: Vec<String> = d
        .proc()
        .lines(Stream::Stderr)
        .iter()
        .map(|l| plain(l))
        .collect();
    let sent_to = |pid: u32| {
        logs.iter()
            .any(|l| l.contains("signal sent") && l.contains(&format!("pid={pid} ")))
    };
    assert!(sent_to(server), "SIGKILL went to the server");
    assert!(
        !sent_to(bystander),
        "no signal to the bystander: {:?}",
        logs.iter()
            .filter(|l| l.contains(&bystander.to_string()))
            .collect::<Vec<_>>()
    );
    assert_eq!(answers(addr, 10), only("B", 10));
}

#[test]
fn handoffd_ancestors_init_and_kernel_threads_are_refused() {
    if !privileged("handoffd_ancestors_init_and_kernel_threads_are_refused") {
        return;
    }
    let addr = loopback();
    // This test process starts handoffd and a server holding the service's listener: its
    // tree has a listener, as the shell of the attack had.
    let a = testsrv("A", &[addr], &[]);
    let mut d = Handoffd::start("deputy-self", &[addr]);
    let me = std::process::id();
    let daemon = d.proc().pid;
    let kthread = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1).map(|p| p == "2"))
                    .unwrap_or(false)
            })
        })
        .expect("a kernel thread (a child of kthreadd)");
    for (pid, why) in [
        (me, "ancestor of handoffd"),
        (daemon, "handoffd itself"),
        (1, "init (pid 1)"),
        (2, "kernel thread"),
        (kthread, "kernel thread"),
    ] {
        let line = d.refused(&["promote", &pid.to_string()]);
        eprintln!("promote {pid}: {line}");
        assert!(line.contains(why), "promote {pid}: {line}");
        assert!(d.service().generations.is_empty(), "nothing changed");
    }
    // The daemon is unaffected: it runs and promotes a real server.
    assert!(
        d.proc().wait_exit(Duration::ZERO).is_none(),
        "handoffd runs"
    );
    d.promote(a.pid);
    assert_eq!(answers(addr, 10), only("A", 10));
}

#[test]
fn a_listener_in_another_network_namespace_is_refused() {
    if !privileged("a_listener_in_another_network_namespace_is_refused") {
        return;
    }
    let addr = loopback();
    let ns = Netns::create("deputy-netns");
    // The same address and port, on the other namespace's loopback.
    let other = ns.run(|| testsrv("OTHER", &[addr], &[]));
    let d = Handoffd::start("deputy-netns", &[addr]);
    let line = d.refused(&["promote", &other.pid.to_string()]);
    eprintln!("refusal: {line}");
    assert!(line.contains("another network namespace"), "{line}");
    assert!(d.service().generations.is_empty(), "nothing changed");
    let a = testsrv("A", &[addr], &[]);
    d.promote(a.pid);
    assert_eq!(answers(addr, 10), only("A", 10));
    drop(other);
}
