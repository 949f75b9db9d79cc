//! Daemon settings: services and where the daemon keeps its state; [`file`](mod@file)
//! reads them from the configuration file.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub mod file;
mod release;
mod service;

use handoff_common::check::{CheckSpec, CheckSpecError};

pub use release::{
    MAX_CHECK_TIMEOUT, MAX_SOCKET_PATH, MAX_WATCH, MIN_RELEASE_DURATION, OrOff, notify_settings,
    parse_check, parse_check_timeout, parse_notify_forward, parse_notify_socket, parse_watch,
};
pub use service::{DEFAULT_CHECK_TIMEOUT, NotifySettings, ReleaseSettings, ServiceConfig};

/// Default state directory: control socket, lock, generation table.
pub const DEFAULT_STATE_DIR: &str = "/run/handoff";

/// The longest duration accepted (drain timeout, kill-after): 30 days. A drain is a
/// restart's tail, minutes at most; a longer value is a typo, and one near `u64::MAX`
/// seconds cannot even be added to the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The most addresses a service may list: each is a reuseport group with a steering
/// program and maps of its own.
pub const MAX_LISTEN: usize = 64;

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
    /// Not a signal.
    #[error("{0:?} is not a signal (give a name like SIGTERM, TERM or a number 1-64)")]
    Signal(String),
    /// Not a duration, or not a positive one.
    #[error("{0:?} is not a positive duration (e.g. 500ms, 90s, 5m, 1h)")]
    Duration(String),
    /// Longer than [`MAX_DURATION`].
    #[error(
        "{0:?} is longer than 30 days, the longest drain timeout or kill-after handoffd accepts (a drain is a restart's tail; give e.g. 5m or 1h)"
    )]
    DurationTooLong(String),
    /// More than [`MAX_LISTEN`] addresses.
    #[error("service {service} lists {count} addresses; at most {MAX_LISTEN} are supported")]
    TooManyAddresses {
        /// The service.
        service: String,
        /// How many it lists.
        count: usize,
    },
    /// Flags override a config file of one service only.
    #[error(
        "flags override the service of a config file with one service; this one has {0} (set them in the file)"
    )]
    Overrides(usize),
    /// Names end up in paths and metrics labels.
    #[error("service name {0:?} is not 1-64 characters of letters, digits, '-' or '_'")]
    Name(String),
    /// Not a user of this host.
    #[error("user {0:?} is neither a user name of this host nor a uid (0-4294967294)")]
    User(String),
    /// Not a check (its own message says what one is).
    #[error("{0}")]
    Check(CheckSpecError),
    /// Not a duration from 1 ms to [`MAX_CHECK_TIMEOUT`].
    #[error("{0:?} is not a check timeout: give a duration from 1ms to 1h (e.g. 500ms, 5s, 1m)")]
    CheckTimeout(String),
    /// Not a duration from 1 ms to [`MAX_WATCH`], nor `none`.
    #[error("{0:?} is not a watch window: give a duration from 1ms to 24h (e.g. 30s, 5m), or none")]
    Watch(String),
    /// Not a path handoffd can bind a notify socket at.
    #[error("{value:?} is not a notify socket's path: {reason}")]
    NotifySocket {
        /// The text given.
        value: String,
        /// Why not.
        reason: &'static str,
    },
    /// Not a socket a notify socket can forward to.
    #[error("{value:?} is not a notify socket to forward to: {reason}")]
    NotifyForward {
        /// The text given.
        value: String,
        /// Why not.
        reason: &'static str,
    },
    /// A forward without the service's notify socket, whose messages it forwards.
    #[error(
        "a notify forward needs the service's notify socket (notify_socket, --notify-socket): it forwards what arrives there"
    )]
    ForwardAlone,
    /// A notify socket that forwards to itself.
    #[error(
        "the notify forward {0:?} is the service's notify socket itself: every message would come back"
    )]
    ForwardLoop(PathBuf),
}

/// A signal, by number; parsed from a name (`SIGTERM`, `term`) or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub i32);

impl FromStr for Sig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::Signal(s.to_string());
        if let Ok(n) = s.parse::<i32>() {
            // Every signal the kernel knows, realtime ones included.
            return if (1..=64).contains(&n) {
                Ok(Sig(n))
            } else {
                Err(bad())
            };
        }
        let upper = s.trim().to_ascii_uppercase();
        let name = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        nix::sys::signal::Signal::from_str(&name)
            .map(|sig| Sig(sig as i32))
            .map_err(|_| bad())
    }
}

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match nix::sys::signal::Signal::try_from(self.0) {
            Ok(sig) => f.write_str(sig.as_str()),
            Err(_) => write!(f, "signal {}", self.0),
        }
    }
}

/// Parses a positive duration of at most [`MAX_DURATION`]: a number with a unit `ms`,
/// `s`, `m` or `h` (`s` if none).
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::Duration(s.to_string());
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let seconds = value * scale;
    if seconds.is_infinite() || seconds > MAX_DURATION.as_secs_f64() {
        return Err(ConfigError::DurationTooLong(s.to_string()));
    }
    let d = Duration::try_from_secs_f64(seconds).map_err(|_| bad())?;
    if d.is_zero() { Err(bad()) } else { Ok(d) }
}

