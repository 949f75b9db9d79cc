//! Process and socket plumbing for the test programs; the only module with `unsafe`.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};
use nix::unistd::{ForkResult, Pid};

/// Listen backlog of every test listener: deep enough that bursts of load never overflow it.
const BACKLOG: i32 = 4096;

/// Which side of a [`fork`] the caller is on.
pub(crate) enum Forked {
    /// The original process; holds the child's pid.
    Parent(Pid),
    /// The new process.
    Child,
}

/// Forks the process, refusing to do so unless the process has exactly one thread.
pub(crate) fn fork() -> io::Result<Forked> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "refusing to fork a process with {threads} threads: fork before starting threads"
        )));
    }
    // SAFETY: the process has exactly one thread (checked just above; only this thread could
    // start another one). The child is therefore a complete copy of a single-threaded process:
    // no lock can be held by a thread that does not exist in it, so it may call any function,
    // not only async-signal-safe ones.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        ForkResult::Child => Ok(Forked::Child),
    }
}

/// Makes the kernel SIGKILL this process when `parent` dies, closing the race where `parent`
/// died before the request was made.
pub(crate) fn die_with_parent(parent: Pid) -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    if nix::unistd::getppid() != parent {
        return Err(io::Error::other(format!(
            "parent {parent} exited before the worker started"
        )));
    }
    Ok(())
}

/// The signals the test server handles synchronously: blocked in every thread and taken with
/// [`SigSet::wait`] by one thread, so no signal handler is ever installed.
pub(crate) fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGCHLD);
    // `--hold`: close the held connections.
    set.add(Signal::SIGUSR1);
    set
}

/// Blocks [`handled_signals`] in the calling thread; threads and children started afterwards
/// inherit the mask.
pub(crate) fn block_handled_signals() -> io::Result<()> {
    handled_signals().thread_block()?;
    Ok(())
}

/// Creates a listening TCP socket on `addr` with SO_REUSEADDR, SO_REUSEPORT (if `reuseport`)
/// and IPV6_V6ONLY (if `v6only` is given and `addr` is IPv6).
pub(crate) fn tcp_listener(
    addr: SocketAddr,
    reuseport: bool,
    v6only: Option<bool>,
) -> io::Result<TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if reuseport {
        setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    if let (SocketAddr::V6(_), Some(only)) = (addr, v6only) {
        setsockopt(&fd, sockopt::Ipv6V6Only, &only)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::new(BACKLOG)?)?;
    Ok(TcpListener::from(fd))
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, so hundreds of concurrent connections fit;
/// returns the new soft limit.
pub(crate) fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the valid, exclusively borrowed `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit only reads the valid, initialised `limit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// `setsockopt(SO_ATTACH_REUSEPORT_CBPF)` with the classic program `ret #index`: every new
/// connection of the socket's reuseport group goes to the group's socket number `index`
/// (the oldest is 0). Needs no privilege: what an intruder with the service's uid does.
pub fn attach_reuseport_cbpf(socket: &impl std::os::fd::AsFd, index: u32) -> io::Result<()> {
    let mut filter = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: index,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `filter`, both alive for the call; the length passed is
    // the size of `prog`, which the kernel copies before returning.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const prog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `setsockopt(SO_DETACH_REUSEPORT_BPF)`: removes the group's program. Unprivileged.
pub fn detach_reuseport(socket: &impl std::os::fd::AsFd) -> io::Result<()> {
    let dummy: libc::c_int = 0;
    // SAFETY: `dummy` is a live int and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_REUSEPORT_BPF,
            (&raw const dummy).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A listening TCP socket on `addr` with SO_REUSEPORT: joins the group there.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    tcp_listener(addr, true, None)
}

/// `setsockopt(level, name)` with an `len`-byte optval whose first int is 1: the kernel
/// reads the int and ignores the rest, so a cgroup setsockopt program that mishandles
/// options larger than a page (EFAULT) shows.
pub fn setsockopt_oversized(
    socket: &impl std::os::fd::AsFd,
    level: libc::c_int,
    name: libc::c_int,
    len: usize,
) -> io::Result<()> {
    let mut buf = vec![0u8; len.max(size_of::<libc::c_int>())];
    buf[..size_of::<libc::c_int>()].copy_from_slice(&1i32.to_ne_bytes());
    // SAFETY: `buf` is alive for the call and its length is what is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            buf.as_ptr().cast(),
            buf.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A sender's `SCM_CREDENTIALS`: pid, uid, gid.
pub type Credentials = (i32, u32, u32);

/// The next datagram on `socket` (which has `SO_PASSCRED` set) and its sender's
/// credentials, waiting at most `timeout`.
pub fn recv_with_credentials(
    socket: &std::os::unix::net::UnixDatagram,
    timeout: std::time::Duration,
) -> io::Result<(Vec<u8>, Option<Credentials>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    socket.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!(libc::ucred);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )?;
    let creds = msg.cmsgs().ok().and_then(|mut c| {
        c.find_map(|c| match c {
            ControlMessageOwned::ScmCredentials(c) => Some((c.pid(), c.uid(), c.gid())),
            _ => None,
        })
    });
    let len = msg.bytes;
    Ok((buf[..len].to_vec(), creds))
}
