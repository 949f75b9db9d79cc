//! The probe: a connection from a reserved source port that the kernel program
//! recognises, answers with the slot it would have chosen, and drops.
//!
//! It is the only way to see what the kernel does: no interface reads back a group's
//! program, so a program attached by someone else would otherwise go unnoticed.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use handoff_common::maps::{PROBE_PORT_FIRST, PROBE_PORTS, PROBE_UNSET};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike, bind, connect,
    setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

use crate::loader::{GroupProgram, LoaderError};

/// Why a probe gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Every probe source port is in use.
    #[error("no free probe source port in {PROBE_PORT_FIRST}..{}", PROBE_PORT_FIRST + PROBE_PORTS)]
    NoPort,
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
        "the probe to {target} was not seen by handoff's program: another sk_reuseport program may have replaced it, or a more specific listener takes the address"
    )]
    NotSeen {
        /// Where the probe went.
        target: SocketAddr,
    },
    /// Reading or resetting the probe map failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
}

/// What the kernel program chose for a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    /// The slot it selected.
    Slot(u32),
    /// No socket of the active or previous generation: it left the choice to the kernel.
    NoSocket,
}

/// Connects from a probe port on `target`'s loopback address to `target` and returns
/// the program's choice.
pub fn probe(program: &mut GroupProgram, target: SocketAddr) -> Result<ProbeResult, ProbeError> {
    let family = match target {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    for index in 0..u32::from(PROBE_PORTS) {
        let port = PROBE_PORT_FIRST + index as u16;
        let fd =
            socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(|source| {
                ProbeError::Socket {
                    op: "socket",
                    source,
                }
            })?;
        let source_addr = SocketAddr::new(target.ip(), port);
        match bind(fd.as_raw_fd(), sockaddr(&source_addr).as_ref()) {
            Ok(()) => {}
            // Another prober (another daemon, a test) holds this port: take the next.
            Err(Errno::EADDRINUSE) => continue,
            Err(source) => return Err(ProbeError::Socket { op: "bind", source }),
        }
        // A lost SYN would be retransmitted after 1 s; on loopback the answer is at once.
        let timeout = TimeVal::from(libc::timeval {
            tv_sec: 3,
            tv_usec: 0,
        });
        setsockopt(&fd, sockopt::SendTimeout, &timeout).map_err(|source| ProbeError::Socket {
            op: "setsockopt",
            source,
        })?;
        program.reset_probe(index)?;
        return match connect(fd.as_raw_fd(), sockaddr(&target).as_ref()) {
            // The program dropped the SYN: the kernel answered with a reset.
            Err(Errno::ECONNREFUSED) => match program.probe_result(index)? {
                PROBE_UNSET => Err(ProbeError::NotSeen { target }),
                slot if slot == handoff_common::maps::PROBE_NO_SOCKET => Ok(ProbeResult::NoSocket),
                slot => Ok(ProbeResult::Slot(slot)),
            },
            Ok(()) => Err(ProbeError::NotSeen { target }),
            Err(source) => Err(ProbeError::Socket {
                op: "connect",
                source,
            }),
        };
    }
    Err(ProbeError::NoPort)
}

fn sockaddr(addr: &SocketAddr) -> Box<dyn SockaddrLike> {
    match addr {
        SocketAddr::V4(a) => Box::new(SockaddrIn::from(*a)),
        SocketAddr::V6(a) => Box::new(SockaddrIn6::from(*a)),
    }
}
