//! The state directory's lock, and the start that undoes what it made if it fails.

use std::fs::{self, File};
use std::io;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;

use super::{ControlError, server};
use crate::config::Paths;
use crate::persist::dirs;

/// The lock file's name in the state directory (see [`Paths::lock_file`]).
const LOCK_FILE: &str = "handoffd.lock";

/// Holds the state directory's lock for the daemon's life.
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] Flock<File>);

/// Creates the state directory (0700) if absent, refuses one another user could write
/// (see [`dirs`]), and takes its lock: one daemon per state directory.
pub fn lock_state_dir(paths: &Paths) -> Result<StateLock, ControlError> {
    let dir = dirs::ensure(&paths.state_dir)?;
    let file = dir.lock_file(LOCK_FILE)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map(StateLock)
        .map_err(|_| ControlError::Locked(paths.state_dir.clone()))
}

/// The state directory taken for a start that has not finished: what the start created
/// there (the directory, the lock file, the generation table, the control socket and its
/// directory) is removed again if it is dropped before [`Start::ready`], so a failed start
/// leaves the state directory as it found it. Only what this daemon created is removed,
/// and only while it holds the lock: a daemon refused by another's lock removes nothing.
#[derive(Debug)]
pub struct Start {
    /// Held for the daemon's life.
    _lock: StateLock,
    /// What existed before the start, and what it made.
    paths: Paths,
    created_dir: bool,
    created_lock: bool,
    created_state: bool,
    /// Set once the control socket is bound: (its directory was created by the start).
    socket: Option<bool>,
    socket_dir_existed: bool,
    /// The start finished: nothing is removed.
    ready: bool,
}

impl Start {
    /// Takes the state directory's lock ([`lock_state_dir`]), noting what exists first.
    pub fn lock(paths: &Paths) -> Result<Self, ControlError> {
        let exists = |p: &Path| fs::symlink_metadata(p).is_ok();
        let created_dir = !exists(&paths.state_dir);
        let created_lock = !exists(&paths.lock_file());
        let created_state = !exists(&crate::persist::state::file(&paths.state_dir));
        let socket_dir_existed = paths.control_socket.parent().is_none_or(exists);
        let lock = lock_state_dir(paths)?;
        Ok(Self {
            _lock: lock,
            paths: paths.clone(),
            created_dir,
            created_lock,
            created_state,
            socket: None,
            socket_dir_existed,
            ready: false,
        })
    }

    /// Binds the control socket ([`server::bind`]); it is removed again if the start fails.
    pub fn bind(&mut self) -> Result<UnixListener, ControlError> {
        let listener = server::bind(&self.paths.control_socket)?;
        self.socket = Some(!self.socket_dir_existed);
        Ok(listener)
    }

    /// The start finished: what it made stays (the lock is held until the drop).
    pub fn ready(&mut self) {
        self.ready = true;
    }
}

impl Drop for Start {
    fn drop(&mut self) {
        if self.ready {
            return;
        }
        let remove = |p: &Path| match fs::remove_file(p) {
            Ok(()) => tracing::debug!(path = %p.display(), "removed after a failed start"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::debug!(path = %p.display(), error = %e, "cannot remove after a failed start")
            }
        };
        if let Some(created_dir) = self.socket {
            remove(&self.paths.control_socket);
            if let (true, Some(dir)) = (created_dir, self.paths.control_socket.parent()) {
                let _ = fs::remove_dir(dir);
            }
        }
        if self.created_state {
            remove(&crate::persist::state::file(&self.paths.state_dir));
        }
        if self.created_lock {
            // Still locked by this process: a daemon that opened the file meanwhile was
            // refused, one that opens the path after this finds a new file.
            remove(&self.paths.lock_file());
        }
        if self.created_dir {
            // Only if empty: what anyone else put there stays.
            let _ = fs::remove_dir(&self.paths.state_dir);
        }
    }
}
