//! State another user prepared is never trusted: a state directory of theirs, or one they
//! could write, is refused; symlinks in the state directory are never followed; a
//! control socket they serve is not believed by handoffctl; state.json and the lock are
//! 0600 in a 0700 directory; an inconsistent state.json is refused whole at start.
//! The attacker is uid 65534, acting through processes the test spawns.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use handoff_common::proto::{self, Promoted, Response};
use handoff_tests::{Proc, Stream, TempDir, bin_path, scaled};
use support::{Handoffd, ctl, loopback, privileged, testsrv};

const NOBODY: u32 = 65534;

/// A test directory `hostile-NAME`, sticky and world-writable like /tmp if `sticky`.
fn hostile_dir(name: &str, sticky: bool) -> TempDir {
    let dir = TempDir::new(&format!("hostile-{name}"));
    let mode = if sticky { 0o1777 } else { 0o755 };
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).expect("chmod");
    dir
}

/// Runs `program args` as uid/gid 65534 and checks it succeeded.
fn as_nobody(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("running a command as nobody");
    assert!(
        out.status.success(),
        "{program} {args:?} as nobody: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A root file the attacker wants root to overwrite.
fn victim(dir: &Path) -> PathBuf {
    let path = dir.join("victim");
    std::fs::write(&path, "precious\n").expect("writing the victim file");
    path
}

fn assert_victim_intact(path: &Path) {
    assert_eq!(
        std::fs::read_to_string(path).expect("the victim file is still there"),
        "precious\n",
        "{} was written through a symlink",
        path.display()
    );
}

/// Starts handoffd on `state` expecting it to refuse at once; returns its error line.
fn refused_start(state: &Path, socket: &Path, needle: &str) -> String {
    let mut cmd = Command::new(bin_path("handoffd"));
    cmd.args(["--listen", &loopback().to_string(), "--service"])
        .arg(format!("hostile-{}", std::process::id()))
        .arg("--state-dir")
        .arg(state)
        .arg("--control-socket")
        .arg(socket)
        .args(["--metrics-addr", "off"]);
    refusal(&mut cmd, needle)
}

/// Runs handoffd expecting it to exit at once with one error line containing `needle`;
/// returns the line. A daemon that starts instead is killed (by the guard) after 10 s.
fn refusal(cmd: &mut Command, needle: &str) -> String {
    let mut p = Proc::spawn(cmd);
    let status = p.wait_exit(scaled(Duration::from_secs(10)));
    // Until stderr is closed: every line read.
    let _ = p.wait_line(Stream::Stderr, "\0", scaled(Duration::from_secs(5)));
    let stderr = p.lines(Stream::Stderr).join("\n");
    let status = status.unwrap_or_else(|| panic!("handoffd started: {stderr}"));
    assert!(!status.success(), "handoffd exited 0: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("Error:") || l.contains("Caused by"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    assert!(errors[0].contains(needle), "{needle:?} not in {stderr}");
    errors[0].to_string()
}

#[test]
fn state_directories_another_user_could_write_are_refused() {
    if !privileged("state_directories_another_user_could_write_are_refused") {
        return;
    }
    let tmp = hostile_dir("dirs", true);
    let victim = victim(&tmp.0);
    let socket = tmp.0.join("root-ctl").join("ctl.sock");

    // The attacker prepares the state directory root will use, with symlinks in it.
    let theirs = tmp.0.join("theirs");
    let theirs_s = theirs.display().to_string();
    as_nobody("mkdir", &["-m", "0700", &theirs_s]);
    for name in ["state.json", "state.json.new", "handoffd.lock"] {
        as_nobody(
            "ln",
            &[
                "-s",
                &victim.display().to_string(),
                &format!("{theirs_s}/{name}"),
            ],
        );
    }
    let line = refused_start(&theirs, &socket, "owned by uid 65534 with mode 0700");
    assert!(line.contains(&theirs_s), "names the path: {line}");
    assert_victim_intact(&victim);

    // One the attacker could write: root's, mode 0777.
    let open = tmp.0.join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    refused_start(&open, &socket, "mode 0777");
    assert!(
        !open.join("handoffd.lock").exists(),
        "nothing written there"
    );

    // Root's own directory below one of the attacker's (who could swap it).
    let parent = tmp.0.join("parent");
    as_nobody("mkdir", &["-m", "0755", &parent.display().to_string()]);
    refused_start(&parent.join("state"), &socket, "above");

    // A symlink planted where the state directory should be.
    let link = tmp.0.join("link");
    as_nobody("ln", &["-s", "/etc", &link.display().to_string()]);
    refused_start(&link, &socket, "is not a directory");

    // A control socket directory of the attacker's.
    let good = tmp.0.join("good-state");
    refused_start(&good, &theirs.join("ctl.sock"), "owned by uid 65534");
    assert!(
        !theirs.join("ctl.sock").exists(),
        "no socket was bound there"
    );
    assert_victim_intact(&victim);
    assert!(!socket.exists(), "no daemon started");
}

#[test]
fn symlinks_in_a_root_state_directory_are_never_followed() {
    if !privileged("symlinks_in_a_root_state_directory_are_never_followed") {
        return;
    }
    let tmp = hostile_dir("links", false);
    let victim = victim(&tmp.0);
    let socket = tmp.0.join("ctl.sock");
    // state.json or the lock as a symlink: refused, the target untouched.
    for (i, name) in ["state.json", "handoffd.lock"].into_iter().enumerate() {
        let state = tmp.0.join(format!("s{i}"));
        std::fs::create_dir(&state).expect("mkdir");
        symlink(&victim, state.join(name)).expect("symlink");
        let needle = format!("{} is a symlink", state.join(name).display());
        refused_start(&state, &socket, &needle);
        assert_victim_intact(&victim);
    }
    // A stale temp file that is a symlink: removed, never written through.
    let mut d = Handoffd::new("links");
    let state = d.socket.with_file_name("state");
    std::fs::create_dir(&state).expect("mkdir");
    symlink(&victim, state.join("state.json.new")).expect("symlink");
    let addr = loopback();
    d.spawn(&[addr], &[]);
    let a = testsrv("A", &[addr], &[]);
    d.promote(a.pid);
    assert_victim_intact(&victim);
    assert!(!state.join("state.json.new").exists(), "temp file renamed");
    let json = std::fs::symlink_metadata(state.join("state.json")).expect("state.json");
    assert!(json.file_type().is_file());
    assert_eq!(json.mode() & 0o7777, 0o600, "state.json is 0600");
}

#[test]
fn files_are_0600_in_a_0700_directory_created_by_the_daemon() {
    if !privileged("files_are_0600_in_a_0700_directory_created_by_the_daemon") {
        return;
    }
    let addr = loopback();
    let d = Handoffd::start("modes", &[addr]);
    let a = testsrv("A", &[addr], &[]);
    d.promote(a.pid);
    let state = d.socket.with_file_name("state");
    let mode = |p: &Path| std::fs::symlink_metadata(p).expect("exists").mode() & 0o7777;
    assert_eq!(mode(&state), 0o700, "state dir");
    assert_eq!(mode(&state.join("state.json")), 0o600, "state.json");
    assert_eq!(mode(&state.join("handoffd.lock")), 0o600, "lock");
    let pins = Path::new("/sys/fs/bpf/handoff");
    let meta = std::fs::symlink_metadata(pins).expect("pin dir");
    assert_eq!(meta.uid(), 0);
    assert_eq!(meta.mode() & 0o022, 0, "pin dir writable by root only");
}

#[test]
fn inconsistent_state_files_are_refused_whole() {
    if !privileged("inconsistent_state_files_are_refused_whole") {
        return;
    }
    let addr = loopback();
    let mut a = testsrv("A", &[addr], &[]);
    let pid = a.pid;
    let d = Handoffd::new("badstate");
    let state = d.socket.with_file_name("state");
    std::fs::create_dir(&state).expect("mkdir");
    let start_time = start_time(pid);
    let generation = |state: &str, blocks: &str, drain: &str| {
        format!(
            r#"{{"id":1,"state":"{state}","leader":{{"pid":{pid},"start_time":{start_time}}},"descendants":[],"blocks":{blocks},"drain":{drain}}}"#
        )
    };
    let key = format!(r#"{{"addr":"{addr}","v6only":null,"ifindex":0,"uid":0}}"#);
    let file_in = |group: &str, generations: &[String], next_id: u64| {
        format!(
            r#"{{"version":1,"services":[{{"name":"{}","listen":["{addr}"],"next_id":{next_id},"groups":[{group}],"generations":[{}]}}]}}"#,
            d.service,
            generations.join(",")
        )
    };
    let file = |generations: &[String], next_id: u64| file_in(&key, generations, next_id);
    let block = r#"[{"index":1,"cookies":[5]}]"#;
    let huge = r#"{"started_ms":1,"deadline_ms":18446744073709551615,"retired_ms":null,"timed_out":false,"killed":false}"#;
    let cases = [
        (
            file(&[generation("active", "[]", "null")], 2),
            "not one block per group",
        ),
        (
            file(&[generation("active", block, "null")], 1),
            "below next_id",
        ),
        (
            file(&[generation("draining", block, huge)], 2),
            "beyond the longest drain timeout",
        ),
        (
            file(
                &[generation(
                    "active",
                    r#"[{"index":64,"cookies":[]}]"#,
                    "null",
                )],
                2,
            ),
            "beyond the map",
        ),
        (
            file_in("null", &[generation("active", block, "null")], 2),
            "never fixed",
        ),
        (
            "{\"version\":1,\"services\":[".to_string(),
            "is not a handoff state",
        ),
    ];
    for (text, needle) in &cases {
        refused_whole(&d, &mut a, addr, text, needle);
    }
}

/// handoffd `d` refuses the state file `text` with `needle`, leaves it as it is, starts
/// nothing and signals nothing (A, the process the file names, still runs).
fn refused_whole(d: &Handoffd, a: &mut Proc, addr: std::net::SocketAddr, text: &str, needle: &str) {
    let state = d.socket.with_file_name("state");
    std::fs::write(state.join("state.json"), text).expect("writing state.json");
    let mut cmd = Command::new(bin_path("handoffd"));
    cmd.args(["--listen", &addr.to_string(), "--service", &d.service])
        .arg("--state-dir")
        .arg(&state)
        .arg("--control-socket")
        .arg(&d.socket)
        .args(["--metrics-addr", "off"]);
    let line = refusal(&mut cmd, needle);
    assert!(line.contains("state.json"), "names the file: {line}");
    assert_eq!(
        &std::fs::read_to_string(state.join("state.json")).expect("still there"),
        text,
        "state.json untouched"
    );
    assert!(!d.socket.exists(), "no control socket: nothing started");
    assert!(
        !Path::new("/sys/fs/bpf/handoff").join(&d.service).exists(),
        "nothing pinned"
    );
    // And A, the process the file names, got no signal.
    assert!(a.wait_exit(Duration::ZERO).is_none(), "A still runs");
}

/// Field 22 of /proc/PID/stat.
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    after
        .split(' ')
        .nth(19)
        .and_then(|f| f.parse().ok())
        .expect("start time")
}

/// The forged answer the fake daemon gives.
fn forged() -> Vec<u8> {
    proto::encode(&Response::Promoted(Promoted {
        service: "web".into(),
        generation: 7,
        pid: 4242,
        listeners: 1,
        draining: Some(6),
        weight: None,
        standby_ms: None,
    }))
}

#[test]
fn a_control_socket_served_by_another_user_is_not_believed() {
    if !privileged("a_control_socket_served_by_another_user_is_not_believed") {
        return;
    }
    let tmp = hostile_dir("fake", true);
    let socket = tmp.0.join("evil").join("ctl.sock");
    // The fake daemon: this test binary's helper below, run as nobody.
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
    cmd.args(["fake_daemon", "--exact", "--ignored", "--nocapture"])
        .env("HANDOFF_FAKE_SOCKET", &socket)
        .uid(NOBODY)
        .gid(NOBODY);
    let fake = Proc::spawn(&mut cmd);
    fake.wait_line(Stream::Stdout, "fake daemon ready", Duration::from_secs(10))
        .expect("the fake daemon listens");

    // A pid that exists: handoffctl opens a pidfd of it before it connects (and never
    // sends it to a peer it does not believe).
    let target = fake.pid.to_string();
    let out = ctl(&socket, &["promote", &target]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "refused: {stderr}");
    assert!(out.stdout.is_empty(), "no forged success printed");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("served by a process of uid 65534"),
        "{stderr}"
    );
    // The check is what refused it: told to trust uid 65534, handoffctl believes it.
    let out = ctl(&socket, &["--daemon-uid", "65534", "promote", &target]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("generation 7 (pid {target}, host pid 4242")),
        "the forged answer reached the peer check"
    );
}

/// Not a test: the fake control socket of
/// [`a_control_socket_served_by_another_user_is_not_believed`], run as nobody.
#[test]
#[ignore = "helper run as uid 65534 by a_control_socket_served_by_another_user_is_not_believed"]
fn fake_daemon() {
    use std::io::{BufRead, BufReader, Write};
    let path = PathBuf::from(std::env::var_os("HANDOFF_FAKE_SOCKET").expect("socket path"));
    std::fs::create_dir_all(path.parent().expect("a dir")).expect("mkdir");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    println!("fake daemon ready");
    // Bounded: the test makes two requests.
    for _ in 0..2 {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut line = Vec::new();
        let _ = BufReader::new(&stream).read_until(b'\n', &mut line);
        let _ = stream.write_all(&forged());
    }
}

#[test]
fn handoffctl_exits_quietly_on_a_closed_pipe() {
    if !privileged("handoffctl_exits_quietly_on_a_closed_pipe") {
        return;
    }
    let addr = loopback();
    let d = Handoffd::start("pipe", &[addr]);
    // A pipe whose reader is gone before handoffctl writes: `handoffctl status | head -1`
    // with head already done.
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    for args in [&["status"][..], &["status", "--json"]] {
        let out = Command::new(bin_path("handoffctl"))
            .arg("--control-socket")
            .arg(&d.socket)
            .args(args)
            .stdout(writer.try_clone().expect("dup"))
            .output()
            .expect("running handoffctl");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}");
    }
}
