//! A state file naming processes the generation never had: a restarted daemon trusts a
//! member only when it holds one of the generation's pinned sockets or is in its verified
//! leader's tree. A forged member is dropped with a warning and never signalled, through
//! the drain timeout and kill-after.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use handoff_common::proto::GenerationState;
use handoff_tests::{Proc, Stream};
use support::{Handoffd, loopback, privileged, testsrv, wait_until};

/// Start time (clock ticks after boot) of `pid`.
fn start_time(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading stat");
    let rest = text.rsplit_once(')').expect("a stat line").1;
    rest.split_whitespace()
        .nth(19)
        .and_then(|t| t.parse().ok())
        .expect("a start time")
}

/// Where [`Handoffd`] keeps the state of service `service`.
fn state_file(service: &str) -> PathBuf {
    std::env::temp_dir()
        .join(format!("handoff-test-{service}"))
        .join("state")
        .join("state.json")
}

#[test]
fn forged_members_in_the_state_file_are_never_signalled() {
    if !privileged("forged_members_in_the_state_file_are_never_signalled") {
        return;
    }
    let addr = loopback();
    let extra = ["--drain-timeout", "2s", "--kill-after", "1s"];
    // A has a worker, so the saved generation has a genuine descendant too.
    let a = testsrv("A", &[addr], &["--workers", "1", "--ignore-term"]);
    let mut d = Handoffd::start_with("forged", &[addr], &extra);
    d.promote(a.pid);
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    // The daemon goes away while A drains; the state file it leaves is then edited.
    d.crash();

    // Unrelated processes an attacker would name: a sleep of ours (a root process with no
    // socket), and the test process itself.
    let mut victim = Proc::spawn(Command::new("sleep").arg("300"));
    let path = state_file(&d.service);
    let text = std::fs::read_to_string(&path).expect("reading state.json");
    let mut state: serde_json::Value = serde_json::from_str(&text).expect("state.json is JSON");
    let generations = state["services"][0]["generations"]
        .as_array_mut()
        .expect("generations");
    let a_gen = generations
        .iter_mut()
        .find(|g| g["leader"]["pid"] == a.pid)
        .expect("A is saved");
    assert_eq!(a_gen["state"], "draining");
    let descendants = a_gen["descendants"].as_array_mut().expect("descendants");
    assert!(
        descendants.iter().any(|m| m["pid"] == a.workers[0]),
        "A's worker is saved"
    );
    let me = std::process::id();
    for pid in [victim.pid, me] {
        descendants.push(serde_json::json!({"pid": pid, "start_time": start_time(pid)}));
    }
    std::fs::write(&path, serde_json::to_vec(&state).expect("serialising"))
        .expect("writing the forged state.json");

    d.spawn(&[addr], &extra);
    let dropped = d
        .proc()
        .wait_lines(Stream::Stderr, "dropped", 2, Duration::from_secs(5));
    assert!(
        dropped.is_some(),
        "the daemon logs each forged member it dropped"
    );
    // A is taken up: the drain timeout retires it, kill-after SIGKILLs its members (A
    // ignores SIGTERM), and it retires once they exit.
    wait_until(
        "A to be killed and retired after the restart",
        Duration::from_secs(15),
        || d.state_of(a.pid) == Some(GenerationState::Retired),
    );
    assert!(
        victim.wait_exit(Duration::ZERO).is_none(),
        "the process the state file named was never signalled"
    );
    assert!(
        d.proc().wait_exit(Duration::ZERO).is_none(),
        "handoffd runs"
    );
    assert_eq!(d.state_of(b.pid), Some(GenerationState::Active));
}

#[test]
fn a_forged_leader_drops_its_generation_and_is_never_signalled() {
    if !privileged("a_forged_leader_drops_its_generation_and_is_never_signalled") {
        return;
    }
    let addr = loopback();
    let extra = ["--drain-timeout", "1s", "--kill-after", "1s"];
    let mut a = testsrv("A", &[addr], &["--ignore-term"]);
    let mut d = Handoffd::start_with("forged-leader", &[addr], &extra);
    d.promote(a.pid);
    let b = testsrv("B", &[addr], &["--ignore-term"]);
    d.promote(b.pid);
    d.crash();

    // The draining generation's leader is replaced by an unrelated process.
    let mut victim = Proc::spawn(Command::new("sleep").arg("300"));
    let path = state_file(&d.service);
    let text = std::fs::read_to_string(&path).expect("reading state.json");
    let mut state: serde_json::Value = serde_json::from_str(&text).expect("state.json is JSON");
    let a_gen = state["services"][0]["generations"]
        .as_array_mut()
        .expect("generations")
        .iter_mut()
        .find(|g| g["leader"]["pid"] == a.pid)
        .expect("A is saved");
    a_gen["leader"] = serde_json::json!({"pid": victim.pid, "start_time": start_time(victim.pid)});
    std::fs::write(&path, serde_json::to_vec(&state).expect("serialising"))
        .expect("writing the forged state.json");

    d.spawn(&[addr], &extra);
    assert!(
        d.proc()
            .wait_line(Stream::Stderr, "generation dropped", Duration::from_secs(5))
            .is_some(),
        "the daemon logs the generation it dropped"
    );
    let gens: Vec<u32> = d
        .service()
        .generations
        .iter()
        .map(|g| g.pid as u32)
        .collect();
    assert_eq!(gens, vec![b.pid], "only B is taken up");
    // B drains, gets its retire signal (ignored) and is killed one second later: past
    // the drain timeout and kill-after the forged generation would have had.
    let c = testsrv("C", &[addr], &[]);
    d.promote(c.pid);
    wait_until(
        "B to be killed and retired",
        Duration::from_secs(10),
        || d.state_of(b.pid) == Some(GenerationState::Retired),
    );
    assert!(
        victim.wait_exit(Duration::ZERO).is_none(),
        "the process named as leader was never signalled"
    );
    assert!(
        a.wait_exit(Duration::ZERO).is_none(),
        "A, no longer known, was not signalled either (it finishes on its own)"
    );
}

#[test]
fn workers_that_listen_after_fork_are_taken_up_after_a_restart() {
    if !privileged("workers_that_listen_after_fork_are_taken_up_after_a_restart") {
        return;
    }
    let addr = loopback();
    // The master holds no listener; its two workers do.
    let a = testsrv("A", &[addr], &["--workers", "2", "--mode", "after-fork"]);
    let mut d = Handoffd::start("after-fork-restart", &[addr]);
    d.promote(a.pid);
    d.crash();
    d.spawn(&[addr], &[]);
    assert!(
        d.proc()
            .wait_line(
                Stream::Stderr,
                "kept, never signalled",
                Duration::from_secs(5)
            )
            .is_some(),
        "the master, holding none of the sockets, is kept but not trusted"
    );
    assert_eq!(d.state_of(a.pid), Some(GenerationState::Active));
    // Its workers, which hold the sockets, get the retire signal and the generation
    // retires when they have exited.
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    wait_until(
        "A's workers to get the retire signal and A to retire",
        Duration::from_secs(10),
        || d.state_of(a.pid) == Some(GenerationState::Retired),
    );
    for w in &a.workers {
        assert!(
            std::fs::read_to_string(format!("/proc/{w}/stat")).map_or(true, |s| s
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))),
            "worker {w} exited"
        );
    }
}
