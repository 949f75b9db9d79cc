//! A notify socket for services that speak systemd's readiness protocol (`sd_notify`,
//! `READY=1`): handoffd binds it, the service finds it in `$NOTIFY_SOCKET`, and a
//! `READY=1` from a process of the service's uid names that process as ready.
//!
//! The socket (`AF_UNIX`, `SOCK_DGRAM`) is mode 0600 and owned by the service's uid, so
//! only that uid and root can send to it. A message counts only when its sender is
//! identified by a pidfd and runs as that uid (real, effective and saved):
//! - with `SO_PASSPIDFD` (Linux >= 6.5) the kernel attaches a pidfd of the sender to
//!   every message (`SCM_PIDFD`): it names exactly the sender, even once its pid is
//!   reused;
//! - on older kernels the pid of `SCM_CREDENTIALS` is opened with `pidfd_open`, and the
//!   process that pid names then must have started no later than the datagram was
//!   received: a sender that exited and whose pid was reused by a later process is
//!   refused. (What remains is a pid reused within the same clock tick, 10 ms, as the
//!   receipt, by a process of the same uid.)
//!
//! Every message that fits is forwarded, byte for byte, to the original notify socket if
//! one is given (e.g. systemd's `/run/systemd/notify`, or `@name` for an abstract one),
//! with `SCM_CREDENTIALS` naming the original sender's pid, uid and gid (root may send
//! those), so that a `Type=notify` unit with `NotifyAccess=all` keeps working. A message
//! whose sender has already exited is not forwarded: the kernel refuses its pid, and
//! sent under handoffd's own pid it could tell systemd that handoffd is ready. Forwarding
//! never fails a receipt (logged at debug).
//!
//! Descriptors that come with a message (`FDSTORE=1`) are closed at once and not
//! forwarded: systemd's file descriptor store does not work through this socket.
//! Datagrams longer than [`MAX_DATAGRAM`] bytes (systemd's own limit) are ignored and
//! not forwarded.

// Until the daemon's event loop binds these sockets (issue 14, "promote when ready").
#![cfg_attr(
    not(test),
    expect(
        dead_code,
        unused_imports,
        reason = "used by the daemon once it offers readiness sockets"
    )
)]

#[cfg(test)]
mod input_tests;
mod notice;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr};

pub use notice::{Ignored, Notice};

use crate::sys;

/// The longest message taken, in bytes (systemd's `NOTIFY_BUFFER_MAX`, `PIPE_BUF`).
pub const MAX_DATAGRAM: usize = 4096;

/// Senders whose oversized datagrams are remembered, to log each of them once.
const MAX_LOGGED_SENDERS: usize = 1024;

/// Why the readiness socket could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum ReadinessError {
    /// Something other than a socket is where the socket goes.
    #[error(
        "{path} exists and is not a socket: not replaced (remove it, or configure another path)"
    )]
    NotSocket {
        /// The socket's path.
        path: PathBuf,
    },
    /// A process is bound to the socket already.
    #[error("{path} is bound by another process already (another handoffd?)")]
    InUse {
        /// The socket's path.
        path: PathBuf,
    },
    /// A system call failed.
    #[error("readiness socket {path}: {what} failed")]
    Sys {
        /// The socket's path.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// How the sender of a message is identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identify {
    /// By the pidfd the kernel attaches (`SO_PASSPIDFD`, Linux >= 6.5).
    Pidfd,
    /// By the pid of `SCM_CREDENTIALS`, opened and checked against its start time.
    Credentials,
}

/// A bound notify socket of one service.
#[derive(Debug)]
pub struct ReadinessSocket {
    fd: OwnedFd,
    path: PathBuf,
    /// The file bound at `path` (device, inode): removed on drop only if still there.
    file: (u64, u64),
    uid: u32,
    identify: Identify,
    forward: Option<Forward>,
    /// Senders whose oversized datagrams were logged already.
    logged: Mutex<HashSet<i32>>,
}

/// The original notify socket, and the unbound socket that forwards to it.
#[derive(Debug)]
struct Forward {
    to: UnixAddr,
    shown: PathBuf,
    socket: OwnedFd,
}

impl ReadinessSocket {
    /// Binds at `path` (a stale socket file there is replaced; any other file, or a socket
    /// another process is bound to, is an error), mode 0600, owned by `uid`:`gid`, with
    /// `SO_PASSCRED` and, when the kernel has it, `SO_PASSPIDFD`; non-blocking and
    /// close-on-exec. `forward`: the original notify socket, a path or `@name` (abstract).
    ///
    /// The directory of `path` must be writable by root only (as `/run/handoff` is), and
    /// searchable by `uid`.
    pub fn bind(
        path: &Path,
        uid: u32,
        gid: u32,
        forward: Option<PathBuf>,
    ) -> Result<Self, ReadinessError> {
        Self::bind_with(path, uid, gid, forward, Identify::Pidfd)
    }

