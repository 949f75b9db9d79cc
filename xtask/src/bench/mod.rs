//! `cargo xtask bench [--quick] [--only NAME]` (root): the benchmarks of issue 5, a table,
//! and `BENCHMARKS.md`.
//!
//! One file per benchmark, each `run(&Ctx) -> Result<Outcome>`:
//! [`path`] (cost on the connection path), [`promote`] (promote latency), [`drain`] (drain
//! detection), [`restarts`] (failed connections and worst latency during restarts),
//! [`footprint`] (daemon memory and idle CPU), [`scale`] (drain accounting at 1 k–100 k
//! connections, with [`client`] as its load), [`flood`] (retire latency and the daemon's
//! CPU under floods by an unprivileged user, [`flood_phase`] each phase, [`attack`] the
//! attacker); of issue 14, [`rollback`] (time from a death or a failing check to traffic
//! back on the previous generation) and [`weight`] (the steering program's run time with
//! and without a canary). [`env`], [`netns`], [`output`] and [`measure`] are the shared harness;
//! [`report`] makes the table and the file.
//!
//! A full run writes `BENCHMARKS.md` (only when every benchmark ran: `--only` prints the
//! table and the benchmarks' details). `--quick` runs each benchmark briefly and fails only
//! when one fails or produces no number: timings on a shared CI machine decide nothing.

mod attack;
mod client;
mod drain;
mod env;
mod flood;
mod flood_phase;
mod footprint;
mod measure;
mod netns;
mod output;
mod path;
mod promote;
mod report;
mod restarts;
mod rollback;
mod scale;
mod weight;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use attack::FloodArgs;
pub use attack::run as flood;
pub use client::HoldArgs;
pub use client::run as hold;
use env::Ctx;
use report::{Row, Section};

use crate::children::{catch_interrupts, check_interrupted};
use crate::{TempDir, cargo, run_checked};

/// What a benchmark hands back.
pub struct Outcome {
    /// Its table rows.
    pub rows: Vec<Row>,
    /// How it was measured and its raw figures (markdown, one paragraph or item each).
    pub details: Vec<String>,
}

/// A benchmark: its number in the issue, `--only` name, title and body.
struct Bench {
    id: usize,
    name: &'static str,
    title: &'static str,
    run: fn(&Ctx) -> Result<Outcome>,
}

const BENCHES: [Bench; 9] = [
    Bench {
        id: 1,
        name: "path",
        title: "Cost on the connection path",
        run: path::run,
    },
    Bench {
        id: 2,
        name: "promote",
        title: "Promote latency",
        run: promote::run,
    },
    Bench {
        id: 3,
        name: "drain",
        title: "Drain detection",
        run: drain::run,
    },
    Bench {
        id: 4,
        name: "restarts",
        title: "Restarts under load",
        run: restarts::run,
    },
    Bench {
        id: 5,
        name: "footprint",
        title: "Footprint",
        run: footprint::run,
    },
    Bench {
        id: 6,
        name: "scale",
        title: "Scale of drain accounting",
        run: scale::run,
    },
    Bench {
        id: 7,
        name: "flood",
        title: "Floods by an unprivileged user",
        run: flood::run,
    },
    Bench {
        id: 8,
        name: "rollback",
        title: "Rollback time (issue 14)",
        run: rollback::run,
    },
    Bench {
        id: 9,
        name: "weight",
        title: "Cost of the weight decision (issue 14)",
        run: weight::run,
    },
];

/// The `--only` names, for the command line's help and checks.
pub const NAMES: [&str; 9] = [
    "path",
    "promote",
    "drain",
    "restarts",
    "footprint",
    "scale",
    "flood",
    "rollback",
    "weight",
];

