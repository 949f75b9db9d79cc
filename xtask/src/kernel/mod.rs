//! `cargo xtask kernel-test [--kernel 6.1|6.12|5.10 ...] [--quick]`: handoff on the
//! kernels users run, booted under qemu (software emulation) from Debian's packages.
//!
//! For each kernel (default: all three) it
//! 1. fetches the pinned kernel package and busybox-static with a private apt
//!    configuration into `~/.cache/handoff/kernel-test` (or `$XDG_CACHE_HOME/…`), checks
//!    their SHA256 and unpacks them with `dpkg-deb -x` (never installed); a pin the archive
//!    no longer has fails naming the version it has now (see [`boot::KERNELS`]);
//! 2. builds the workspace binaries and the integration tests statically
//!    (`+crt-static`, target `x86_64-unknown-linux-gnu`; done once for all kernels);
//! 3. writes an initramfs (an uncompressed newc cpio, [`cpio`]): busybox as init and
//!    shell, the binaries in `/t/`, the test executables in `/t/deps/`, the kernel's
//!    `inet_diag`, `tcp_diag`, `udp_diag`, `sch_ingress`, `cls_bpf` and `veth` modules,
//!    and the host's `ip`, `tc`, `ss`, `prlimit`, `setpriv`, nginx and python3 with their
//!    libraries (CI installs `iproute2 nginx-light`);
//! 4. boots it with `qemu-system-x86_64 -accel tcg` and runs `guest.sh`: on 6.1 and 6.12
//!    a smoke handoff (handoffd, two testsrv generations: steer, promote, retire) and the
//!    integration tests with `HANDOFF_REQUIRE_PRIVILEGED=1` and
//!    `HANDOFF_TEST_SLOWDOWN=8` (a test that prints `SKIPPED` fails); on 5.10 only the
//!    start-up refusal: handoffd exits 1 with one line `Error: this kernel (Linux …) lacks
//!    … (Linux >= …)` and leaves nothing in its state directory or bpffs;
//! 5. prints a table per kernel and exits non-zero if any kernel failed. A failed
//!    kernel's console log is kept in `$TMPDIR` and its path printed; everything else
//!    (qemu, temporary directories) goes, the package cache stays.
//!
//! `--quick` (CI) runs the smoke handoff (promote, steer, drain, retire) and only the
//! `migrate` and `fallback` tests: the load tests of `steer` and `drain` take minutes under
//! emulation and are left to the full run. `systemd` never runs
//! in the guest: it checks the unit file with `systemd-analyze`, not the kernel.
//! Needs `qemu-system-x86`, `dpkg`, `xz-utils`, `zstd` (6.12's kernel) and network access
//! to deb.debian.org on the first run; root is not needed on the host.
//!
//! Measured on the 2-core development VM (no KVM), 2026-12-01: `--quick` for all three
//! kernels 645 s with the static build cached (6.1 287 s, 6.12 326 s, 5.10 10 s; boot to
//! the guest script ~5 s, smoke handoff ~10 s); the static build from a cold target
//! directory adds ~150 s, fetching the four packages into an empty cache ~15 s.

mod boot;
mod console;
mod cpio;
mod fetch;
mod image;
mod outcome;
pub mod systemd;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use self::boot::{Expect, KERNELS, Kernel};
use self::console::{Console, Next, print_tail};
use self::outcome::{Outcome, TestRun};
use crate::children::{catch_interrupts, check_interrupted};
use crate::{TempDir, cargo, run_checked};

/// The `--kernel` values.
pub const NAMES: [&str; 3] = ["6.1", "6.12", "5.10"];

/// The test executables of `--quick`: migration of queued connections, a drain with
/// each tag-pass mode, and promote on READY=1 (SCM_PIDFD on 6.12, the pid and start time
/// on 6.1, which lacks it).
const QUICK_TESTS: [&str; 3] = ["migrate", "fallback", "readiness"];

/// Test executables that never run in the guest, and why.
const NOT_IN_GUEST: [(&str, &str); 1] = [(
    "systemd",
    "checks the unit file with systemd-analyze, not the kernel",
)];

/// `HANDOFF_TEST_SLOWDOWN` in the guest: an emulated CPU is about this much slower.
const SLOWDOWN: u32 = 8;

/// The target of the static build.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The workspace binaries the tests start (from `/t/`, next to `/t/deps/`).
const BINARIES: [&str; 7] = [
    "handoffd",
    "handoffctl",
    "testsrv",
    "loadgen",
    "bindflood",
    "intruder",
    "scrapeflood",
];

