//! handoffd runs on the host or not at all: in a pid namespace of its own, in a cgroup
//! namespace that shows another root, or given a cgroup below the root, it refuses with one
//! line saying what to run instead, having made nothing; given a bind mount of the real
//! cgroup v2 root (as a pod's hostPath volume is), it starts and steers.
//! A bpffs of its own is refused when the host's can be seen through /proc/1/root.
//! Each case is run for real, under `unshare`.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use handoff_common::proto::GenerationState;
use handoff_tests::{Proc, Stream, TempDir, bin_path, scaled};
use support::{Handoffd, answers, loopback, only, privileged, testsrv};

/// The mount point of the cgroup v2 hierarchy (as handoffd finds it).
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("reading /proc/self/mounts");
    mounts
        .lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup2 file system is mounted")
}

/// A cgroup of this test below the root, removed when dropped (once its processes are
/// gone: polled, since a dead process leaves its cgroup a moment after it is reaped).
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(name: &str) -> Self {
        let path = cgroup2_root().join(format!("handoff-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).expect("creating a cgroup");
        Self(path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let procs = self.0.join("cgroup.procs");
        if let Ok(pids) = std::fs::read_to_string(&procs) {
            for pid in pids.lines().filter_map(|p| p.parse().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let deadline = std::time::Instant::now() + scaled(Duration::from_secs(5));
        while std::fs::remove_dir(&self.0).is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A bind mount, unmounted (lazily, whatever still uses it) and its directory removed
/// when dropped.
struct BindMount(PathBuf);

impl BindMount {
    fn new(source: &Path, target: PathBuf) -> Self {
        std::fs::create_dir_all(&target).expect("creating the mount point");
        let status = Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(&target)
            .status()
            .expect("running mount");
        assert!(status.success(), "mount --bind {source:?} {target:?}");
        Self(target)
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Runs `cmd` (a handoffd, perhaps under unshare) expecting a refusal: exit status 1 and
/// one line on stderr; returns that line. The state directory `state` must not exist
/// after. The process group is killed if it outlives the wait.
fn refused(mut cmd: Command, state: &Path) -> String {
    cmd.env_remove("RUST_LOG").env_remove("JOURNAL_STREAM");
    let mut p = Proc::spawn(&mut cmd);
    let status = p.wait_exit(scaled(Duration::from_secs(20)));
    if status.is_none() {
        // Where it hangs, for the failure message.
        let what = |f: &str| std::fs::read_to_string(format!("/proc/{}/{f}", p.pid));
        panic!(
            "{cmd:?} did not exit: cmdline {:?}, wchan {:?}, stack {:?}, stderr {:?}",
            what("cmdline"),
            what("wchan"),
            what("stack"),
            p.lines(Stream::Stderr)
        );
    }
    // Until stderr is closed: every line read.
    assert!(
        p.wait_closed(Stream::Stderr, scaled(Duration::from_secs(5))),
        "stderr closed"
    );
    let stderr = p.lines(Stream::Stderr);
    let status = status.unwrap_or_else(|| panic!("handoffd did not exit: {stderr:?}"));
    assert_eq!(status.code(), Some(1), "{cmd:?}: {status}, {stderr:?}");
    assert_eq!(stderr.len(), 1, "one line expected: {stderr:?}");
    assert!(stderr[0].starts_with("Error: "), "{stderr:?}");
    assert!(
        !state.exists(),
        "a refused start made its state directory {}",
        state.display()
    );
    stderr[0].clone()
}

/// handoffd's arguments for a daemon of `dir`, with `extra`.
fn handoffd_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--listen".to_string(),
        loopback().to_string(),
        "--service".into(),
        format!("host-{}", std::process::id()),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--control-socket".into(),
        dir.join("ctl.sock").display().to_string(),
        "--metrics-addr".into(),
        "off".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn a_pid_namespace_of_its_own_is_refused() {
    if !privileged("a_pid_namespace_of_its_own_is_refused") {
        return;
    }
    let dir = TempDir::new("host-pidns");
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child"])
        .arg(bin_path("handoffd"))
        .args(handoffd_args(&dir.0, &[]));
    let line = refused(cmd, &dir.0.join("state"));
    assert!(line.contains("pid namespace of its own"), "{line}");
    assert!(
        line.contains("run handoffd in the host's pid namespace"),
        "{line}"
    );
    assert!(line.contains("--pid=host"), "{line}");
}

#[test]
fn a_cgroup_namespace_root_is_refused() {
    if !privileged("a_cgroup_namespace_root_is_refused") {
        return;
    }
    let dir = TempDir::new("host-cgns");
    // The process moves itself into a cgroup below the root, then makes a cgroup
    // namespace (rooted there) and a mount namespace in which cgroup2 is mounted again:
    // what a container with its own cgroup namespace shows at /sys/fs/cgroup. Both
    // namespaces end with the process.
    let cgroup = Cgroup::new("cgns");
    let root = cgroup2_root();
    let handoffd = std::iter::once(bin_path("handoffd").display().to_string())
        .chain(handoffd_args(&dir.0, &[]))
        .collect::<Vec<_>>()
        .join(" ");
    let inner = format!(
        "umount {root} && mount -t cgroup2 none {root} && exec {handoffd}",
        root = root.display()
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && exec unshare --cgroup --mount sh -c "$2""#)
        .arg("sh")
        .arg(&cgroup.0)
        .arg(&inner);
    let line = refused(cmd, &dir.0.join("state"));
    assert!(
        line.contains(&format!(
            "{} is not the root of the cgroup v2 hierarchy",
            root.display()
        )),
        "{line}"
    );
    assert!(line.contains("--cgroupns=host"), "{line}");
    assert!(line.contains("--cgroup-root"), "{line}");
}

#[test]
fn a_cgroup_below_the_root_is_refused() {
    if !privileged("a_cgroup_below_the_root_is_refused") {
        return;
    }
    let dir = TempDir::new("host-cgchild");
    let cgroup = Cgroup::new("child");
    let path = cgroup.0.display().to_string();
    let mut cmd = Command::new(bin_path("handoffd"));
    cmd.args(handoffd_args(&dir.0, &["--cgroup-root", &path]));
    let line = refused(cmd, &dir.0.join("state"));
    assert!(
        line.contains(&format!(
            "{path} is not the root of the cgroup v2 hierarchy"
        )),
        "{line}"
    );
    // Not a cgroup at all: refused too.
    let plain = dir.0.join("plain");
    std::fs::create_dir(&plain).expect("a plain directory");
    let mut cmd = Command::new(bin_path("handoffd"));
    cmd.args(handoffd_args(
        &dir.0,
        &["--cgroup-root", &plain.display().to_string()],
    ));
    let line = refused(cmd, &dir.0.join("state"));
    assert!(line.contains("is not a cgroup v2 file system"), "{line}");
}

#[test]
fn a_bind_mount_of_the_real_root_is_accepted() {
    if !privileged("a_bind_mount_of_the_real_root_is_accepted") {
        return;
    }
    let dir = TempDir::new("host-cgbind");
    // Dropped last: after the daemon is gone.
    let mount = BindMount::new(&cgroup2_root(), dir.0.join("cgroup"));
    assert_eq!(
        std::fs::metadata(&mount.0).expect("the bind mount").ino(),
        1,
        "the bind mount shows the root"
    );
    let addr = loopback();
    let a = testsrv("A", &[addr], &[]);
    let root = mount.0.display().to_string();
    let d = Handoffd::start_with("host-bind", &[addr], &["--cgroup-root", &root]);
    d.promote(a.pid);
    assert_eq!(answers(addr, 50), only("A", 50), "A is steered to");
    let b = testsrv("B", &[addr], &[]);
    d.promote(b.pid);
    assert_eq!(answers(addr, 50), only("B", 50), "B is steered to");
    // The drain programs attached through the bind mount see A's sockets close: with no
    // connection left, A is retired.
    support::wait_until("A retired", Duration::from_secs(10), || {
        d.state_of(a.pid) == Some(GenerationState::Retired)
    });
}

/// A bpffs of handoffd's own (mounted in a new mount namespace, as a container would) is
/// refused when the host's can be looked at through /proc/1/root; when pid 1's root is
/// out of reach (no ptrace read access to pid 1, as in some sandboxes), the start goes on
/// and says that it could not compare. Either way the outcome is checked, never skipped.
#[test]
fn a_bpffs_of_its_own_is_refused_when_the_host_is_visible() {
    if !privileged("a_bpffs_of_its_own_is_refused_when_the_host_is_visible") {
        return;
    }
    let dir = TempDir::new("host-bpffs");
    let handoffd = std::iter::once(bin_path("handoffd").display().to_string())
        .chain(handoffd_args(&dir.0, &[]))
        .collect::<Vec<_>>()
        .join(" ");
    // The mount namespace, and the bpffs in it, end with the process.
    let inner = format!("mount -t bpf bpf /sys/fs/bpf && exec {handoffd}");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "sh", "-c", &inner]);
    if std::fs::metadata("/proc/1/root/sys/fs/bpf").is_ok() {
        let line = refused(cmd, &dir.0.join("state"));
        assert!(
            line.contains("/sys/fs/bpf is a bpf file system of its own"),
            "{line}"
        );
        assert!(line.contains("hostPath"), "{line}");
    } else {
        cmd.env_remove("RUST_LOG").env_remove("JOURNAL_STREAM");
        let mut p = Proc::spawn(&mut cmd);
        let ready = p.wait_line(
            Stream::Stderr,
            "handoffd ready",
            scaled(Duration::from_secs(20)),
        );
        let stderr = p.lines(Stream::Stderr).join("\n");
        assert!(ready.is_some(), "handoffd did not start: {stderr}");
        assert!(
            stderr.contains("/sys/fs/bpf could not be compared with the host's"),
            "{stderr}"
        );
        p.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(
            p.wait_exit(scaled(Duration::from_secs(10)))
                .is_some_and(|s| s.success()),
            "handoffd stops on SIGTERM: {stderr}"
        );
    }
}
