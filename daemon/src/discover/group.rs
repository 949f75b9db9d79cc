//! The kernel's reuseport groups, as handoff names them.

use std::fmt;
use std::net::SocketAddr;

use crate::discover::diag::DiagSocket;

/// What makes two listening sockets share a reuseport group (besides the network
/// namespace, which is always the daemon's): exact address and port, IPV6_V6ONLY, bound
/// device, owner uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct GroupKey {
    /// Bound address and port.
    pub addr: SocketAddr,
    /// IPV6_V6ONLY for IPv6 sockets.
    pub v6only: Option<bool>,
    /// SO_BINDTODEVICE ifindex, 0 if unbound.
    pub ifindex: u32,
    /// Owner uid.
    pub uid: u32,
}

impl GroupKey {
    /// The group of a socket sock_diag reported.
    pub fn of(s: &DiagSocket) -> Self {
        Self {
            addr: s.local,
            v6only: s.v6only,
            ifindex: s.ifindex,
            uid: s.uid,
        }
    }

    /// The loopback-reachable address a probe connects to for this group.
    pub fn probe_target(&self) -> SocketAddr {
        let mut target = self.addr;
        if target.ip().is_unspecified() {
            target.set_ip(match target {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        target
    }
}

impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        match self.v6only {
            Some(true) => write!(f, " v6only")?,
            Some(false) => write!(f, " dual-stack")?,
            None => {}
        }
        if self.ifindex != 0 {
            write!(f, " device {}", self.ifindex)?;
        }
        write!(f, " uid {}", self.uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_every_part_of_the_tuple() {
        let k = GroupKey {
            addr: "[::]:8080".parse().unwrap(),
            v6only: Some(false),
            ifindex: 1,
            uid: 1000,
        };
        assert_eq!(k.to_string(), "[::]:8080 dual-stack device 1 uid 1000");
        assert_eq!(k.probe_target(), "[::1]:8080".parse().unwrap());
        let v4 = GroupKey {
            addr: "0.0.0.0:80".parse().unwrap(),
            v6only: None,
            ifindex: 0,
            uid: 0,
        };
        assert_eq!(v4.to_string(), "0.0.0.0:80 uid 0");
        assert_eq!(v4.probe_target(), "127.0.0.1:80".parse().unwrap());
    }
}
