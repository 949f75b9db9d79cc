//! handoffd's log where it runs: with stderr a file that JOURNAL_STREAM names (what
//! journald's stream looks like to a service), every line carries its syslog priority —
//! the start-up refusal's `Error:` line, clap's usage errors, the log of a normal start and
//! stop; with JOURNAL_STREAM naming another stream (inherited from a parent), no line
//! does. Never a colour escape in a file.

mod support;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use handoff_tests::{TempDir, bin_path, scaled};
use support::{ctl, loopback, privileged};

/// A handoffd writing its stderr to a file; killed, and what it left cleaned up, when
/// dropped.
struct Daemon {
    child: Child,
    state: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(bin_path("handoffd"))
            .arg("--cleanup")
            .arg("--state-dir")
            .arg(&self.state)
            .output();
    }
}

impl Daemon {
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + scaled(timeout);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `DEV:INO` of `path`, as systemd writes JOURNAL_STREAM.
fn dev_ino(path: &Path) -> String {
    let m = std::fs::metadata(path).expect("stat");
    format!("{}:{}", m.dev(), m.ino())
}

/// Starts handoffd with `args` and `env`, stderr to `log`, JOURNAL_STREAM=`stream`.
fn spawn(dir: &Path, log: &Path, stream: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
    let stderr = File::create(log).expect("creating the log file");
    let state = dir.join("state");
    let child = Command::new(bin_path("handoffd"))
        .args(args)
        .arg("--state-dir")
        .arg(&state)
        .arg("--control-socket")
        .arg(dir.join("ctl.sock"))
        .args(["--metrics-addr", "off"])
        .env("JOURNAL_STREAM", stream)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("starting handoffd");
    Daemon { child, state }
}

/// JOURNAL_STREAM for a handoffd logging to `log`: its own `DEV:INO`, or (`journald`
/// false) what a child of a journald-logged parent inherits, another stream's.
fn stream_for(log: &Path, journald: bool) -> String {
    File::create(log).expect("creating the log file");
    let other = log.parent().expect("the log is in the test dir");
    dev_ino(if journald { log } else { other })
}

/// Runs handoffd to its end; returns its exit status and what it wrote.
fn run(dir: &Path, stream_of_log: bool, args: &[&str]) -> (ExitStatus, String) {
    let log = dir.join(format!("stderr-{}", args.len()));
    let stream = stream_for(&log, stream_of_log);
    let mut d = spawn(dir, &log, &stream, args, &[]);
    let status = d
        .wait_exit(Duration::from_secs(20))
        .expect("handoffd exits");
    (status, std::fs::read_to_string(&log).expect("the log"))
}

/// Every line starts with one of `<3>`, `<4>`, `<6>`, `<7>`; returns the priorities.
fn priorities(text: &str) -> Vec<u8> {
    assert!(!text.contains("\x1b["), "a colour escape in {text:?}");
    text.lines()
        .map(|line| {
            let p = ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .position(|p| line.starts_with(p))
                .unwrap_or_else(|| panic!("no priority prefix on {line:?} in:\n{text}"));
            [3, 4, 6, 7][p]
        })
        .collect()
}

#[test]
fn under_journald_a_refusal_carries_priority_3() {
    if !privileged("under_journald_a_refusal_carries_priority_3") {
        return;
    }
    let dir = TempDir::new("logging-refusal");
    let missing = dir.0.join("missing.toml").display().to_string();
    let (status, text) = run(&dir.0, true, &["--config", &missing]);
    assert_eq!(status.code(), Some(1), "{text}");
    assert_eq!(priorities(&text), vec![3], "{text}");
    assert!(text.starts_with("<3>Error: "), "{text}");
    // A usage error is clap's text, several lines: each one prefixed.
    let (status, text) = run(&dir.0, true, &["--listen", "not-an-address"]);
    assert_eq!(status.code(), Some(2), "{text}");
    let p = priorities(&text);
    assert!(p.len() > 1 && p.iter().all(|&p| p == 3), "{text}");
    assert!(text.starts_with("<3>error: invalid value"), "{text}");
    assert!(!dir.0.join("state").exists(), "nothing was made");
}

/// Starts a daemon (debug level, without the guard so that it warns), waits until it
/// answers, stops it; returns what it wrote.
fn start_and_stop(dir: &Path, journald: bool) -> String {
    let log = dir.join("stderr");
    let stream = stream_for(&log, journald);
    let listen = loopback().to_string();
    let service = format!("logging-{}", std::process::id());
    let env = [("RUST_LOG", "debug"), ("HANDOFF_TEST_NO_GUARD", "1")];
    let args = ["--listen", &listen, "--service", &service];
    let mut d = spawn(dir, &log, &stream, &args, &env);
    let socket = dir.join("ctl.sock");
    support::wait_until("handoffd answers status", Duration::from_secs(10), || {
        ctl(&socket, &["status"]).status.success()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("handoffd stops");
    assert!(status.success(), "{status}");
    std::fs::read_to_string(&log).expect("the log")
}

#[test]
fn under_journald_every_line_of_a_run_carries_its_priority() {
    if !privileged("under_journald_every_line_of_a_run_carries_its_priority") {
        return;
    }
    let dir = TempDir::new("logging-run");
    let text = start_and_stop(&dir.0, true);
    let p = priorities(&text);
    for (priority, what) in [(4, "warning"), (6, "info"), (7, "debug")] {
        assert!(p.contains(&priority), "no {what} line in:\n{text}");
    }
    let has = |prefix: &str, needle: &str| {
        text.lines()
            .any(|l| l.starts_with(prefix) && l.contains(needle))
    };
    assert!(has("<4>", "HANDOFF_TEST_NO_GUARD"), "{text}");
    assert!(has("<6>", "handoffd ready"), "{text}");
    assert!(has("<6>", "stopping"), "{text}");
}

#[test]
fn an_inherited_journal_stream_is_not_journald() {
    if !privileged("an_inherited_journal_stream_is_not_journald") {
        return;
    }
    let dir = TempDir::new("logging-inherited");
    let missing = dir.0.join("missing.toml").display().to_string();
    let (status, text) = run(&dir.0, false, &["--config", &missing]);
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.starts_with("Error: "), "{text}");
    assert!(!text.contains("\x1b["), "{text}");
    assert!(text.lines().all(|l| !l.starts_with('<')), "{text}");
    // A whole run too: warnings and all, as plain text.
    let text = start_and_stop(&dir.0, false);
    assert!(
        text.contains("WARN") && text.contains("handoffd ready"),
        "{text}"
    );
    assert!(!text.contains("\x1b["), "{text}");
    assert!(text.lines().all(|l| !l.starts_with('<')), "{text}");
}