/// What happens to a generation once it drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSettings {
    /// Sent to the generation's leader when it starts draining (none by default).
    pub drain_signal: Option<Sig>,
    /// Sent when its last connection is gone (or at the drain timeout).
    pub retire_signal: Sig,
    /// How long a drain may take before the retire signal is sent anyway.
    pub drain_timeout: Duration,
    /// After the retire signal, SIGKILL every member still alive this much later.
    pub kill_after: Option<Duration>,
}

impl Default for DrainSettings {
    fn default() -> Self {
        Self {
            drain_signal: None,
            retire_signal: Sig(libc::SIGTERM),
            drain_timeout: Duration::from_secs(300),
            kill_after: None,
        }
    }
}

/// Settings given as flags: they make the one service when there is no `--config`, and
/// override the single service of a config file otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Vec<SocketAddr>,
    /// `--service`.
    pub service: Option<String>,
    /// `--drain-signal`.
    pub drain_signal: Option<Sig>,
    /// `--retire-signal`.
    pub retire_signal: Option<Sig>,
    /// `--drain-timeout`.
    pub drain_timeout: Option<Duration>,
    /// `--kill-after`.
    pub kill_after: Option<Duration>,
    /// `--user`, resolved to a uid.
    pub user: Option<u32>,
    /// `--check` (`--check none` turns the file's off).
    pub check: Option<OrOff<CheckSpec>>,
    /// `--check-timeout`.
    pub check_timeout: Option<Duration>,
    /// `--watch` (`--watch none` turns the file's off).
    pub watch: Option<OrOff<Duration>>,
    /// `--notify-socket`.
    pub notify_socket: Option<PathBuf>,
    /// `--notify-forward`.
    pub notify_forward: Option<PathBuf>,
}

impl Overrides {
    fn any(&self) -> bool {
        *self != Overrides::default()
    }

    fn drain(&self, base: DrainSettings) -> DrainSettings {
        DrainSettings {
            drain_signal: self.drain_signal.or(base.drain_signal),
            retire_signal: self.retire_signal.unwrap_or(base.retire_signal),
            drain_timeout: self.drain_timeout.unwrap_or(base.drain_timeout),
            kill_after: self.kill_after.or(base.kill_after),
        }
    }

    /// `base` with the release flags applied; a forward flag needs a notify socket, the
    /// file's or the flag's.
    fn release(&self, base: ReleaseSettings) -> Result<ReleaseSettings, ConfigError> {
        let (socket, forward) = match base.notify {
            Some(n) => (Some(n.socket), n.forward),
            None => (None, None),
        };
        Ok(ReleaseSettings {
            check: match &self.check {
                Some(OrOff(check)) => check.clone(),
                None => base.check,
            },
            check_timeout: self.check_timeout.unwrap_or(base.check_timeout),
            watch: self.watch.as_ref().map_or(base.watch, |w| w.0),
            notify: notify_settings(
                self.notify_socket.clone().or(socket),
                self.notify_forward.clone().or(forward),
            )?,
        })
    }

    /// The services to run: those of the file (if any) with the flags applied.
    pub fn apply(
        &self,
        file: Option<Vec<ServiceConfig>>,
    ) -> Result<Vec<ServiceConfig>, ConfigError> {
        let Some(mut services) = file else {
            let name = self.service.as_deref().unwrap_or("default");
            let made = service(name, &self.listen, self.drain(DrainSettings::default()))?;
            return Ok(vec![ServiceConfig {
                user: self.user,
                release: self.release(ReleaseSettings::default())?,
                ..made
            }]);
        };
        if !self.any() {
            return Ok(services);
        }
        if services.len() != 1 {
            return Err(ConfigError::Overrides(services.len()));
        }
        let base = services.remove(0);
        let name = self.service.clone().unwrap_or(base.name);
        let listen = if self.listen.is_empty() {
            base.listen
        } else {
            self.listen.clone()
        };
        let made = service(&name, &listen, self.drain(base.drain))?;
        Ok(vec![ServiceConfig {
            user: self.user.or(base.user),
            release: self.release(base.release)?,
            ..made
        }])
    }
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
pub fn service(
    name: &str,
    listen: &[SocketAddr],
    drain: DrainSettings,
) -> Result<ServiceConfig, ConfigError> {
    check_name(name)?;
    let first = *listen
        .first()
        .ok_or_else(|| ConfigError::NoListen(name.to_string()))?;
    if listen.len() > MAX_LISTEN {
        return Err(ConfigError::TooManyAddresses {
            service: name.to_string(),
            count: listen.len(),
        });
    }
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
        drain,
        user: None,
        release: ReleaseSettings::default(),
    })
}

/// Resolves a service's `user` (a name of this host's user database, or a uid) to a uid.
pub fn resolve_user(s: &str) -> Result<u32, ConfigError> {
    let bad = || ConfigError::User(s.to_string());
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        // (uid_t)-1 means "no change" to the kernel: never a process's uid.
        return t
            .parse::<u32>()
            .ok()
            .filter(|&u| u != u32::MAX)
            .ok_or_else(bad);
    }
    match nix::unistd::User::from_name(t) {
        Ok(Some(user)) => Ok(user.uid.as_raw()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests;
