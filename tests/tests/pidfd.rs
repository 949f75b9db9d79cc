//! Promote by pidfd: `handoffctl promote PID` run inside another pid namespace (`unshare
//! --pid --fork --mount-proc`, as in a container) promotes the process that PID names
//! there; a pid that namespace cannot see is refused; a descriptor that is not one pidfd
//! refuses the request. Every refusal changes nothing.

mod support;

use std::io::{BufRead, BufReader, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use handoff_common::proto::{self, ErrorKind, Request, Response};
use handoff_tests::{Proc, Stream, bin_path, scaled};
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use support::{Handoffd, answers, loopback, only, privileged, testsrv, wait_until};

/// The pids whose parent is `pid` (from /proc, as the host sees them).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// `NSpid:` of a host pid: its pid in each pid namespace, the host's first.
fn nspids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("reading the status of a live process")
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("an NSpid line")
        .split_whitespace()
        .map(|p| p.parse().expect("a pid"))
        .collect()
}

/// A testsrv named `name` on `addr` in a new pid namespace (and mount namespace with its
/// own /proc), as the third process there: a shell is its init, a `sleep` the second.
/// Dropping the returned guard SIGKILLs the process group, which every process of the
/// namespace is in (`unshare` leads it; nothing there starts a group of its own), and the
/// kernel kills whatever else the namespace holds once its init is gone.
struct Contained {
    _unshare: Proc,
    /// The namespace's init (the shell), as the host sees it.
    init_host: u32,
    /// The server as the namespace sees it.
    inner: u32,
    /// The server as the host sees it.
    host: u32,
    /// A process there that holds no listener, as the namespace sees it.
    sleeper: u32,
}

fn contained(name: &str, addr: SocketAddr) -> Contained {
    let script = format!(
        "sleep 600 &\necho sleeper $!\n{srv} --name {name} --listen {addr} &\nwait\n",
        srv = bin_path("testsrv").display()
    );
    // Short options where util-linux and busybox (the kernel-test guest's) differ.
    let unshare = Proc::spawn(Command::new("unshare").args([
        "-p",
        "-f",
        "--mount-proc",
        "sh",
        "-c",
        &script,
    ]));
    let line = unshare
        .wait_line(Stream::Stdout, "ready ", scaled(Duration::from_secs(10)))
        .unwrap_or_else(|| {
            panic!(
                "testsrv in a new pid namespace did not get ready: {:?}",
                unshare.lines(Stream::Stderr)
            )
        });
    let (inner, _) = handoff_tests::server::parse_ready(&line).expect("a ready line");
    let sleeper = unshare
        .wait_line(Stream::Stdout, "sleeper ", scaled(Duration::from_secs(10)))
        .and_then(|l| l.trim_start_matches("sleeper ").trim().parse().ok())
        .expect("the sleeper's pid");
    let mut init_host = 0;
    wait_until("the namespace's init", Duration::from_secs(5), || {
        init_host = children(unshare.pid).first().copied().unwrap_or(0);
        init_host != 0
    });
    let mut host = 0;
    wait_until("the contained server", Duration::from_secs(5), || {
        host = children(init_host)
            .into_iter()
            .find(|&p| nspids(p).last() == Some(&inner))
            .unwrap_or(0);
        host != 0
    });
    assert_eq!(
        nspids(host),
        vec![host, inner],
        "the server's pid there is the one it printed"
    );
    assert_ne!(host, inner, "the namespace numbers its own pids");
    Contained {
        _unshare: unshare,
        init_host,
        inner,
        host,
        sleeper,
    }
}

