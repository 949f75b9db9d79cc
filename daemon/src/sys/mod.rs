//! Every raw syscall and `unsafe` block of the daemon, each with why it is sound.
//!
//! Here: pidfds (open, fd duplication, signals), descriptors received on a Unix socket,
//! socket options, descriptors registered with tokio, the allocator and the open file
//! limit. In `bpf`: element operations on the REUSEPORT_SOCKARRAY (aya's wrapper forces
//! 4-byte values, which cannot be read back), the shared mapping of the steering index,
//! and the task iterator.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

mod bpf;
mod notify;

pub use bpf::{
    BPF_NOEXIST, MappedIndex, iter_task_of, sockarray_cookie, sockarray_insert, sockarray_remove,
};
pub use notify::{Credentials, Datagram, pass_pidfd, recv_datagram, send_as};

/// `pidfd_open(pid, 0)`: a handle on the process that cannot be confused with a later
/// process of the same pid.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    owned_fd(fd)
}

/// `pidfd_getfd(pidfd, fd, 0)`: a duplicate of another process's file descriptor.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; `pidfd` is borrowed, so it stays open
    // for the duration of the call.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    owned_fd(fd)
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`: signals exactly the process the pidfd names.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: a null siginfo is allowed (the kernel fills in an SI_USER info); the other
    // arguments are integers and `pidfd` is borrowed for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn owned_fd(rc: libc::c_long) -> io::Result<OwnedFd> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(rc).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The most descriptors one `sendmsg` can carry (the kernel's `SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// `recvmsg` on a Unix stream socket without blocking: data into `buf`, and every
/// descriptor that came with it (`SCM_RIGHTS`, close-on-exec) pushed onto `fds`, owned.
/// Returns the bytes read (0 at the end of the stream) and whether descriptors were lost
/// on the way (`MSG_CTRUNC`: the kernel could not install them all, e.g. out of
/// descriptors; those it did install are in `fds` all the same).
///
/// The control buffer holds [`SCM_MAX_FD`] descriptors, the most one message can carry,
/// and one `recvmsg` on a stream socket returns the descriptors of one message at most:
/// none is ever cut off for want of room.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let (bytes, lost) = (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC));
    let received: Vec<RawFd> = match msg.cmsgs() {
        Ok(cmsgs) => cmsgs
            .flat_map(|c| match c {
                ControlMessageOwned::ScmRights(received) => received,
                _ => Vec::new(),
            })
            .collect(),
        // nix reads nothing of a truncated buffer; the kernel wrote the descriptors it
        // installed into the first header all the same.
        Err(_) => rights_in(&cmsg),
    };
    for fd in received {
        // SAFETY: the kernel installed this descriptor in our table for this recvmsg;
        // nothing else knows it, so it is owned here exactly once.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok((bytes, lost))
}

/// The descriptors of the first control message in `buf` (zeroed before `recvmsg`), if
/// it is `SCM_RIGHTS`: the only kind this socket can receive (no `SO_PASSCRED`).
fn rights_in(buf: &[u8]) -> Vec<RawFd> {
    use std::mem::{offset_of, size_of};
    let field = |at: usize, len: usize| buf.get(at..at + len);
    let int = |at: usize| {
        field(at, 4)
            .and_then(|b| b.try_into().ok())
            .map(i32::from_ne_bytes)
    };
    let Some(len) = field(0, size_of::<usize>())
        .and_then(|b| b.try_into().ok())
        .map(usize::from_ne_bytes)
    else {
        return Vec::new();
    };
    let level = int(offset_of!(libc::cmsghdr, cmsg_level));
    let kind = int(offset_of!(libc::cmsghdr, cmsg_type));
    if level != Some(libc::SOL_SOCKET) || kind != Some(libc::SCM_RIGHTS) {
        return Vec::new();
    }
    // CMSG_DATA: the header rounded up to the size of a long.
    let data = size_of::<libc::cmsghdr>().next_multiple_of(size_of::<libc::c_long>());
    let end = len.min(buf.len());
    (data..end)
        .step_by(size_of::<RawFd>())
        .filter(|at| at + size_of::<RawFd>() <= end)
        .filter_map(int)
        .collect()
}

// Here rather than at the end of the file: the tests of `recv_with_fds` alone.
/// `getsockopt(SO_COOKIE)`: the kernel's 64-bit id of the socket.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_u64(fd, libc::SO_COOKIE)
}

