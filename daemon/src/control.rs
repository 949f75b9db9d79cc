//! The control socket: one daemon per state directory, peers checked by their
//! credentials, one framed request per connection.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use handoff_common::proto::{self, ErrorKind, FrameError, MAX_FRAME, Request, Response};
use nix::fcntl::{Flock, FlockArg};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

use crate::config::Paths;
use crate::daemon::{self as state, ConfigSource, Daemon, error, finish_status, one_line};
use crate::dirs::{self, DirError};
use crate::members::Member;
use crate::sys;

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another daemon holds the state directory.
    #[error(
        "another handoffd uses state directory {0} (its lock is held); stop it first, or give this one its own --state-dir"
    )]
    Locked(PathBuf),
    /// A live daemon answers on the socket path.
    #[error(
        "another handoffd is serving {0}; stop it first, or give this one its own --control-socket"
    )]
    InUse(PathBuf),
    /// The state directory or the socket's directory is not trusted.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// Something that is not a socket sits at the path.
    #[error("{0} exists and is not a socket; remove it or choose another --control-socket")]
    NotSocket(PathBuf),
    /// A filesystem or socket call failed.
    #[error("{op} {path} failed")]
    Io {
        /// What was done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ControlError + use<> {
    let path = path.to_path_buf();
    move |source| ControlError::Io { op, path, source }
}

/// The lock file's name in the state directory (see [`Paths::lock_file`]).
const LOCK_FILE: &str = "handoffd.lock";

/// Holds the state directory's lock for the daemon's life.
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] Flock<File>);

/// Creates the state directory (0700) if absent, refuses one another user could write
/// (see [`dirs`]), and takes its lock: one daemon per state directory.
pub fn lock_state_dir(paths: &Paths) -> Result<StateLock, ControlError> {
    let dir = dirs::ensure(&paths.state_dir)?;
    let file = dir.lock_file(LOCK_FILE)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map(StateLock)
        .map_err(|_| ControlError::Locked(paths.state_dir.clone()))
}

/// The state directory taken for a start that has not finished: what the start created
/// there (the directory, the lock file, the generation table, the control socket and its
/// directory) is removed again if it is dropped before [`Start::ready`], so a failed start
/// leaves the state directory as it found it. Only what this daemon created is removed,
/// and only while it holds the lock: a daemon refused by another's lock removes nothing.
#[derive(Debug)]
pub struct Start {
    /// Held for the daemon's life.
    _lock: StateLock,
    /// What existed before the start, and what it made.
    paths: Paths,
    created_dir: bool,
    created_lock: bool,
    created_state: bool,
    /// Set once the control socket is bound: (its directory was created by the start).
    socket: Option<bool>,
    socket_dir_existed: bool,
    /// The start finished: nothing is removed.
    ready: bool,
}

impl Start {
    /// Takes the state directory's lock ([`lock_state_dir`]), noting what exists first.
    pub fn lock(paths: &Paths) -> Result<Self, ControlError> {
        let exists = |p: &Path| fs::symlink_metadata(p).is_ok();
        let created_dir = !exists(&paths.state_dir);
        let created_lock = !exists(&paths.lock_file());
        let created_state = !exists(&crate::state::file(&paths.state_dir));
        let socket_dir_existed = paths.control_socket.parent().is_none_or(exists);
        let lock = lock_state_dir(paths)?;
        Ok(Self {
            _lock: lock,
            paths: paths.clone(),
            created_dir,
            created_lock,
            created_state,
            socket: None,
            socket_dir_existed,
            ready: false,
        })
    }

    /// Binds the control socket ([`bind`]); it is removed again if the start fails.
    pub fn bind(&mut self) -> Result<UnixListener, ControlError> {
        let listener = bind(&self.paths.control_socket)?;
        self.socket = Some(!self.socket_dir_existed);
        Ok(listener)
    }

    /// The start finished: what it made stays (the lock is held until the drop).
    pub fn ready(&mut self) {
        self.ready = true;
    }
}

impl Drop for Start {
    fn drop(&mut self) {
        if self.ready {
            return;
        }
        let remove = |p: &Path| match fs::remove_file(p) {
            Ok(()) => tracing::debug!(path = %p.display(), "removed after a failed start"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::debug!(path = %p.display(), error = %e, "cannot remove after a failed start")
            }
        };
        if let Some(created_dir) = self.socket {
            remove(&self.paths.control_socket);
            if let (true, Some(dir)) = (created_dir, self.paths.control_socket.parent()) {
                let _ = fs::remove_dir(dir);
            }
        }
        if self.created_state {
            remove(&crate::state::file(&self.paths.state_dir));
        }
        if self.created_lock {
            // Still locked by this process: a daemon that opened the file meanwhile was
            // refused, one that opens the path after this finds a new file.
            remove(&self.paths.lock_file());
        }
        if self.created_dir {
            // Only if empty: what anyone else put there stays.
            let _ = fs::remove_dir(&self.paths.state_dir);
        }
    }
}