/// Runs the kernel test; false when a kernel failed (the tables say which and why).
pub fn run(root: &Path, names: &[String], quick: bool, only: &[String]) -> Result<bool> {
    catch_interrupts()?;
    let started = Instant::now();
    let kernels: Vec<Kernel> = if names.is_empty() {
        KERNELS.to_vec()
    } else {
        KERNELS
            .iter()
            .filter(|k| names.iter().any(|n| n == k.name))
            .copied()
            .collect()
    };
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    if !qemu.is_ok_and(|s| s.success()) {
        bail!("qemu-system-x86_64 is missing: apt-get install -y qemu-system-x86");
    }

    let mut cache = fetch::Cache::open()?;
    let busybox = cache.unpacked(&fetch::BUSYBOX)?.join("bin/busybox");
    let mut files = Vec::new();
    for kernel in &kernels {
        let dir = cache.unpacked(&kernel.pin)?;
        files.push(boot::kernel_files(&dir)?);
    }
    let fetched = started.elapsed();
    println!("kernel-test: packages in {}", cache.dir().display());

    let build_started = Instant::now();
    let need_tests = kernels.iter().any(|k| k.expect == Expect::Run);
    let built = build_static(root, need_tests)?;
    let build_time = build_started.elapsed();
    let tests: Vec<&(String, PathBuf)> = built
        .tests
        .iter()
        .filter(|(name, _)| !NOT_IN_GUEST.iter().any(|(n, _)| n == name))
        .filter(|(name, _)| !quick || QUICK_TESTS.contains(&name.as_str()))
        .filter(|(name, _)| only.is_empty() || only.contains(name))
        .collect();
    if let Some(unknown) = only
        .iter()
        .find(|n| !built.tests.iter().any(|(name, _)| name == *n))
    {
        bail!("--test {unknown}: no such integration test (tests/tests/{unknown}.rs)");
    }
    if need_tests && quick && only.is_empty() && tests.len() != QUICK_TESTS.len() {
        bail!("the build lacks one of the quick tests {QUICK_TESTS:?}");
    }

    let mut outcomes = Vec::new();
    for (kernel, files) in kernels.iter().zip(&files) {
        check_interrupted()?;
        let outcome = run_kernel(kernel, files, &busybox, &built.bin_dir, &tests, quick)?;
        outcome.print_table();
        outcomes.push(outcome);
    }

    println!();
    println!(
        "{:<7} {:<22} {:<16} {:<22} {:>7}  result",
        "kernel", "package version", "smoke/refusal", "tests pass/fail/ign", "wall"
    );
    for o in &outcomes {
        println!("{}", o.summary_row());
    }
    for (name, why) in NOT_IN_GUEST {
        println!("not run in the guest: {name} ({why})");
    }
    println!(
        "fetch {:.0} s, static build {:.0} s, total {:.0} s",
        fetched.as_secs_f64(),
        build_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(outcomes.iter().all(Outcome::passed))
}

/// The static build's outputs.
struct Built {
    /// Where the workspace binaries are.
    bin_dir: PathBuf,
    /// Integration test executables by target name.
    tests: Vec<(String, PathBuf)>,
}

/// Builds the workspace binaries and (if `tests`) the integration tests statically.
fn build_static(root: &Path, tests: bool) -> Result<Built> {
    let rustflags = "-C target-feature=+crt-static -C debuginfo=0 -C strip=debuginfo";
    let static_cargo = || {
        let mut cmd = cargo(root);
        cmd.env("RUSTFLAGS", rustflags)
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        cmd
    };
    run_checked(
        static_cargo().args([
            "build",
            "--workspace",
            "--bins",
            "--exclude",
            "xtask",
            "--target",
            TARGET,
        ]),
        "the static build of the workspace binaries",
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), |t| root.join(t));
    let bin_dir = target.join(TARGET).join("debug");
    let mut found = Vec::new();
    if tests {
        let out = static_cargo()
            .args([
                "test",
                "--no-run",
                "-p",
                "handoff-tests",
                "--tests",
                "--target",
                TARGET,
                "--message-format=json",
            ])
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run cargo test --no-run")?;
        if !out.status.success() {
            bail!("the static build of the tests failed ({})", out.status);
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let is_test = msg["reason"] == "compiler-artifact"
                && msg["target"]["kind"] == serde_json::json!(["test"]);
            if let (true, Some(name), Some(exe)) = (
                is_test,
                msg["target"]["name"].as_str(),
                msg["executable"].as_str(),
            ) {
                found.push((name.to_owned(), PathBuf::from(exe)));
            }
        }
        found.sort();
        if found.is_empty() {
            bail!("cargo test --no-run named no integration test executable");
        }
    }
    Ok(Built {
        bin_dir,
        tests: found,
    })
}

