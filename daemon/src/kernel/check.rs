//! Health-check connections: a connection from handoffd to one exact listener of a
//! generation, through the group's own address.
//!
//! Like a probe (see [`crate::kernel::probe`]), a check connection is registered in the
//! group's `probes` map by its exact source address and ephemeral port before the
//! connect; unlike a probe, its registration names a slot, and the program sends the SYN
//! to the listener in that slot and to no other. That is how a candidate is checked
//! through the very sockets clients will reach, before any client is steered to them:
//! no client SYN matches a registration (see `probe_of` in handoff.bpf.c), so none is
//! ever sent to a candidate's slot by it.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::time::Instant;

use handoff_common::maps::{PROBE_NO_SOCKET, PROBE_UNSET, ProbeKey};
use nix::errno::Errno;

use super::loader::{LoaderError, ProbeMap};
use super::probe::{self, Outcome, ProbeError};

/// Why a check connection did not reach its listener.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket could not be made.
    #[error(transparent)]
    Socket(#[from] ProbeError),
    /// The registration could not be written or read.
    #[error(transparent)]
    Map(#[from] LoaderError),
    /// The slot holds no socket: the listener closed.
    #[error("the listener is gone")]
    Gone,
    /// Refused after the program sent it to the listener (it closed meanwhile).
    #[error("connection refused")]
    Refused,
    /// No program of handoff's saw the SYN.
    #[error("handoff's program did not see the check connection (the group lost it)")]
    NotSeen,
    /// The program sent it to another slot (never, unless the map is not handoff's).
    #[error("the check connection reached slot {0}, not the listener's")]
    Elsewhere(u32),
    /// No handshake in time: the listener's accept queue may be full.
    #[error("no handshake within {waited_ms} ms")]
    Timeout {
        /// How long it waited.
        waited_ms: u64,
    },
    /// Any other connect error.
    #[error("connect failed")]
    Failed(#[source] Errno),
}

/// Connects through `target` (the group's address: loopback for a wildcard group) to
/// the listener in `slot`, waiting until `deadline` at most; returns the connected
/// stream in blocking mode.
pub fn connect(
    map: &mut ProbeMap,
    target: SocketAddr,
    slot: u32,
    deadline: Instant,
) -> Result<TcpStream, ConnectError> {
    let (fd, source) = probe::bound_socket(target)?;
    let key = ProbeKey::new(source, target);
    map.register_check(key, slot)?;
    let outcome = probe::connect_within(
        fd.as_fd(),
        target,
        deadline.saturating_duration_since(Instant::now()),
    );
    let chosen = map.chosen(key);
    map.unregister(key);
    let chosen = chosen?;
    match outcome {
        Outcome::Connected if chosen == slot => {
            let stream = TcpStream::from(fd);
            stream.set_nonblocking(false).map_err(|e| {
                ConnectError::Failed(Errno::from_raw(e.raw_os_error().unwrap_or(0)))
            })?;
            Ok(stream)
        }
        Outcome::Connected | Outcome::Refused if chosen == PROBE_UNSET => {
            Err(ConnectError::NotSeen)
        }
        Outcome::Connected => Err(ConnectError::Elsewhere(chosen)),
        Outcome::Refused if chosen == PROBE_NO_SOCKET => Err(ConnectError::Gone),
        Outcome::Refused => Err(ConnectError::Refused),
        Outcome::NoAnswer(waited) => Err(ConnectError::Timeout {
            waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
        }),
        Outcome::Failed(e) => Err(ConnectError::Failed(e)),
    }
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
