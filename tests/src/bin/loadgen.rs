//! `loadgen`: the load client of handoff tests; prints one JSON report on stdout. SIGINT or
//! SIGTERM ends the run early, still printing the report. By default it reads the `testsrv`
//! answer line; `--http` speaks HTTP/1.1 (`--requests-per-connection N` for keep-alive). See
//! `handoff_tests::load`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use anyhow::Context;
use clap::Parser;
use handoff_tests::load::{self, LoadConfig};
use nix::sys::signal::{SigSet, Signal};

static STOP: AtomicBool = AtomicBool::new(false);

fn main() -> anyhow::Result<()> {
    let cfg = LoadConfig::parse();
    // Blocked before any thread starts, so only the waiter below takes these signals.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .context("blocking SIGINT and SIGTERM")?;
    thread::spawn(move || {
        if signals.wait().is_ok() {
            STOP.store(true, Ordering::Relaxed);
        }
    });
    let report = load::try_run(&cfg, Some(&STOP))
        .with_context(|| format!("load run against {}", cfg.connect))?;
    println!(
        "{}",
        serde_json::to_string(&report).context("encoding the report")?
    );
    Ok(())
}
