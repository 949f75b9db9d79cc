//! `testsrv`: a stand-in service generation for handoff tests; see `handoff_tests::server`.

use clap::Parser;
use handoff_tests::server::{self, ServerConfig};

fn main() -> anyhow::Result<()> {
    let cfg = ServerConfig::parse();
    server::run(&cfg).map_err(|e| anyhow::Error::new(e).context(format!("testsrv {}", cfg.name)))
}
