//! `--notify-ready`: systemd's readiness protocol, `READY=1` in one datagram to
//! `$NOTIFY_SOCKET`.

use std::ffi::OsString;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use super::serve::log_line;
use super::{ServerConfig, ServerError};

/// The variable naming the socket.
pub(super) const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// `$NOTIFY_SOCKET` when `--notify-ready` asks for it (an error when it is unset), none
/// otherwise: checked before anything listens.
pub(super) fn notify_socket(cfg: &ServerConfig) -> Result<Option<OsString>, ServerError> {
    if !cfg.notify_ready {
        return Ok(None);
    }
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(socket) if !socket.is_empty() => Ok(Some(socket)),
        _ => Err(ServerError::NoNotifySocket),
    }
}

/// Sends `READY=1` to `socket` (a path, or `@name`) and logs `notify NAME pid=PID ns=NS`
/// (NS: CLOCK_MONOTONIC just before the send), or `notify-failed NAME pid=PID error=…`.
pub(super) fn send_ready(cfg: &ServerConfig, socket: &OsString) {
    let pid = std::process::id();
    let ns = crate::load::monotonic_ns();
    match send(socket, b"READY=1") {
        Ok(()) => log_line(&format!("notify {} pid={pid} ns={ns}", cfg.name)),
        Err(e) => log_line(&format!("notify-failed {} pid={pid} error={e}", cfg.name)),
    }
}

/// One datagram of `state` to the notify socket `socket`.
pub(super) fn send(socket: &OsString, state: &[u8]) -> io::Result<()> {
    let bytes = socket.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(socket)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state, &addr)?;
    Ok(())
}
