//! The client's side of the control socket (`handoffctl`): believe only a trusted peer,
//! send one request (with a promote's pidfd), read one answer.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use handoff_common::proto::{self, FrameReader, Request, Response};

use crate::sys;

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

/// Why a client could not name the process to promote by a pidfd.
#[derive(Debug, thiserror::Error)]
pub enum CallerPidfdError {
    /// No process has the pid (in the caller's pid namespace).
    #[error("no process with pid {pid}")]
    NoSuchProcess {
        /// The pid typed.
        pid: i32,
    },
    /// The pid is a thread's, not a thread group leader's.
    #[error("pid {pid} is a thread, not a process: promote the process it belongs to")]
    Thread {
        /// The pid typed.
        pid: i32,
    },
    /// `pidfd_open` failed otherwise.
    #[error("pidfd_open({pid}) failed")]
    Open {
        /// The pid typed.
        pid: i32,
        /// The OS error.
        #[source]
        source: io::Error,
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
    use std::io::Write;
    let gone = |source| ClientError::Unreachable {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(gone)?;
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
    let mut answer = FrameReader::default();
    let read = read_frame(&stream, &mut answer);
    match (answer.decode(), written, read) {
        (Ok(response), _, _) => Ok(response),
        (Err(_), Err(e), _) | (Err(_), Ok(()), Err(e)) => Err(gone(e)),
        (Err(e), Ok(()), Ok(())) => Err(gone(io::Error::other(e))),
    }
}

/// Reads from `stream` into `frame` until the frame is over or the peer closes.
fn read_frame(mut stream: &UnixStream, frame: &mut FrameReader) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match io::Read::read(&mut stream, &mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if frame.push(buf.get(..n).unwrap_or_default()) {
            return Ok(());
        }
    }
}

/// For a client: a pidfd of `pid` in the caller's own pid namespace, to send with the
/// promote. `None` for a pid no process can have (0 or less: the daemon gives its usual
/// refusal) or on a kernel without pidfd_open (the pid is then taken in the daemon's
/// namespace). A pid that names no process here is refused with one line.
pub fn caller_pidfd(pid: i32) -> Result<Option<OwnedFd>, CallerPidfdError> {
    if pid <= 0 {
        return Ok(None);
    }
    match sys::pidfd_open(pid) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) => match e.raw_os_error() {
            Some(libc::ESRCH) => Err(CallerPidfdError::NoSuchProcess { pid }),
            // Not a thread group leader (ENOENT since Linux 6.9, EINVAL before).
            Some(libc::ENOENT | libc::EINVAL) => Err(CallerPidfdError::Thread { pid }),
            // No pidfd_open (before Linux 5.3), or a seccomp profile that refuses it: the
            // plain pid, as a client without pidfds sends.
            Some(libc::ENOSYS | libc::EPERM) => Ok(None),
            _ => Err(CallerPidfdError::Open { pid, source: e }),
        },
    }
}

/// `sendmsg` of `data` with `fd` attached; returns the bytes sent.
pub(super) fn send_with_fd(
    stream: &UnixStream,
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
    use handoff_common::proto::{ErrorKind, ErrorReply};

    /// Answers one request at a fresh socket with `answer`'s bytes, then closes.
    fn daemon_answering(name: &str, answer: Vec<u8>) -> (PathBuf, std::thread::JoinHandle<()>) {
        let path =
            std::env::temp_dir().join(format!("handoff-client-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("binding");
        let serve = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("a client");
            let mut request = FrameReader::default();
            read_frame(&stream, &mut request).expect("reading the request");
            assert_eq!(
                request.decode::<Request>().expect("a request"),
                Request::Status {}
            );
            io::Write::write_all(&mut stream, &answer).expect("answering");
        });
        (path, serve)
    }

    #[test]
    fn the_answer_is_read_to_its_newline() {
        let refused = Response::Error(ErrorReply {
            kind: ErrorKind::Retiring,
            message: "generation 3 (pid 42) is retiring".into(),
        });
        let (path, serve) = daemon_answering("whole", proto::encode(&refused));
        let got = request(&path, &Request::Status {}, None).expect("an answer");
        serve.join().expect("served");
        let _ = std::fs::remove_file(&path);
        assert_eq!(got, refused);
    }

    #[test]
    fn an_answer_cut_short_is_no_answer() {
        let mut cut = proto::encode(&Response::Status(Default::default()));
        cut.pop();
        let (path, serve) = daemon_answering("cut", cut);
        let got = request(&path, &Request::Status {}, None);
        serve.join().expect("served");
        let _ = std::fs::remove_file(&path);
        let Err(e) = got else {
            panic!("an answer without its newline was believed: {got:?}")
        };
        assert!(
            e.to_string()
                .ends_with("control message ended without a newline"),
            "{e}"
        );
    }
}
