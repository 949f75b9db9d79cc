//! `/metrics` agrees with the connections a test made and the changes it caused.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use handoff_tests::{free_port, load};
use support::{Handoffd, answers, loopback, only, privileged, testsrv};

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// The value of the sample line starting with `prefix` (name and labels).
fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in\n{text}"))
}

/// The figures after 203 connections to A, 3 of them held: all steered to A, one promote.
fn after_three_held(m: &str, svc: &str, a_pid: u32) {
    let steered = value(
        m,
        &format!("handoff_steered_connections_total{{service=\"{svc}\",target=\"active\"}}"),
    );
    assert!(
        steered >= 203.0,
        "steered to active {steered} after 203 connections"
    );
    let conns = value(
        m,
        &format!(
            "handoff_generation_connections{{service=\"{svc}\",generation=\"1\",pid=\"{}\",state=\"active\"}}",
            a_pid
        ),
    );
    assert_eq!(conns, 3.0, "the 3 held connections");
    assert_eq!(
        value(
            m,
            &format!("handoff_promotions_total{{service=\"{svc}\",result=\"ok\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            m,
            &format!("handoff_foreign_listeners{{service=\"{svc}\"}}")
        ),
        0.0
    );
    assert!(
        value(
            m,
            &format!("handoff_steered_connections_total{{service=\"{svc}\",target=\"probe\"}}")
        ) >= 1.0
    );
}

/// The metrics once A's retirement (drained) is counted, waiting at most 10 s for it.
fn retirement_counted(mport: u16, svc: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(mport);
        if m.contains(&format!(
            "handoff_retirements_total{{service=\"{svc}\",reason=\"drained\"}} 1"
        )) {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "A's retirement not counted:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_agree_with_the_connections_made() {
    if !privileged("metrics_agree_with_the_connections_made") {
        return;
    }
    let addr = loopback();
    let mport = free_port();
    let a = testsrv("A", &[addr], &[]);
    let d = Handoffd::start_with(
        "metrics",
        &[addr],
        &["--metrics-addr", &format!("127.0.0.1:{mport}")],
    );
    let svc = d.service.clone();
    d.promote(a.pid);
    assert_eq!(answers(addr, 200), only("A", 200));
    let held: Vec<_> = (0..3).map(|_| load::hold(addr).expect("held")).collect();

    let m = scrape(mport);
    after_three_held(&m, &svc, a.pid);

    // A refused promote, then a handoff and A's retirement once its connections close.
    // (A process that holds no listener: a pid that names none is refused by handoffctl
    // itself, which cannot open a pidfd of it, and never reaches the daemon.)
    let mut idle = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("starting sleep");
    let refused = d.ctl(&["promote", &idle.id().to_string()]);
    let _ = idle.kill();
    let _ = idle.wait();
    assert!(!refused.status.success());
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    drop(held);
    let m = retirement_counted(mport, &svc);
    assert_eq!(
        value(
            &m,
            &format!("handoff_promotions_total{{service=\"{svc}\",result=\"ok\"}}")
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            &format!("handoff_promotions_total{{service=\"{svc}\",result=\"refused\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            &format!("handoff_drain_duration_seconds_count{{service=\"{svc}\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            &format!("handoff_promote_duration_seconds_count{{service=\"{svc}\"}}")
        ),
        2.0
    );
}
