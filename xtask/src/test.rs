//! `cargo xtask test`: the project's test command.
//!
//! The integration tests start the workspace binaries from `target/debug`, and
//! `cargo test` alone does not build binaries of other packages, so every binary is
//! built first.

use std::ffi::OsString;
use std::path::Path;

use anyhow::Result;

use crate::{cargo, run_checked};

/// Runs `cargo build --workspace --bins`, then `cargo test --workspace <args>`.
pub fn run(root: &Path, args: &[OsString]) -> Result<()> {
    run_checked(
        cargo(root).args(["build", "--workspace", "--bins"]),
        "cargo build --workspace --bins",
    )?;
    run_checked(
        cargo(root).args(["test", "--workspace"]).args(args),
        "cargo test --workspace",
    )
}
