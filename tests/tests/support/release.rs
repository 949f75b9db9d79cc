//! What the release tests (issue 14: checks, canaries, watch windows) share: a load that
//! runs while a test makes its changes, clients from a loopback source of their own, the
//! accepts testsrv logs, and the metrics endpoint.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use handoff_tests::load::{self, LoadConfig, LoadReport};
use handoff_tests::{Proc, Stream, slowdown};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

/// The source address of [`sourced_load`]'s clients: a health check of handoffd comes
/// from the group's own address (127.0.0.1 for a group on 127.0.0.1), so an accept from
/// this one is a client's.
pub const CLIENT_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Runs the tests of one binary one at a time: their loads and timings would otherwise
/// share this machine's two CPUs. Hold the guard for the whole test.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A flag that is set when dropped, also when the test panics mid-run: the load stops
/// then, instead of going on to its time bound before the panic is reported.
pub struct SetOnDrop<'a>(pub &'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs `load` on a thread of its own while `body` makes its changes; the flag it is
/// given is set when `body` returns or panics, and must end it.
pub fn beside<L: Send, T>(
    load: impl FnOnce(&AtomicBool) -> L + Send,
    body: impl FnOnce() -> T,
) -> (L, T) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let load = s.spawn(|| load(&stop));
        let out = {
            let _stop = SetOnDrop(&stop);
            body()
        };
        (load.join().expect("the load thread"), out)
    })
}

/// A load of `clients` on `addr` that logs every attempt to `log`, bounded in count and
/// time (it is meant to be stopped by [`under_load`] long before); raises the fd limit.
pub fn logged_load(addr: SocketAddr, clients: u32, log: &Path) -> LoadConfig {
    handoff_tests::raise_fd_limit().expect("raising the fd limit");
    let mut cfg = LoadConfig::new(addr, clients);
    cfg.timeout_ms *= u64::from(slowdown());
    cfg.duration_ms = Some((60_000 * u64::from(slowdown())).min(load::MAX_DURATION_MS));
    cfg.count = Some(2_000_000);
    cfg.log = Some(log.to_path_buf());
    cfg
}

/// Runs [`load::run`] with `cfg` (which must bound it by count or time) while `body`
/// makes its changes, and stops it when `body` returns or panics.
pub fn under_load<T>(cfg: &LoadConfig, body: impl FnOnce() -> T) -> (LoadReport, T) {
    assert!(
        cfg.count.is_some() || cfg.duration_ms.is_some(),
        "a load without bound"
    );
    beside(|stop| load::run(cfg, Some(stop)), body)
}

/// What [`sourced_load`]'s clients got: answers per generation name (whatever their
/// status), and failures per kind of error.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Answers per generation name.
    pub answers: BTreeMap<String, u64>,
    /// Failed attempts per error kind.
    pub failures: BTreeMap<String, u64>,
}

impl Tally {
    /// Answers in all.
    pub fn answered(&self) -> u64 {
        self.answers.values().sum()
    }

    fn add(&mut self, other: Tally) {
        for (k, n) in other.answers {
            *self.answers.entry(k).or_default() += n;
        }
        for (k, n) in other.failures {
            *self.failures.entry(k).or_default() += n;
        }
    }
}

/// `clients` threads making one HTTP request after another to `addr`, each on a new
/// connection from [`CLIENT_SOURCE`], until `stop` is set, `max` attempts were made or
/// `limit` passed.
pub fn sourced_load(
    addr: SocketAddr,
    clients: usize,
    max: u64,
    limit: Duration,
    stop: &AtomicBool,
) -> Tally {
    let started = Instant::now();
    let made = std::sync::atomic::AtomicU64::new(0);
    let go = || {
        !stop.load(Ordering::SeqCst)
            && started.elapsed() < limit
            && made.fetch_add(1, Ordering::SeqCst) < max
    };
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    let mut t = Tally::default();
                    while go() {
                        match http_from(IpAddr::V4(CLIENT_SOURCE), addr) {
                            Ok(name) => *t.answers.entry(name).or_default() += 1,
                            Err(e) => *t.failures.entry(e).or_default() += 1,
                        }
                    }
                    t
                })
            })
            .collect();
        let mut all = Tally::default();
        for t in threads {
            all.add(t.join().expect("a client thread"));
        }
        all
    })
}

/// One `GET /` from `source` (port chosen by the kernel) to `addr`, within 2 s (scaled):
/// the first line of the answer's body, whatever its status; the error's kind otherwise.
pub fn http_from(source: IpAddr, addr: SocketAddr) -> Result<String, String> {
    let (IpAddr::V4(source), SocketAddr::V4(to)) = (source, addr) else {
        return Err("IPv4 only".into());
    };
    let timeout = handoff_tests::scaled(Duration::from_secs(2));
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(source, 0)),
    )
    .map_err(|e| format!("bind: {e}"))?;
    // A blocking connect gives up after SO_SNDTIMEO.
    setsockopt(
        &fd,
        sockopt::SendTimeout,
        &TimeVal::new(timeout.as_secs() as i64, i64::from(timeout.subsec_micros())),
    )
    .map_err(|e| e.to_string())?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).map_err(|e| format!("connect: {e}"))?;
    let mut stream = TcpStream::from(fd);
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: handoff\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {:?}", e.kind()))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("read: {:?}", e.kind()))?;
    let response = load::parse_response(&answer)
        .map_err(|e| format!("answer: {e}"))?
        .ok_or("answer: incomplete")?;
    let body = String::from_utf8_lossy(&response.body);
    Ok(body.lines().next().unwrap_or_default().to_owned())
}

/// One `accept NAME pid=PID peer=IP:PORT local=IP:PORT` line of a testsrv run with
/// `--log-accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accept {
    /// The process that accepted.
    pub pid: u32,
    /// The connection's source.
    pub peer: SocketAddr,
    /// The address of the listener that took it.
    pub local: SocketAddr,
}

/// The connections testsrv `p` (run with `--log-accept`) has accepted so far, in order.
pub fn accepts(p: &Proc) -> Vec<Accept> {
    p.lines(Stream::Stderr)
        .iter()
        .filter_map(|l| {
            let mut words = l.strip_prefix("accept ")?.split_whitespace().skip(1);
            let pid = words.next()?.strip_prefix("pid=")?.parse().ok()?;
            let peer = words.next()?.strip_prefix("peer=")?.parse().ok()?;
            let local = words.next()?.strip_prefix("local=")?.parse().ok()?;
            Some(Accept { pid, peer, local })
        })
        .collect()
}

/// GET `/metrics` of a daemon started with `--metrics-addr 127.0.0.1:PORT`.
pub fn metrics(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to /metrics");
    s.set_read_timeout(Some(handoff_tests::scaled(Duration::from_secs(5))))
        .expect("a read timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: handoff\r\nConnection: close\r\n\r\n")
        .expect("sending the request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reading /metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// The value of the sample of `name` whose labels include every one of `labels`
/// (`reason="exited"`), if there is one.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
        })
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Seconds since midnight UTC of a log line's leading RFC 3339 time
/// (`2026-12-01T10:31:11.123456Z …`), as handoffd writes its text log.
pub fn log_time_of_day(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let time = time.trim_end_matches('Z');
    let mut parts = time.splitn(3, ':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Seconds since midnight UTC now (the clock of [`log_time_of_day`]).
pub fn time_of_day_now() -> f64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970");
    since.as_secs_f64() % 86_400.0
}
