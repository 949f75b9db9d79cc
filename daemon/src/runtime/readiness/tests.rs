//! The readiness socket on real sockets and processes: senders run as uid 65534 (this
//! test binary's helper below, run as nobody), as root, and as a uid that may not send.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use handoff_tests::{TempDir, privileged};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::{Identify, Ignored, Notice, ReadinessSocket};

const NOBODY: u32 = 65534;
/// A uid without a right to the socket (mode 0600, owned by nobody).
const STRANGER: u32 = 4242;
const HELPER: &str = "runtime::readiness::tests::sender_helper";
const SOCKET_VAR: &str = "HANDOFF_READINESS_SOCKET";
const MESSAGE_VAR: &str = "HANDOFF_READINESS_MESSAGE";
/// What the helper prints before what it did.
const SAID: &str = "readiness helper: ";

/// A sender process (this test binary's [`sender_helper`]): it has sent its message once
/// `sent` is read; it lives until dropped (killed and reaped).
struct Sender {
    child: std::process::Child,
    /// What it printed after sending: `sent`, or `error KIND`.
    said: String,
}

impl Sender {
    /// Runs the helper as `uid` (its gid the same), sending `message` to `socket`.
    fn spawn(socket: &Path, message: &str, uid: Option<u32>) -> Sender {
        let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
        cmd.args([
            HELPER,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SOCKET_VAR, socket)
        .env(MESSAGE_VAR, message)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd.spawn().expect("spawning the sender");
        let stdout = child.stdout.take().expect("piped");
        // Bounded: the helper prints a few lines of libtest and its own (after libtest's
        // `test NAME ... ` on the same line), then waits on its stdin (which this process
        // holds open) until dropped; or it dies, closing its stdout.
        let said = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| Some(l.split_once(SAID)?.1.to_owned()))
            .unwrap_or_else(|| "nothing".into());
        Sender { child, said }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Not a test: the sender of the tests here, run by [`Sender::spawn`].
#[test]
#[ignore = "helper run as another uid by the readiness tests"]
fn sender_helper() {
    let (Some(socket), Some(message)) = (
        std::env::var_os(SOCKET_VAR),
        std::env::var(MESSAGE_VAR).ok(),
    ) else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|s| s.send_to(message.as_bytes(), &socket));
    match sent {
        Ok(_) => println!("{SAID}sent"),
        Err(e) => println!("{SAID}error {:?}", e.kind()),
    }
    // Alive until the test is done with it: its stdin closes when the test drops it.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// The next notice on `socket`, waiting at most 5 s for one.
fn next(socket: &ReadinessSocket) -> Notice {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(notice) = socket.receive().expect("receive") {
            return notice;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no datagram within 5 s");
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::from(left.as_millis().min(5000) as u16);
        let _ = poll(&mut fds, ms);
    }
}

fn bind(dir: &TempDir, name: &str, uid: u32, identify: Identify) -> ReadinessSocket {
    let path = dir.path().join(name);
    ReadinessSocket::bind_with(&path, uid, uid, None, identify).expect("bind")
}

#[test]
fn the_socket_is_0600_owned_by_the_uid_and_pidfds_are_used_here() {
    if !privileged("the_socket_is_0600_owned_by_the_uid_and_pidfds_are_used_here") {
        return;
    }
    let dir = TempDir::new("readiness-mode");
    let path = dir.path().join("n.sock");
    let socket = ReadinessSocket::bind(&path, NOBODY, NOBODY, None).expect("bind");
    let meta = std::fs::symlink_metadata(&path).expect("the socket file");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
    // This kernel (>= 6.5) has SO_PASSPIDFD: senders are named by SCM_PIDFD.
    let release = nix::sys::utsname::uname().expect("uname");
    let release = release.release().to_string_lossy().into_owned();
    let (major, minor) = release
        .split_once('.')
        .map(|(a, b)| {
            (
                a.parse::<u32>().unwrap_or(0),
                b.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap_or("0")
                    .parse::<u32>()
                    .unwrap_or(0),
            )
        })
        .expect("a kernel release");
    if (major, minor) >= (6, 5) {
        assert_eq!(socket.identify(), Identify::Pidfd, "kernel {release}");
    }
    // A uid other than the owner's may not send at all.
    let stranger = Sender::spawn(&path, "READY=1", Some(STRANGER));
    assert_eq!(stranger.said, "error PermissionDenied");
    drop(socket);
    assert!(!path.exists(), "removed on drop");
}

/// A nobody process's `READY=1` names it, identified the `identify` way.
fn ready_from_the_service_uid_is_taken(identify: Identify) {
    let dir = TempDir::new(&format!("readiness-ready-{identify:?}"));
    let socket = bind(&dir, "n.sock", NOBODY, identify);
    assert_eq!(socket.identify(), identify);
    let sender = Sender::spawn(socket.path(), "STATUS=warm\nREADY=1\n", Some(NOBODY));
    assert_eq!(sender.said, "sent");
    let notice = next(&socket);
    assert_eq!(notice.ignored, None);
    assert!(notice.ready);
    assert_eq!(notice.status.as_deref(), Some("warm"));
    assert_eq!(
        (notice.pid, notice.uid, notice.gid),
        (sender.pid(), NOBODY, NOBODY)
    );
    let member = notice.ready_sender().expect("taken");
    assert_eq!(member.pid, sender.pid());
    assert!(member.alive());
    assert!(socket.receive().expect("receive").is_none(), "one datagram");
}

#[test]
fn a_ready_from_the_service_uid_is_taken_by_pidfd() {
    if privileged("a_ready_from_the_service_uid_is_taken_by_pidfd") {
        ready_from_the_service_uid_is_taken(Identify::Pidfd);
    }
}

#[test]
fn a_ready_from_the_service_uid_is_taken_by_credentials() {
    if privileged("a_ready_from_the_service_uid_is_taken_by_credentials") {
        ready_from_the_service_uid_is_taken(Identify::Credentials);
    }
}

#[test]
fn a_ready_from_another_uid_is_not_taken() {
    if !privileged("a_ready_from_another_uid_is_not_taken") {
        return;
    }
    let dir = TempDir::new("readiness-other");
    for identify in [Identify::Pidfd, Identify::Credentials] {
        // Root may send to nobody's socket, but it is not nobody.
        let socket = bind(&dir, "n.sock", NOBODY, identify);
        let root = Sender::spawn(socket.path(), "READY=1", None);
        assert_eq!(root.said, "sent");
        let notice = next(&socket);
        assert!(notice.ready && notice.sender.is_none(), "{identify:?}");
        assert!(notice.ready_sender().is_none());
        match notice.ignored {
            Some(Ignored::WrongUid { pid, uids, want }) => {
                assert_eq!((pid, uids.real, want), (root.pid(), 0, NOBODY));
            }
            other => panic!("{identify:?}: {other:?}"),
        }
        drop(socket);
        // Configured for root, root is the service's uid.
        let socket = bind(&dir, "r.sock", 0, identify);
        let root = Sender::spawn(socket.path(), "READY=1", None);
        let notice = next(&socket);
        assert_eq!(
            notice.ready_sender().map(|m| m.pid),
            Some(root.pid()),
            "{identify:?}"
        );
    }
}

/// Binds a forward target with SO_PASSCRED at `path`.
fn forward_target(path: &Path) -> UnixDatagram {
    let target = UnixDatagram::bind(path).expect("bind the original socket");
    nix::sys::socket::setsockopt(&target, nix::sys::socket::sockopt::PassCred, &true)
        .expect("SO_PASSCRED");
    target.set_nonblocking(true).expect("non-blocking");
    target
}

/// One datagram on `target` and its credentials, or none queued.
fn forwarded(target: &UnixDatagram) -> Option<(Vec<u8>, Option<libc::ucred>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut buf = vec![0u8; 8192];
    let mut cmsg = nix::cmsg_space!(libc::ucred);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        target.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .ok()?;
    let creds = msg.cmsgs().ok()?.find_map(|c| match c {
        ControlMessageOwned::ScmCredentials(c) => Some(libc::ucred {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        }),
        _ => None,
    });
    let len = msg.bytes;
    Some((buf[..len].to_vec(), creds))
}

#[test]
fn every_message_is_forwarded_with_its_senders_credentials() {
    if !privileged("every_message_is_forwarded_with_its_senders_credentials") {
        return;
    }
    let dir = TempDir::new("readiness-forward");
    let original = dir.path().join("orig.sock");
    let target = forward_target(&original);
    let path = dir.path().join("n.sock");
    let socket =
        ReadinessSocket::bind(&path, NOBODY, NOBODY, Some(original.clone())).expect("bind");
    let message = "READY=1\nSTATUS=up\nX-CUSTOM=\u{e9}";
    for uid in [Some(NOBODY), None] {
        let sender = Sender::spawn(&path, message, uid);
        let notice = next(&socket);
        assert_eq!(notice.pid, sender.pid());
        let (bytes, creds) = forwarded(&target).expect("forwarded before receive returned");
        assert_eq!(bytes, message.as_bytes());
        let creds = creds.expect("SCM_CREDENTIALS");
        let want = uid.unwrap_or(0);
        assert_eq!(
            (creds.pid, creds.uid, creds.gid),
            (sender.pid(), want, want)
        );
    }
    // An abstract original socket, `@name`.
    let name = format!("handoff-readiness-test-{}", std::process::id());
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .expect("an abstract address");
    let abs = UnixDatagram::bind_addr(&addr).expect("bind abstract");
    nix::sys::socket::setsockopt(&abs, nix::sys::socket::sockopt::PassCred, &true).expect("cred");
    abs.set_nonblocking(true).expect("non-blocking");
    drop(socket);
    let socket = ReadinessSocket::bind(
        &path,
        NOBODY,
        NOBODY,
        Some(PathBuf::from(format!("@{name}"))),
    )
    .expect("bind");
    let sender = Sender::spawn(&path, "READY=1", Some(NOBODY));
    let _ = next(&socket);
    let (bytes, creds) = forwarded(&abs).expect("forwarded");
    assert_eq!(bytes, b"READY=1");
    assert_eq!(creds.map(|c| c.pid), Some(sender.pid()));
}
