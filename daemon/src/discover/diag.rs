//! TCP socket dumps over NETLINK_SOCK_DIAG (inet_diag).
//!
//! The kernel is the source of truth for what listens where: a dump gives, per socket,
//! the inode that links it to a process's fd, the cookie that names it for its whole
//! life, the owner uid, the bound device and, for IPv6, `IPV6_V6ONLY` — every part of
//! the reuseport group tuple.

use std::net::SocketAddr;

use netlink_packet_core::{
    DecodeError, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// `TCP_LISTEN` in the kernel's state numbering.
pub const TCP_LISTEN: u8 = 10;

/// Errors of a sock_diag dump.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    /// The netlink socket could not be opened, bound or used.
    #[error("sock_diag netlink {op} failed")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel answered the dump with an error. (The cause is in the message too:
    /// callers log these with `%e`, which shows no source.)
    #[error("sock_diag dump refused by the kernel: {0}")]
    Kernel(#[source] std::io::Error),
    /// A message could not be decoded.
    #[error("undecodable sock_diag message: {0}")]
    Decode(#[source] DecodeError),
    /// The netlink socket ended before the dump did.
    #[error("undecodable sock_diag message: netlink socket closed mid-dump")]
    Closed,
    /// A message claimed a length of zero (walking on would loop forever).
    #[error("undecodable sock_diag message: zero-length netlink message")]
    ZeroLength,
}

/// One TCP socket as sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    /// Kernel TCP state (`TCP_LISTEN` = 10, established = 1, ...).
    pub state: u8,
    /// Local address and port.
    pub local: SocketAddr,
    /// Remote address and port (unspecified for listeners).
    pub remote: SocketAddr,
    /// Bound device index (`SO_BINDTODEVICE`), 0 if none.
    pub ifindex: u32,
    /// Owner uid.
    pub uid: u32,
    /// Inode of the socket file; 0 once no file refers to it.
    pub inode: u32,
    /// The socket cookie, unique for the socket's life.
    pub cookie: u64,
    /// `IPV6_V6ONLY` for IPv6 sockets, `None` for IPv4.
    pub v6only: Option<bool>,
    /// Listeners: connections waiting in the accept queue. Others: unread bytes.
    pub recv_queue: u32,
}

/// Dumps the TCP sockets of the daemon's network namespace in `states` on local `port`.
///
/// The kernel filters both: it walks the listening hash only when `states` has LISTEN,
/// the established hash only when it has another state, and skips sockets of another
/// local port (`idiag_sport`) before building a message, so a LISTEN dump costs in
/// proportion to the host's listeners and answers with those on `port` alone.
pub fn dump_tcp(states: StateFlags, port: u16) -> Result<Vec<DiagSocket>, DiagError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(|source| DiagError::Io {
        op: "socket",
        source,
    })?;
    socket
        .bind_auto()
        .map_err(|source| DiagError::Io { op: "bind", source })?;
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .map_err(|source| DiagError::Io {
            op: "connect",
            source,
        })?;
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        id.source_port = port;
        dump_family(&socket, family, states.clone(), id, &mut out)?;
    }
    // Port 0 is no filter for the kernel; no socket is bound there either.
    out.retain(|s| s.local.port() == port);
    Ok(out)
}

fn dump_family(
    socket: &Socket,
    family: u8,
    states: StateFlags,
    socket_id: SocketId,
    out: &mut Vec<DiagSocket>,
) -> Result<(), DiagError> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut request = vec![0; packet.buffer_len()];
    packet.serialize(&mut request);
    socket
        .send(&request, 0)
        .map_err(|source| DiagError::Io { op: "send", source })?;

    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = socket
            .recv(&mut &mut buf[..], 0)
            .map_err(|source| DiagError::Io { op: "recv", source })?;
        if n == 0 {
            return Err(DiagError::Closed);
        }
        // One datagram carries several messages; walk them by their own length.
        let mut offset = 0;
        while offset < n {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..n])
                .map_err(DiagError::Decode)?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => return Err(DiagError::Kernel(e.to_io())),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    out.push(DiagSocket {
                        state: r.header.state,
                        local: SocketAddr::new(
                            r.header.socket_id.source_address,
                            r.header.socket_id.source_port,
                        ),
                        remote: SocketAddr::new(
                            r.header.socket_id.destination_address,
                            r.header.socket_id.destination_port,
                        ),
                        ifindex: r.header.socket_id.interface_id,
                        uid: r.header.uid,
                        inode: r.header.inode,
                        cookie: cookie(r.header.socket_id.cookie),
                        v6only: r.nlas.iter().find_map(|nla| match nla {
                            Nla::SkV6Only(v) => Some(*v),
                            _ => None,
                        }),
                        recv_queue: r.header.recv_queue,
                    });
                }
                _ => {}
            }
            if len == 0 {
                return Err(DiagError::ZeroLength);
            }
            // Messages are 4-byte aligned within the datagram.
            offset += (len + 3) & !3;
        }
    }
}

/// The kernel stores the cookie as two host-order u32s, low half first.
fn cookie(raw: [u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let hi = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    (u64::from(hi) << 32) | u64::from(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_dump_names_the_kernel_error() {
        let e = DiagError::Kernel(std::io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(
            crate::logging::one_line(&e),
            "sock_diag dump refused by the kernel: Operation not permitted (os error 1)"
        );
        assert_eq!(e.to_string(), crate::logging::one_line(&e));
        assert_eq!(
            DiagError::Closed.to_string(),
            "undecodable sock_diag message: netlink socket closed mid-dump"
        );
    }
}
