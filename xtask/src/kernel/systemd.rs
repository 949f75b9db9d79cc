//! `cargo xtask systemd-test`: the package and its unit under a real systemd as PID 1.
//!
//! 1. builds the `.deb` with cargo-deb (`cargo install cargo-deb --version 3.8.0 --locked`
//!    first when that version is missing) and `testsrv` statically (the kernel test's
//!    build);
//! 2. makes a minimal Debian 12 root with `debootstrap --variant=minbase` plus
//!    [`ROOT_PACKAGES`], trimmed (documentation, locales, apt lists), cached as a tarball
//!    in `~/.cache/handoff/systemd-test/` (or `$XDG_CACHE_HOME/…`) keyed by the suite, the
//!    mirror and the package list;
//! 3. unpacks a copy, installs the package into it with `dpkg -i` in a chroot (the
//!    package installs and its dependencies are there; its postinst enables the unit),
//!    then adds what a user would: a configuration naming a test service run as `nobody`,
//!    and for the test the static `testsrv`, the kernel's modules (with `depmod`) and a
//!    oneshot unit running `systemd_check.sh` after handoffd.service;
//! 4. packs the root as an uncompressed initramfs and boots it under qemu (software
//!    emulation) with the Debian 6.1 kernel of `kernel-test` and `rdinit=/sbin/init`:
//!    systemd runs as PID 1 on the initramfs, starts handoffd.service because the package
//!    enabled it, then the check unit, which prints `@@handoff check NAME PASS|FAIL
//!    detail` on the serial console and powers off;
//! 5. prints each check with its time and the time of each stage; fails on a FAIL or a
//!    missing check. qemu is killed and the temporary directories removed in every case;
//!    a failed run's console log is kept in `$TMPDIR` and its path printed.
//!
//! Needs root (debootstrap, chroot), `debootstrap`, `qemu-system-x86`, `dpkg`, `tar`, and
//! network access to deb.debian.org (and crates.io for cargo-deb) for a cold cache.
//!
//! Measured on the 2-core development VM (no KVM, shared with other builds), 2026-12-01:
//! cold (cargo-deb not installed: `cargo install` 212 s; empty root cache: debootstrap
//! 108 s; release and static builds from scratch: 2-6 min depending on load); warm 31-66 s
//! (cargo-deb packaging 4-12 s, image 1-2.5 s, boot to the first check 16-34 s, the
//! checks 8-15 s). The initramfs is 105 MB.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::boot::{KERNELS, MODULES};
use super::console::{Console, Next, print_tail};
use super::{build_static, cpio, fetch};
use crate::children::{catch_interrupts, check_interrupted};
use crate::{TempDir, cargo, run_checked};

/// The cargo-deb release installed when missing (builds on Rust 1.95; MSRV 1.85).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Debian suite and mirror of the root (the mirror the kernel test fetches from).
const SUITE: &str = "bookworm";
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

/// The kernel the root boots (one of [`KERNELS`]).
const KERNEL: &str = "6.1";

/// The checks `systemd_check.sh` runs, in order; each must print PASS.
pub const CHECKS: [&str; 13] = [
    "enabled",
    "active",
    "status",
    "runtime-dir",
    "promote-v1",
    "unpromoted-v2",
    "promote-v2",
    "retired-v1",
    "reload-good",
    "reload-bad",
    "journal-err",
    "journal-plain",
    "stop-keeps-steering",
];

/// How long the guest may take from qemu's start to its last check.
const DEADLINE: Duration = Duration::from_secs(600);