/// Binds the control socket in a trusted directory (created 0700 if absent; see
/// [`dirs`]): no other user can have put a socket of theirs there, or replace ours. A
/// socket file left by a dead daemon is replaced, a live one is an error.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    dirs::ensure(dir)?;
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ControlError::NotSocket(path.to_path_buf()));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ControlError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing the control socket of a daemon that is gone");
                fs::remove_file(path).map_err(io_err("removing", path))?;
            }
            Err(e) => return Err(io_err("probing", path)(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspecting", path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err("binding", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660)).map_err(io_err("chmod", path))?;
    Ok(listener)
}

/// Serves control requests until `shutdown` completes, then removes the socket file.
/// `config` is where a reload request reads the configuration from (as SIGHUP does).
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    daemon: Arc<Mutex<Daemon>>,
    config: Arc<ConfigSource>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let daemon = Arc::clone(&daemon);
                    let config = Arc::clone(&config);
                    tokio::spawn(async move {
                        if let Err(e) = client(stream, daemon, config).await {
                            tracing::debug!(error = %e, "control client");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "accepting a control connection failed"),
            },
            () = &mut shutdown => break,
        }
    }
    let _ = fs::remove_file(&path);
}

/// Peers allowed to steer: root and the daemon's own user.
fn authorised(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

async fn client(
    mut stream: UnixStream,
    daemon: Arc<Mutex<Daemon>>,
    config: Arc<ConfigSource>,
) -> io::Result<()> {
    let response = match stream.peer_cred() {
        Ok(cred) if authorised(cred.uid()) => match read_request(&stream).await {
            Ok(received) => {
                tracing::debug!(request = ?received.request, fds = received.fds.len() + received.dropped, pid = ?cred.pid(), "control request");
                tokio::task::spawn_blocking(move || answer(received, &daemon, &config))
                    .await
                    .unwrap_or_else(|e| error(ErrorKind::Internal, &e))
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused a malformed control message");
                error(ErrorKind::BadRequest, &e)
            }
        },
        Ok(cred) => error(
            ErrorKind::Unauthorized,
            &format!(
                "uid {} may not control handoffd (only root and the daemon's user)",
                cred.uid()
            ),
        ),
        Err(e) => error(
            ErrorKind::Unauthorized,
            &format!("peer credentials unavailable: {e}"),
        ),
    };
    stream.write_all(&proto::encode(&response)).await?;
    stream.shutdown().await
}

/// A request as it arrived: the frame, and the descriptors that came with it.
#[derive(Debug)]
struct Received {
    request: Request,
    /// The first descriptor that came with it, if any.
    fds: Vec<OwnedFd>,
    /// How many more came (closed at once).
    dropped: usize,
    /// Descriptors were sent that the kernel could not hand over (out of descriptors).
    lost: bool,
}

/// Answers one request (blocking: it takes the daemon's lock).
fn answer(received: Received, daemon: &Mutex<Daemon>, config: &ConfigSource) -> Response {
    let Received {
        request,
        mut fds,
        dropped,
        lost,
    } = received;
    if lost {
        return error(
            ErrorKind::Internal,
            &"a descriptor sent with the request could not be received: handoffd is out of file descriptors (raise its LimitNOFILE), or a security module refused it",
        );
    }
    if dropped > 0 {
        return error(
            ErrorKind::BadRequest,
            &format!(
                "{} descriptors came with the request; a promote takes one pidfd at most",
                dropped + 1
            ),
        );
    }
    match request {
        Request::Promote { service, .. } if !fds.is_empty() => {
            let Some(pidfd) = fds.pop() else {
                return error(ErrorKind::Internal, &"no descriptor");
            };
            // The process the client named by its pidfd, pinned by it; the pid field is
            // the client's view and may mean nothing here (another pid namespace).
            match Member::from_pidfd(pidfd) {
                Ok(leader) => {
                    tracing::debug!(pid = leader.pid, "promote by pidfd");
                    Daemon::lock(daemon).promote_member(leader, service.as_deref())
                }
                Err(e) => {
                    tracing::info!(error = %one_line(&e), "promote by pidfd refused");
                    error(e.kind(), &one_line(&e))
                }
            }
        }
        _ if !fds.is_empty() => error(
            ErrorKind::BadRequest,
            &"a descriptor came with a request that takes none (only promote takes a pidfd)",
        ),
        Request::Status {} => {
            let mut d = Daemon::lock(daemon);
            // The socket dumps run after the lock is released.
            let plans = d.status_plans();
            let kernel = d.kernel_status();
            drop(d);
            finish_status(plans, Some(kernel))
        }
        Request::Reload {} => match state::reload(daemon, config) {
            Ok(reloaded) => Response::Reloaded(reloaded),
            Err(e) => error(e.kind(), &e),
        },
        request => Daemon::lock(daemon).handle(request),
    }
}

/// Reads one frame, and the descriptors sent with it: the first is kept, any more are
/// closed at once (and refuse the request), so a client cannot make the daemon hold
/// many.
async fn read_request(stream: &UnixStream) -> Result<Received, FrameError> {
    let mut frame = Vec::new();
    let mut fds = Vec::new();
    let mut dropped = 0usize;
    let mut lost = false;
    let read = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            stream.readable().await?;
            let got = stream.try_io(Interest::READABLE, || {
                sys::recv_with_fds(stream.as_fd(), &mut buf, &mut fds)
            });
            let n = match got {
                Ok((0, _)) => return io::Result::Ok(()),
                Ok((n, cut)) => {
                    lost |= cut;
                    n
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if fds.len() > 1 {
                dropped = dropped.saturating_add(fds.len() - 1);
                fds.truncate(1);
            }
            let chunk = buf.get(..n).unwrap_or_default();
            if let Some(end) = chunk.iter().position(|&b| b == b'\n') {
                frame.extend_from_slice(chunk.get(..=end).unwrap_or_default());
                return Ok(());
            }
            frame.extend_from_slice(chunk);
            if frame.len() > MAX_FRAME {
                return Ok(());
            }
        }
    };
    let done = tokio::time::timeout(READ_TIMEOUT, read).await;
    let request = match done {
        Ok(Ok(())) if frame.len() > MAX_FRAME => Err(FrameError::TooLong),
        Ok(Ok(())) if frame.last() == Some(&b'\n') => proto::decode(&frame),
        _ => Err(FrameError::Truncated),
    }?;
    Ok(Received {
        request,
        fds,
        dropped,
        lost,
    })
}

/// Why a client got no answer it can believe.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered, or not in the protocol.
    #[error("{}", unreachable(path, source))]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// The OS or framing error.
        source: io::Error,
    },
    /// The socket's peer is neither root nor a uid the caller trusts.
    #[error(
        "{path} is served by a process of uid {uid}, not root or handoffd's user, so its answer is not believed; if handoffd really runs as uid {uid}, pass --daemon-uid {uid}"
    )]
    Impostor {
        /// The socket.
        path: PathBuf,
        /// The uid of the process that accepted the connection.
        uid: u32,
    },
}

