//! The raw parts of the readiness socket (`runtime::readiness`): `SO_PASSPIDFD`, and
//! `recvmsg` of one datagram with its sender's credentials and pidfd, every descriptor
//! that came with it owned (and so closed) exactly once.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `SO_PASSPIDFD` (Linux >= 6.5): every message received carries an `SCM_PIDFD` of its
/// sender. The asm-generic value (x86, arm, riscv, powerpc, s390, loongarch, mips,
/// alpha); sparc has its own. libc 0.2 does not export it.
#[cfg(not(target_arch = "sparc64"))]
const SO_PASSPIDFD: libc::c_int = 76;
#[cfg(target_arch = "sparc64")]
const SO_PASSPIDFD: libc::c_int = 0x55;

/// `SCM_PIDFD` (include/linux/socket.h, the same on every architecture): a pidfd of the
/// sender, installed in the receiver's descriptor table (close-on-exec).
const SCM_PIDFD: libc::c_int = 0x04;

/// Room for every control message a datagram can bring on a socket with `SO_PASSCRED`
/// and `SO_PASSPIDFD`: credentials, a pidfd, and 253 descriptors (`SCM_MAX_FD`, the
/// most one message carries: the kernel merges every `SCM_RIGHTS` of a message into one),
/// each header included, with room to spare. Descriptors that do not fit are never
/// installed (the kernel drops them), so none can leak either way.
const CONTROL_BYTES: usize = 2048;

/// The control buffer of [`recv_datagram`], aligned for `cmsghdr` (whose first field is a
/// `size_t`).
#[repr(C, align(8))]
struct Control([u8; CONTROL_BYTES]);

/// `setsockopt(SO_PASSPIDFD, 1)`: `Ok(false)` when the kernel does not know the option
/// (`ENOPROTOOPT`, Linux < 6.5).
pub fn pass_pidfd(socket: BorrowedFd<'_>) -> io::Result<bool> {
    let on: libc::c_int = 1;
    // SAFETY: `socket` is open for the whole call (borrowed); the option value is a live
    // c_int whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSPIDFD,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOPROTOOPT) => Ok(false),
        _ => Err(e),
    }
}

/// The sender's credentials as the kernel gives them (`SCM_CREDENTIALS`): its pid in the
/// receiver's pid namespace (0 when it has none there), uid and gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// The sender's pid.
    pub pid: i32,
    /// The sender's uid (its real uid, unless it named another of its own or is privileged).
    pub uid: u32,
    /// The sender's gid.
    pub gid: u32,
}

/// One datagram as [`recv_datagram`] read it.
#[derive(Debug)]
pub struct Datagram {
    /// Its full length: more than the buffer when it was cut off.
    pub len: usize,
    /// Its sender's credentials (always there with `SO_PASSCRED`).
    pub credentials: Option<Credentials>,
    /// `SCM_PIDFD`: a pidfd of the sender, or the errno the kernel gave instead of one
    /// (e.g. `ESRCH`: the sender had already been reaped; `EMFILE`).
    pub pidfd: Option<Result<OwnedFd, i32>>,
    /// How many descriptors came with it (`SCM_RIGHTS`): all closed already.
    pub descriptors: usize,
}

/// `recvmsg` of one datagram without blocking, into `buf`: its length (`MSG_TRUNC`: the
/// full one), the sender's credentials and pidfd, and every descriptor it carried, closed.
/// `WouldBlock` when none is queued.
pub fn recv_datagram(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Datagram> {
    let mut control = Control([0; CONTROL_BYTES]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value (null name and control, no iovecs).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_BYTES as _;
    let flags = libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC | libc::MSG_TRUNC;
    // SAFETY: `socket` is open for the call (borrowed); `iov` points into `buf` with its
    // length, and `msg_control` into `control` with its size, both live and writable for
    // the call; the kernel writes at most those lengths and updates `msg` in place.
    let rc = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, flags) };
    let len = usize::try_from(rc).map_err(|_| io::Error::last_os_error())?;
    // size_t with glibc, socklen_t with musl: at most CONTROL_BYTES either way.
    let used = msg.msg_controllen as usize;
    let mut datagram = Datagram {
        len,
        credentials: None,
        pidfd: None,
        descriptors: 0,
    };
    for (level, kind, data) in control_messages(&control.0[..used.min(CONTROL_BYTES)]) {
        if level == libc::SOL_SOCKET {
            take_control(&mut datagram, kind, data);
        }
    }
    Ok(datagram)
}