/// Runs the systemd test; false when a check failed (the table says which).
pub fn run(root: &Path) -> Result<bool> {
    catch_interrupts()?;
    let started = Instant::now();
    let mut times: Vec<(&str, Duration)> = Vec::new();
    require_root_tools()?;

    // The kernel first: a missing pin fails before the long builds.
    let kernel = KERNELS
        .iter()
        .find(|k| k.name == KERNEL)
        .context("the systemd test's kernel is not pinned")?;
    let mut cache = fetch::Cache::open()?;
    let kernel_dir = cache.unpacked(&kernel.pin)?;
    let files = super::boot::kernel_files(&kernel_dir)?;

    let t = Instant::now();
    let deb = build_deb(root)?;
    times.push(("cargo-deb build", t.elapsed()));

    let t = Instant::now();
    let built = build_static(root, false)?;
    let testsrv = built.bin_dir.join("testsrv");
    if !testsrv.is_file() {
        bail!("{} is missing after the static build", testsrv.display());
    }
    times.push(("static testsrv build", t.elapsed()));

    let t = Instant::now();
    let (tarball, cold) = cached_root()?;
    times.push((
        if cold {
            "debootstrap (cold)"
        } else {
            "debootstrap (cached)"
        },
        t.elapsed(),
    ));

    check_interrupted()?;
    let t = Instant::now();
    let work = TempDir::new_in(&cache_base()?, "systemd-test")?;
    let image = work.path().join("root");
    std::fs::create_dir(&image)?;
    run_checked(
        Command::new("tar")
            .arg("-C")
            .arg(&image)
            .args(["--numeric-owner", "-xpf"])
            .arg(&tarball),
        "unpacking the cached root",
    )?;
    install_deb(&image, &deb)?;
    add_test_files(&image, &testsrv, &kernel_dir, &files)?;
    let initrd = work.path().join("initrd.cpio");
    write_cpio(&image, &initrd)?;
    // The tree is in the archive now: free the disk before booting.
    std::fs::remove_dir_all(&image)?;
    let size = std::fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0);
    times.push(("image (unpack, dpkg -i, cpio)", t.elapsed()));

    println!(
        "systemd-test: booting Linux {} with systemd as PID 1, initramfs {} MB, deadline {} s",
        files.release,
        size >> 20,
        DEADLINE.as_secs()
    );
    let log = work.path().join("console.log");
    let mut outcome = Outcome::default();
    let boot = boot_and_read(&files.image, &initrd, &log, &mut outcome);
    if let Err(e) = &boot {
        outcome.error = Some(format!("{e:#}"));
    }
    if let Some(first) = outcome.first_check {
        times.push(("boot to the first check", first));
        if let Some(last) = outcome.last_check {
            times.push(("checks", last.saturating_sub(first)));
        }
    }

    println!();
    println!("systemd-test checks (Debian {SUITE}, systemd as PID 1, Linux {KERNEL}):");
    let mut passed = outcome.error.is_none() && outcome.done;
    for name in CHECKS {
        match outcome.checks.get(name) {
            Some((ok, detail, at)) => {
                println!(
                    "  {name:<20} {:<4} [{:>5.1} s] {detail}",
                    if *ok { "PASS" } else { "FAIL" },
                    at.as_secs_f64(),
                );
                passed &= *ok;
            }
            None => {
                println!("  {name:<20} FAIL did not run");
                passed = false;
            }
        }
    }
    if let Some(error) = &outcome.error {
        println!("  error: {error}");
    }
    println!("stage times:");
    for (stage, d) in &times {
        println!("  {stage:<30} {:>6.1} s", d.as_secs_f64());
    }
    println!(
        "  {:<30} {:>6.1} s",
        "total",
        started.elapsed().as_secs_f64()
    );
    if !passed {
        let kept =
            std::env::temp_dir().join(format!("handoff-systemd-test-{}.log", std::process::id()));
        if std::fs::copy(&log, &kept).is_ok() {
            print_tail(&kept, 80);
            println!("console log: {}", kept.display());
        }
    }
    println!("systemd-test: {}", if passed { "PASS" } else { "FAIL" });
    Ok(passed)
}

/// Fails naming what to install when a tool is missing or we are not root.
fn require_root_tools() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("systemd-test needs root (debootstrap, chroot, dpkg -i into the root)");
    }
    for (tool, package) in [
        ("debootstrap", "debootstrap"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("dpkg", "dpkg"),
        ("tar", "tar"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("{tool} is missing: apt-get install -y {package}");
        }
    }
    Ok(())
}

