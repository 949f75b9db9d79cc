//! The readiness socket against bad input, sent by the test process itself: oversized
//! and garbage datagrams, descriptors, files in the way; the message parser; and the
//! start-time check of the credentials path.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use handoff_tests::{TempDir, privileged};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::notice::{boottime_ticks, by_pid, parse};
use super::{Identify, Ignored, MAX_DATAGRAM, ReadinessError, ReadinessSocket};

#[test]
fn messages_are_read_line_by_line() {
    assert_eq!(parse(b"READY=1"), (true, None));
    assert_eq!(
        parse(b"STATUS=a\nREADY=1\nSTATUS=b\n"),
        (true, Some("b".into()))
    );
    for not_ready in [
        &b"READY=0"[..],
        b"READY=1 ",
        b" READY=1",
        b"READY=10",
        b"XREADY=1",
        b"READY=1\r\n",
        b"",
        b"\n\n=\n",
    ] {
        assert!(!parse(not_ready).0, "{not_ready:?}");
    }
    let (ready, status) = parse(b"\xff\0garbage\nSTATUS=\x07bell\xff\nREADY=1");
    assert!(ready);
    assert_eq!(status.as_deref(), Some("\u{fffd}bell\u{fffd}"));
    let long = [&b"STATUS="[..], &[b'x'; 1000]].concat();
    assert_eq!(parse(&long).1.map(|s| s.chars().count()), Some(256));
}

#[test]
fn a_pid_started_after_the_receipt_is_refused() {
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let pid = child.id() as i32;
    let now = boottime_ticks();
    let before = now.map(|t| t.saturating_sub(1_000_000));
    let late = by_pid(pid, before);
    let taken = by_pid(pid, now);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(late.map(|m| m.pid), Err(Ignored::PidReused { pid }));
    assert_eq!(taken.map(|m| m.pid), Ok(pid));
    assert_eq!(
        by_pid(pid, now).map(|m| m.pid),
        Err(Ignored::Exited { pid })
    );
}

/// A socket for uid 0 (the test process itself is never taken: it is handoffd here).
fn socket(dir: &TempDir, forward: Option<std::path::PathBuf>) -> ReadinessSocket {
    ReadinessSocket::bind(&dir.path().join("n.sock"), 0, 0, forward).expect("bind")
}

#[test]
fn oversized_and_garbage_datagrams_are_ignored_without_error() {
    if !privileged("oversized_and_garbage_datagrams_are_ignored_without_error") {
        return;
    }
    let dir = TempDir::new("readiness-garbage");
    let original = dir.path().join("orig.sock");
    let target = UnixDatagram::bind(&original).expect("bind the original");
    target.set_nonblocking(true).expect("non-blocking");
    let socket = socket(&dir, Some(original));
    let client = UnixDatagram::unbound().expect("socket");
    let big = [&b"READY=1\n"[..], &[b'x'; MAX_DATAGRAM]].concat();
    let just = [&b"READY=1\n"[..], &[b'x'; MAX_DATAGRAM - 8]].concat();
    let garbage: [&[u8]; 4] = [&big, &[0xff; 300], b"", &just];
    for d in garbage {
        client.send_to(d, socket.path()).expect("send");
    }
    let notices: Vec<_> = (0..4)
        .map(|_| socket.receive().expect("no error").expect("a notice"))
        .collect();
    assert!(socket.receive().expect("no error").is_none());
    assert_eq!(
        notices[0].ignored,
        Some(Ignored::Oversized { len: big.len() })
    );
    assert!(!notices[0].ready && notices[0].sender.is_none());
    assert!(!notices[1].ready && !notices[2].ready);
    assert!(notices[3].ready, "exactly {MAX_DATAGRAM} bytes fit");
    // The handoffd process itself is never a sender that counts.
    assert!(matches!(
        notices[3].ignored,
        Some(Ignored::Unidentified { .. })
    ));
    // Forwarded: all but the oversized one.
    let mut buf = vec![0u8; 2 * MAX_DATAGRAM];
    let lens: Vec<usize> = std::iter::from_fn(|| target.recv(&mut buf).ok()).collect();
    assert_eq!(lens, [300, 0, MAX_DATAGRAM]);
}

#[test]
fn descriptors_that_come_with_a_message_are_closed() {
    if !privileged("descriptors_that_come_with_a_message_are_closed") {
        return;
    }
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    let dir = TempDir::new("readiness-fds");
    let socket = socket(&dir, None);
    let (reader, writer) = std::io::pipe().expect("pipe");
    let writer: OwnedFd = writer.into();
    let client = UnixDatagram::unbound().expect("socket");
    let to = UnixAddr::new(socket.path()).expect("address");
    let fds = [writer.as_raw_fd(); 3];
    sendmsg(
        client.as_raw_fd(),
        &[std::io::IoSlice::new(b"FDSTORE=1\nREADY=1")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        Some(&to),
    )
    .expect("sendmsg with descriptors");
    drop(writer);
    let notice = socket.receive().expect("no error").expect("a notice");
    assert!(notice.ready);
    // Every copy of the write end is closed: the pipe reads end-of-file.
    let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut hung_up = false;
    while !hung_up && Instant::now() < deadline {
        let _ = poll(&mut fds, PollTimeout::from(100u8));
        hung_up = fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP));
    }
    assert!(hung_up, "a received descriptor was left open");
}

#[test]
fn only_a_stale_socket_is_replaced() {
    if !privileged("only_a_stale_socket_is_replaced") {
        return;
    }
    let dir = TempDir::new("readiness-stale");
    let path = dir.path().join("n.sock");
    std::fs::write(&path, "not a socket").expect("a file");
    let e = ReadinessSocket::bind(&path, 0, 0, None).expect_err("a file in the way");
    assert!(matches!(e, ReadinessError::NotSocket { .. }), "{e}");
    assert!(path.is_file(), "left alone");
    std::fs::remove_file(&path).expect("rm");

    let live = UnixDatagram::bind(&path).expect("a live socket");
    let e = ReadinessSocket::bind(&path, 0, 0, None).expect_err("in use");
    assert!(matches!(e, ReadinessError::InUse { .. }), "{e}");
    drop(live);
    // Its file stays behind, stale: replaced.
    let socket = ReadinessSocket::bind(&path, 0, 0, None).expect("a stale socket is replaced");
    assert_eq!(socket.identify(), Identify::Pidfd);
    // Replaced by another file meanwhile: not removed on drop.
    std::fs::remove_file(&path).expect("rm");
    std::fs::write(&path, "someone else's").expect("a file");
    drop(socket);
    assert!(path.is_file());
}
