//! The probe: a connection from handoffd that the kernel program recognises by its exact
//! source address and ephemeral port (registered in the program's `probes` map before
//! the connect and removed after), answers with the slot it would have chosen, and drops.
//!
//! It is the only way to see what the kernel does: no interface reads back a group's
//! program, so a program attached by someone else would otherwise go unnoticed. Nothing
//! outside the daemon can make a SYN count as a probe: the map is root's, the source port
//! is one the kernel gave the daemon's socket, and the source address is the destination
//! address (a local one: see handoff.bpf.c).

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use handoff_common::maps::{PROBE_NO_SOCKET, PROBE_UNSET, ProbeKey};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike, SockaddrStorage,
    bind, connect, getsockname, getsockopt, socket, sockopt,
};

use crate::kernel::loader::{GroupProgram, LoaderError};

/// Why a probe gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A socket call failed.
    #[error("probe {op} failed")]
    Socket {
        /// What was done.
        op: &'static str,
        /// The error.
        #[source]
        source: Errno,
    },
    /// The probe was accepted or otherwise not dropped: our program did not see it.
    #[error(
        "the probe to {target} was not seen by handoff's program: another sk_reuseport program may have replaced it, the group may have re-formed, or a more specific listener takes the address"
    )]
    NotSeen {
        /// Where the probe went.
        target: SocketAddr,
    },
    /// No answer within [`PROBE_DEADLINE`]: the SYN went somewhere that drops it (a
    /// listener with a full accept queue chosen by another program), not to ours.
    #[error(
        "the probe to {target} got no answer within {waited_ms} ms: another sk_reuseport program may have replaced handoff's and sent it to a listener that drops it"
    )]
    NoAnswer {
        /// Where the probe went.
        target: SocketAddr,
        /// How long it waited.
        waited_ms: u64,
    },
    /// The connect ended with an error other than the reset our program's drop causes.
    #[error("the probe to {target} failed unlike a probe handoff's program saw")]
    Connect {
        /// Where the probe went.
        target: SocketAddr,
        /// The error.
        #[source]
        source: Errno,
    },
    /// Reading or writing the probe map failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
}

impl ProbeError {
    /// Whether the probe's connect ended in any way but the reset of a SYN handoff's
    /// program dropped and recorded (accepted, no answer, another error): the group has
    /// lost its program (or never had it). Failures before the connect (no fd, a map
    /// error) say nothing about the group.
    pub fn lost(&self) -> bool {
        matches!(
            self,
            ProbeError::NotSeen { .. } | ProbeError::NoAnswer { .. } | ProbeError::Connect { .. }
        )
    }
}

/// How long a probe waits for its answer. On loopback the reset of a dropped SYN comes
/// back within the connect's own softirq, well under a millisecond; a SYN the kernel
/// drops silently (full accept queue) would only be retransmitted after 1 s. Callers hold
/// the daemon's lock while probing, so this bounds how long one probe holds it.
pub const PROBE_DEADLINE: Duration = Duration::from_millis(100);

/// How long a promote's or rollback's probes that the program has not seen by
/// [`PROBE_DEADLINE`] may wait, in all, for the whole operation (each group's probe gets
/// what is left, at least [`PROBE_DEADLINE`]). On a host slow enough that loopback's softirq runs late (a loaded machine, an
/// emulated CPU: seen at 117 ms under qemu), the SYN has not reached the program yet;
/// giving up then would fail a promote that is sound. Only a probe that no handoff
/// program saw waits this long, so a healthy group never does. The watch's probes keep
/// [`PROBE_DEADLINE`]: a slow answer there costs a needless re-attach, not a failed
/// promote, and a replaced program must not hold the daemon's lock for a second.
pub const PROBE_SLOW_DEADLINE: Duration = Duration::from_secs(1);

/// What the kernel program chose for a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    /// The slot it selected.
    Slot(u32),
    /// No socket of the active or previous generation: it left the choice to the kernel.
    NoSocket,
}

