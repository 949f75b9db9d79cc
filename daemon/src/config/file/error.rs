//! A refused configuration file, and the place in it that is refused.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::config::ConfigError;

/// A place in a configuration file, shown as `FILE:LINE:COLUMN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub path: PathBuf,
    /// The line, from 1.
    pub line: usize,
    /// The column in characters, from 1.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.path.display(), self.line, self.column)
    }
}

/// A refused configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("{}: cannot be read", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not TOML, a value of the wrong type, an unknown key or a missing one.
    #[error("{at}: {message}")]
    Syntax {
        /// Where (the start of the file when toml gives no place).
        at: Location,
        /// toml's message, on one line.
        message: String,
    },
    /// A signal, a duration or a service that the daemon's own checks refuse.
    #[error("{at}: {reason}")]
    Invalid {
        /// The offending value.
        at: Location,
        /// What is wrong with it (boxed: it is large, and refusals are rare).
        reason: Box<ConfigError>,
    },
    /// A listen entry that is not an address with a port.
    #[error("{at}: {value:?} is not an address with a port (e.g. 0.0.0.0:8080 or [::]:8080)")]
    Address {
        /// The entry.
        at: Location,
        /// Its text.
        value: String,
    },
    /// A service without an address.
    #[error("{at}: service {service} has no address; list every address it listens on")]
    NoListen {
        /// Its `listen` value.
        at: Location,
        /// The service.
        service: String,
    },
    /// Two services with one name.
    #[error("{at}: service {name} is already defined on line {first_line}")]
    DuplicateName {
        /// The second name.
        at: Location,
        /// The name.
        name: String,
        /// The line of the first.
        first_line: usize,
    },
    /// Two services on one port.
    #[error(
        "{at}: service {service}: port {port} is already service {other}'s (line {other_line}); two services cannot steer one port"
    )]
    DuplicatePort {
        /// The second service's address on that port.
        at: Location,
        /// The second service.
        service: String,
        /// The port.
        port: u16,
        /// The first service.
        other: String,
        /// The line of the first service's address.
        other_line: usize,
    },
    /// Two services with one notify socket.
    #[error(
        "{at}: service {service}: {} is already service {other}'s notify socket (line {other_line})",
        path.display()
    )]
    DuplicateNotify {
        /// The second service's `notify_socket`.
        at: Location,
        /// The second service.
        service: String,
        /// The socket's path.
        path: PathBuf,
        /// The first service.
        other: String,
        /// The line of the first service's `notify_socket`.
        other_line: usize,
    },
    /// A file without a service.
    #[error("{}: no [[service]]", path.display())]
    NoService {
        /// The file.
        path: PathBuf,
    },
}
