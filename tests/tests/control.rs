//! The control socket: one daemon per state directory and socket, a stale socket file
//! replaced, requests from unauthorised users refused.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use handoff_tests::{Proc, Stream, bin_path};
use support::{Handoffd, ctl, loopback, privileged};

#[test]
fn second_daemon_on_the_same_state_dir_or_socket_refuses_to_start() {
    if !privileged("second_daemon_on_the_same_state_dir_or_socket_refuses_to_start") {
        return;
    }
    let addr = loopback();
    let d = Handoffd::start("twice", &[addr]);
    let state = d.socket.parent().expect("a dir").join("state");
    // Same state dir.
    let out = Command::new(bin_path("handoffd"))
        .args(["--listen", &addr.to_string(), "--state-dir"])
        .arg(&state)
        .arg("--control-socket")
        .arg(d.socket.with_extension("other"))
        .output()
        .expect("running handoffd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another handoffd uses state directory"),
        "{err}"
    );
    // Same control socket, other state dir.
    let other = tempdir("twice-other");
    let out = Command::new(bin_path("handoffd"))
        .args(["--listen", &addr.to_string(), "--state-dir"])
        .arg(&other)
        .arg("--control-socket")
        .arg(&d.socket)
        .output()
        .expect("running handoffd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another handoffd is serving"), "{err}");
    assert!(
        d.ctl(&["status"]).status.success(),
        "the first daemon still serves"
    );
    let _ = std::fs::remove_dir_all(other);
}

#[test]
fn stale_socket_of_a_killed_daemon_is_replaced() {
    if !privileged("stale_socket_of_a_killed_daemon_is_replaced") {
        return;
    }
    let addr = loopback();
    let mut d = Handoffd::start("stale", &[addr]);
    d.proc().signal(nix::sys::signal::Signal::SIGKILL);
    d.proc()
        .wait_exit(Duration::from_secs(5))
        .expect("handoffd died");
    assert!(d.socket.exists(), "a killed daemon leaves its socket file");
    let out = d.ctl(&["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is handoffd running?"), "{err}");
    d.spawn(&[addr], &[]); // waits until the new daemon answers
    assert!(d.ctl(&["status"]).status.success());
}

#[test]
fn unauthorised_user_is_refused() {
    if !privileged("unauthorised_user_is_refused") {
        return;
    }
    let addr = loopback();
    let d = Handoffd::start("auth", &[addr]);
    // Let user nobody reach the socket through the file system, so the daemon's own
    // credential check is what refuses it.
    let dir = d.socket.parent().expect("a dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let mut cmd = Command::new(bin_path("handoffctl"));
    cmd.arg("--control-socket").arg(&d.socket).arg("status");
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    std::os::unix::process::CommandExt::gid(&mut cmd, 65534);
    let p = Proc::spawn(&mut cmd);
    let line = p
        .wait_line(Stream::Stderr, "handoffctl:", Duration::from_secs(10))
        .expect("handoffctl as nobody prints an error");
    assert!(
        line.contains("uid 65534 may not control handoffd"),
        "{line}"
    );
    assert!(
        ctl(&d.socket, &["status"]).status.success(),
        "root still may"
    );
}

#[test]
fn daemon_reports_ready_to_systemd() {
    if !privileged("daemon_reports_ready_to_systemd") {
        return;
    }
    let mut d = Handoffd::new("notify");
    // In the daemon's own test directory, which its guard removes.
    let path = d.socket.with_file_name("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&path).expect("a notify socket");
    systemd
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    d.env
        .push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    d.spawn(&[loopback()], &[]);
    let mut buf = [0u8; 512];
    // STATUS updates may come first; READY comes once the maps are loaded.
    let msg = loop {
        let n = systemd.recv(&mut buf).expect("READY within 10 s");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.contains("READY=1") {
            break msg;
        }
        assert!(msg.starts_with("STATUS="), "{msg}");
    };
    assert!(msg.starts_with("READY=1\nSTATUS=1 services"), "{msg}");
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("handoff-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a temp dir");
    dir
}
