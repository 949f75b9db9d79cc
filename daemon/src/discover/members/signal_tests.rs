//! The check before every signal, on real processes: a member whose uids changed since
//! it joined is signalled only when its new uids are trusted (or root is).

use std::time::{Duration, Instant};

use crate::discover::members::Member;
use handoff_tests::privileged;

/// A child process, killed and reaped when dropped (also when the test fails).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Effective uid of `pid` from /proc.
fn euid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn a_member_whose_uids_changed_is_signalled_only_if_they_are_trusted() {
    if !privileged("a_member_whose_uids_changed_is_signalled_only_if_they_are_trusted") {
        return;
    }
    // A root process that becomes uid 65534 when its stdin closes.
    let mut cmd = std::process::Command::new("python3");
    cmd.args([
        "-c",
        "import os, sys, time\nsys.stdin.read()\nos.setresuid(65534, 65534, 65534)\ntime.sleep(30)\n",
    ])
    .stdin(std::process::Stdio::piped());
    let mut child = Child(cmd.spawn().expect("spawning python3"));
    let pid = child.0.id();
    let member = Member::open(pid as i32).expect("a child of ours may be a member");
    assert_eq!(member.uids.effective, 0);
    assert_eq!(member.may_signal(&[1000]), Ok(()), "unchanged uids");

    drop(child.0.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    while euid(pid) != Some(65534) {
        assert!(
            Instant::now() < deadline,
            "the child did not change its uid"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let refused = member.may_signal(&[1000]);
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("uids changed")),
        "{refused:?}"
    );
    assert_eq!(member.may_signal(&[65534]), Ok(()), "now a trusted uid");
    assert_eq!(member.may_signal(&[0]), Ok(()), "root is trusted");
}