/// Takes one `SOL_SOCKET` control message into `datagram`.
fn take_control(datagram: &mut Datagram, kind: libc::c_int, data: &[u8]) {
    let ints: Vec<i32> = data
        .chunks_exact(size_of::<i32>())
        .filter_map(|c| c.try_into().ok().map(i32::from_ne_bytes))
        .collect();
    match kind {
        libc::SCM_CREDENTIALS => {
            if let [pid, uid, gid, ..] = ints[..] {
                datagram.credentials = Some(Credentials {
                    pid,
                    uid: uid as u32,
                    gid: gid as u32,
                });
            }
        }
        SCM_PIDFD => {
            if let Some(&fd) = ints.first() {
                datagram.pidfd = Some(owned(fd).ok_or(fd.saturating_neg()));
            }
        }
        libc::SCM_RIGHTS => {
            // Closed here: nothing that arrives on this socket is passed on.
            datagram.descriptors += ints.iter().filter_map(|&fd| owned(fd)).count();
        }
        _ => {}
    }
}

/// The descriptor `fd` the kernel installed for this `recvmsg`, owned; none for a
/// negative value (an errno in place of a pidfd).
fn owned(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: a non-negative value in an SCM_PIDFD or SCM_RIGHTS message, within the
    // length the kernel wrote, is a descriptor it installed in our table for this recvmsg;
    // nothing else knows it, so it is owned here exactly once.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The control messages in `buf` (the `msg_controllen` bytes the kernel wrote): (level,
/// type, data), walked as `CMSG_FIRSTHDR`/`CMSG_NXTHDR` do, never past `buf`.
fn control_messages(buf: &[u8]) -> Vec<(libc::c_int, libc::c_int, &[u8])> {
    use std::mem::offset_of;
    let align = |n: usize| n.next_multiple_of(size_of::<usize>());
    let header = align(size_of::<libc::cmsghdr>());
    let int = |at: usize| {
        buf.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(i32::from_ne_bytes)
    };
    let mut out = Vec::new();
    let mut at = 0;
    // Each step moves on by at least one header: bounded by the buffer's length.
    while let Some(len) = buf
        .get(at..at + size_of::<usize>())
        .and_then(|b| b.try_into().ok())
        .map(usize::from_ne_bytes)
    {
        let (Some(level), Some(kind)) = (
            int(at + offset_of!(libc::cmsghdr, cmsg_level)),
            int(at + offset_of!(libc::cmsghdr, cmsg_type)),
        ) else {
            break;
        };
        if len < header {
            break;
        }
        let end = at.saturating_add(len).min(buf.len());
        out.push((level, kind, buf.get(at + header..end).unwrap_or_default()));
        at = at.saturating_add(align(len));
    }
    out
}

/// Sends `bytes` to `to` with `SCM_CREDENTIALS` naming `from` (another process's pid,
/// uid and gid: needs `CAP_SYS_ADMIN`, `CAP_SETUID` and `CAP_SETGID`), without blocking.
/// `ESRCH` when no process has that pid any more.
pub fn send_as(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    to: &nix::sys::socket::UnixAddr,
    from: Credentials,
) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixCredentials, sendmsg};
    let credentials = UnixCredentials::from(libc::ucred {
        pid: from.pid,
        uid: from.uid,
        gid: from.gid,
    });
    sendmsg(
        socket.as_raw_fd(),
        &[io::IoSlice::new(bytes)],
        &[ControlMessage::ScmCredentials(&credentials)],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        Some(to),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One control message as the kernel lays it out.
    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let header = size_of::<libc::cmsghdr>();
        let mut out = Vec::new();
        out.extend_from_slice(&(header + data.len()).to_ne_bytes());
        out.extend_from_slice(&level.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(size_of::<usize>()), 0);
        out
    }

    #[test]
    fn control_messages_are_walked_within_the_buffer() {
        let mut buf = cmsg(libc::SOL_SOCKET, libc::SCM_CREDENTIALS, &[1; 12]);
        buf.extend(cmsg(libc::SOL_SOCKET, SCM_PIDFD, &[2; 4]));
        let got = control_messages(&buf);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            (libc::SOL_SOCKET, libc::SCM_CREDENTIALS, &[1u8; 12][..])
        );
        assert_eq!(got[1], (libc::SOL_SOCKET, SCM_PIDFD, &[2u8; 4][..]));
        // A length past the end is cut at the end; a length below a header stops the walk.
        let mut long = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &[3; 4]);
        long[..size_of::<usize>()].copy_from_slice(&4096usize.to_ne_bytes());
        assert_eq!(control_messages(&long)[0].2.len(), 8);
        assert!(control_messages(&[0u8; 64]).is_empty());
        assert!(control_messages(&[0xff; 7]).is_empty());
        assert!(control_messages(&[]).is_empty());
    }

    #[test]
    fn an_errno_in_place_of_a_pidfd_is_kept_as_one() {
        let mut d = Datagram {
            len: 0,
            credentials: None,
            pidfd: None,
            descriptors: 0,
        };
        take_control(&mut d, SCM_PIDFD, &(-libc::ESRCH).to_ne_bytes());
        assert!(matches!(d.pidfd, Some(Err(libc::ESRCH))));
        take_control(&mut d, libc::SCM_CREDENTIALS, &[0; 8]);
        assert_eq!(d.credentials, None, "too short");
    }
}
