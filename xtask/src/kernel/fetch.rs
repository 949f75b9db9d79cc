//! Pinned Debian packages, fetched with a private apt configuration into a cache outside
//! the repository, checked by SHA256 and unpacked with `dpkg-deb -x` (never installed).
//!
//! Cache layout (`$XDG_CACHE_HOME/handoff/kernel-test`, else `~/.cache/handoff/kernel-test`):
//! `apt/` (sources list, apt.conf, lists and archives of the private configuration),
//! `debs/PKG_VERSION.deb` (checked), `unpacked/PKG_VERSION/` (the package's files, plus
//! `vmlinux` for a kernel).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// One pinned package: Debian replaces kernels at point releases (a new ABI number, a new
/// package name), so a pin that the archive no longer has fails with the version it has.
#[derive(Debug, Clone, Copy)]
pub struct Pin {
    /// The binary package.
    pub package: &'static str,
    /// Its exact Debian version.
    pub version: &'static str,
    /// SHA256 of the .deb.
    pub sha256: &'static str,
}

/// Static busybox for the guest's init and shell (bookworm).
pub const BUSYBOX: Pin = Pin {
    package: "busybox-static",
    version: "1:1.35.0-4+deb12u1+b1",
    sha256: "3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744",
};

/// The archive's signing keys (package `debian-archive-keyring`; bookworm's also holds
/// bullseye's keys).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The suites the pins come from.
const SUITES: [(&str, &str); 3] = [
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
    ("http://deb.debian.org/debian-security", "bullseye-security"),
];

/// The package cache and the private apt configuration in it.
pub struct Cache {
    /// `…/handoff/kernel-test`.
    dir: PathBuf,
    /// Whether `apt-get update` already ran in this invocation.
    updated: bool,
}

