//! The daemon's side of the control socket: bound in a trusted directory, peers checked
//! by their credentials, one framed request per connection (with a promote's pidfd).

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use handoff_common::proto::{self, ErrorKind, FrameError, FrameReader, Request, Response};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

use super::{ControlError, io_err};
use crate::discover::members::Member;
use crate::logging::one_line;
use crate::persist::dirs;
use crate::runtime::daemon::{
    self as state, ConfigSource, Daemon, Who, error, finish_status, promote,
};
use crate::sys;

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

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
        Request::Promote {
            service, options, ..
        } if !fds.is_empty() => {
            let Some(pidfd) = fds.pop() else {
                return error(ErrorKind::Internal, &"no descriptor");
            };
            // The process the client named by its pidfd, pinned by it; the pid field is
            // the client's view and may mean nothing here (another pid namespace).
            match Member::from_pidfd(pidfd) {
                Ok(leader) => {
                    tracing::debug!(pid = leader.pid, "promote by pidfd");
                    promote(daemon, Who::Member(leader), service.as_deref(), &options)
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
        Request::Promote {
            pid,
            service,
            options,
        } => promote(daemon, Who::Pid(pid), service.as_deref(), &options),
        request => Daemon::lock(daemon).handle(request),
    }
}

/// Reads one frame, and the descriptors sent with it: the first is kept, any more are
/// closed at once (and refuse the request), so a client cannot make the daemon hold
/// many.
async fn read_request(stream: &UnixStream) -> Result<Received, FrameError> {
    let mut frame = FrameReader::default();
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
            if frame.push(buf.get(..n).unwrap_or_default()) {
                return Ok(());
            }
        }
    };
    let request = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(())) => frame.decode(),
        // Timed out, or the connection failed: what came is cut short.
        _ => Err(FrameError::Truncated),
    }?;
    Ok(Received {
        request,
        fds,
        dropped,
        lost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::control::client::send_with_fd;

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
        std::fs::File::open("/dev/null")
            .expect("opening /dev/null")
            .into()
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
