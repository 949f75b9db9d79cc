//! The whole-host tag pass of kernels before 6.1, forced on this kernel with
//! `HANDOFF_FORCE_WHOLE_HOST=1`: status says so, and a draining generation (its
//! connection held by a worker, a child of the promoted process) is still counted and
//! retired when its last connection closes. Without the variable, status reports the
//! per-process pass this kernel offers.

mod support;

use std::time::Duration;

use handoff_common::proto::{GenerationState, TagPass};
use handoff_tests::Stream;
use handoff_tests::load;
use support::{Handoffd, loopback, privileged, testsrv, wait_until};

fn drains_and_retires(name: &str, force: bool) {
    let addr = loopback();
    let a = testsrv("A", &[addr], &["--workers", "1", "--mode", "shared"]);
    let mut d = Handoffd::new(name);
    if force {
        d.env.push(("HANDOFF_FORCE_WHOLE_HOST".into(), "1".into()));
    }
    d.spawn(&[addr], &[]);
    let kernel = d.status().kernel.expect("status has a kernel section");
    let release = nix::sys::utsname::uname().expect("uname");
    assert_eq!(kernel.release, release.release().to_string_lossy());
    // The iterator over one process came with Linux 6.1 (the test may know versions; the
    // daemon tries it).
    let (major, minor) = {
        let mut v = kernel
            .release
            .split(['.', '-'])
            .map(|n| n.parse::<u32>().unwrap_or(0));
        (v.next().unwrap_or(0), v.next().unwrap_or(0))
    };
    let expected = if force || (major, minor) < (6, 1) {
        TagPass::WholeHost
    } else {
        TagPass::PerProcess
    };
    assert_eq!(kernel.tag_pass, expected, "{kernel:?}");
    let text = String::from_utf8_lossy(&d.ctl(&["status"]).stdout).into_owned();
    assert!(
        text.contains(&format!("tag pass {}", expected.as_str())),
        "{text}"
    );

    d.promote(a.pid);
    let held = load::hold(addr).expect("a connection to A");
    assert!(a.workers.contains(&held.2), "A's worker accepted it");
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    let g = d.generation_of(a.pid).expect("A listed");
    assert_eq!((g.state, g.connections), (GenerationState::Draining, 1));
    drop(held);
    a.wait_line(Stream::Stderr, "term ", Duration::from_secs(5))
        .expect("A got its retire signal after its last connection closed");
    wait_until("A to be retired", Duration::from_secs(5), || {
        d.state_of(a.pid) == Some(GenerationState::Retired)
    });
}

#[test]
fn forced_whole_host_pass_drains_and_retires() {
    if privileged("forced_whole_host_pass_drains_and_retires") {
        drains_and_retires("fallback", true);
    }
}

#[test]
fn per_process_pass_is_reported_without_the_variable() {
    if privileged("per_process_pass_is_reported_without_the_variable") {
        drains_and_retires("perproc", false);
    }
}