impl Cache {
    /// Opens (creating) the cache directory and writes the private apt configuration.
    pub fn open() -> Result<Self> {
        let base = match std::env::var_os("XDG_CACHE_HOME") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => {
                let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).context(
                    "neither XDG_CACHE_HOME nor HOME is set: no place for the kernel cache",
                )?;
                PathBuf::from(home).join(".cache")
            }
        };
        let dir = base.join("handoff").join("kernel-test");
        let apt = dir.join("apt");
        for sub in [
            "etc/apt.conf.d",
            "etc/sources.list.d",
            "etc/preferences.d",
            "state/lists/partial",
            "cache/archives/partial",
        ] {
            let path = apt.join(sub);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
        }
        std::fs::create_dir_all(dir.join("debs"))?;
        std::fs::create_dir_all(dir.join("unpacked"))?;
        if !Path::new(KEYRING).is_file() {
            bail!("{KEYRING} is missing: apt-get install -y debian-archive-keyring");
        }
        let sources: String = SUITES
            .iter()
            .map(|(uri, suite)| format!("deb [signed-by={KEYRING}] {uri} {suite} main\n"))
            .collect();
        write_if_changed(&apt.join("etc/sources.list"), &sources)?;
        // Every Dir:: setting points into the cache: the host's apt configuration, sources
        // and package state are neither read nor touched. APT_CONFIG is read first, and
        // it names the (empty) parts directory and main file that follow.
        let a = apt.display();
        let conf = format!(
            "Dir::Etc::main \"{a}/etc/apt.conf\";\n\
             Dir::Etc::parts \"{a}/etc/apt.conf.d\";\n\
             Dir::Etc::sourcelist \"{a}/etc/sources.list\";\n\
             Dir::Etc::sourceparts \"{a}/etc/sources.list.d\";\n\
             Dir::Etc::preferences \"{a}/etc/preferences\";\n\
             Dir::Etc::preferencesparts \"{a}/etc/preferences.d\";\n\
             Dir::State \"{a}/state\";\n\
             Dir::State::status \"{a}/state/status\";\n\
             Dir::Cache \"{a}/cache\";\n\
             APT::Sandbox::User \"root\";\n\
             Acquire::Languages \"none\";\n\
             Debug::NoLocking \"true\";\n"
        );
        write_if_changed(&apt.join("etc/apt.conf"), &conf)?;
        let status = apt.join("state/status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        Ok(Self {
            dir,
            updated: false,
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The package's files, unpacked (fetched and checked first when not cached yet).
    pub fn unpacked(&mut self, pin: &Pin) -> Result<PathBuf> {
        let dest = self.dir.join("unpacked").join(file_stem(pin));
        if dest.join(".complete").exists() {
            return Ok(dest);
        }
        let deb = self.deb(pin)?;
        let partial = dest.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::create_dir_all(&partial)?;
        crate::run_checked(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial),
            &format!("dpkg-deb -x {}", deb.display()),
        )?;
        std::fs::write(partial.join(".complete"), "")?;
        std::fs::rename(&partial, &dest)
            .with_context(|| format!("cannot rename {} into place", partial.display()))?;
        Ok(dest)
    }

    /// The checked .deb of `pin`, downloaded when missing or not matching its SHA256.
    fn deb(&mut self, pin: &Pin) -> Result<PathBuf> {
        let path = self
            .dir
            .join("debs")
            .join(format!("{}.deb", file_stem(pin)));
        if path.exists() {
            if sha256(&path)? == pin.sha256 {
                return Ok(path);
            }
            eprintln!(
                "kernel-test: {} does not match its pinned SHA256: fetching it again",
                path.display()
            );
            std::fs::remove_file(&path)?;
        }
        if !self.updated {
            println!(
                "kernel-test: apt-get update (private configuration in {}/apt)",
                self.dir.display()
            );
            run_quiet(self.apt("apt-get").arg("update"), "apt-get update")?;
            self.updated = true;
        }
        let download = self.dir.join("download");
        let _ = std::fs::remove_dir_all(&download);
        std::fs::create_dir_all(&download)?;
        println!("kernel-test: fetching {} {}", pin.package, pin.version);
        let out = self
            .apt("apt-get")
            .args(["download", &format!("{}={}", pin.package, pin.version)])
            .current_dir(&download)
            .stdin(Stdio::null())
            .output()
            .context("cannot run apt-get download")?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&download);
            bail!(
                "{}",
                self.not_in_archive(pin, &String::from_utf8_lossy(&out.stderr))
            );
        }
        let fetched = std::fs::read_dir(&download)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb in {}", download.display()))?;
        let sum = sha256(&fetched)?;
        if sum != pin.sha256 {
            let _ = std::fs::remove_dir_all(&download);
            bail!(
                "{} {} from the archive has SHA256 {sum}, not the pinned {}: refusing it",
                pin.package,
                pin.version,
                pin.sha256
            );
        }
        std::fs::rename(&fetched, &path)?;
        let _ = std::fs::remove_dir_all(&download);
        Ok(path)
    }

    /// Why `pin` could not be downloaded, naming what the archive has now.
    fn not_in_archive(&self, pin: &Pin, apt_error: &str) -> String {
        let versions = self.madison(pin.package);
        if !versions.is_empty() {
            return format!(
                "the archive no longer has {} {} (it has {}): Debian replaced it at a point release; update the pin in xtask/src/kernel/ (version and SHA256)",
                pin.package,
                pin.version,
                versions.join(", ")
            );
        }
        // A kernel's package name carries its ABI (linux-image-6.1.0-57-amd64-unsigned):
        // a point release brings a new name. Look for its successor in the local index.
        if let Some(successor) = self.successor(pin.package) {
            let versions = self.madison(&successor);
            return format!(
                "the archive no longer has {} {}: it now has {successor} {}; update the pin in xtask/src/kernel/ (package, version and SHA256)",
                pin.package,
                pin.version,
                versions.join(", ")
            );
        }
        format!(
            "cannot download {} {}: {}",
            pin.package,
            pin.version,
            apt_error
                .trim()
                .lines()
                .last()
                .unwrap_or("apt-get download failed")
        )
    }

    /// The versions of `package` in the private index.
    fn madison(&self, package: &str) -> Vec<String> {
        let Ok(out) = self.apt("apt-cache").args(["madison", package]).output() else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split('|').nth(1).map(|v| v.trim().to_owned()))
            .collect()
    }

    /// The newest package named like `package` with another ABI number (the part after
    /// the kernel version and before the flavour), from the private index.
    fn successor(&self, package: &str) -> Option<String> {
        // linux-image-6.1.0-57-amd64-unsigned: prefix "linux-image-6.1.0-", suffix
        // "-amd64-unsigned"; linux-image-6.12.117+deb12-amd64-unsigned: prefix
        // "linux-image-6.12.", suffix "+deb12-amd64-unsigned".
        let (prefix, suffix) = if let Some(plus) = package.find('+') {
            let head = &package[..plus];
            let dot = head.rfind('.')?;
            (&package[..=dot], &package[plus..])
        } else {
            let flavour = package.find("-amd64")?;
            let dash = package[..flavour].rfind('-')?;
            (&package[..=dash], &package[flavour..])
        };
        let out = self
            .apt("apt-cache")
            .args(["pkgnames", prefix])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|n| n.ends_with(suffix))
            .filter_map(|n| {
                let abi = &n[prefix.len()..n.len() - suffix.len()];
                abi.parse::<u32>().ok().map(|abi| (abi, n.to_owned()))
            })
            .max()
            .map(|(_, n)| n)
    }

    /// `tool` (apt-get, apt-cache) with the private configuration.
    fn apt(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        cmd.env("APT_CONFIG", self.dir.join("apt/etc/apt.conf"));
        cmd
    }
}

/// `PKG_VERSION` with the epoch's colon replaced: a file name.
fn file_stem(pin: &Pin) -> String {
    format!("{}_{}", pin.package, pin.version.replace(':', "%3a"))
}

/// The SHA256 of `path`, in hex (by `sha256sum`, from coreutils).
pub fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("cannot run sha256sum")?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("sha256sum printed nothing for {}", path.display()))
}

/// Runs `cmd` with its output captured; on failure the error carries the output's tail.
fn run_quiet(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{what} failed ({}): {}",
            out.status,
            err.trim().lines().last().unwrap_or("")
        );
    }
    Ok(())
}

/// Writes `text` to `path` unless it holds it already.
fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
