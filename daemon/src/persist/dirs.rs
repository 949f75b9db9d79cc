//! Directories root can trust, and files in them that no other user can redirect.
//!
//! The state directory, the control socket's directory and the pin directory must be
//! owned by root (or by the daemon's own uid) and writable by no one else, and so must
//! every directory above them unless it is sticky (`/tmp`: others may add entries there
//! but cannot rename or remove root's). Anyone who can write to one of them could plant
//! a symlink, a fake socket or a forged `state.json`, so such a directory is refused,
//! never repaired. Inside a trusted directory every file is opened relative to the
//! directory's descriptor with `O_NOFOLLOW`: a symlink is never followed, even one a
//! previous careless root process left there.

use std::fs::{DirBuilder, File, Metadata};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, fchmod};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Mode bits that let others than the owner write.
const GROUP_OTHER_WRITE: u32 = 0o022;

/// Why a directory or a file in it is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The directory itself may be written by someone else.
    #[error(
        "{path} is owned by uid {uid} with mode {mode:04o}; handoffd only uses a directory owned by root (or by the uid it runs as) that no other user may write: remove it and let handoffd create it, or choose another"
    )]
    Untrusted {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
        /// The daemon's effective uid.
        euid: u32,
    },
    /// A directory above it may be written by someone else (and is not sticky).
    #[error(
        "{path}, above {dir}, is owned by uid {uid} with mode {mode:04o}: another user could replace {dir}; use a directory whose parents only root may write"
    )]
    UntrustedParent {
        /// The parent.
        path: PathBuf,
        /// The directory it contains.
        dir: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// Something that is not a directory (a symlink, a file) sits at the path.
    #[error("{0} is not a directory (a symlink or a file?); remove it and start again")]
    NotDir(PathBuf),
    /// A symlink where handoffd keeps a file of its own.
    #[error("{0} is a symlink; handoffd never follows one in its directories: remove it")]
    Symlink(PathBuf),
    /// A file in the directory is not a regular file of root's (or the daemon's uid).
    #[error(
        "{path} is not a regular file owned by root (uid {uid}, mode {mode:o}); remove it and start again"
    )]
    UntrustedFile {
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its full mode (type and permissions).
        mode: u32,
    },
    /// A file is larger than anything handoffd writes there.
    #[error("{path} is {size} bytes, more than the {max} handoffd ever writes; remove it")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The cap.
        max: u64,
    },
    /// A system call failed.
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

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DirError + use<> {
    let path = path.to_path_buf();
    move |source| DirError::Io { op, path, source }
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Whether `uid` may own what handoffd trusts: root, or the daemon's own uid.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == euid()
}

/// A directory checked to be trusted, held open: every file below is reached through
/// this descriptor, so a directory renamed or replaced afterwards changes nothing.
#[derive(Debug)]
pub struct TrustedDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Creates `path` (and missing parents) mode 0700 if absent, then opens it as
/// [`open`] does.
pub fn ensure(path: &Path) -> Result<TrustedDir, DirError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Nothing is created below a directory another user could write.
            let absolute = std::path::absolute(path).map_err(io_err("resolving", path))?;
            if let Some(existing) = absolute.ancestors().skip(1).find(|a| a.exists()) {
                check_parents(&existing.join("x"), path)?;
            }
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(io_err("creating", path))?
        }
        Err(e) => return Err(io_err("inspecting", path)(e)),
    }
    open(path)
}

/// Opens the directory `path` if it, and every directory above it, is trusted.
pub fn open(path: &Path) -> Result<TrustedDir, DirError> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        // O_NOFOLLOW on a symlink fails with ELOOP; O_DIRECTORY on a file with ENOTDIR.
        Errno::ELOOP | Errno::ENOTDIR => DirError::NotDir(path.to_path_buf()),
        e => io_err("opening", path)(errno(e)),
    })?;
    let meta = File::from(fd.try_clone().map_err(io_err("opening", path))?)
        .metadata()
        .map_err(io_err("inspecting", path))?;
    let mode = meta.permissions().mode() & 0o7777;
    if !trusted_owner(meta.uid()) || mode & GROUP_OTHER_WRITE != 0 {
        return Err(DirError::Untrusted {
            path: path.to_path_buf(),
            uid: meta.uid(),
            mode,
            euid: euid(),
        });
    }
    check_parents(path, path)?;
    Ok(TrustedDir {
        fd,
        path: path.to_path_buf(),
    })
}

/// Checks every directory above `path` (`path` itself need not exist; its parent must):
/// as the kernel resolves them, owned by root or the daemon's uid, and writable by no one
/// else unless sticky. `dir` names the directory being checked in messages.
fn check_parents(path: &Path, dir: &Path) -> Result<(), DirError> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let real = std::fs::canonicalize(parent).map_err(io_err("resolving", parent))?;
    for parent in real.ancestors() {
        let meta: Metadata =
            std::fs::symlink_metadata(parent).map_err(io_err("inspecting", parent))?;
        let mode = meta.permissions().mode() & 0o7777;
        let sticky = mode & 0o1000 != 0;
        if !trusted_owner(meta.uid()) || (mode & GROUP_OTHER_WRITE != 0 && !sticky) {
            return Err(DirError::UntrustedParent {
                path: parent.to_path_buf(),
                dir: dir.to_path_buf(),
                uid: meta.uid(),
                mode,
            });
        }
    }
    Ok(())
}

