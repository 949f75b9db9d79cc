//! A service as the rest of the daemon sees it, once checked.

use std::net::SocketAddr;

use super::DrainSettings;

/// A service as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Its name (used in paths: letters, digits, `-`, `_`).
    pub name: String,
    /// Its addresses, all on one port.
    pub listen: Vec<SocketAddr>,
    /// Signals and deadlines of its drains.
    pub drain: DrainSettings,
    /// The uid its processes run as when it is not the promoted process's own (`user`):
    /// descendants of that uid are members, and may hold the listeners.
    pub user: Option<u32>,
}
