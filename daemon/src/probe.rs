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
use std::os::fd::AsRawFd;

use handoff_common::maps::{PROBE_NO_SOCKET, PROBE_UNSET, ProbeKey};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike, SockaddrStorage,
    bind, connect, getsockname, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

use crate::loader::{GroupProgram, LoaderError};

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
    /// Reading or writing the probe map failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
}

impl ProbeError {
    /// Whether the probe reached a listener without handoff's program deciding: the
    /// group has lost its program (or never had it).
    pub fn lost(&self) -> bool {
        matches!(self, ProbeError::NotSeen { .. })
    }
}

/// What the kernel program chose for a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    /// The slot it selected.
    Slot(u32),
    /// No socket of the active or previous generation: it left the choice to the kernel.
    NoSocket,
}

fn socket_err(op: &'static str) -> impl Fn(Errno) -> ProbeError {
    move |source| ProbeError::Socket { op, source }
}

/// Connects from an ephemeral port on `target`'s own address to `target` and returns the
/// program's choice. `target` is a local address (loopback for a wildcard group).
pub fn probe(program: &mut GroupProgram, target: SocketAddr) -> Result<ProbeResult, ProbeError> {
    let family = match target {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
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
    // A lost SYN would be retransmitted after 1 s; on loopback the answer is at once.
    let timeout = TimeVal::from(libc::timeval {
        tv_sec: 3,
        tv_usec: 0,
    });
    setsockopt(&fd, sockopt::SendTimeout, &timeout).map_err(socket_err("setsockopt"))?;
    let key = ProbeKey::new(source, target);
    program.register_probe(key)?;
    let connected = connect(fd.as_raw_fd(), sockaddr(&target).as_ref());
    let chosen = program.probe_result(key);
    program.unregister_probe(key);
    match connected {
        // The program dropped the SYN: the kernel answered with a reset.
        Err(Errno::ECONNREFUSED) => match chosen? {
            PROBE_UNSET => Err(ProbeError::NotSeen { target }),
            PROBE_NO_SOCKET => Ok(ProbeResult::NoSocket),
            slot => Ok(ProbeResult::Slot(slot)),
        },
        Ok(()) => Err(ProbeError::NotSeen { target }),
        Err(source) => Err(ProbeError::Socket {
            op: "connect",
            source,
        }),
    }
}

fn sockaddr(addr: &SocketAddr) -> Box<dyn SockaddrLike> {
    match addr {
        SocketAddr::V4(a) => Box::new(SockaddrIn::from(*a)),
        SocketAddr::V6(a) => Box::new(SockaddrIn6::from(*a)),
    }
}
