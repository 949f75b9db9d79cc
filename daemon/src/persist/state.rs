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
pub use check::{Inconsistent, Resume};

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
    /// Its drain, if draining. A canary and a standby are saved as draining, with the
    /// drain they would get (see [`SavedGeneration::canary`]), so that a daemon that
    /// predates them takes them up as demoted generations instead of refusing the file.
    pub drain: Option<SavedDrain>,
    /// A canary's percent of new connections (1 to 99; checked where it is taken up, a
    /// weight out of range is dropped with a warning and the generation drains).
    /// Saved with state `draining` and a drain whose timeout has passed: a daemon before
    /// canaries (which refuses a second active generation) reads it as a draining
    /// generation due for its retire signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<u64>,
    /// A standby's end of watch window, in wall-clock milliseconds: it stands by until
    /// then, and drains after (at once if it passed while no daemon ran). Saved with
    /// state `draining` and the drain it gets then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_until_ms: Option<u64>,
    /// The health check the generation was promoted with (e.g. `http:/healthz`), kept
    /// opaque: at most [`MAX_CHECK`] bytes, no control character.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

/// The longest health-check spec a state file may hold.
pub const MAX_CHECK: usize = 1100;

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

    /// A state with an active generation, a standby, a canary with a check.
    fn with_canary_and_standby() -> SavedState {
        let g = |id: u64, block: u32, drain: Option<SavedDrain>| SavedGeneration {
            id,
            state: if drain.is_some() {
                GenerationState::Draining
            } else {
                GenerationState::Active
            },
            leader: SavedMember {
                pid: 100 * i32::try_from(id).unwrap(),
                start_time: 5,
            },
            descendants: vec![],
            blocks: vec![SavedBlock {
                index: block,
                cookies: vec![u64::from(block) * 10],
            }],
            drain,
            canary: None,
            watch_until_ms: None,
            check: None,
        };
        let drain = |started_ms, deadline_ms| SavedDrain {
            started_ms,
            deadline_ms,
            retired_ms: None,
            timed_out: false,
            killed: false,
        };
        let mut standby = g(1, 1, Some(drain(1_700_000_060_000, 1_700_000_360_000)));
        standby.watch_until_ms = Some(1_700_000_060_000);
        let mut canary = g(3, 3, Some(drain(0, 0)));
        canary.canary = Some(10);
        canary.check = Some("http:/healthz:200".into());
        let mut active = g(2, 2, None);
        active.check = Some("tcp".into());
        SavedState {
            version: VERSION,
            services: vec![SavedService {
                name: "web".into(),
                listen: vec!["127.0.0.1:8080".parse().unwrap()],
                next_id: 4,
                groups: vec![Some(GroupKey {
                    addr: "127.0.0.1:8080".parse().unwrap(),
                    v6only: None,
                    ifindex: 0,
                    uid: 0,
                })],
                generations: vec![standby, active, canary],
            }],
        }
    }

    #[test]
    fn a_canary_a_standby_and_checks_round_trip_and_an_older_reader_sees_a_valid_file() {
        let dir = std::env::temp_dir().join(format!("handoff-state-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = file(&dir);
        let state = with_canary_and_standby();
        let text = serde_json::to_string_pretty(&state).unwrap();
        save(&path, &text).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back, state);
        let gens = &back.services[0].generations;
        assert_eq!(gens[0].resume(), Ok(Resume::Standby(1_700_000_060_000)));
        assert_eq!(gens[2].resume(), Ok(Resume::Canary(10)));
        assert_eq!(gens[2].check(), Ok(Some("http:/healthz:200")));
        // A daemon before these fields ignores them (its structs do not deny unknown
        // fields): what it reads must pass its checks, one active generation, the
        // canary and the standby draining.
        let mut older: serde_json::Value = serde_json::from_str(&text).unwrap();
        for g in older["services"][0]["generations"].as_array_mut().unwrap() {
            let g = g.as_object_mut().unwrap();
            for field in ["canary", "watch_until_ms", "check"] {
                g.remove(field);
            }
        }
        let older: SavedState = serde_json::from_value(older).unwrap();
        assert_eq!(older.validate(), Ok(()));
        assert!(
            older.services[0]
                .generations
                .iter()
                .all(|g| g.resume() == Ok(Resume::AsSaved))
        );
        // And a file of that daemon (no new field) is read by this one; absent fields
        // are not written.
        let plain = serde_json::to_string(&older).unwrap();
        assert!(!plain.contains("canary") && !plain.contains("watch_until_ms"));
        save(&path, &plain).unwrap();
        assert_eq!(load(&path).unwrap(), older);
        std::fs::remove_dir_all(dir).unwrap();
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
