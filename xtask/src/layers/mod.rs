//! `cargo xtask layers`: the shape of the daemon crate, checked.
//!
//! 1. No cycle between the top-level modules of `daemon/src`, from the same scan as 2.
//!    With `--cargo-modules` also `cargo modules dependencies --lib -p handoff --acyclic
//!    --layout none` (cargo-modules [`CARGO_MODULES_VERSION`], installed with `cargo
//!    install --locked` first when that version is missing; 41 min on the 2-core VM). Not
//!    by default: its graph has items as well as modules, so a type and its method that
//!    returns `Self` are a cycle to it (`group::GroupKey` and `GroupKey::of` today).
//! 2. Layers, downward only: each top-level module of `daemon/src` belongs to one layer
//!    of [`LAYERS`] (lowest first) and may use, through `crate::…` or `super::…` paths,
//!    only the modules of its own layer or of lower ones. A module missing from the
//!    table is a violation too, so a new module gets placed. `#[cfg(test)]` modules are
//!    not read: a test may reach up.
//! 3. Lengths: every `.rs` file under [`LENGTH_DIRS`] at most [`MAX_FILE_LINES`] lines and
//!    every function at most [`MAX_FN_LINES`] (tests included), except those of
//!    [`LONG_FILES_ALLOWED`] and [`LONG_FNS_ALLOWED`].
//!
//! Prints every violation, then fails if there was one. The scan is a token scan
//! (see `scan`), not a parser: paths built inside macros are read like any other code.

mod scan;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cargo;

/// A layer: a name for the report and the top-level modules of `daemon/src` in it.
pub struct Layer {
    /// Shown in the report.
    pub name: &'static str,
    /// Top-level module names (`config` for `config.rs` or `config/mod.rs`).
    pub modules: &'static [&'static str],
}

/// The daemon's layers, lowest first: a module may use its own layer and the layers
/// listed before it, never one listed after it. Edit this table when modules move.
pub const LAYERS: &[Layer] = &[
    Layer {
        name: "system",
        modules: &["sys", "logging"],
    },
    Layer {
        name: "config",
        modules: &["config"],
    },
    Layer {
        name: "health",
        modules: &["health"],
    },
    Layer {
        name: "lifecycle",
        modules: &["lifecycle"],
    },
    Layer {
        name: "discover",
        modules: &["discover"],
    },
    Layer {
        name: "persist",
        modules: &["persist"],
    },
    Layer {
        name: "kernel",
        modules: &["kernel"],
    },
    Layer {
        name: "runtime",
        modules: &["runtime"],
    },
];

/// Top-level modules that group components: cycles are looked for between their
/// submodules (`runtime::daemon`, `runtime::control`, …) as well as between top-level
/// modules. A module not listed is one component (the lifecycle's files implement one
/// machine between them).
pub const SPLIT: &[&str] = &["discover", "persist", "kernel", "runtime"];

/// The crate whose layers are checked, relative to the workspace root.
const CRATE_DIR: &str = "daemon/src";

/// Directories (relative to the workspace root) whose files and functions are measured.
pub const LENGTH_DIRS: [&str; 5] = [
    "daemon/src",
    "common/src",
    "tests/src",
    "tests/tests",
    "xtask/src",
];

/// The longest a file may be, in lines.
pub const MAX_FILE_LINES: usize = 500;

/// The longest a function may be, in lines from `fn` to its closing brace.
pub const MAX_FN_LINES: usize = 80;

/// Files allowed past [`MAX_FILE_LINES`]: (path from the workspace root, why).
pub const LONG_FILES_ALLOWED: &[(&str, &str)] = &[];

/// Functions allowed past [`MAX_FN_LINES`]: (path from the workspace root, name, why).
pub const LONG_FNS_ALLOWED: &[(&str, &str, &str)] = &[];

/// The cargo-modules release installed when missing (0.27.0 needs Rust 1.95).
const CARGO_MODULES_VERSION: &str = "0.27.0";

/// Runs the checks; false when one found a violation.
pub fn run(root: &Path, cargo_modules: bool) -> Result<bool> {
    let mut ok = true;
    if cargo_modules {
        ok &= check_cycles(root)?;
    }
    let (layers_ok, edges, unit_edges) = check_layers(root)?;
    ok &= layers_ok;
    ok &= check_module_cycles(&edges, "top-level modules");
    let units = unit_edges.len();
    ok &= check_module_cycles(&unit_edges, "components");
    println!("layers: {units} components use others");
    ok &= check_lengths(root)?;
    println!("layers: {}", if ok { "ok" } else { "FAILED (see above)" });
    Ok(ok)
}

/// `cargo modules dependencies --acyclic` on the daemon library.
fn check_cycles(root: &Path) -> Result<bool> {
    crate::ensure_cargo_tool(
        root,
        "modules",
        "cargo-modules",
        CARGO_MODULES_VERSION,
        "layers",
    )?;
    // `--layout none`: the cycle check only, no graph printed.
    let out = cargo(root)
        .args(["modules", "dependencies", "--lib", "-p", "handoff"])
        .args(["--acyclic", "--layout", "none"])
        .output()
        .context("cannot run cargo modules")?;
    if out.status.success() {
        println!("layers: no module cycle in the daemon library (cargo-modules)");
        return Ok(true);
    }
    println!("layers: module cycle in the daemon library (cargo modules dependencies --acyclic):");
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .filter(|l| !l.trim().is_empty())
    {
        println!("  {line}");
    }
    Ok(false)
}

