//! A start that fails leaves the state directory as it found it, and a daemon refused by
//! another's lock removes nothing of the other's (real handoffd processes, as root).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use handoff_tests::{Proc, bin_path, free_port, privileged};

/// A directory of this test alone, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("handoff-start-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test's temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// handoffd for one service on a free loopback port, at the default log level.
fn handoffd(service: &str, state: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new(bin_path("handoffd"));
    cmd.arg("--listen")
        .arg(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())).to_string())
        .args(["--service", service, "--metrics-addr", "off", "--state-dir"])
        .arg(state)
        .arg("--control-socket")
        .arg(socket)
        .env_remove("RUST_LOG");
    cmd
}

/// Runs a start expected to fail: exit status 1 and an `Error:` line that contains
/// `needle`, last on stderr.
fn refused(cmd: &mut Command, needle: &str) {
    let out: Output = cmd.output().expect("running handoffd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("Error: ") && last.contains(needle),
        "expected one error line with {needle:?}, got {stderr:?}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("Error:")).count(),
        1,
        "{stderr}"
    );
}

/// The names in `dir`, sorted; `None` if it does not exist.
fn listing(dir: &Path) -> Option<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .map(|e| {
            e.expect("a dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    Some(names)
}

fn status_ok(socket: &Path) -> bool {
    Command::new(bin_path("handoffctl"))
        .arg("--control-socket")
        .arg(socket)
        .arg("status")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_failed_start_leaves_the_state_directory_as_it_was() {
    if !privileged("a_failed_start_leaves_the_state_directory_as_it_was") {
        return;
    }
    let tmp = TempDir::new("failed");
    // Fails after the lock was taken: the control socket's path holds a regular file.
    let not_a_socket = tmp.0.join("not-a-socket");
    std::fs::write(&not_a_socket, "keep").expect("writing a file");

    // A state directory that did not exist is not left behind.
    let state = tmp.0.join("new-state");
    refused(
        &mut handoffd("failed", &state, &not_a_socket),
        "is not a socket",
    );
    assert_eq!(listing(&state), None, "the state directory was left behind");
    assert_eq!(
        std::fs::read_to_string(&not_a_socket).expect("kept"),
        "keep"
    );

    // One that existed keeps what it had, and gets nothing new.
    let state = tmp.0.join("old-state");
    std::fs::create_dir(&state).expect("mkdir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::write(state.join("handoffd.lock"), "").expect("an old lock file");
    refused(
        &mut handoffd("failed", &state, &not_a_socket),
        "is not a socket",
    );
    assert_eq!(listing(&state), Some(vec!["handoffd.lock".to_string()]));

    // A generation table that cannot be read stops the start after the lock: the
    // table stays as it was, the lock file goes.
    std::fs::remove_file(state.join("handoffd.lock")).expect("rm");
    std::fs::write(state.join("state.json"), "{ not json").expect("a broken table");
    refused(
        &mut handoffd("failed", &state, &tmp.0.join("ctl.sock")),
        "state.json",
    );
    assert_eq!(listing(&state), Some(vec!["state.json".to_string()]));
    assert_eq!(
        std::fs::read_to_string(state.join("state.json")).expect("kept"),
        "{ not json"
    );
    assert!(!tmp.0.join("ctl.sock").exists());
}

#[test]
fn a_daemon_refused_by_the_lock_removes_nothing_of_the_first() {
    if !privileged("a_daemon_refused_by_the_lock_removes_nothing_of_the_first") {
        return;
    }
    let tmp = TempDir::new("locked");
    let state = tmp.0.join("state");
    let socket = tmp.0.join("ctl.sock");
    let service = format!("locked-{}", std::process::id());
    let first = Proc::spawn(&mut handoffd(&service, &state, &socket));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status_ok(&socket) {
        assert!(
            Instant::now() < deadline,
            "the first handoffd did not answer within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = listing(&state).expect("the state directory");
    assert!(before.contains(&"handoffd.lock".to_string()), "{before:?}");

    // The same state directory: refused by the lock.
    refused(
        &mut handoffd(&service, &state, &tmp.0.join("other.sock")),
        "another handoffd uses state directory",
    );
    // Another state directory, the same control socket: refused at the socket, after it
    // took (and now leaves) its own lock.
    let state2 = tmp.0.join("state2");
    refused(
        &mut handoffd(&service, &state2, &socket),
        "another handoffd is serving",
    );
    assert_eq!(
        listing(&state2),
        None,
        "the refused daemon's state directory stayed"
    );
    assert_eq!(listing(&state), Some(before));
    assert!(socket.exists(), "the first daemon's socket was removed");
    assert!(status_ok(&socket), "the first daemon no longer answers");
    assert!(!tmp.0.join("other.sock").exists());

    drop(first);
    let _ = Command::new(bin_path("handoffd"))
        .args(["--cleanup", "--service", &service, "--state-dir"])
        .arg(&state)
        .output();
}
