//! A killed handoffd disturbs nothing: the kernel keeps steering, and a restarted daemon
//! takes up the generations and still retires the draining one.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use handoff_common::proto::GenerationState;
use handoff_tests::load::{self, LoadConfig};
use handoff_tests::{Stream, scaled, scaled_down, slowdown};
use support::{Handoffd, answers, loopback, only, privileged, testsrv, wait_until};

#[test]
fn killed_daemon_keeps_steering_and_a_restarted_one_takes_over() {
    if !privileged("killed_daemon_keeps_steering_and_a_restarted_one_takes_over") {
        return;
    }
    handoff_tests::raise_fd_limit().expect("raising the fd limit");
    let addr = loopback();
    let a = testsrv("A", &[addr], &["--workers", "2", "--mode", "per-worker"]);
    let mut d = Handoffd::start("restart", &[addr]);
    let pins = Path::new("/sys/fs/bpf/handoff").join(&d.service);
    d.promote(a.pid);
    let held = load::hold(addr).expect("a connection to A");
    let b = testsrv("B", &[addr], &["--workers", "2", "--mode", "per-worker"]);
    d.promote(b.pid);

    // Sized for this machine; with HANDOFF_TEST_SLOWDOWN=N: clients and the connections
    // expected /N (at least 16 and 50), the timeout and the run's bound xN.
    let mut cfg = LoadConfig::new(addr, scaled_down(128u32, 16));
    cfg.timeout_ms *= u64::from(slowdown());
    cfg.duration_ms = Some(30_000 * u64::from(slowdown()));
    let enough = scaled_down(500u64, 50);
    let stop = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        let load = s.spawn(|| load::run(&cfg, Some(&stop)));
        std::thread::sleep(Duration::from_millis(500));
        d.crash();
        std::thread::sleep(Duration::from_millis(500)); // load runs with no daemon at all
        d.spawn(&[addr], &[]);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        load.join().expect("load thread")
    });
    eprintln!("load across kill -9 and restart: {report:?}");
    assert_eq!(report.failures.total(), 0, "{:?}", report.failures);
    assert_eq!(
        report.by_name.keys().collect::<Vec<_>>(),
        vec!["B"],
        "only B took connections"
    );
    assert!(report.ok >= enough, "the load ran ({})", report.ok);

    let gens: Vec<_> = d
        .service()
        .generations
        .iter()
        .map(|g| (g.pid as u32, g.state))
        .collect();
    assert_eq!(
        gens,
        vec![
            (a.pid, GenerationState::Draining),
            (b.pid, GenerationState::Active)
        ],
        "the restarted daemon knows both generations"
    );
    // A still drains on its own count: retired when its connection closes.
    drop(held);
    wait_until(
        "A to retire after its last connection closed",
        Duration::from_secs(5),
        || d.state_of(a.pid) == Some(GenerationState::Retired),
    );
    // And the taken-up maps still steer a new promote.
    let c = testsrv("C", &[addr], &[]);
    d.promote(c.pid);
    assert_eq!(answers(addr, 50), only("C", 50));
    assert!(pins.exists(), "maps are pinned at {}", pins.display());
    drop(d);
    assert!(!pins.exists(), "--cleanup removed the pins");
}

/// A generation that shut its listeners on the drain signal (nginx on SIGQUIT) empties its
/// slots at once; its served connection still ties it to the service across a restart:
/// still draining in the restarted daemon, and retired when that connection closes.
#[test]
fn a_generation_that_shut_its_listeners_survives_a_restart() {
    if !privileged("a_generation_that_shut_its_listeners_survives_a_restart") {
        return;
    }
    let addr = loopback();
    let extra = ["--drain-signal", "SIGTERM"];
    let mut d = Handoffd::start_with("restart-shut", &[addr], &extra);
    let a = testsrv("A", &[addr], &["--shut-on-term"]);
    d.promote(a.pid);
    let held = load::hold(addr).expect("a connection to A");
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    // A shut its listener on the drain signal: nothing of it is left in the group.
    a.wait_line(Stream::Stderr, "term A", scaled(Duration::from_secs(5)))
        .expect("A took the drain signal");
    let listeners = || {
        let out = std::process::Command::new("ss")
            .args(["-Hltn", &format!("sport = :{}", addr.port())])
            .output()
            .expect("ss");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    wait_until("only B to listen", Duration::from_secs(5), || {
        listeners() == 1
    });
    d.crash();
    d.spawn(&[addr], &extra);
    assert_eq!(
        d.state_of(a.pid),
        Some(GenerationState::Draining),
        "the restarted daemon still drains A"
    );
    // Its shut listener (fd still open, state CLOSE) is not a connection: A retires
    // when the one it serves closes.
    drop(held);
    wait_until(
        "the retire signal (a second SIGTERM) in A",
        Duration::from_secs(5),
        || {
            a.lines(Stream::Stderr)
                .iter()
                .filter(|l| l.contains("term A"))
                .count()
                >= 2
        },
    );
}
