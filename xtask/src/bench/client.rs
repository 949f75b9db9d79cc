//! `cargo xtask bench-hold` (hidden): the client of the scale benchmark. Opens `--count`
//! connections from `--source` (a loopback address of its own, so that the ephemeral ports
//! of one address suffice), reads each answer, prints `held N`, and holds them all until its
//! stdin closes or it is killed. loadgen would need a thread per held connection; 100 k
//! threads exceed `pid_max` here.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};

/// Connections opened before their answers are read: deep enough to overlap the server's
/// accepts, well below the listeners' backlog.
const BATCH: usize = 256;
/// Deadline of each answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// Command line of `bench-hold`.
#[derive(Debug, clap::Args)]
pub struct HoldArgs {
    /// The service address.
    #[arg(long)]
    connect: SocketAddrV4,
    /// The local address to connect from.
    #[arg(long)]
    source: Ipv4Addr,
    /// How many connections to hold.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    count: u32,
}

/// Opens and holds the connections; returns when stdin closes.
pub fn run(args: &HoldArgs) -> Result<()> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising the open file limit")?;
    let count = args.count as usize;
    let mut held = Vec::with_capacity(count);
    while held.len() < count {
        let batch = BATCH.min(count - held.len());
        let start = held.len();
        for _ in 0..batch {
            held.push(open(args.source, args.connect)?);
        }
        for stream in &held[start..] {
            stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
            let mut line = String::new();
            BufReader::new(stream)
                .read_line(&mut line)
                .with_context(|| format!("no answer on connection {}", held.len()))?;
            if !line.ends_with('\n') {
                anyhow::bail!("connection closed before its answer");
            }
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "held {}", held.len())?;
    out.flush()?;
    // Hold until the bench closes our stdin, or dies, or kills us.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}

/// One connection from `source` (any port) to `to`.
fn open(source: Ipv4Addr, to: SocketAddrV4) -> Result<TcpStream> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket")?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(source, 0)),
    )
    .with_context(|| format!("bind {source}:0"))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(to))
        .with_context(|| format!("connect {}", SocketAddr::V4(to)))?;
    Ok(TcpStream::from(fd))
}
