//! The generation table on disk (`STATE_DIR/state.json`), so that a restarted or
//! crashed daemon takes up what the previous one steered: the kernel keeps steering
//! meanwhile, and this file says which processes are which generation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use handoff_common::proto::GenerationState;
use serde::{Deserialize, Serialize};

use crate::discover::group::GroupKey;
use crate::persist::dirs::{self, DirError, TrustedDir};

mod check;
pub use check::Inconsistent;

/// The version of this file's layout.
pub const VERSION: u32 = 1;

/// Everything the daemon must find again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// [`VERSION`].
    pub version: u32,
    /// Every service.
    pub services: Vec<SavedService>,
}

/// A service's groups and generations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedService {
    /// Its name.
    pub name: String,
    /// Its addresses when saved.
    pub listen: Vec<SocketAddr>,
    /// The next generation id.
    pub next_id: u64,
    /// The group tuple of each address, once fixed.
    pub groups: Vec<Option<GroupKey>>,
    /// Generations not retired.
    pub generations: Vec<SavedGeneration>,
}

/// A generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedGeneration {
    /// Its id.
    pub id: u64,
    /// Its state.
    pub state: GenerationState,
    /// The promoted process.
    pub leader: SavedMember,
    /// Its descendants known so far.
    pub descendants: Vec<SavedMember>,
    /// Its blocks of slots, per group.
    pub blocks: Vec<SavedBlock>,
    /// Its drain, if draining.
    pub drain: Option<SavedDrain>,
}

/// A process, named for good by pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMember {
    /// Its pid.
    pub pid: i32,
    /// Its start time in clock ticks after boot.
    pub start_time: u64,
}

/// A generation's listeners in one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBlock {
    /// Block index.
    pub index: u32,
    /// Cookies by slot offset.
    pub cookies: Vec<u64>,
}

/// A drain's progress, in wall-clock milliseconds (instants do not survive a process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDrain {
    /// When it started.
    pub started_ms: u64,
    /// When the drain timeout fires.
    pub deadline_ms: u64,
    /// When the retire signal was sent, and whether because of the timeout.
    pub retired_ms: Option<u64>,
    /// Whether it was the timeout that sent it.
    pub timed_out: bool,
    /// Whether SIGKILL was sent.
    pub killed: bool,
}

/// The longest a saved deadline may lie ahead: the longest duration handoffd accepts
/// ([`crate::config::MAX_DURATION`]).
const MAX_AHEAD: Duration = crate::config::MAX_DURATION;

/// An instant as wall-clock milliseconds since the epoch.
pub fn to_wall(at: Instant) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let here = Instant::now();
    let wall = if at <= here {
        now.saturating_sub(here.saturating_duration_since(at))
    } else {
        now.saturating_add(at.saturating_duration_since(here))
    };
    u64::try_from(wall.as_millis()).unwrap_or(u64::MAX)
}

/// Wall-clock milliseconds as an instant of this process; never further ahead than
/// [`MAX_AHEAD`] (the instant of a file's number cannot overflow).
pub fn from_wall(ms: u64) -> Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let then = Duration::from_millis(ms);
    let instant = Instant::now();
    if then <= now {
        instant.checked_sub(now - then).unwrap_or(instant)
    } else {
        instant
            .checked_add((then - now).min(MAX_AHEAD))
            .unwrap_or(instant)
    }
}

/// The largest state file read: far above what any daemon writes (a generation of
/// 100 000 members is about 8 MB), and a bound on what parsing may allocate.
pub const MAX_FILE: u64 = 64 << 20;

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state directory or the file in it is not trusted, or a call on it failed.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// The file is not a state this daemon understands.
    #[error(
        "{path} is not a handoff state of version {VERSION}; remove it (handoffd --cleanup) to start afresh"
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The file parses but contradicts itself: nothing of it is used.
    #[error(
        "{path} is inconsistent, so none of it is used: {source}; remove it (handoffd --cleanup) to start afresh"
    )]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What is wrong (boxed: it is large, and refusals are rare).
        #[source]
        source: Box<Inconsistent>,
    },
}

/// The state file of a state directory.
pub fn file(state_dir: &Path) -> PathBuf {
    state_dir.join("state.json")
}

/// The trusted directory of `path` and the file's name in it.
fn split(path: &Path) -> Result<(TrustedDir, String), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((dirs::open(dir)?, name))
}

/// Reads and checks the state file (in a trusted directory, never through a symlink,
/// at most [`MAX_FILE`] bytes); an absent one is an empty state. A file that does not
/// parse, or contradicts itself ([`SavedState::validate`]), is refused whole.
pub fn load(path: &Path) -> Result<SavedState, StateError> {
    let (dir, name) = split(path)?;
    let Some(text) = dir.read(&name, MAX_FILE)? else {
        return Ok(SavedState::default());
    };
    let state: SavedState = serde_json::from_slice(&text).map_err(|source| StateError::Format {
        path: path.into(),
        source,
    })?;
    state
        .validate()
        .map_err(|source| StateError::Inconsistent {
            path: path.into(),
            source: Box::new(source),
        })?;
    Ok(state)
}

/// Writes the state file atomically, mode 0600 (see [`TrustedDir::write`]).
pub fn save(path: &Path, text: &str) -> Result<(), StateError> {
    let (dir, name) = split(path)?;
    Ok(dir.write(&name, text.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_round_trip() {
        let at = Instant::now() - Duration::from_secs(5);
        let back = from_wall(to_wall(at));
        let diff = if back > at { back - at } else { at - back };
        assert!(diff < Duration::from_millis(5), "{diff:?}");
        let later = Instant::now() + Duration::from_secs(60);
        let back = from_wall(to_wall(later));
        let diff = if back > later {
            back - later
        } else {
            later - back
        };
        assert!(diff < Duration::from_millis(5), "{diff:?}");
    }

    #[test]
    fn a_missing_file_is_an_empty_state_and_a_bad_one_an_error() {
        let dir = std::env::temp_dir().join(format!("handoff-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = file(&dir);
        assert_eq!(load(&path).unwrap(), SavedState::default());
        save(&path, "{\"version\":99,\"services\":[]}").unwrap();
        assert!(matches!(
            load(&path),
            Err(StateError::Inconsistent {
                source,
                ..
            }) if *source == Inconsistent::Version { found: 99 }
        ));
        save(&path, "{\"version\":1,\"services\":[").unwrap();
        assert!(matches!(load(&path), Err(StateError::Format { .. })));
        let state = SavedState {
            version: VERSION,
            services: vec![],
        };
        save(&path, &serde_json::to_string(&state).unwrap()).unwrap();
        assert_eq!(load(&path).unwrap(), state);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
