//! A service as the rest of the daemon sees it, once checked.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use handoff_common::check::CheckSpec;

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
    /// How promotes hand traffic over, unless a promote says otherwise.
    pub release: ReleaseSettings,
}

/// How a service's promotes hand traffic over when the promote does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseSettings {
    /// The check every promote runs first (none: only promotes that ask are checked).
    pub check: Option<CheckSpec>,
    /// How long a check may take, retries included.
    pub check_timeout: Duration,
    /// The watch window after a promote (none: the previous generation drains at once).
    pub watch: Option<Duration>,
    /// Where handoffd offers the service an sd_notify socket (none: it offers none), and
    /// where it forwards what arrives there.
    pub notify: Option<NotifySettings>,
}

impl Default for ReleaseSettings {
    fn default() -> Self {
        Self {
            check: None,
            check_timeout: DEFAULT_CHECK_TIMEOUT,
            watch: None,
            notify: None,
        }
    }
}

/// The default of `check_timeout`.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A service's readiness socket: a process of the service's uid that sends `READY=1`
/// there is promoted (after its check), with no operator command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifySettings {
    /// The socket's path.
    pub socket: PathBuf,
    /// Where every datagram is forwarded (systemd's own notify socket for a
    /// `Type=notify` unit), if anywhere.
    pub forward: Option<PathBuf>,
}
