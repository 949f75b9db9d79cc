//! The control socket: one daemon per state directory (`lock`), peers checked by their
//! credentials, one framed request per connection (`server`), and the client side that
//! `handoffctl` uses (`client`). Both sides read a frame with
//! [`handoff_common::proto::FrameReader`].

mod client;
mod lock;
mod server;

use std::io;
use std::path::{Path, PathBuf};

pub use client::{CallerPidfdError, ClientError, caller_pidfd, request, request_with_fd};
pub use lock::{Start, lock_state_dir};
pub use server::serve;

use crate::persist::dirs::DirError;

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another daemon holds the state directory.
    #[error(
        "another handoffd uses state directory {0} (its lock is held); stop it first, or give this one its own --state-dir"
    )]
    Locked(PathBuf),
    /// A live daemon answers on the socket path.
    #[error(
        "another handoffd is serving {0}; stop it first, or give this one its own --control-socket"
    )]
    InUse(PathBuf),
    /// The state directory or the socket's directory is not trusted.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// Something that is not a socket sits at the path.
    #[error("{0} exists and is not a socket; remove it or choose another --control-socket")]
    NotSocket(PathBuf),
    /// A filesystem or socket call failed.
    #[error("{op} {path} failed")]
    Io {
        /// What was done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ControlError + use<> {
    let path = path.to_path_buf();
    move |source| ControlError::Io { op, path, source }
}
