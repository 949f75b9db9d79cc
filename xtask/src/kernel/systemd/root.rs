//! The Debian root the test boots: made by debootstrap, trimmed, cached as a tarball.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{TempDir, run_checked};

/// Debian suite and mirror of the root (the mirror the kernel test fetches from).
pub(super) const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// Packages added to minbase: systemd as PID 1 (`systemd-sysv` makes /sbin/init), and
/// `kmod` for `depmod`/`modprobe` (systemd-modules-load loads the diag modules).
/// No dbus: systemctl, systemd-run and journalctl reach PID 1 on its private socket.
const ROOT_PACKAGES: [&str; 3] = ["systemd", "systemd-sysv", "kmod"];

/// Removed from the cached root: not needed to boot and half its size.
const TRIM: [&str; 6] = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/info",
    "var/cache/apt",
    "var/lib/apt/lists",
];

/// `$XDG_CACHE_HOME/handoff` or `~/.cache/handoff`.
pub(super) fn cache_base() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .context("neither XDG_CACHE_HOME nor HOME is set: no place for the cache")?;
            PathBuf::from(home).join(".cache")
        }
    };
    let dir = base.join("handoff").join("systemd-test");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// The cached root tarball (made now if missing; true then).
pub(super) fn cached_root() -> Result<(PathBuf, bool)> {
    let dir = cache_base()?;
    let key = format!(
        "{SUITE} {MIRROR} minbase {} trim {}",
        ROOT_PACKAGES.join(","),
        TRIM.join(",")
    );
    let tarball = dir.join(format!("root-{SUITE}-{:016x}.tar", fnv1a(key.as_bytes())));
    if tarball.is_file() {
        println!("systemd-test: cached root {}", tarball.display());
        return Ok((tarball, false));
    }
    println!(
        "systemd-test: debootstrap {SUITE} (minbase + {}) from {MIRROR}",
        ROOT_PACKAGES.join(" ")
    );
    let work = TempDir::new_in(&dir, "debootstrap")?;
    let target = work.path().join("root");
    let out = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={}", ROOT_PACKAGES.join(",")),
            "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
            SUITE,
        ])
        .arg(&target)
        .arg(MIRROR)
        .stdin(Stdio::null())
        .output()
        .context("cannot run debootstrap")?;
    if !out.status.success() {
        let log = target.join("debootstrap/debootstrap.log");
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(15).collect();
        bail!(
            "debootstrap failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    for sub in TRIM {
        let path = target.join(sub);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot trim {}", path.display()))?;
            std::fs::create_dir_all(&path)?;
        }
    }
    let partial = work.path().join("root.tar");
    run_checked(
        Command::new("tar")
            .arg("-C")
            .arg(&target)
            .args(["--numeric-owner", "-cf"])
            .arg(&partial)
            .arg("."),
        "packing the root",
    )?;
    std::fs::rename(&partial, &tarball)
        .with_context(|| format!("cannot move the root to {}", tarball.display()))?;
    println!("systemd-test: root cached in {}", tarball.display());
    Ok((tarball, true))
}

/// FNV-1a, 64 bits: the cache key's hash (not a security property).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::fnv1a;

    #[test]
    fn cache_key_hash_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }
}
