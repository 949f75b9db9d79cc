//! `cargo xtask systemd-test`: the package and its unit under a real systemd as PID 1.
//!
//! 1. builds the `.deb` with cargo-deb (`cargo install cargo-deb --version 3.8.0 --locked`
//!    first when that version is missing) and `testsrv` statically (the kernel test's
//!    build);
//! 2. makes a minimal Debian 12 root with `debootstrap --variant=minbase` plus
//!    [`root::ROOT_PACKAGES`], trimmed (documentation, locales, apt lists), cached as a tarball
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

mod image;
mod root;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use self::image::{add_test_files, install_deb, write_cpio};
use self::root::{SUITE, cache_base, cached_root};
use super::boot::KERNELS;
use super::console::{Console, Next, print_tail};
use super::{build_static, fetch};
use crate::children::{catch_interrupts, check_interrupted};
use crate::{TempDir, cargo, run_checked};

/// The cargo-deb release installed when missing (builds on Rust 1.95; MSRV 1.85).
const CARGO_DEB_VERSION: &str = "3.8.0";

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
    let initrd = build_initrd(&work, &tarball, &deb, &testsrv, &kernel_dir, &files)?;
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

    let passed = report(&outcome, &times, started, &log);
    println!("systemd-test: {}", if passed { "PASS" } else { "FAIL" });
    Ok(passed)
}

/// Unpacks the cached root in `work`, installs the package and the test files, and packs it into
/// an initramfs; the unpacked tree is removed before returning the archive's path.
fn build_initrd(
    work: &TempDir,
    tarball: &Path,
    deb: &Path,
    testsrv: &Path,
    kernel_dir: &Path,
    files: &super::boot::KernelFiles,
) -> Result<PathBuf> {
    let image = work.path().join("root");
    std::fs::create_dir(&image)?;
    run_checked(
        Command::new("tar")
            .arg("-C")
            .arg(&image)
            .args(["--numeric-owner", "-xpf"])
            .arg(tarball),
        "unpacking the cached root",
    )?;
    install_deb(&image, deb)?;
    add_test_files(&image, testsrv, kernel_dir, files)?;
    let initrd = work.path().join("initrd.cpio");
    write_cpio(&image, &initrd)?;
    // The tree is in the archive now: free the disk before booting.
    std::fs::remove_dir_all(&image)?;
    Ok(initrd)
}

/// Prints the checks' table and the stage times, and the console log's tail on a failure; true
/// when every check passed.
fn report(outcome: &Outcome, times: &[(&str, Duration)], started: Instant, log: &Path) -> bool {
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
    for (stage, d) in times {
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
        if std::fs::copy(log, &kept).is_ok() {
            print_tail(&kept, 80);
            println!("console log: {}", kept.display());
        }
    }
    passed
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
    crate::ensure_cargo_tool(root, "deb", "cargo-deb", CARGO_DEB_VERSION, "systemd-test")?;
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
