//! Developer tasks for the handoff workspace, run as `cargo xtask <task>`.
//!
//! - `build-ebpf [--check]`: compile `ebpf/*.bpf.c` into the committed `.bpf.o` objects,
//!   or check that the committed objects match their sources.
//! - `test [-- ARGS]`: build the workspace binaries, then run `cargo test --workspace`.
//! - `demo [--seconds N] [--concurrency N]`: a handoff under load on loopback (root).
//! - `bench [--quick] [--only NAME]`: the benchmarks, a table and `BENCHMARKS.md` (root).
//! - `kernel-test [--kernel 6.1|6.12|5.10 ...] [--quick]`: Debian's kernels under qemu, a
//!   smoke handoff and the integration tests in each (see `kernel`).
//! - `systemd-test`: the .deb installed into a Debian 12 root booted under qemu with
//!   systemd as PID 1, the unit's checks (root; see `kernel::systemd`).
//! - `layers [--cargo-modules]`: no module cycle, downward-only layers and length limits in
//!   the daemon crate (see `layers`).

mod bench;
mod build_ebpf;
mod children;
mod demo;
mod kernel;
mod layers;
mod test;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Command line of `cargo xtask`.
#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for handoff"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// The tasks.
#[derive(Subcommand)]
enum Task {
    /// Compile ebpf/*.bpf.c into ebpf/*.bpf.o with clang-19.
    BuildEbpf {
        /// Build into a temporary directory and fail if a committed object differs.
        #[arg(long)]
        check: bool,
    },
    /// Build the workspace binaries, then run `cargo test --workspace [ARGS]`.
    Test {
        /// Extra arguments for `cargo test` (filters, `-- --nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Show a handoff under load on loopback (needs root).
    Demo {
        /// How long the load runs, in seconds.
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..))]
        seconds: u64,
        /// Concurrent connections of the load generator.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
        concurrency: u32,
    },
    /// Run the benchmarks and write BENCHMARKS.md (needs root).
    Bench {
        /// Run each benchmark briefly and only check that it produces a number (CI).
        #[arg(long)]
        quick: bool,
        /// Run only these benchmarks (repeatable); prints the table, leaves BENCHMARKS.md.
        #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(bench::NAMES))]
        only: Vec<String>,
    },
    /// Boot Debian's kernels under qemu: a smoke handoff and the integration tests in each.
    KernelTest {
        /// The kernels to boot (repeatable) [default: all].
        #[arg(long = "kernel", value_name = "VERSION", value_parser = clap::builder::PossibleValuesParser::new(kernel::NAMES))]
        kernels: Vec<String>,
        /// Run only the smoke handoff and the migrate and fallback tests (CI).
        #[arg(long)]
        quick: bool,
        /// Run only these integration tests (repeatable; e.g. --test steer).
        #[arg(long = "test", value_name = "NAME")]
        tests: Vec<String>,
    },
    /// Build the .deb, install it into a Debian 12 root and boot that root under qemu with
    /// systemd as PID 1: the unit's checks (needs root).
    SystemdTest,
    /// Check the daemon crate's shape: no module cycle, uses only down the
    /// layers of `xtask/src/layers/mod.rs`, files within 500 lines, fns within 80.
    Layers {
        /// Also run cargo-modules' cycle check (installed when missing), which counts
        /// cycles between items too (a type and its method returning `Self`).
        #[arg(long)]
        cargo_modules: bool,
    },
    /// The scale benchmark's client (started by `bench`, inside its network namespace).
    #[command(hide = true)]
    BenchHold(bench::HoldArgs),
    /// The flood benchmark's attacker (started by `bench` as uid 65534 in its namespace).
    #[command(hide = true)]
    BenchFlood(bench::FloodArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One line per error, with its causes, and no backtrace even under RUST_BACKTRACE=1.
    run(cli).unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

/// Runs the chosen task.
fn run(cli: Cli) -> Result<ExitCode> {
    let root = workspace_root()?;
    match cli.task {
        Task::BuildEbpf { check } => build_ebpf::run(&root, check)?,
        Task::Test { args } => test::run(&root, &args)?,
        Task::Demo {
            seconds,
            concurrency,
        } => {
            // The demo prints its own verdict; a failed demo only sets the exit status.
            if !demo::run(&root, seconds, concurrency)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Task::Bench { quick, only } => {
            // The table says what failed; a failure only sets the exit status.
            if !bench::run(&root, quick, &only)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Task::KernelTest {
            kernels,
            quick,
            tests,
        } => {
            // The tables say what failed; a failure only sets the exit status.
            if !kernel::run(&root, &kernels, quick, &tests)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Task::SystemdTest => {
            // The table says what failed; a failure only sets the exit status.
            if !kernel::systemd::run(&root)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Task::Layers { cargo_modules } => {
            // Each violation is printed; they only set the exit status.
            if !layers::run(&root, cargo_modules)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Task::BenchHold(args) => bench::hold(&args)?,
        Task::BenchFlood(args) => bench::flood(&args)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The workspace root: the parent of this crate's directory, canonicalised.
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .context("xtask's manifest directory has no parent")?;
    root.canonicalize()
        .with_context(|| format!("cannot resolve the workspace root {}", root.display()))
}

/// A `cargo` command running in `root`: the cargo that started us, or `cargo` from PATH.
fn cargo(root: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root);
    cmd
}

/// Installs `crate_name` at `version` with `cargo install --locked` unless `cargo SUB
/// --version` already reports that version (`who` names the caller in the message).
fn ensure_cargo_tool(
    root: &Path,
    sub: &str,
    crate_name: &str,
    version: &str,
    who: &str,
) -> Result<()> {
    let found = cargo(root)
        .args([sub, "--version"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if found.as_deref().is_some_and(|v| v.ends_with(version)) {
        return Ok(());
    }
    println!(
        "{who}: {crate_name} {version} missing (found {}): cargo install",
        found.as_deref().unwrap_or("none")
    );
    run_checked(
        cargo(root).args(["install", crate_name, "--version", version, "--locked"]),
        &format!("cargo install {crate_name}"),
    )
}

/// Runs `cmd` with inherited stdio and fails unless it exits successfully.
fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// A private temporary directory, removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/handoff-<label>-<pid>-<n>` with mode 0700.
    fn new(label: &str) -> Result<Self> {
        Self::new_in(&std::env::temp_dir(), label)
    }

    /// Creates `BASE/handoff-<label>-<pid>-<n>` with mode 0700.
    fn new_in(base: &Path, label: &str) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let pid = std::process::id();
        for n in 0..100 {
            let path = base.join(format!("handoff-{label}-{pid}-{n}"));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Self(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()));
                }
            }
        }
        bail!(
            "cannot create a temporary directory under {}",
            base.display()
        )
    }

    /// The directory's path.
    fn path(&self) -> &Path {
        &self.0
    }

    /// Keeps the directory and what is in it (for a post-mortem); returns its path.
    fn keep(self) -> PathBuf {
        let this = std::mem::ManuallyDrop::new(self);
        this.0.clone()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: cannot remove {}: {e}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