    /// [`ReadinessSocket::bind`], identifying senders by credentials when `identify` says
    /// so even if the kernel has `SO_PASSPIDFD` (to test the older kernels' way).
    pub fn bind_with(
        path: &Path,
        uid: u32,
        gid: u32,
        forward: Option<PathBuf>,
        identify: Identify,
    ) -> Result<Self, ReadinessError> {
        let err = |what| sys_err(path, what);
        let forward = forward
            .map(Forward::new)
            .transpose()
            .map_err(err("creating the forwarding socket"))?;
        remove_stale(path)?;
        let fd = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| err("socket")(e.into()))?;
        // Before bind: the file is created with the socket's mode (less the umask), so it
        // never exists with more than 0600.
        let owner_only = nix::sys::stat::Mode::from_bits_truncate(0o600);
        nix::sys::stat::fchmod(&fd, owner_only).map_err(|e| err("fchmod")(e.into()))?;
        let addr =
            UnixAddr::new(path).map_err(|e| err("a socket address of the path")(e.into()))?;
        nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(|e| err("bind")(e.into()))?;
        let file = std::fs::symlink_metadata(path).map_err(err("lstat after bind"))?;
        let mut socket = ReadinessSocket {
            fd,
            path: path.to_path_buf(),
            file: (file.dev(), file.ino()),
            uid,
            identify,
            forward,
            logged: Mutex::new(HashSet::new()),
        };
        socket.finish_bind(gid, identify)?;
        Ok(socket)
    }

    /// After bind (the file is removed on drop from here on): owner, mode and options.
    fn finish_bind(&mut self, gid: u32, identify: Identify) -> Result<(), ReadinessError> {
        let path = self.path.clone();
        let err = |what| sys_err(&path, what);
        use nix::sys::stat::{FchmodatFlags, Mode, fchmodat};
        std::os::unix::fs::lchown(&self.path, Some(self.uid), Some(gid)).map_err(err("chown"))?;
        // Exactly 0600, whatever the umask took off.
        fchmodat(
            nix::fcntl::AT_FDCWD,
            &self.path,
            Mode::from_bits_truncate(0o600),
            FchmodatFlags::NoFollowSymlink,
        )
        .map_err(|e| err("chmod")(e.into()))?;
        nix::sys::socket::setsockopt(&self.fd, nix::sys::socket::sockopt::PassCred, &true)
            .map_err(|e| err("setsockopt(SO_PASSCRED)")(e.into()))?;
        if identify == Identify::Pidfd
            && !sys::pass_pidfd(self.fd.as_fd()).map_err(err("setsockopt(SO_PASSPIDFD)"))?
        {
            tracing::info!(
                socket = %self.path.display(),
                "the kernel has no SO_PASSPIDFD (Linux < 6.5): readiness senders are identified by pid and start time"
            );
            self.identify = Identify::Credentials;
        }
        Ok(())
    }

    /// The socket's path (for `$NOTIFY_SOCKET`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How senders are identified: [`Identify::Pidfd`] unless the kernel lacks it (or
    /// [`ReadinessSocket::bind_with`] asked for credentials).
    pub fn identify(&self) -> Identify {
        self.identify
    }

    /// Reads one datagram without blocking (`Ok(None)`: none is queued), forwards it, and
    /// returns what it says and who sent it. Every datagram gives a notice: one that is
    /// ignored says why in [`Notice::ignored`].
    pub fn receive(&self) -> Result<Option<Notice>, ReadinessError> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let datagram = match sys::recv_datagram(self.fd.as_fd(), &mut buf) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(sys_err(&self.path, "recvmsg")(e)),
        };
        // Right after the receipt: the sender started before this (pid reuse check).
        let received = notice::boottime_ticks();
        let notice = notice::read(self, datagram, &buf, received);
        Ok(Some(notice))
    }

    /// Forwards `bytes` to the original notify socket as sent by `from`.
    fn forward(&self, bytes: &[u8], from: sys::Credentials) {
        let Some(forward) = &self.forward else {
            return;
        };
        if let Err(e) = sys::send_as(forward.socket.as_fd(), bytes, &forward.to, from) {
            let why = match e.raw_os_error() {
                Some(libc::ESRCH) => "its sender has exited",
                _ => "sendmsg failed",
            };
            tracing::debug!(
                to = %forward.shown.display(),
                pid = from.pid,
                error = %e,
                "readiness message not forwarded: {why}"
            );
        }
    }

    /// Logs an oversized datagram, once per sender pid (of the last
    /// [`MAX_LOGGED_SENDERS`]).
    fn log_oversized(&self, pid: i32, len: usize) {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.len() >= MAX_LOGGED_SENDERS {
            logged.clear();
        }
        if logged.insert(pid) {
            tracing::warn!(
                socket = %self.path.display(),
                pid,
                len,
                "readiness message of {len} bytes ignored: at most {MAX_DATAGRAM} (logged once per sender)"
            );
        }
    }
}

impl Forward {
    fn new(to: PathBuf) -> io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = to.as_os_str().as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => UnixAddr::new_abstract(name)?,
            None => UnixAddr::new(&to)?,
        };
        let socket = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        Ok(Forward {
            to: addr,
            shown: to,
            socket,
        })
    }
}

/// The error of `what` on the socket at `path`.
fn sys_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> ReadinessError {
    let path = path.to_path_buf();
    move |source| ReadinessError::Sys { path, what, source }
}

/// Removes a socket file left at `path` by an earlier process; refuses any other file,
/// and a socket that a process is still bound to.
fn remove_stale(path: &Path) -> Result<(), ReadinessError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |what| sys_err(path, what);
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err("lstat")(e)),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ReadinessError::NotSocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => {}
    }
    let probe = std::os::unix::net::UnixDatagram::unbound().map_err(err("socket"))?;
    if probe.connect(path).is_ok() {
        return Err(ReadinessError::InUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(err("removing the stale socket"))
}

impl AsFd for ReadinessSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for ReadinessSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for ReadinessSocket {
    /// Removes the socket file, if the file at the path is still the one bound.
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