/// handoffctl run inside `c`'s pid and mount namespaces.
fn ctl_inside(c: &Contained, socket: &Path, args: &[&str]) -> Output {
    Command::new("nsenter")
        .args([
            "--target",
            &c.init_host.to_string(),
            "--pid",
            "--mount",
            "--",
        ])
        .arg(bin_path("handoffctl"))
        .arg("--control-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("running handoffctl under nsenter")
}

/// Sends `request` with `fds` attached, as a client other than handoffctl could, and
/// returns the daemon's answer.
fn send_with_fds(socket: &Path, request: &Request, fds: &[OwnedFd]) -> Response {
    let stream = UnixStream::connect(socket).expect("connecting to the control socket");
    stream
        .set_read_timeout(Some(scaled(Duration::from_secs(10))))
        .expect("a read timeout");
    let frame = proto::encode(request);
    let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let sent = sendmsg::<UnixAddr>(
        stream.as_fd().as_raw_fd(),
        &[IoSlice::new(&frame)],
        if fds.is_empty() { &[] } else { &rights },
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    assert_eq!(sent, frame.len(), "a short frame goes out whole");
    let mut line = Vec::new();
    BufReader::new(&stream)
        .read_until(b'\n', &mut line)
        .expect("reading the answer");
    proto::decode(&line).expect("an answer in the protocol")
}

fn refusal(r: Response) -> (ErrorKind, String) {
    match r {
        Response::Error(e) => (e.kind, e.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn promote_by_pidfd_from_another_pid_namespace() {
    if !privileged("promote_by_pidfd_from_another_pid_namespace") {
        return;
    }
    let addr = loopback();
    let d = Handoffd::start("pidfd", &[addr]);
    let h = testsrv("HOST", &[addr], &[]);
    // From the host: handoffctl passes a pidfd too, naming the same pid.
    d.promote(h.pid);
    assert_eq!(answers(addr, 10), only("HOST", 10));
    // Held, so that HOST drains (rather than retires) once the contained server is promoted.
    let (_held, name, _) = handoff_tests::load::hold(addr).expect("a connection to HOST");
    assert_eq!(name, "HOST");

    let c = contained("INNER", addr);

    // A pid the namespace cannot see (the host's server, numbered far above anything
    // the new namespace has), and one no process has: refused by handoffctl there.
    let before = d.shape();
    for pid in [h.pid.to_string(), "4000000".to_string()] {
        let out = ctl_inside(&c, d.socket.as_path(), &["promote", &pid]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "promote {pid}: {stderr}");
        assert_eq!(
            stderr,
            format!("handoffctl: no process with pid {pid}\n"),
            "one clear line"
        );
        assert_eq!(d.shape(), before, "nothing changed");
    }
    // A process it can see that holds no listener: the daemon's usual refusal.
    let out = ctl_inside(&c, d.socket.as_path(), &["promote", &c.sleeper.to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("holds no TCP listener"), "{stderr}");
    assert_eq!(d.shape(), before, "nothing changed");

    // The server's pid as the namespace sees it: the daemon promotes the host process.
    let out = ctl_inside(&c, d.socket.as_path(), &["promote", &c.inner.to_string()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "promote by pidfd from inside: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("(pid {}, host pid {}, ", c.inner, c.host)),
        "{stdout}"
    );
    let service = d.service();
    let active: Vec<_> = service
        .generations
        .iter()
        .filter(|g| g.state.as_str() == "active")
        .map(|g| g.pid as u32)
        .collect();
    assert_eq!(active, vec![c.host], "the host pid of the contained server");
    assert_eq!(answers(addr, 20), only("INNER", 20), "connections reach it");
    assert_eq!(d.state_of(h.pid).map(|s| s.as_str()), Some("draining"));
    drop(c);
}

#[test]
fn descriptors_that_are_not_one_pidfd_are_refused() {
    if !privileged("descriptors_that_are_not_one_pidfd_are_refused") {
        return;
    }
    let addr = loopback();
    let d = Handoffd::start("pidfd-bad", &[addr]);
    let a = testsrv("A", &[addr], &[]);
    let mut d = d;
    d.promote(a.pid);
    let b = testsrv("B", &[addr], &[]);
    let before = d.shape();
    let daemon = d.proc().pid;
    // Its stdin, at least.
    let held = dev_nulls(daemon);
    let devnull = || -> OwnedFd {
        std::fs::File::open("/dev/null")
            .expect("opening /dev/null")
            .into()
    };
    let promote = Request::Promote {
        pid: b.pid as i32,
        service: None,
        options: Default::default(),
    };

    let (kind, message) = refusal(send_with_fds(&d.socket, &promote, &[devnull()]));
    assert_eq!(kind, ErrorKind::BadRequest, "{message}");
    assert!(
        message.contains("not a pidfd") && message.contains("/dev/null"),
        "{message}"
    );

    let (kind, message) = refusal(send_with_fds(
        &d.socket,
        &promote,
        &[devnull(), devnull(), devnull()],
    ));
    assert_eq!(kind, ErrorKind::BadRequest, "{message}");
    assert!(message.starts_with("3 descriptors came"), "{message}");

    let (kind, message) = refusal(send_with_fds(&d.socket, &Request::Status {}, &[devnull()]));
    assert_eq!(kind, ErrorKind::BadRequest, "{message}");
    assert!(message.contains("only promote takes a pidfd"), "{message}");

    assert_eq!(d.shape(), before, "nothing changed");
    assert_eq!(answers(addr, 10), only("A", 10));
    assert_eq!(
        dev_nulls(daemon),
        held,
        "handoffd keeps none of the descriptors it refused"
    );
    // A plain pid with no descriptor (an older client, a caller on the host) still
    // promotes.
    match send_with_fds(&d.socket, &promote, &[]) {
        Response::Promoted(p) => assert_eq!(p.pid, b.pid as i32),
        other => panic!("a plain pid: {other:?}"),
    }
    assert_eq!(answers(addr, 10), only("B", 10));
}

/// How many descriptors of `pid` are open on /dev/null.
fn dev_nulls(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading the daemon's fds")
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == Path::new("/dev/null")))
        .count()
}
