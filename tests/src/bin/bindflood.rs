//! `bindflood`: a local user's bind() flood on a service port, for the hostile-bind tests
//! and measurements. Each round opens a TCP socket, binds it to `--addr` (with IP_FREEBIND,
//! so an address the namespace lacks still binds) and closes it; binds that fail
//! (EADDRINUSE: the service holds the address) count as well. `--netns` first moves into a
//! new network namespace, inside a new user namespace when not root (as an unprivileged
//! user can). `--reuseport` sets SO_REUSEPORT first. Bounded by `--seconds` and `--max`. Prints `ready pid=PID` once flooding,
//! then `done pid=PID ok=N failed=N`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sched::{CloneFlags, unshare};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
};

#[derive(Parser)]
struct Args {
    /// The address to bind, again and again.
    #[arg(long)]
    addr: SocketAddr,
    /// Flood from a new network namespace (and a new user namespace when not root).
    #[arg(long)]
    netns: bool,
    /// Set SO_REUSEPORT before each bind: with the service's uid, binds of its address
    /// succeed beside its listeners (the rate limit's case).
    #[arg(long)]
    reuseport: bool,
    /// How long to flood, in seconds (at most 60).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60))]
    seconds: u64,
    /// At most this many binds.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    max: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.netns {
        let mut flags = CloneFlags::CLONE_NEWNET;
        if !nix::unistd::geteuid().is_root() {
            flags |= CloneFlags::CLONE_NEWUSER;
        }
        unshare(flags).map_err(|e| anyhow::anyhow!("unshare({flags:?}): {e}"))?;
    }
    let family = match args.addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let target = SockaddrStorage::from(args.addr);
    let pid = std::process::id();
    println!("ready pid={pid}");
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let (mut ok, mut failed) = (0u64, 0u64);
    while ok + failed < args.max && Instant::now() < until {
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        if family == AddressFamily::Inet {
            setsockopt(&fd, sockopt::IpFreebind, &true)?;
        }
        if args.reuseport {
            setsockopt(&fd, sockopt::ReusePort, &true)?;
        }
        match bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &target) {
            Ok(()) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    println!("done pid={pid} ok={ok} failed={failed}");
    Ok(())
}
