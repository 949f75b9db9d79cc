//! Daemon settings: services and where the daemon keeps its state.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::generation::ServiceConfig;

/// Default state directory: control socket, lock, generation table.
pub const DEFAULT_STATE_DIR: &str = "/run/handoff";

/// A refused configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A service needs at least one address.
    #[error("service {0} has no --listen address")]
    NoListen(String),
    /// A service is served on one port.
    #[error("service {service}: {a} and {b} are on different ports; a service has one port")]
    Ports {
        /// The service.
        service: String,
        /// One address.
        a: SocketAddr,
        /// Another, on another port.
        b: SocketAddr,
    },
    /// The same address twice.
    #[error("service {service}: {addr} is listed twice")]
    Duplicate {
        /// The service.
        service: String,
        /// The address.
        addr: SocketAddr,
    },
    /// Port 0 cannot be steered.
    #[error("service {service}: {addr} has port 0; give the service's real port")]
    PortZero {
        /// The service.
        service: String,
        /// The address.
        addr: SocketAddr,
    },
    /// Names end up in paths and metrics labels.
    #[error("service name {0:?} is not 1-64 characters of letters, digits, '-' or '_'")]
    Name(String),
}

/// Where the daemon keeps what it must find again.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The control socket.
    pub control_socket: PathBuf,
}

impl Paths {
    /// The paths, the control socket defaulting to `STATE_DIR/handoffd.sock`.
    pub fn new(state_dir: PathBuf, control_socket: Option<PathBuf>) -> Self {
        let control_socket = control_socket.unwrap_or_else(|| state_dir.join("handoffd.sock"));
        Self {
            state_dir,
            control_socket,
        }
    }

    /// The lock file that makes one daemon per state directory.
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join("handoffd.lock")
    }
}

/// Checks a service name.
pub fn check_name(name: &str) -> Result<(), ConfigError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Name(name.to_string()))
    }
}

/// Checks and builds one service's settings.
pub fn service(name: &str, listen: &[SocketAddr]) -> Result<ServiceConfig, ConfigError> {
    check_name(name)?;
    let first = *listen
        .first()
        .ok_or_else(|| ConfigError::NoListen(name.to_string()))?;
    for (i, addr) in listen.iter().enumerate() {
        if addr.port() == 0 {
            return Err(ConfigError::PortZero {
                service: name.to_string(),
                addr: *addr,
            });
        }
        if addr.port() != first.port() {
            return Err(ConfigError::Ports {
                service: name.to_string(),
                a: first,
                b: *addr,
            });
        }
        if listen[..i].contains(addr) {
            return Err(ConfigError::Duplicate {
                service: name.to_string(),
                addr: *addr,
            });
        }
    }
    Ok(ServiceConfig {
        name: name.to_string(),
        listen: listen.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_service_has_one_port_and_distinct_addresses() {
        assert!(service("web", &addrs(&["127.0.0.1:80", "[::1]:80"])).is_ok());
        assert!(matches!(
            service("web", &addrs(&["127.0.0.1:80", "[::1]:81"])),
            Err(ConfigError::Ports { .. })
        ));
        assert!(matches!(
            service("web", &addrs(&["127.0.0.1:80", "127.0.0.1:80"])),
            Err(ConfigError::Duplicate { .. })
        ));
        assert!(matches!(
            service("web", &addrs(&["127.0.0.1:0"])),
            Err(ConfigError::PortZero { .. })
        ));
        assert_eq!(
            service("web", &[]),
            Err(ConfigError::NoListen("web".into()))
        );
    }

    #[test]
    fn names_are_path_safe() {
        assert!(check_name("web-1_a").is_ok());
        for bad in ["", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn control_socket_defaults_into_the_state_dir() {
        let p = Paths::new("/run/x".into(), None);
        assert_eq!(p.control_socket, PathBuf::from("/run/x/handoffd.sock"));
        assert_eq!(p.lock_file(), PathBuf::from("/run/x/handoffd.lock"));
    }
}
