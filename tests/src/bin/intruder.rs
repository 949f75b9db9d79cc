//! `intruder ADDR ACTION [DELAY_MS]`: joins the reuseport group on ADDR (a listener with
//! SO_REUSEPORT, under whatever uid it is started as), then tries ACTION on it: `cbpf`
//! attaches the classic program `ret #0` (every new connection to the group's oldest
//! socket), `detach` removes the group's program; DELAY_MS after listening (so that a
//! probe following the bind has passed). Prints `ACTION ok` or `ACTION failed:
//! ERRNO` and then answers connections with `intruder PID`, like testsrv, until killed.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(action)) = (args.next(), args.next()) else {
        bail!("usage: intruder ADDR cbpf|detach [DELAY_MS]");
    };
    let addr: SocketAddr = addr.parse().context("ADDR must be IP:PORT")?;
    let delay: u64 = match args.next() {
        Some(ms) => ms.parse().context("DELAY_MS must be a number")?,
        None => 0,
    };
    let listener = handoff_tests::reuseport_listener(addr).context("joining the group")?;
    std::thread::sleep(std::time::Duration::from_millis(delay.min(10_000)));
    let result = match action.as_str() {
        "cbpf" => handoff_tests::attach_reuseport_cbpf(&listener, 0),
        "detach" => handoff_tests::detach_reuseport(&listener),
        other => bail!("unknown action {other:?}: cbpf or detach"),
    };
    match result {
        Ok(()) => println!("{action} ok"),
        Err(e) => println!(
            "{action} failed: {}",
            nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0))
        ),
    }
    std::io::stdout().flush()?;
    let pid = std::process::id();
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = writeln!(stream, "intruder {pid}");
    }
    Ok(())
}