impl TrustedDir {
    fn at(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Opens `name` without following a symlink; `None` if absent (without `O_CREAT`).
    fn open_at(
        &self,
        op: &'static str,
        name: &str,
        flags: OFlag,
        mode: u32,
    ) -> Result<Option<File>, DirError> {
        let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match openat(&self.fd, name, flags, Mode::from_bits_truncate(mode)) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(Errno::ENOENT) if !flags.contains(OFlag::O_CREAT) => Ok(None),
            // O_NOFOLLOW met a symlink.
            Err(Errno::ELOOP) => Err(DirError::Symlink(self.at(name))),
            Err(e) => Err(io_err(op, &self.at(name))(errno(e))),
        }
    }

    /// A file handoffd wrote: regular, owned by root or the daemon's uid.
    fn check_file(&self, name: &str, file: &File) -> Result<Metadata, DirError> {
        let meta = file
            .metadata()
            .map_err(io_err("inspecting", &self.at(name)))?;
        if !meta.file_type().is_file() || !trusted_owner(meta.uid()) {
            return Err(DirError::UntrustedFile {
                path: self.at(name),
                uid: meta.uid(),
                mode: meta.mode(),
            });
        }
        Ok(meta)
    }

    /// Reads the file `name` (at most `max` bytes: a larger one is refused before it is
    /// read); `None` if there is none.
    pub fn read(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>, DirError> {
        // O_NONBLOCK: a FIFO planted there must not hang the daemon (it is refused below).
        let Some(file) = self.open_at("opening", name, OFlag::O_RDONLY | OFlag::O_NONBLOCK, 0)?
        else {
            return Ok(None);
        };
        let meta = self.check_file(name, &file)?;
        if meta.len() > max {
            return Err(DirError::TooLarge {
                path: self.at(name),
                size: meta.len(),
                max,
            });
        }
        let mut out = Vec::new();
        file.take(max + 1)
            .read_to_end(&mut out)
            .map_err(io_err("reading", &self.at(name)))?;
        if out.len() as u64 > max {
            return Err(DirError::TooLarge {
                path: self.at(name),
                size: out.len() as u64,
                max,
            });
        }
        Ok(Some(out))
    }

    /// Replaces the file `name` with `bytes`, mode 0600, atomically: a new file
    /// `name.new` (created exclusively, never through a symlink) renamed over it.
    ///
    /// Not fsynced: what these files describe (pinned maps, processes) does not survive
    /// a reboot either, and rename alone is atomic against the daemon's own crash.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), DirError> {
        let tmp = format!("{name}.new");
        // A stale temp file (or a symlink planted in its place): unlink never follows.
        self.remove(&tmp)?;
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
        let Some(mut file) = self.open_at("creating", &tmp, flags, 0o600)? else {
            return Err(DirError::Symlink(self.at(&tmp)));
        };
        // The umask may have taken bits away, never added any; 0600 whatever it was.
        fchmod(&file, Mode::from_bits_truncate(0o600))
            .map_err(|e| io_err("chmod", &self.at(&tmp))(errno(e)))?;
        file.write_all(bytes)
            .map_err(io_err("writing", &self.at(&tmp)))?;
        drop(file);
        renameat(&self.fd, tmp.as_str(), &self.fd, name)
            .map_err(|e| io_err("renaming", &self.at(&tmp))(errno(e)))
    }

    /// Opens (creating it if absent) the file `name` for a lock: mode 0600, never
    /// through a symlink.
    pub fn lock_file(&self, name: &str) -> Result<File, DirError> {
        let Some(file) = self.open_at("opening", name, OFlag::O_RDWR | OFlag::O_CREAT, 0o600)?
        else {
            return Err(DirError::Symlink(self.at(name)));
        };
        self.check_file(name, &file)?;
        fchmod(&file, Mode::from_bits_truncate(0o600))
            .map_err(|e| io_err("chmod", &self.at(name))(errno(e)))?;
        Ok(file)
    }

    /// Removes the entry `name` (a symlink is removed, never followed); whether there was
    /// one.
    pub fn remove(&self, name: &str) -> Result<bool, DirError> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(io_err("removing", &self.at(name))(errno(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("handoff-dirs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn created_0700_and_files_0600_never_through_symlinks() {
        let base = tempdir("create");
        let dir = base.join("state");
        let d = ensure(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        let victim = base.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        symlink(&victim, dir.join("f")).unwrap();
        symlink(&victim, dir.join("f.new")).unwrap();
        assert!(matches!(d.read("f", 100), Err(DirError::Symlink(_))));
        d.write("f", b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(d.read("f", 100).unwrap().unwrap(), b"new");
        let meta = std::fs::symlink_metadata(dir.join("f")).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        symlink(&victim, dir.join("lock")).unwrap();
        assert!(d.lock_file("lock").is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(matches!(d.read("f", 2), Err(DirError::TooLarge { .. })));
        assert_eq!(d.read("missing", 2).unwrap(), None);
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn writable_or_symlinked_directories_are_refused() {
        let base = tempdir("refuse");
        std::fs::create_dir_all(&base).unwrap();
        let open_dir = base.join("open");
        std::fs::create_dir(&open_dir).unwrap();
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = open(&open_dir).unwrap_err();
        assert!(
            matches!(err, DirError::Untrusted { mode: 0o777, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("mode 0777"), "{err}");
        // Below a writable parent.
        let err = ensure(&open_dir.join("state")).unwrap_err();
        assert!(matches!(err, DirError::UntrustedParent { .. }), "{err}");
        let link = base.join("link");
        symlink(&base, &link).unwrap();
        assert!(matches!(open(&link), Err(DirError::NotDir(_))));
        std::fs::remove_dir_all(base).unwrap();
    }
}
