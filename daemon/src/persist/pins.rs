//! Where pinned maps live: the host's bpffs, under `/sys/fs/bpf/handoff/<service>/v2/`.
//!
//! The version in the path lets a newer handoffd recognise an older layout (sockets cannot
//! be moved to a new map without taking them from their processes again).

use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

use crate::persist::dirs::{self, DirError};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

/// The host's bpffs.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The pin layout this daemon writes and reads.
pub const LAYOUT: &str = "v2";

/// Why the pin directory is unusable.
#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    /// /sys/fs/bpf is missing or not a directory.
    #[error("{BPFFS} cannot be inspected")]
    Inspect(#[source] nix::Error),
    /// bpffs could not be mounted.
    #[error("{BPFFS} is not a bpf file system and mounting one there failed")]
    Mount(#[source] nix::Error),
    /// The pin directory could be written by another user.
    #[error(transparent)]
    Dir(#[from] DirError),
}

/// Makes sure `/sys/fs/bpf` is a bpf file system, mounting one if it is not, and that
/// handoff's directory in it is trusted (created 0700; see [`dirs`]): pins another user
/// placed there would be taken up as handoff's maps. Checked by file system type: a
/// directory on another file system would lose the pins.
pub fn ensure_bpffs() -> Result<(), PinsError> {
    let fs = statfs(BPFFS).map_err(PinsError::Inspect)?;
    if fs.filesystem_type() != BPF_FS_MAGIC {
        mount_bpffs()?;
    }
    dirs::ensure(&Path::new(BPFFS).join("handoff"))?;
    Ok(())
}

fn mount_bpffs() -> Result<(), PinsError> {
    mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(PinsError::Mount)?;
    tracing::info!("mounted a bpf file system on {BPFFS}");
    Ok(())
}

/// The directory of a service's pins.
pub fn service_dir(service: &str) -> PathBuf {
    Path::new(BPFFS).join("handoff").join(service)
}

/// The pin directory of group `index` of a service.
pub fn group_dir(service: &str, index: usize) -> PathBuf {
    service_dir(service).join(LAYOUT).join(format!("g{index}"))
}

/// Removes every pin of a service (the program stays attached to its groups, holding the
/// maps, until their last listener closes).
pub fn remove_service(service: &str) -> std::io::Result<bool> {
    match std::fs::remove_dir_all(service_dir(service)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_versioned_per_service() {
        assert_eq!(
            group_dir("web", 1),
            PathBuf::from("/sys/fs/bpf/handoff/web/v2/g1")
        );
    }
}
