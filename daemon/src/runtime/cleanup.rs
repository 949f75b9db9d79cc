//! `handoffd --cleanup`: remove what a stopped daemon left — its pins, its generation
//! table, its socket — and detach its programs where a generation still listens.

use std::path::Path;

use crate::config::Paths;
use crate::kernel::detach::detach;
use crate::persist::dirs::{self, DirError};
use crate::persist::pins;
use crate::persist::state::{self, SavedService, SavedState, StateError};
use crate::runtime::control::{self, ControlError};

/// Why a cleanup could not run.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// A daemon holds the state directory.
    #[error("a handoffd is running on {0}: stop it first")]
    Running(std::path::PathBuf),
    /// The state directory could not be locked.
    #[error(transparent)]
    Control(ControlError),
    /// The state file could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// A directory is not trusted, or a file in it could not be removed.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// The pins could not be removed.
    #[error("removing {path} failed")]
    Remove {
        /// The pin directory.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Cleans up `service` (or every service of the state) and reports each step on stdout.
pub fn run(paths: &Paths, service: Option<&str>) -> Result<(), CleanupError> {
    if !paths.state_dir.exists() && service.is_none() {
        println!("nothing to clean up in {}", paths.state_dir.display());
        return Ok(());
    }
    let _lock = control::lock_state_dir(paths).map_err(|e| match e {
        ControlError::Locked(dir) => CleanupError::Running(dir),
        other => CleanupError::Control(other),
    })?;
    let file = state::file(&paths.state_dir);
    let mut saved = match state::load(&file) {
        Ok(saved) => saved,
        // A state no daemon can use is removed whole: nothing in it can be trusted to
        // name services or processes (their pins, if any, stay under /sys/fs/bpf/handoff).
        Err(e @ (StateError::Format { .. } | StateError::Inconsistent { .. }))
            if service.is_none() =>
        {
            println!("{}", crate::logging::one_line(&e));
            SavedState::default()
        }
        Err(e) => return Err(e.into()),
    };
    let (gone, kept): (Vec<SavedService>, Vec<SavedService>) = saved
        .services
        .drain(..)
        .partition(|s| service.is_none_or(|name| s.name == name));
    for s in &gone {
        for line in detach(s) {
            println!("{line}");
        }
    }
    let mut names: Vec<&str> = gone.iter().map(|s| s.name.as_str()).collect();
    if let Some(name) = service
        && !names.contains(&name)
    {
        names.push(name);
    }
    for name in names {
        match pins::remove_service(name) {
            Ok(true) => println!("removed the pins of service {name}"),
            Ok(false) => {}
            Err(source) => {
                return Err(CleanupError::Remove {
                    path: pins::service_dir(name),
                    source,
                });
            }
        }
    }
    if kept.is_empty() {
        remove(&file)?;
        remove(&paths.control_socket)?;
        remove(&paths.lock_file())?;
        remove(&file.with_extension("json.new"))?;
    } else {
        let state = SavedState {
            version: state::VERSION,
            services: kept,
        };
        state::save(
            &file,
            &serde_json::to_string_pretty(&state).unwrap_or_default(),
        )?;
        println!("kept the state of {} other services", state.services.len());
    }
    Ok(())
}

/// Removes `path` in its (trusted) directory; a symlink there is removed, not followed.
fn remove(path: &Path) -> Result<(), CleanupError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name() else {
        return Ok(());
    };
    if !dir.exists() {
        return Ok(());
    }
    if dirs::open(dir)?.remove(&name.to_string_lossy())? {
        println!("removed {}", path.display());
    }
    Ok(())
}