/// Runs the benchmarks; `Ok(false)` when one failed (or, with `--quick`, gave no number).
pub fn run(root: &Path, quick: bool, only: &[String]) -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks need root (BPF, network namespaces): run them with sudo");
    }
    catch_interrupts()?;
    let started = Instant::now();
    let tmp = TempDir::new("bench")?;
    // The scale benchmark's clients are this executable; the build below may replace the
    // file (cargo unifies features across the workspace), so run a copy.
    let xtask = tmp.path().join("xtask");
    std::fs::copy(
        std::env::current_exe().context("cannot find this executable")?,
        &xtask,
    )
    .context("cannot copy this executable")?;
    env::remove_leftovers();
    // Timings of a quick run decide nothing, so it uses the debug build that CI has already
    // made for the tests; a full run measures the release build.
    let (profile, build): (&str, &[&str]) = if quick {
        ("debug", &["build", "--workspace", "--bins"])
    } else {
        ("release", &["build", "--release", "--workspace", "--bins"])
    };
    println!("building the {profile} binaries");
    run_checked(
        cargo(root).args(build),
        &format!("cargo {}", build.join(" ")),
    )?;
    let built = started.elapsed();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), |t| root.join(t));
    let shm = Path::new("/dev/shm");
    let state = if shm.is_dir() {
        TempDir::new_in(shm, "bench-state")?
    } else {
        TempDir::new("bench-state")?
    };
    let ctx = Ctx {
        bin: target.join(profile),
        xtask,
        quick,
        tmp,
        state,
    };
    let mut sections = Vec::new();
    for bench in BENCHES
        .iter()
        .filter(|b| only.is_empty() || only.iter().any(|o| o == b.name))
    {
        sections.push(run_one(&ctx, bench, quick, only)?);
    }
    let took = started.elapsed();
    println!("\n{}", report::table(&sections, quick));
    println!(
        "{} in {} (the build took {:.0} s)",
        if quick { "quick run" } else { "full run" },
        report::minutes(took),
        built.as_secs_f64()
    );
    let ok = all_ok(&sections);
    if !quick && only.is_empty() {
        let path = root.join("BENCHMARKS.md");
        report::write_markdown(root, &path, &sections, took, built)?;
        println!("wrote {}", path.display());
    } else {
        println!("BENCHMARKS.md is written by a full run of every benchmark only");
    }
    if !ok {
        println!("logs of the children kept in {}", ctx.tmp.keep().display());
    }
    Ok(ok)
}

/// Runs one benchmark and prints its table; its section of the report (an error in it when it
/// failed). Stops the run on Ctrl-C.
fn run_one(ctx: &Ctx, bench: &Bench, quick: bool, only: &[String]) -> Result<Section> {
    println!("== {}. {} ({})", bench.id, bench.title, bench.name);
    let t = Instant::now();
    let load_before = measure::loadavg();
    let result = (bench.run)(ctx);
    let took = t.elapsed();
    let load = format!(
        "Load average of the machine (1 min) before and after: {} / {}.",
        load_before,
        measure::loadavg()
    );
    // Ctrl-C: the benchmark's guards have cleaned up; stop here.
    check_interrupted()?;
    let (rows, mut details, error) = match result {
        Ok(o) => (o.rows, o.details, None),
        Err(e) => {
            eprintln!("{}: FAILED: {e:#}", bench.name);
            (Vec::new(), Vec::new(), Some(format!("{e:#}")))
        }
    };
    details.push(load);
    let section = Section {
        id: bench.id,
        name: bench.name,
        title: bench.title,
        rows,
        details,
        error,
        took,
    };
    print!("{}", report::table(std::slice::from_ref(&section), quick));
    println!("({:.0} s)", took.as_secs_f64());
    // BENCHMARKS.md, which shows the details, is not written for a part of the run.
    if !only.is_empty() {
        println!("{}", section.details.join("\n"));
    }
    Ok(section)
}

/// Whether every benchmark ran and gave its numbers; says on stderr which did not.
fn all_ok(sections: &[Section]) -> bool {
    let mut ok = true;
    for s in sections {
        if s.error.is_some() {
            ok = false;
        }
        let missing = s.missing_numbers();
        if !missing.is_empty() {
            eprintln!("{}: no number for {}", s.name, missing.join(", "));
            ok = false;
        }
    }
    ok
}

/// `value` with a unit and sensible precision: `0.42 ms`, `3.1 ms`, `42 ms`.
pub fn fmt_ms(value: f64) -> String {
    if value < 1.0 {
        format!("{value:.2} ms")
    } else if value < 10.0 {
        format!("{value:.1} ms")
    } else {
        format!("{value:.0} ms")
    }
}

/// A short pause between steps that must not run back to back.
pub const SETTLE: Duration = Duration::from_millis(200);