/// A 64-bit `SOL_SOCKET` option of `fd`.
fn getsockopt_u64(fd: BorrowedFd<'_>, option: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is open for the whole call (borrowed); `value` and `len` are valid for
    // writes and `len` gives the buffer's size; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// Registers the drain ring buffer with the tokio reactor.
pub fn async_ringbuf(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
) -> io::Result<tokio::io::unix::AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>> {
    // SAFETY: the RingBuf owns its MapData, which owns the map's descriptor for its whole
    // life and never replaces it; the RingBuf is moved into the AsyncFd, and its
    // `as_raw_fd` always returns that descriptor.
    Ok(unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }?)
}

/// Keeps glibc to one malloc arena that gives freed memory back: the daemon's threads
/// are few and mostly idle, and an arena per thread would each keep the high-water mark
/// of a tag pass or a status dump. Call first thing in `main`, before any thread starts.
pub fn compact_malloc() {
    // SAFETY: mallopt only sets glibc's tuning parameters; it takes no pointer, and it
    // runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024);
    }
}

/// Gives memory freed after start-up (the kernel's BTF, parsed once to load the drain
/// programs, is tens of megabytes) back to the system.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap under its lock; no pointer is passed.
    unsafe { libc::malloc_trim(0) };
}

/// Registers a member's pidfd, shared with its [`crate::discover::members::Member`], with the tokio
/// reactor to wait for its process's exit: no duplicate descriptor per member.
pub fn async_shared_pidfd(
    fd: std::sync::Arc<OwnedFd>,
) -> io::Result<tokio::io::unix::AsyncFd<std::sync::Arc<OwnedFd>>> {
    // SAFETY: the Arc keeps the descriptor open for as long as the AsyncFd holds it (the
    // member may drop its own reference first), nothing closes an `OwnedFd` behind its
    // owners, and `as_raw_fd` always returns that descriptor.
    Ok(unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }?)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (soft before, soft now).
/// A root daemon holding a pidfd per member and sockets of every generation needs more
/// than the usual soft limit of 1024 (raising the soft limit up to the hard one needs no
/// privilege).
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    // An unlimited hard limit cannot be the soft one: the kernel caps descriptors at
    // fs.nr_open.
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|n| n.trim().parse::<libc::rlim_t>().ok())
            .unwrap_or(1 << 20)
    } else {
        lim.rlim_max
    };
    if lim.rlim_cur >= target {
        return Ok((before, before));
    }
    lim.rlim_cur = target;
    // SAFETY: `lim` is a valid rlimit read just above, its soft limit raised to at most
    // the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, lim.rlim_cur))
}

/// `getsockopt(SO_NETNS_COOKIE)` on a fresh socket: the kernel's 64-bit id of the calling
/// process's network namespace (Linux >= 5.14), as `bpf_get_netns_cookie` returns it.
pub fn netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    getsockopt_u64(socket.as_fd(), libc::SO_NETNS_COOKIE)
}

/// `setsockopt(TCP_DEFER_ACCEPT)`: the kernel hands a connection to `accept` only once
/// its client has sent data (or after about `seconds`), so idle connections wait in the
/// kernel, not in a worker.
pub fn tcp_defer_accept(fd: BorrowedFd<'_>, seconds: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is open for the whole call (borrowed); the option value is a live
    // c_int whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const seconds).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod recv_tests {
    use super::*;
    use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

    #[test]
    fn rights_are_read_as_the_kernel_writes_them() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("a pair");
        let null = std::fs::File::open("/dev/null").expect("open");
        let sent = [null.as_raw_fd(), a.as_raw_fd()];
        sendmsg::<()>(
            a.as_raw_fd(),
            &[io::IoSlice::new(b"x")],
            &[ControlMessage::ScmRights(&sent)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut data = [0u8; 4];
        let mut iov = [io::IoSliceMut::new(&mut data)];
        let msg = recvmsg::<()>(b.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
            .expect("recvmsg");
        let by_nix: Vec<RawFd> = msg
            .cmsgs()
            .expect("not truncated")
            .flat_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds,
                _ => Vec::new(),
            })
            .collect();
        let ours = rights_in(&cmsg);
        // SAFETY: the two descriptors recvmsg just installed, owned once each here.
        let _owned: Vec<OwnedFd> = by_nix
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        assert_eq!(by_nix.len(), 2);
        assert_eq!(ours, by_nix);
        assert!(
            rights_in(&[0u8; 64]).is_empty(),
            "a zeroed buffer holds none"
        );
        assert!(rights_in(&[0xff; 7]).is_empty(), "too short");
    }
}
