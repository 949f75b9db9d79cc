//! `--config` and SIGHUP: added services start, removed ones are steered until one
//! generation is left, unchanged ones are not disturbed, a bad file changes nothing.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use handoff_tests::load::{self, LoadConfig};
use handoff_tests::{scaled, scaled_down, slowdown};
use nix::sys::signal::Signal;
use support::{Handoffd, answers, loopback, only, privileged, testsrv, wait_until};

fn write_config(path: &Path, services: &[(&str, SocketAddr)]) {
    let mut text = String::from("[defaults]\ndrain_timeout = \"60s\"\n");
    for (name, addr) in services {
        text.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nlisten = [\"{addr}\"]\n"
        ));
    }
    std::fs::write(path, text).expect("writing the config");
}

/// Promotes `pid` in `service`, which must succeed.
fn promote_in(d: &Handoffd, pid: u32, service: &str) {
    assert!(
        d.ctl(&["promote", &pid.to_string(), "--service", service])
            .status
            .success()
    );
}

fn names(d: &Handoffd) -> Vec<String> {
    d.status().services.into_iter().map(|s| s.name).collect()
}

#[test]
fn sighup_adds_and_removes_services_without_disturbing_the_others() {
    if !privileged("sighup_adds_and_removes_services_without_disturbing_the_others") {
        return;
    }
    let (keep, gone, added) = (loopback(), loopback(), loopback());
    let mut d = Handoffd::new("reload");
    let tag = std::process::id();
    let (k, g, a) = (
        format!("keep-{tag}"),
        format!("gone-{tag}"),
        format!("added-{tag}"),
    );
    // In the daemon's own test directory, which its guard removes.
    let config = d.socket.with_file_name("handoffd.toml");
    write_config(&config, &[(&k, keep), (&g, gone)]);
    let config_arg = config.display().to_string();
    d.spawn(&[], &["--config", &config_arg]);
    assert_eq!(names(&d), vec![k.clone(), g.clone()]);

    let k1 = testsrv("K1", &[keep], &[]);
    promote_in(&d, k1.pid, &k);
    let g1 = testsrv("G1", &[gone], &[]);
    promote_in(&d, g1.pid, &g);
    let held = load::hold(gone).expect("a connection to G1");
    let g2 = testsrv("G2", &[gone], &[]);
    promote_in(&d, g2.pid, &g);

    // Sized for this machine; with HANDOFF_TEST_SLOWDOWN=N: clients /N (at least 8), the
    // timeout and the run's bound xN.
    let mut cfg = LoadConfig::new(keep, scaled_down(64u32, 8));
    cfg.timeout_ms *= u64::from(slowdown());
    cfg.duration_ms = Some(30_000 * u64::from(slowdown()));
    let stop = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        let load = s.spawn(|| load::run(&cfg, Some(&stop)));
        std::thread::sleep(Duration::from_millis(300));
        // The new file: `gone` removed, `added` added, `keep` unchanged.
        write_config(&config, &[(&k, keep), (&a, added)]);
        d.proc().signal(Signal::SIGHUP);
        wait_until("the added service", Duration::from_secs(10), || {
            names(&d).contains(&a)
        });
        // `gone` still has two live generations: still steered.
        assert!(
            names(&d).contains(&g),
            "a removed service with two generations is kept"
        );
        assert_eq!(answers(gone, 20), only("G2", 20), "still steered to G2");
        bad_file_refused_on_sighup(&mut d, &config);
        assert_eq!(names(&d), vec![k.clone(), g.clone(), a.clone()]);
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        load.join().expect("load")
    });
    assert_eq!(
        report.failures.total(),
        0,
        "the unchanged service lost connections: {:?}",
        report.failures
    );
    assert_eq!(report.by_name.keys().collect::<Vec<_>>(), vec!["K1"]);

    // G1 drains; with one generation left, `gone` is detached and forgotten.
    drop(held);
    wait_until("the removed service to go", Duration::from_secs(10), || {
        !names(&d).contains(&g)
    });
    assert_eq!(answers(gone, 20), only("G2", 20), "G2 serves on, unsteered");
    drop(g1);
    // The added service works like any other.
    let a1 = testsrv("A1", &[added], &[]);
    promote_in(&d, a1.pid, &a);
    assert_eq!(answers(added, 20), only("A1", 20));
}