/// The `.rs` files under `dir`, sorted, recursively.
fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let path = entry
                .with_context(|| format!("cannot read {}", dir.display()))?
                .path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The module path of a file relative to the crate's `src`: `generation/drain.rs` is
/// `[generation, drain]`, `loader/mod.rs` `[loader]`, `lib.rs` `[]`; None for a binary.
fn module_path(rel: &Path) -> Option<Vec<String>> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    let last = parts.pop()?;
    match last.strip_suffix(".rs")? {
        "mod" | "lib" | "main" => {}
        name => parts.push(name.to_owned()),
    }
    Some(parts)
}

/// The index in [`LAYERS`] of a top-level module.
fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.modules.contains(&module))
}

/// Which top-level modules each top-level module uses.
type Edges = BTreeMap<String, BTreeSet<String>>;

/// Each file's uses of other top-level modules against [`LAYERS`]; true when all go down,
/// and the uses found.
fn check_layers(root: &Path) -> Result<(bool, Edges, Edges)> {
    let src = root.join(CRATE_DIR);
    let files = rust_files(&src)?;
    let mut paths = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap_or(file);
        if let Some(path) = module_path(rel) {
            paths.insert(file.clone(), path);
        }
    }
    let tops: BTreeSet<&str> = paths
        .values()
        .filter_map(|p| p.first().map(String::as_str))
        .collect();
    let mut ok = true;
    for top in &tops {
        if layer_of(top).is_none() {
            println!("layers: {CRATE_DIR}: module `{top}` is in no layer: add it to LAYERS");
            ok = false;
        }
    }
    for layer in LAYERS {
        for module in layer.modules.iter().filter(|m| !tops.contains(*m)) {
            println!("layers: LAYERS names `{module}`, which is not a module of {CRATE_DIR}");
            ok = false;
        }
    }
    let modules: BTreeSet<&[String]> = paths.values().map(Vec::as_slice).collect();
    let mut upward = 0;
    let mut edges = Edges::new();
    let mut unit_edges = Edges::new();
    for (file, path) in &paths {
        let Some(own) = path.first() else {
            continue; // lib.rs: the root declares the modules.
        };
        let Some(own_layer) = layer_of(own) else {
            continue;
        };
        let text = scan::blank(
            &std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?,
        );
        let skip = scan::test_modules(&text);
        let own_unit = unit_of(path, &modules);
        for used in scan::uses(&text, &skip) {
            if let Some(unit) = absolute(path, &used)
                .map(|abs| unit_of(&abs, &modules))
                .filter(|u| *u != own_unit && tops.contains(u.split("::").next().unwrap_or("")))
            {
                unit_edges.entry(own_unit.clone()).or_default().insert(unit);
            }
            let Some(target) =
                target(path, &used).filter(|t| t != own && tops.contains(t.as_str()))
            else {
                continue;
            };
            edges.entry(own.clone()).or_default().insert(target.clone());
            let Some(target_layer) = layer_of(&target) else {
                continue;
            };
            if target_layer > own_layer {
                let rel = file.strip_prefix(root).unwrap_or(file);
                println!(
                    "layers: upward use: {}:{} `{own}` ({}) uses `{target}` ({})",
                    rel.display(),
                    used.line,
                    LAYERS[own_layer].name,
                    LAYERS[target_layer].name
                );
                upward += 1;
            }
        }
    }
    if upward == 0 && ok {
        println!("layers: every use goes down ({} layers)", LAYERS.len());
    }
    Ok((ok && upward == 0, edges, unit_edges))
}

/// The module path a use names from the file at module path `path`: its first two names
/// after the crate root.
fn absolute(path: &[String], used: &scan::Use) -> Option<Vec<String>> {
    // `crate::` starts at the root, each `super::` one module up from the file's own.
    let base = if used.supers == 0 {
        0
    } else {
        path.len().checked_sub(used.supers)?
    };
    let mut abs = path[..base].to_vec();
    abs.push(used.name.clone());
    abs.extend(used.sub.clone());
    Some(abs)
}

/// The component a module path belongs to: `runtime::daemon` for anything under it (a
/// submodule of a [`SPLIT`] module), else its top-level module.
fn unit_of(path: &[String], modules: &BTreeSet<&[String]>) -> String {
    match path {
        [top, sub, ..] if SPLIT.contains(&top.as_str()) && modules.contains(&path[..2]) => {
            format!("{top}::{sub}")
        }
        [top, ..] => top.clone(),
        [] => String::new(),
    }
}