impl std::fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeResult::Slot(s) => write!(f, "slot {s}"),
            ProbeResult::NoSocket => f.write_str("no socket"),
        }
    }
}

fn socket_err(op: &'static str) -> impl Fn(Errno) -> ProbeError {
    move |source| ProbeError::Socket { op, source }
}

/// Connects from an ephemeral port on `target`'s own address to `target` and returns the
/// program's choice. `target` is a local address (loopback for a wildcard group). A probe
/// the program has not seen after [`PROBE_DEADLINE`] is given until `patience` (at least
/// that deadline) before it counts as unanswered.
pub fn probe(
    program: &mut GroupProgram,
    target: SocketAddr,
    patience: Duration,
) -> Result<ProbeResult, ProbeError> {
    let (fd, source) = bound_socket(target)?;
    let key = ProbeKey::new(source, target);
    program.register_probe(key)?;
    let start = Instant::now();
    let mut outcome = connect_within(fd.as_fd(), target, PROBE_DEADLINE);
    let mut chosen = program.probe_result(key);
    if matches!(outcome, Outcome::NoAnswer(_))
        && matches!(chosen, Ok(PROBE_UNSET))
        && patience > PROBE_DEADLINE
    {
        outcome = wait_connect(fd.as_fd(), start, patience);
        chosen = program.probe_result(key);
    }
    program.unregister_probe(key);
    if let (Outcome::NoAnswer(_), Ok(recorded)) = (outcome, &chosen) {
        // The program recorded its choice and dropped the SYN; only the reset is late.
        match *recorded {
            PROBE_UNSET => {}
            PROBE_NO_SOCKET => return Ok(ProbeResult::NoSocket),
            slot => return Ok(ProbeResult::Slot(slot)),
        }
    }
    match outcome {
        // The program dropped the SYN: the kernel answered with a reset.
        Outcome::Refused => match chosen? {
            PROBE_UNSET => Err(ProbeError::NotSeen { target }),
            PROBE_NO_SOCKET => Ok(ProbeResult::NoSocket),
            slot => Ok(ProbeResult::Slot(slot)),
        },
        Outcome::Connected => Err(ProbeError::NotSeen { target }),
        Outcome::NoAnswer(waited) => Err(ProbeError::NoAnswer {
            target,
            waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
        }),
        Outcome::Failed(source) => Err(ProbeError::Connect { target, source }),
    }
}

/// A non-blocking TCP socket bound to an ephemeral port on `target`'s own address (a
/// local address: loopback for a wildcard group), and the address it got.
pub(super) fn bound_socket(target: SocketAddr) -> Result<(OwnedFd, SocketAddr), ProbeError> {
    let family = match target {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    // Non-blocking: the connect's outcome is waited for with poll and a deadline, never
    // with a blocking connect another program's choice of listener could stretch.
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(socket_err("socket"))?;
    // Port 0: the kernel picks a free ephemeral port; nobody else holds it while we do.
    let source = SocketAddr::new(target.ip(), 0);
    bind(fd.as_raw_fd(), sockaddr(&source).as_ref()).map_err(socket_err("bind"))?;
    let bound: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(socket_err("getsockname"))?;
    let source = match (bound.as_sockaddr_in(), bound.as_sockaddr_in6()) {
        (Some(a), _) => SocketAddr::V4((*a).into()),
        (None, Some(a)) => SocketAddr::V6((*a).into()),
        (None, None) => {
            return Err(ProbeError::Socket {
                op: "getsockname",
                source: Errno::EAFNOSUPPORT,
            });
        }
    };
    Ok((fd, source))
}

/// How a non-blocking connect ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Reset: ECONNREFUSED.
    Refused,
    /// The handshake completed: a listener accepted it.
    Connected,
    /// Nothing within the deadline (after waiting this long).
    NoAnswer(Duration),
    /// Any other error.
    Failed(Errno),
}

