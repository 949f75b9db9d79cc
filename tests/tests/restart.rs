//! A killed handoffd disturbs nothing: the kernel keeps steering, and a restarted daemon
//! takes up the generations and still retires the draining one.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use handoff_common::proto::GenerationState;
use handoff_tests::load::{self, LoadConfig};
use nix::sys::signal::Signal;
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

    let mut cfg = LoadConfig::new(addr, 128);
    cfg.duration_ms = Some(30_000);
    let stop = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        let load = s.spawn(|| load::run(&cfg, Some(&stop)));
        std::thread::sleep(Duration::from_millis(500));
        d.proc().signal(Signal::SIGKILL);
        d.proc()
            .wait_exit(Duration::from_secs(5))
            .expect("handoffd died");
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
    assert!(report.ok >= 500, "the load ran ({})", report.ok);

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
