//! The release settings as written, in the configuration file and as handoffd's flags:
//! a service's default check, its timeout, its watch window, and its notify socket.
//! Each function here reads one value and refuses it with one line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use handoff_common::check::CheckSpec;
use handoff_common::proto::{MAX_CHECK_TIMEOUT_MS, MAX_WATCH_MS};

use super::{ConfigError, NotifySettings, parse_duration};

/// The longest check timeout, the control protocol's [`MAX_CHECK_TIMEOUT_MS`] (1 h).
pub const MAX_CHECK_TIMEOUT: Duration = Duration::from_millis(MAX_CHECK_TIMEOUT_MS);

/// The longest watch window, the control protocol's [`MAX_WATCH_MS`] (24 h).
pub const MAX_WATCH: Duration = Duration::from_millis(MAX_WATCH_MS);

/// The shortest check timeout or watch window: promotes count them in milliseconds.
pub const MIN_RELEASE_DURATION: Duration = Duration::from_millis(1);

/// The longest path of a unix socket, in bytes (`sun_path` less its final NUL); also the
/// longest name of an abstract one.
pub const MAX_SOCKET_PATH: usize = 107;

/// A setting that may be turned off: a value, or none when `none` or `off` was written,
/// which turns off what a default turned on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrOff<T>(pub Option<T>);

/// `none` or `off`.
pub(crate) fn is_off(s: &str) -> bool {
    matches!(s, "none" | "off")
}

/// Reads a check (`tcp`, `http:/PATH[:STATUS]`, `https:/PATH[:STATUS]`) or `none`/`off`.
pub fn parse_check(s: &str) -> Result<OrOff<CheckSpec>, ConfigError> {
    if is_off(s) {
        return Ok(OrOff(None));
    }
    s.parse()
        .map(|c| OrOff(Some(c)))
        .map_err(ConfigError::Check)
}

/// Reads a check timeout: a duration from 1 ms to [`MAX_CHECK_TIMEOUT`].
pub fn parse_check_timeout(s: &str) -> Result<Duration, ConfigError> {
    bounded(s, MAX_CHECK_TIMEOUT).ok_or_else(|| ConfigError::CheckTimeout(s.to_string()))
}

/// Reads a watch window: a duration from 1 ms to [`MAX_WATCH`], or `none`/`off`.
pub fn parse_watch(s: &str) -> Result<OrOff<Duration>, ConfigError> {
    if is_off(s) {
        return Ok(OrOff(None));
    }
    bounded(s, MAX_WATCH)
        .map(|d| OrOff(Some(d)))
        .ok_or_else(|| ConfigError::Watch(s.to_string()))
}

/// A duration from [`MIN_RELEASE_DURATION`] to `max`, if `s` is one.
fn bounded(s: &str, max: Duration) -> Option<Duration> {
    parse_duration(s)
        .ok()
        .filter(|d| (MIN_RELEASE_DURATION..=max).contains(d))
}

/// Reads the path handoffd binds a service's notify socket at: absolute, naming a file,
/// at most [`MAX_SOCKET_PATH`] bytes.
pub fn parse_notify_socket(s: &str) -> Result<PathBuf, ConfigError> {
    let bad = |reason| ConfigError::NotifySocket {
        value: s.to_string(),
        reason,
    };
    if !s.starts_with('/') {
        return Err(bad("give an absolute path (e.g. /run/handoff/web.notify)"));
    }
    socket_path(s).map_err(bad)
}

/// Reads where a notify socket forwards what it receives: an absolute path (systemd's
/// `/run/systemd/notify`) or `@NAME`, an abstract socket, as `$NOTIFY_SOCKET` gives them.
pub fn parse_notify_forward(s: &str) -> Result<PathBuf, ConfigError> {
    let bad = |reason| ConfigError::NotifyForward {
        value: s.to_string(),
        reason,
    };
    match s.strip_prefix('@') {
        Some("") => Err(bad("@ needs a name after it")),
        Some(name) if name.len() > MAX_SOCKET_PATH => Err(bad(
            "an abstract socket's name is at most 107 bytes after the @",
        )),
        Some(_) if s.contains('\0') => Err(bad("it holds a NUL character")),
        Some(_) => Ok(PathBuf::from(s)),
        None if !s.starts_with('/') => Err(bad(
            "give an absolute path or @NAME for an abstract socket (e.g. /run/systemd/notify)",
        )),
        None => socket_path(s).map_err(bad),
    }
}

/// An absolute path a unix socket can have, or why not.
fn socket_path(s: &str) -> Result<PathBuf, &'static str> {
    if s.contains('\0') {
        Err("it holds a NUL character")
    } else if s.ends_with('/') {
        Err("it ends in '/': name the socket itself")
    } else if s.len() > MAX_SOCKET_PATH {
        Err("it is longer than 107 bytes, the most a unix socket's path can be")
    } else {
        Ok(PathBuf::from(s))
    }
}

/// A service's notify settings from its socket and forward, each checked already: a
/// forward needs a socket, and cannot be that socket.
pub fn notify_settings(
    socket: Option<PathBuf>,
    forward: Option<PathBuf>,
) -> Result<Option<NotifySettings>, ConfigError> {
    match (socket, forward) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(ConfigError::ForwardAlone),
        (Some(socket), Some(forward)) if same_path(&socket, &forward) => {
            Err(ConfigError::ForwardLoop(forward))
        }
        (Some(socket), forward) => Ok(Some(NotifySettings { socket, forward })),
    }
}

/// Two paths that name one file as written (`/a//b` and `/a/b/.` too).
fn same_path(a: &Path, b: &Path) -> bool {
    a.components().eq(b.components())
}