/// Builds the image for `kernel`, boots it, and collects what the guest reports.
fn run_kernel(
    kernel: &Kernel,
    files: &boot::KernelFiles,
    busybox: &Path,
    bin_dir: &Path,
    tests: &[&(String, PathBuf)],
    quick: bool,
) -> Result<Outcome> {
    let started = Instant::now();
    let dir = TempDir::new(&format!("kernel-test-{}", kernel.name))?;
    let expected_tests: Vec<String> = match kernel.expect {
        Expect::Run => tests.iter().map(|(n, _)| n.clone()).collect(),
        Expect::Refusal => Vec::new(),
    };

    let mut tree = image::Tree::base();
    let modules = fill_tree(&mut tree, files, busybox, bin_dir, tests, &expected_tests)?;
    let (test_timeout, deadline) = match (kernel.expect, quick) {
        (Expect::Refusal, _) => (120, Duration::from_secs(300)),
        (Expect::Run, true) => (900, Duration::from_secs(1800)),
        (Expect::Run, false) => (900, Duration::from_secs(5400)),
    };
    let script = format!(
        "KERNEL={}\nEXPECT={}\nTESTS=\"{}\"\nMODULES=\"{}\"\nSLOWDOWN={SLOWDOWN}\nTEST_TIMEOUT={test_timeout}\n{}",
        kernel.name,
        match kernel.expect {
            Expect::Run => "run",
            Expect::Refusal => "refusal",
        },
        expected_tests.join(" "),
        modules.join(" "),
        include_str!("guest.sh")
    );
    tree.bytes("/t/guest.sh", 0o755, script);
    let initrd = dir.path().join("initrd.cpio");
    tree.write(&initrd)?;
    let size = std::fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0);
    println!(
        "kernel-test: booting {} ({}, {}), initramfs {} MB, deadline {} s",
        kernel.name,
        files.release,
        files.image.display(),
        size >> 20,
        deadline.as_secs()
    );

    let log = dir.path().join("console.log");
    let mut outcome = Outcome {
        kernel: *kernel,
        release: None,
        check: None,
        expected_tests,
        tests: Vec::new(),
        done: false,
        error: None,
        wall: Duration::ZERO,
        log: None,
    };
    if let Err(e) = boot_and_read(&files.image, &initrd, &log, deadline, &mut outcome) {
        outcome.error = Some(format!("{e:#}"));
    }
    outcome.wall = started.elapsed();
    if !outcome.passed() {
        // The console log outlives the temporary directory, for a post-mortem.
        let kept = std::env::temp_dir().join(format!(
            "handoff-kernel-test-{}-{}.log",
            kernel.name,
            std::process::id()
        ));
        if std::fs::copy(&log, &kept).is_ok() {
            print_tail(&kept, 60);
            outcome.log = Some(kept);
        }
    }
    Ok(outcome)
}

/// Puts busybox, the host programs, the static binaries, the expected tests and the kernel's
/// modules in `tree`; returns the modules' names, in the order the guest loads them.
fn fill_tree<'a>(
    tree: &mut image::Tree,
    files: &'a boot::KernelFiles,
    busybox: &Path,
    bin_dir: &Path,
    tests: &[&(String, PathBuf)],
    expected_tests: &[String],
) -> Result<Vec<&'a str>> {
    tree.busybox(busybox)?;
    tree.host_programs(expected_tests.iter().any(|t| t == "fd_budget"))?;
    for name in BINARIES {
        let path = bin_dir.join(name);
        if !path.is_file() {
            bail!("{} is missing after the static build", path.display());
        }
        tree.file(&format!("/t/{name}"), 0o755, &path);
    }
    for (name, path) in tests.iter().filter(|(n, _)| expected_tests.contains(n)) {
        tree.file(&format!("/t/deps/{name}"), 0o755, path);
    }
    let mut modules = Vec::new();
    for (name, ko) in &files.modules {
        tree.bytes(&format!("/lib/modules/{name}.ko"), 0o644, ko.clone());
        modules.push(name.as_str());
    }
    Ok(modules)
}

/// Boots `image` with `initrd`, logs the console to `log`, and fills `outcome` from the
/// guest's `@@handoff` lines until the guest powers off or `deadline` passes.
fn boot_and_read(
    image: &Path,
    initrd: &Path,
    log: &Path,
    deadline: Duration,
    outcome: &mut Outcome,
) -> Result<()> {
    let mut console = Console::boot(image, initrd, "console=ttyS0 panic=-1 quiet", log)?;
    let started = Instant::now();
    let end = started + deadline;
    loop {
        let marker = match console.next_marker(end)? {
            Next::Marker(marker) => marker,
            Next::Exited => break,
            Next::Deadline => bail!(
                "the guest did not finish within {} s (qemu killed)",
                deadline.as_secs()
            ),
        };
        let marker = marker.as_str();
        println!(
            "  [{:>5.0} s] {} {marker}",
            started.elapsed().as_secs_f64(),
            outcome.kernel.name
        );
        let (key, rest) = marker.split_once(' ').unwrap_or((marker, ""));
        match key {
            "kernel" => outcome.release = Some(rest.to_owned()),
            "smoke" | "refusal" => outcome.check = Some(rest.to_owned()),
            "test" => {
                if let Some(run) = TestRun::parse(rest) {
                    outcome.tests.push(run);
                }
            }
            "setup" => outcome.error = Some(format!("guest set-up failed: {rest}")),
            "done" => outcome.done = true,
            _ => {}
        }
    }
    if !outcome.done {
        bail!("qemu exited before the guest finished");
    }
    Ok(())
}