/// A bad file, sent by SIGHUP, is refused with a line naming file:line.
fn bad_file_refused_on_sighup(d: &mut Handoffd, config: &Path) {
    std::fs::write(
        config,
        "[[service]]\nname = \"x\"\nlisten = [\"not an address\"]\n",
    )
    .expect("writing");
    d.proc().signal(Signal::SIGHUP);
    assert!(
        d.proc()
            .wait_line(
                handoff_tests::Stream::Stderr,
                "configuration refused",
                scaled(Duration::from_secs(5))
            )
            .is_some_and(|l| l.contains(".toml:3:")),
        "the refusal names file:line"
    );
}

/// A root shell holding no listener whose child, of uid 65534, listens on `addr`: the
/// shape of the confused deputy. Returns the shell.
fn root_parent_of_nobody(addr: SocketAddr) -> handoff_tests::Proc {
    let script = format!(
        "setpriv --reuid 65534 --regid 65534 --clear-groups {srv} --name NOBODY --listen {addr} &\nwait\n",
        srv = handoff_tests::bin_path("testsrv").display()
    );
    let sh = handoff_tests::Proc::spawn(std::process::Command::new("sh").arg("-c").arg(script));
    assert!(
        sh.wait_line(
            handoff_tests::Stream::Stdout,
            "ready ",
            scaled(Duration::from_secs(10))
        )
        .is_some(),
        "testsrv as uid 65534 did not get ready: {:?}",
        sh.lines(handoff_tests::Stream::Stderr)
    );
    sh
}

#[test]
fn sighup_applies_a_new_user_to_the_next_promote() {
    if !privileged("sighup_applies_a_new_user_to_the_next_promote") {
        return;
    }
    let addr = loopback();
    let mut d = Handoffd::new("reload-user");
    let name = format!("user-{}", std::process::id());
    let config = d.socket.with_file_name("handoffd.toml");
    write_config(&config, &[(&name, addr)]);
    let config_arg = config.display().to_string();
    d.spawn(&[], &["--config", &config_arg]);
    let sh = root_parent_of_nobody(addr);
    let pid = sh.pid.to_string();
    let line = d.refused(&["promote", &pid]);
    assert!(line.contains("holds no listener itself"), "{line}");

    // The same file naming the uid of the listener's holder: the same promote passes.
    let mut text = std::fs::read_to_string(&config).expect("reading the config");
    text.push_str("user = \"65534\"\n");
    std::fs::write(&config, text).expect("writing the config");
    d.proc().signal(Signal::SIGHUP);
    assert!(
        d.proc()
            .wait_line(
                handoff_tests::Stream::Stderr,
                "service user changed",
                scaled(Duration::from_secs(5))
            )
            .is_some(),
        "the reload did not take the new user"
    );
    assert!(d.ctl(&["promote", &pid]).status.success());
    assert_eq!(answers(addr, 10), only("NOBODY", 10));
}

