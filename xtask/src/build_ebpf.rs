//! `cargo xtask build-ebpf [--check]`: the BPF objects and their sources.
//!
//! Every `ebpf/*.bpf.c` is compiled into `ebpf/*.bpf.o` by a pinned compiler, from the
//! workspace root, with a relative source path and the root mapped to `.` in the debug
//! info, so that the object is byte-identical in every checkout. The objects are
//! committed; `--check` rebuilds them in a temporary directory and compares bytes.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::TempDir;

/// The pinned compiler: another clang version emits different bytes.
const CLANG: &str = "clang-19";

/// The directory of the BPF sources and objects, relative to the workspace root.
const EBPF_DIR: &str = "ebpf";

/// Builds every object in place, or with `check` compares fresh builds with them.
pub fn run(root: &Path, check: bool) -> Result<()> {
    let sources = sources(root)?;
    if check {
        let tmp = TempDir::new("build-ebpf")?;
        let mut stale = Vec::new();
        for src in &sources {
            let obj = object_of(src);
            let fresh = tmp
                .path()
                .join(obj.file_name().context("object has no name")?);
            compile(root, src, &fresh)?;
            let fresh = std::fs::read(&fresh)
                .with_context(|| format!("cannot read {}", fresh.display()))?;
            match std::fs::read(root.join(&obj)) {
                Ok(committed) if committed == fresh => println!("{}: up to date", obj.display()),
                Ok(_) => stale.push(format!(
                    "{} does not match its source: run `cargo xtask build-ebpf` and commit the object",
                    obj.display()
                )),
                Err(e) if e.kind() == ErrorKind::NotFound => stale.push(format!(
                    "{} is missing: run `cargo xtask build-ebpf` and commit the object",
                    obj.display()
                )),
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot read {}", obj.display()));
                }
            }
        }
        if !stale.is_empty() {
            bail!("{}", stale.join("\n"));
        }
    } else {
        for src in &sources {
            let obj = object_of(src);
            compile(root, src, &root.join(&obj))?;
            println!("built {}", obj.display());
        }
    }
    Ok(())
}

/// The `ebpf/*.bpf.c` files, relative to `root`, sorted.
fn sources(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join(EBPF_DIR);
    let mut sources = Vec::new();
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
    {
        let name = entry?.file_name();
        if name.to_str().is_some_and(|n| n.ends_with(".bpf.c")) {
            sources.push(Path::new(EBPF_DIR).join(name));
        }
    }
    sources.sort();
    if sources.is_empty() {
        bail!("no *.bpf.c source in {}", dir.display());
    }
    Ok(sources)
}

/// `ebpf/x.bpf.c` → `ebpf/x.bpf.o`.
fn object_of(src: &Path) -> PathBuf {
    src.with_extension("o")
}

/// Compiles `src` (relative to `root`) into `out` with the pinned clang.
fn compile(root: &Path, src: &Path, out: &Path) -> Result<()> {
    let mut cmd = Command::new(CLANG);
    cmd.current_dir(root)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .args(["-D__TARGET_ARCH_x86", "-I/usr/include/x86_64-linux-gnu"])
        .arg(format!("-fdebug-prefix-map={}=.", root.display()))
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(out);
    let status = match cmd.status() {
        Ok(status) => status,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("{CLANG} not found: install it with `apt-get install -y clang-19 libbpf-dev`")
        }
        Err(e) => return Err(e).with_context(|| format!("cannot run {CLANG}")),
    };
    if !status.success() {
        bail!("{CLANG} failed to compile {} ({status})", src.display());
    }
    Ok(())
}