/// `cargo deb -p handoff`, installing the pinned cargo-deb first when needed; the path
/// of the package.
fn build_deb(root: &Path) -> Result<PathBuf> {
    let version = cargo(root)
        .args(["deb", "--version"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if !version
        .as_deref()
        .is_some_and(|v| v.ends_with(CARGO_DEB_VERSION))
    {
        println!(
            "systemd-test: cargo-deb {CARGO_DEB_VERSION} missing (found {}): cargo install",
            version.as_deref().unwrap_or("none")
        );
        run_checked(
            cargo(root).args([
                "install",
                "cargo-deb",
                "--version",
                CARGO_DEB_VERSION,
                "--locked",
            ]),
            "cargo install cargo-deb",
        )?;
    }
    let out = cargo(root)
        .args(["deb", "-p", "handoff", "--fast"])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo deb")?;
    if !out.status.success() {
        bail!("cargo deb -p handoff failed ({})", out.status);
    }
    // cargo-deb prints the package's path as its last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .context("cargo deb printed no .deb path")?;
    let deb = if deb.is_absolute() {
        deb
    } else {
        root.join(deb)
    };
    if !deb.is_file() {
        bail!("cargo deb named {}, which does not exist", deb.display());
    }
    println!("systemd-test: package {}", deb.display());
    Ok(deb)
}

/// `$XDG_CACHE_HOME/handoff` or `~/.cache/handoff`.
fn cache_base() -> Result<PathBuf> {
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
fn cached_root() -> Result<(PathBuf, bool)> {
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

/// `dpkg -i` of the package in a chroot into `image`, then checks that its postinst
/// enabled the unit.
fn install_deb(image: &Path, deb: &Path) -> Result<()> {
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
fn add_test_files(
    image: &Path,
    testsrv: &Path,
    kernel_dir: &Path,
    files: &super::boot::KernelFiles,
) -> Result<()> {
    let put = |path: &str, mode: u32, data: &[u8]| -> Result<()> {
        let full = image.join(path.trim_start_matches('/'));
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&full, data).with_context(|| format!("cannot write {}", full.display()))?;
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let link = |path: &str, target: &str| -> Result<()> {
        let full = image.join(path.trim_start_matches('/'));
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(&full);
        std::os::unix::fs::symlink(target, &full)
            .with_context(|| format!("cannot link {}", full.display()))
    };

    // What an administrator does after installing: name the service in the config.
    put("/etc/handoff/handoffd.toml", 0o644, GOOD_CONFIG.as_bytes())?;
    put(
        "/usr/local/bin/testsrv",
        0o755,
        &std::fs::read(testsrv).with_context(|| format!("cannot read {}", testsrv.display()))?,
    )?;
    put(
        "/usr/local/sbin/handoff-check",
        0o755,
        format!("#!/bin/bash\n{}", include_str!("systemd_check.sh")).as_bytes(),
    )?;
    put(
        "/etc/systemd/system/handoff-check.service",
        0o644,
        CHECK_UNIT.as_bytes(),
    )?;
    link(
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
        link(&format!("/etc/systemd/system/{unit}"), "/dev/null")?;
    }
    put("/etc/hostname", 0o644, b"handoff-systemd-test\n")?;

    // The kernel's diag modules, found by depmod and loaded by systemd-modules-load.
    let release = &files.release;
    let mut names = Vec::new();
    for (name, ko) in &files.modules {
        let sub = MODULES
            .iter()
            .find(|(_, n, _)| n == name)
            .map_or("extra", |(sub, _, _)| sub);
        put(
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
            put(&format!("/lib/modules/{release}/{list}"), 0o644, &data)?;
        }
    }
    put(
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
fn write_cpio(image: &Path, out: &Path) -> Result<()> {
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

/// What the guest reported.
#[derive(Default)]
struct Outcome {
    /// Check name → (passed, detail, time since qemu started).
    checks: BTreeMap<String, (bool, String, Duration)>,
    first_check: Option<Duration>,
    last_check: Option<Duration>,
    done: bool,
    error: Option<String>,
}

/// Boots the image, logs the console to `log`, and fills `outcome` from the guest's
/// `@@handoff` lines until `@@handoff done` (then qemu gets a few seconds to power off
/// before it is killed) or the deadline.
fn boot_and_read(image: &Path, initrd: &Path, log: &Path, outcome: &mut Outcome) -> Result<()> {
    let mut console = Console::boot(
        image,
        initrd,
        "console=ttyS0 panic=-1 quiet rdinit=/sbin/init systemd.show_status=error",
        log,
    )?;
    let started = Instant::now();
    let mut end = started + DEADLINE;
    loop {
        let marker = match console.next_marker(end)? {
            Next::Marker(marker) => marker,
            Next::Exited => break,
            // Powered off too slowly: the results are in, qemu goes on drop.
            Next::Deadline if outcome.done => return Ok(()),
            Next::Deadline => bail!(
                "the guest did not finish within {} s (qemu killed)",
                DEADLINE.as_secs()
            ),
        };
        let marker = marker.as_str();
        let at = started.elapsed();
        println!("  [{:>5.1} s] {marker}", at.as_secs_f64());
        let (key, rest) = marker.split_once(' ').unwrap_or((marker, ""));
        match key {
            "check" => {
                let mut words = rest.splitn(3, ' ');
                let (Some(name), Some(verdict)) = (words.next(), words.next()) else {
                    continue;
                };
                let detail = words.next().unwrap_or("").to_owned();
                outcome.first_check.get_or_insert(at);
                outcome.last_check = Some(at);
                outcome
                    .checks
                    .insert(name.to_owned(), (verdict == "PASS", detail, at));
            }
            "done" => {
                outcome.done = true;
                end = Instant::now() + Duration::from_secs(15);
            }
            _ => {}
        }
    }
    if !outcome.done {
        bail!("qemu exited before the guest finished");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{dev_numbers, fnv1a};

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

    #[test]
    fn cache_key_hash_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }
}