/// Whether an answer from a peer of `uid` may be believed: root, the caller's own uid
/// (a process of one's own uid can do anything to one anyway), or `daemon_uid`.
pub fn trusted_peer(uid: u32, daemon_uid: Option<u32>) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw() || Some(uid) == daemon_uid
}

/// Sends one request to the daemon at `path` and reads its answer (blocking), once the
/// connected socket's peer credentials (`SO_PEERCRED`, set by the kernel when the peer
/// called `listen`) show a [`trusted_peer`]: whoever could place a socket at the path
/// gets neither the request nor belief.
pub fn request(
    path: &Path,
    request: &Request,
    daemon_uid: Option<u32>,
) -> Result<Response, ClientError> {
    request_with_fd(path, request, None, daemon_uid)
}

/// As [`request`], sending `fd` with the frame (`SCM_RIGHTS`): a promote's pidfd.
pub fn request_with_fd(
    path: &Path,
    request: &Request,
    fd: Option<BorrowedFd<'_>>,
    daemon_uid: Option<u32>,
) -> Result<Response, ClientError> {
    use std::io::{BufRead, Write};
    let gone = |source| ClientError::Unreachable {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(gone)?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| gone(io::Error::from_raw_os_error(e as i32)))?;
    if !trusted_peer(cred.uid(), daemon_uid) {
        return Err(ClientError::Impostor {
            path: path.to_path_buf(),
            uid: cred.uid(),
        });
    }
    // The daemon may answer and close before reading (an unauthorised peer): a failed
    // write still leaves its answer to read.
    let frame = proto::encode(request);
    let written = match fd {
        // The descriptor goes with the frame's first bytes; the rest, if the kernel took
        // only part, follows as plain data.
        Some(fd) => send_with_fd(&stream, &frame, fd)
            .and_then(|sent| stream.write_all(frame.get(sent..).unwrap_or_default())),
        None => stream.write_all(&frame),
    };
    let mut frame = Vec::new();
    let read = io::BufReader::new(io::Read::take(&stream, MAX_FRAME as u64 + 1))
        .read_until(b'\n', &mut frame);
    match (proto::decode(&frame), written, read) {
        (Ok(response), _, _) => Ok(response),
        (Err(_), Err(e), _) | (Err(_), Ok(()), Err(e)) => Err(gone(e)),
        (Err(e), Ok(()), Ok(_)) => Err(gone(io::Error::other(e))),
    }
}

