//! `intruder ADDR ACTION [DELAY_MS]`: joins the reuseport group on ADDR (a listener with
//! SO_REUSEPORT, under whatever uid it is started as), then tries ACTION on it: `cbpf`
//! attaches the classic program `ret #0` (every new connection to the group's oldest
//! socket), `detach` removes the group's program; DELAY_MS after listening (so that a
//! probe following the bind has passed). Prints `ACTION ok` or `ACTION failed:
//! ERRNO` and then answers connections with `intruder PID`, like testsrv, until killed.
//!
//! `intruder ADDR full DELAY_MS INDEX`: listens with backlog 0, attaches `ret #INDEX`,
//! checks that a connection of its own reaches its listener (INDEX is its place in the
//! group), then fills its accept queue and never accepts again: every SYN the group sends
//! it is dropped without an answer. Prints `full ok` once that holds.

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
        "full" => {
            let index: u32 = match args.next() {
                Some(i) => i.parse().context("INDEX must be a number")?,
                None => bail!("full needs INDEX"),
            };
            return full(addr, &listener, index);
        }
        other => bail!("unknown action {other:?}: cbpf, detach or full"),
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

/// The `full` action: see the module's doc.
fn full(addr: SocketAddr, listener: &std::net::TcpListener, index: u32) -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    // listen() again on a listening socket only changes its backlog; with 0 the queue
    // holds one connection and the kernel drops every later SYN.
    nix::sys::socket::listen(listener, nix::sys::socket::Backlog::new(0)?)?;
    listener.set_nonblocking(true)?;
    let wait = Duration::from_millis(300);
    let mut ours = false;
    for _ in 0..5 {
        handoff_tests::attach_reuseport_cbpf(listener, index)?;
        let Ok(_probe) = std::net::TcpStream::connect_timeout(&addr, wait) else {
            continue;
        };
        let start = Instant::now();
        while start.elapsed() < wait {
            if listener.accept().is_ok() {
                ours = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if ours {
            break;
        }
    }
    if !ours {
        println!("full failed: slot {index} is not the intruder's listener");
        std::io::stdout().flush()?;
        bail!("slot {index} is not ours");
    }
    // One connection fills the queue; the next SYN is already dropped.
    let mut held = Vec::new();
    for _ in 0..2 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            held.push(s);
        }
    }
    handoff_tests::attach_reuseport_cbpf(listener, index)?;
    println!("full ok");
    std::io::stdout().flush()?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