/// The top-level modules reachable from `from` through `edges` (`from` too).
fn reachable<'a>(edges: &'a Edges, from: &'a str) -> BTreeSet<&'a str> {
    let mut seen = BTreeSet::from([from]);
    let mut todo = vec![from];
    while let Some(module) = todo.pop() {
        for next in edges.get(module).into_iter().flatten() {
            if seen.insert(next.as_str()) {
                todo.push(next.as_str());
            }
        }
    }
    seen
}

/// Module cycles between the top-level modules: each group of modules that reach each
/// other, with the uses inside it.
fn check_module_cycles(edges: &Edges, what: &str) -> bool {
    let mut reported = BTreeSet::new();
    for from in edges.keys() {
        if reported.contains(from.as_str()) {
            continue;
        }
        let group: BTreeSet<&str> = reachable(edges, from)
            .into_iter()
            .filter(|m| reachable(edges, m).contains(from.as_str()))
            .collect();
        if group.len() < 2 {
            continue;
        }
        let inside: Vec<String> = group
            .iter()
            .flat_map(|m| {
                edges
                    .get(*m)
                    .into_iter()
                    .flatten()
                    .filter(|t| group.contains(t.as_str()))
                    .map(move |t| format!("{m} -> {t}"))
            })
            .collect();
        println!(
            "layers: module cycle between {what} of {CRATE_DIR}: {} ({})",
            group.iter().copied().collect::<Vec<_>>().join(", "),
            inside.join(", ")
        );
        reported.extend(group.iter().map(|m| (*m).to_owned()));
    }
    if reported.is_empty() {
        println!("layers: no cycle between the {what} of {CRATE_DIR}");
    }
    reported.is_empty()
}

/// The top-level module a path of the file at module path `path` names, if it leaves
/// through the crate root.
fn target(path: &[String], used: &scan::Use) -> Option<String> {
    if used.supers == 0 {
        return Some(used.name.clone());
    }
    let parent = path.len().checked_sub(used.supers)?;
    (parent == 0).then(|| used.name.clone())
}

/// File and function lengths under [`LENGTH_DIRS`].
fn check_lengths(root: &Path) -> Result<bool> {
    let (mut files, mut fns) = (0, 0);
    for dir in LENGTH_DIRS {
        for file in rust_files(&root.join(dir))? {
            let rel = file
                .strip_prefix(root)
                .unwrap_or(&file)
                .to_string_lossy()
                .into_owned();
            let raw = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let lines = raw.lines().count();
            if lines > MAX_FILE_LINES && !LONG_FILES_ALLOWED.iter().any(|(p, _)| *p == rel) {
                println!("layers: long file: {rel} has {lines} lines (at most {MAX_FILE_LINES})");
                files += 1;
            }
            for f in scan::functions(&scan::blank(&raw)) {
                let allowed = LONG_FNS_ALLOWED
                    .iter()
                    .any(|(p, n, _)| *p == rel && *n == f.name);
                if f.lines > MAX_FN_LINES && !allowed {
                    println!(
                        "layers: long fn: {rel}:{} `{}` has {} lines (at most {MAX_FN_LINES})",
                        f.line, f.name, f.lines
                    );
                    fns += 1;
                }
            }
        }
    }
    if files + fns == 0 {
        println!(
            "layers: every file within {MAX_FILE_LINES} lines, every fn within {MAX_FN_LINES}"
        );
    }
    Ok(files + fns == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths() {
        let path = |p: &str| module_path(Path::new(p));
        assert_eq!(
            path("generation/drain.rs"),
            Some(vec!["generation".into(), "drain".into()])
        );
        assert_eq!(path("loader/mod.rs"), Some(vec!["loader".into()]));
        assert_eq!(path("lib.rs"), Some(vec![]));
        assert_eq!(path("bin/handoffd.rs"), None);
    }

    #[test]
    fn super_reaches_the_root_only_from_a_top_level_file() {
        let used = |supers| scan::Use {
            line: 1,
            supers,
            name: "config".into(),
            sub: None,
        };
        let top = ["members".to_owned()];
        let nested = ["generation".to_owned(), "drain".to_owned()];
        assert_eq!(target(&top, &used(1)), Some("config".into()));
        assert_eq!(target(&nested, &used(1)), None);
        assert_eq!(target(&nested, &used(2)), Some("config".into()));
        assert_eq!(target(&nested, &used(0)), Some("config".into()));
    }

    #[test]
    fn module_cycles_are_found() {
        let edges = |pairs: &[(&str, &str)]| {
            let mut edges = Edges::new();
            for (a, b) in pairs {
                edges
                    .entry((*a).to_owned())
                    .or_default()
                    .insert((*b).to_owned());
            }
            edges
        };
        assert!(check_module_cycles(&edges(&[("a", "b"), ("b", "c")]), "t"));
        assert!(!check_module_cycles(
            &edges(&[("a", "b"), ("b", "c"), ("c", "a")]),
            "t"
        ));
    }

    #[test]
    fn every_module_is_in_one_layer() {
        let mut seen = BTreeSet::new();
        for module in LAYERS.iter().flat_map(|l| l.modules) {
            assert!(seen.insert(module), "{module} is in two layers");
        }
    }
}