/// `handoffctl reload`'s exit status and its one line, on stdout or stderr.
fn reload(d: &Handoffd) -> (Option<i32>, String, String) {
    let out = d.ctl(&["reload"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn handoffctl_reload_applies_a_good_file_and_refuses_a_bad_one() {
    if !privileged("handoffctl_reload_applies_a_good_file_and_refuses_a_bad_one") {
        return;
    }
    let (one, two) = (loopback(), loopback());
    let mut d = Handoffd::new("ctl-reload");
    let tag = std::process::id();
    let (a, b) = (format!("one-{tag}"), format!("two-{tag}"));
    let config = d.socket.with_file_name("handoffd.toml");
    write_config(&config, &[(&a, one)]);
    let config_arg = config.display().to_string();
    d.spawn(&[], &["--config", &config_arg]);
    let a1 = testsrv("A1", &[one], &[]);
    promote_in(&d, a1.pid, &a);

    // A good file: a service added, answered at once with the file and the services.
    write_config(&config, &[(&a, one), (&b, two)]);
    let (code, stdout, stderr) = reload(&d);
    assert_eq!(code, Some(0), "reload of a good file: {stderr}");
    assert_eq!(stderr, "", "nothing on stderr");
    assert_eq!(
        stdout,
        format!("reloaded {config_arg}: services {a}, {b}\n"),
        "one line naming the file and the services"
    );
    assert_eq!(names(&d), vec![a.clone(), b.clone()]);
    let b1 = testsrv("B1", &[two], &[]);
    assert!(
        d.ctl(&["promote", &b1.pid.to_string(), "--service", &b])
            .status
            .success(),
        "the added service takes a promote"
    );
    assert_eq!(answers(two, 10), only("B1", 10));

    // A bad file: exit 1, the FILE:LINE:COL line, nothing changed.
    let before = d.shape();
    std::fs::write(
        &config,
        format!("[[service]]\nname = \"{a}\"\nlisten = [\"not an address\"]\n"),
    )
    .expect("writing");
    let (code, stdout, stderr) = reload(&d);
    assert_eq!(code, Some(1), "a refused file exits 1: {stdout}{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    let prefix =
        format!("Error: configuration refused, the running one stays: {config_arg}:3:11: ");
    assert!(
        stderr.starts_with(&prefix),
        "{stderr:?} starts with {prefix:?}"
    );
    assert!(stderr.contains("not an address"), "{stderr}");
    assert_eq!(d.shape(), before, "a refused file changes nothing");
    assert_eq!(answers(one, 10), only("A1", 10));
    assert_eq!(answers(two, 10), only("B1", 10));

    moved_or_missing_files_are_refused(&d, &config, &config_arg, &a, &before);

    // SIGHUP takes the same path: the file back, without `two`.
    write_config(&config, &[(&a, one)]);
    d.proc().signal(Signal::SIGHUP);
    assert!(
        d.proc()
            .wait_line(
                handoff_tests::Stream::Stderr,
                "service removed from the configuration",
                scaled(Duration::from_secs(5))
            )
            .is_some(),
        "SIGHUP reloaded the file"
    );
}

/// A file that moves service `a`, which has a live generation, and then no file at all are
/// refused with one line each, changing nothing from `before`.
fn moved_or_missing_files_are_refused(
    d: &Handoffd,
    config: &Path,
    config_arg: &str,
    a: &str,
    before: &[support::ServiceShape],
) {
    // A file that moves a service with a live generation to another address: refused
    // whole (service b's removal in it does not happen either).
    let three = loopback();
    write_config(config, &[(a, three)]);
    let (code, stdout, stderr) = reload(d);
    assert_eq!(
        code,
        Some(1),
        "an address change of a live service: {stdout}{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.starts_with(&format!(
            "Error: configuration refused, the running one stays: service {a} has live generations"
        )),
        "{stderr}"
    );
    assert_eq!(
        d.shape(),
        before,
        "an address change of a live service changes nothing"
    );

    // A file that is gone: its name, no line.
    std::fs::remove_file(config).expect("removing the config");
    let (code, _, stderr) = reload(d);
    assert_eq!(code, Some(1));
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.starts_with(&format!(
            "Error: configuration refused, the running one stays: {config_arg}: cannot be read"
        )),
        "{stderr}"
    );
    assert_eq!(d.shape(), before, "a missing file changes nothing");
}

#[test]
fn handoffctl_reload_without_config_is_refused() {
    if !privileged("handoffctl_reload_without_config_is_refused") {
        return;
    }
    let d = Handoffd::start("ctl-reload-none", &[loopback()]);
    let before = d.shape();
    let (code, stdout, stderr) = reload(&d);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.starts_with("Error: handoffd runs without --config"),
        "{stderr}"
    );
    assert_eq!(d.shape(), before);
}