/// Starts a connect on the non-blocking `fd` and waits at most `deadline` for it to end.
pub(super) fn connect_within(
    fd: std::os::fd::BorrowedFd<'_>,
    target: SocketAddr,
    deadline: Duration,
) -> Outcome {
    let start = Instant::now();
    match connect(fd.as_raw_fd(), sockaddr(&target).as_ref()) {
        Ok(()) => return Outcome::Connected,
        Err(Errno::ECONNREFUSED) => return Outcome::Refused,
        Err(Errno::EINPROGRESS) => {}
        Err(e) => return Outcome::Failed(e),
    }
    wait_connect(fd, start, deadline)
}

/// Waits until `deadline` after `start` for the connect in progress on `fd` to end.
pub(super) fn wait_connect(
    fd: std::os::fd::BorrowedFd<'_>,
    start: Instant,
    deadline: Duration,
) -> Outcome {
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Outcome::NoAnswer(start.elapsed());
        }
        // Whole milliseconds, at least 1 so a sub-millisecond rest still waits.
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => break,
            Err(e) => return Outcome::Failed(e),
        }
    }
    // Writable: the connect ended; SO_ERROR says how.
    match getsockopt(&fd, sockopt::SocketError) {
        Ok(0) => Outcome::Connected,
        Ok(e) if e == libc::ECONNREFUSED => Outcome::Refused,
        Ok(e) => Outcome::Failed(Errno::from_raw(e)),
        Err(e) => Outcome::Failed(e),
    }
}

fn sockaddr(addr: &SocketAddr) -> Box<dyn SockaddrLike> {
    match addr {
        SocketAddr::V4(a) => Box::new(SockaddrIn::from(*a)),
        SocketAddr::V6(a) => Box::new(SockaddrIn6::from(*a)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn nonblocking_socket() -> std::os::fd::OwnedFd {
        socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .expect("socket")
    }

    /// A listener whose accept queue is full drops the SYN without a reset: the probe
    /// must give up at its deadline and count as lost, not wait for a retransmission.
    #[test]
    fn a_probe_without_answer_ends_at_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = listener.local_addr().expect("addr");
        // backlog 0: the kernel queues one connection (full when more than 0 wait).
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(0).expect("0"))
            .expect("listen");
        // Fill the queue: the first completes, later SYNs are dropped.
        let mut held = Vec::new();
        for _ in 0..2 {
            let fd = nonblocking_socket();
            let _ = connect_within(fd.as_fd(), target, Duration::from_millis(50));
            held.push(fd);
        }
        let fd = nonblocking_socket();
        let start = Instant::now();
        let outcome = connect_within(fd.as_fd(), target, PROBE_DEADLINE);
        let took = start.elapsed();
        assert!(matches!(outcome, Outcome::NoAnswer(_)), "{outcome:?}");
        assert!(took >= PROBE_DEADLINE, "gave up early: {took:?}");
        assert!(took < Duration::from_millis(500), "waited {took:?}");
        let err = ProbeError::NoAnswer {
            target,
            waited_ms: 100,
        };
        assert!(err.lost());
        drop(held);
    }

    #[test]
    fn a_choice_reads_as_before() {
        assert_eq!(ProbeResult::Slot(17).to_string(), "slot 17");
        assert_eq!(ProbeResult::NoSocket.to_string(), "no socket");
    }

    #[test]
    fn refused_and_accepted_are_told_apart() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = listener.local_addr().expect("addr");
        let fd = nonblocking_socket();
        assert_eq!(
            connect_within(fd.as_fd(), target, PROBE_DEADLINE),
            Outcome::Connected
        );
        drop(listener);
        let fd = nonblocking_socket();
        assert_eq!(
            connect_within(fd.as_fd(), target, PROBE_DEADLINE),
            Outcome::Refused
        );
    }
}
