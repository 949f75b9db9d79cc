//! `cargo xtask test`: the project's test command.
//!
//! The integration tests start the workspace binaries from `target/debug`, and
//! `cargo test` alone does not build binaries of other packages, so every binary is
//! built first.
//!
//! Then, with no filter given, the drain and restart tests run a second time with
//! `HANDOFF_FORCE_WHOLE_HOST=1`: handoffd behaves as on a kernel without the per-process
//! task iterator (Linux < 6.1) and walks the whole host for each tag pass and listener
//! search, so that path runs on every CI machine too. The tests' support module checks,
//! through `handoffctl status`, that each daemon really ran in that mode.

use std::ffi::OsString;
use std::path::Path;

use anyhow::Result;

use crate::{cargo, run_checked};

/// The test binaries run again with the whole-host fallback forced.
const FALLBACK_TESTS: &[&str] = &["drain", "restart"];

/// Runs `cargo build --workspace --bins`, then `cargo test --workspace <args>`, then (with
/// no args) the drain tests with the whole-host fallback forced.
pub fn run(root: &Path, args: &[OsString]) -> Result<()> {
    run_checked(
        cargo(root).args(["build", "--workspace", "--bins"]),
        "cargo build --workspace --bins",
    )?;
    run_checked(
        cargo(root).args(["test", "--workspace"]).args(args),
        "cargo test --workspace",
    )?;
    if !args.is_empty() {
        return Ok(());
    }
    println!(
        "== the drain tests again, with the whole-host fallback forced (HANDOFF_FORCE_WHOLE_HOST=1)"
    );
    let mut cmd = cargo(root);
    cmd.args(["test", "-p", "handoff-tests"])
        .env("HANDOFF_FORCE_WHOLE_HOST", "1");
    for test in FALLBACK_TESTS {
        cmd.args(["--test", test]);
    }
    run_checked(
        &mut cmd,
        "the drain tests with the whole-host fallback forced",
    )
}
