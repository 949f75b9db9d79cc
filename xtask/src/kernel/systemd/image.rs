//! The unpacked root made into the test's image: the package installed, the test's files
//! added, all of it packed as an initramfs.

use std::io::BufWriter;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::super::boot::{KernelFiles, MODULES};
use super::super::cpio;
use crate::run_checked;

/// `dpkg -i` of the package in a chroot into `image`, then checks that its postinst
/// enabled the unit.
pub(super) fn install_deb(image: &Path, deb: &Path) -> Result<()> {
    let inside = image.join("tmp/handoff.deb");
    std::fs::copy(deb, &inside).with_context(|| format!("cannot copy {}", deb.display()))?;
    let out = Command::new("chroot")
        .arg(image)
        .args(["dpkg", "-i", "/tmp/handoff.deb"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .context("cannot run chroot dpkg -i")?;
    std::fs::remove_file(&inside)?;
    if !out.status.success() {
        bail!(
            "dpkg -i of the package failed in the Debian root ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!("systemd-test: dpkg -i {} in the root: ok", deb.display());
    Ok(())
}

/// What the test adds to the installed root.
pub(super) fn add_test_files(
    image: &Path,
    testsrv: &Path,
    kernel_dir: &Path,
    files: &KernelFiles,
) -> Result<()> {
    add_units(image, testsrv)?;
    add_modules(image, kernel_dir, files)
}

/// Writes `data` at `path` in the root with `mode`, making the parent directories.
fn put(image: &Path, path: &str, mode: u32, data: &[u8]) -> Result<()> {
    let full = image.join(path.trim_start_matches('/'));
    if let Some(parent) = full.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&full, data).with_context(|| format!("cannot write {}", full.display()))?;
    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Makes `path` in the root a symbolic link to `target`, replacing what was there.
fn link(image: &Path, path: &str, target: &str) -> Result<()> {
    let full = image.join(path.trim_start_matches('/'));
    if let Some(parent) = full.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(&full);
    std::os::unix::fs::symlink(target, &full)
        .with_context(|| format!("cannot link {}", full.display()))
}

/// The configuration, testsrv, the check's script and unit, the masked units and the hostname.
fn add_units(image: &Path, testsrv: &Path) -> Result<()> {
    // What an administrator does after installing: name the service in the config.
    put(
        image,
        "/etc/handoff/handoffd.toml",
        0o644,
        GOOD_CONFIG.as_bytes(),
    )?;
    put(
        image,
        "/usr/local/bin/testsrv",
        0o755,
        &std::fs::read(testsrv).with_context(|| format!("cannot read {}", testsrv.display()))?,
    )?;
    put(
        image,
        "/usr/local/sbin/handoff-check",
        0o755,
        format!("#!/bin/bash\n{}", include_str!("../systemd_check.sh")).as_bytes(),
    )?;
    put(
        image,
        "/etc/systemd/system/handoff-check.service",
        0o644,
        CHECK_UNIT.as_bytes(),
    )?;
    link(
        image,
        "/etc/systemd/system/multi-user.target.wants/handoff-check.service",
        "/etc/systemd/system/handoff-check.service",
    )?;
    // No login prompts, no timers of apt: nothing else on the console or the CPU.
    for unit in [
        "serial-getty@ttyS0.service",
        "getty@tty1.service",
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "dpkg-db-backup.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
    ] {
        link(image, &format!("/etc/systemd/system/{unit}"), "/dev/null")?;
    }
    put(image, "/etc/hostname", 0o644, b"handoff-systemd-test\n")?;
    Ok(())
}

/// The kernel's diag modules and depmod's lists, loaded at boot by systemd-modules-load.
fn add_modules(image: &Path, kernel_dir: &Path, files: &KernelFiles) -> Result<()> {
    // The kernel's diag modules, found by depmod and loaded by systemd-modules-load.
    let release = &files.release;
    let mut names = Vec::new();
    for (name, ko) in &files.modules {
        let sub = MODULES
            .iter()
            .find(|(_, n, _)| n == name)
            .map_or("extra", |(sub, _, _)| sub);
        put(
            image,
            &format!("/lib/modules/{release}/kernel/{sub}/{name}.ko"),
            0o644,
            ko,
        )?;
        names.push(name.as_str());
    }
    // depmod's lists of the whole kernel (the modules that are built in, their order).
    for list in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        let source = kernel_dir.join("lib/modules").join(release).join(list);
        if let Ok(data) = std::fs::read(&source) {
            put(
                image,
                &format!("/lib/modules/{release}/{list}"),
                0o644,
                &data,
            )?;
        }
    }
    put(
        image,
        "/etc/modules-load.d/handoff-test.conf",
        0o644,
        format!("{}\n", names.join("\n")).as_bytes(),
    )?;
    run_checked(
        Command::new("chroot")
            .arg(image)
            .args(["depmod", "-a", release])
            .stdin(Stdio::null()),
        "depmod in the root",
    )?;
    Ok(())
}

/// The configuration of the test: one service on loopback, run as `nobody`.
const GOOD_CONFIG: &str = "# systemd-test: one service, run as nobody\n\
[defaults]\n\
drain_timeout = \"60s\"\n\
\n\
[[service]]\n\
name = \"web\"\n\
listen = [\"127.0.0.1:8080\"]\n\
user = \"nobody\"\n";

/// The oneshot unit that runs the checks once handoffd.service is up (or has failed).
const CHECK_UNIT: &str = "[Unit]\n\
Description=handoff systemd-test checks\n\
After=handoffd.service\n\
\n\
[Service]\n\
Type=oneshot\n\
ExecStart=/usr/local/sbin/handoff-check\n\
StandardOutput=tty\n\
StandardError=tty\n\
TTYPath=/dev/ttyS0\n\
TTYReset=no\n\
TTYVHangup=no\n\
TimeoutStartSec=infinity\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n";

/// Writes `image` (a directory) as an uncompressed newc cpio: modes, owners and device
/// numbers as they are; hard links become separate copies.
pub(super) fn write_cpio(image: &Path, out: &Path) -> Result<()> {
    let file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = cpio::Writer::new(BufWriter::new(file));
    w.raw(".", 0o040_755, (0, 0), (0, 0), &[])?;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = image.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let rel = rel.join(entry.file_name());
            let path = image.join(&rel);
            let name = rel.to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&path)?;
            let owner = (meta.uid(), meta.gid());
            let ft = meta.file_type();
            let result = if ft.is_dir() {
                stack.push(rel.clone());
                w.raw(&name, meta.mode(), owner, (0, 0), &[])
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path)?;
                w.raw(
                    &name,
                    meta.mode(),
                    owner,
                    (0, 0),
                    target.as_os_str().as_encoded_bytes(),
                )
            } else if ft.is_file() {
                let data = std::fs::read(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                w.raw(&name, meta.mode(), owner, (0, 0), &data)
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                w.raw(&name, meta.mode(), owner, dev_numbers(meta.rdev()), &[])
            } else {
                // Sockets: nothing to carry over.
                continue;
            };
            result.with_context(|| format!("cannot write {name} into {}", out.display()))?;
        }
    }
    w.finish()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// glibc's encoding of a `dev_t` into (major, minor).
fn dev_numbers(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

#[cfg(test)]
mod tests {
    use super::dev_numbers;

    #[test]
    fn device_numbers_decode() {
        // /dev/console 5:1, /dev/null 1:3.
        assert_eq!(dev_numbers(0x501), (5, 1));
        assert_eq!(dev_numbers(0x103), (1, 3));
        assert_eq!(
            dev_numbers((259 << 8) | 0x45 | (0x12300 << 12)),
            (259, 0x12345)
        );
    }
}