/// For a client: a pidfd of `pid` in the caller's own pid namespace, to send with the
/// promote. `None` for a pid no process can have (0 or less: the daemon gives its usual
/// refusal) or on a kernel without pidfd_open (the pid is then taken in the daemon's
/// namespace). A pid that names no process here is refused with one line.
pub fn caller_pidfd(pid: i32) -> Result<Option<OwnedFd>, String> {
    if pid <= 0 {
        return Ok(None);
    }
    match sys::pidfd_open(pid) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) => match e.raw_os_error() {
            Some(libc::ESRCH) => Err(format!("no process with pid {pid}")),
            // Not a thread group leader (ENOENT since Linux 6.9, EINVAL before).
            Some(libc::ENOENT | libc::EINVAL) => Err(format!(
                "pid {pid} is a thread, not a process: promote the process it belongs to"
            )),
            // No pidfd_open (before Linux 5.3), or a seccomp profile that refuses it: the
            // plain pid, as a client without pidfds sends.
            Some(libc::ENOSYS | libc::EPERM) => Ok(None),
            _ => Err(format!("pidfd_open({pid}) failed: {e}")),
        },
    }
}

/// `sendmsg` of `data` with `fd` attached; returns the bytes sent.
fn send_with_fd(
    stream: &std::os::unix::net::UnixStream,
    data: &[u8],
    fd: BorrowedFd<'_>,
) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    let fds = [fd.as_raw_fd()];
    sendmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &[io::IoSlice::new(data)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)
}

/// The response to an unreachable daemon, for the client.
pub fn unreachable(path: &Path, e: &io::Error) -> String {
    let hint = match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => "is handoffd running?",
        io::ErrorKind::PermissionDenied => "only root and handoffd's user may control it",
        _ => "",
    };
    format!("cannot reach handoffd at {}: {e} {hint}", path.display())
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads one request from `peer` on a runtime of its own.
    fn read(peer: std::os::unix::net::UnixStream) -> Result<Received, FrameError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            peer.set_nonblocking(true).expect("nonblocking");
            let stream = UnixStream::from_std(peer).expect("a tokio stream");
            read_request(&stream).await
        })
    }

    fn devnull() -> OwnedFd {
        File::open("/dev/null").expect("opening /dev/null").into()
    }

    #[test]
    fn a_frame_brings_at_most_one_descriptor() {
        let status = proto::encode(&Request::Status {});

        // One descriptor with the frame: kept.
        let (client, peer) = std::os::unix::net::UnixStream::pair().expect("a pair");
        let null = devnull();
        assert_eq!(
            send_with_fd(&client, &status, null.as_fd()).expect("sent"),
            status.len()
        );
        let got = read(peer).expect("a request");
        assert_eq!(got.request, Request::Status {});
        assert_eq!((got.fds.len(), got.dropped), (1, 0));

        // One with each of two parts of the frame: the second is closed and counted.
        let (client, peer) = std::os::unix::net::UnixStream::pair().expect("a pair");
        let (head, tail) = status.split_at(3);
        send_with_fd(&client, head, null.as_fd()).expect("sent");
        send_with_fd(&client, tail, null.as_fd()).expect("sent");
        let got = read(peer).expect("a request");
        assert_eq!((got.fds.len(), got.dropped), (1, 1));

        // None: a plain request, as before.
        let (mut client, peer) = std::os::unix::net::UnixStream::pair().expect("a pair");
        io::Write::write_all(&mut client, &status).expect("sent");
        let got = read(peer).expect("a request");
        assert_eq!((got.fds.len(), got.dropped), (0, 0));

        // A frame cut short, with a descriptor: refused, and the descriptor dropped with it.
        let (client, peer) = std::os::unix::net::UnixStream::pair().expect("a pair");
        send_with_fd(&client, head, null.as_fd()).expect("sent");
        drop(client);
        assert!(matches!(read(peer), Err(FrameError::Truncated)));
    }
}
