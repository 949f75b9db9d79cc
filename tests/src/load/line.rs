//! The `testsrv` line protocol: connect, read the `NAME PID` answer line, hold the
//! connection open.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{Answer, FailureKind, HOLD_SLICE, remaining};

/// Longest answer line accepted; the server's is `NAME PID`.
const MAX_LINE: usize = 256;
/// Deadline of [`hold`] for connect plus answer.
const HOLD_TIMEOUT: Duration = Duration::from_secs(5);

/// One attempt: connect, answer, hold, close.
pub(super) fn attempt(
    addr: SocketAddr,
    timeout: Duration,
    hold: Duration,
    stopped: &dyn Fn() -> bool,
) -> Result<Answer, FailureKind> {
    let started = Instant::now();
    let (stream, name, pid) = exchange(addr, started + timeout)?;
    let latency = started.elapsed();
    if !hold.is_zero() {
        hold_open(&stream, Instant::now() + hold, stopped)?;
    }
    Ok(Answer {
        name,
        pid: Some(pid),
        latency,
    })
}

/// Connects and reads the answer line, both before `deadline`.
fn exchange(addr: SocketAddr, deadline: Instant) -> Result<(TcpStream, String, u32), FailureKind> {
    let stream =
        TcpStream::connect_timeout(&addr, remaining(deadline)?).map_err(|e| FailureKind::of(&e))?;
    let line = read_line(&stream, deadline)?;
    let (name, pid) = parse_answer(&line).ok_or(FailureKind::Eof)?;
    Ok((stream, name.to_owned(), pid))
}

fn read_line(mut stream: &TcpStream, deadline: Instant) -> Result<String, FailureKind> {
    let mut line = Vec::with_capacity(64);
    let mut chunk = [0u8; 128];
    loop {
        stream
            .set_read_timeout(Some(remaining(deadline)?))
            .map_err(|e| FailureKind::of(&e))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(FailureKind::Eof),
            Ok(n) => {
                line.extend_from_slice(&chunk[..n]);
                if let Some(end) = line.iter().position(|&b| b == b'\n') {
                    line.truncate(end);
                    return String::from_utf8(line).map_err(|_| FailureKind::Eof);
                }
                if line.len() > MAX_LINE {
                    return Err(FailureKind::Eof);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FailureKind::of(&e)),
        }
    }
}

/// Keeps the connection open until `until` (or the stop flag), reading so that a server
/// closing or resetting it early is noticed.
fn hold_open(
    mut stream: &TcpStream,
    until: Instant,
    stopped: &dyn Fn() -> bool,
) -> Result<(), FailureKind> {
    let mut chunk = [0u8; 128];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stopped() {
            return Ok(());
        }
        stream
            .set_read_timeout(Some(left.min(HOLD_SLICE)))
            .map_err(|e| FailureKind::of(&e))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(FailureKind::Eof),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(FailureKind::of(&e)),
        }
    }
}

/// Parses a server answer `NAME PID` (without the newline).
pub fn parse_answer(line: &str) -> Option<(&str, u32)> {
    let (name, pid) = line.split_once(' ')?;
    if name.is_empty() {
        return None;
    }
    Some((name, pid.parse().ok()?))
}

/// One connection: connect, read the answer, close. For tests counting the answers of
/// sequential connections.
pub fn connect_once(addr: SocketAddr, timeout: Duration) -> Result<(String, u32), FailureKind> {
    exchange(addr, Instant::now() + timeout).map(|(_, name, pid)| (name, pid))
}

/// Connects and reads the answer within 5 s (times [`crate::slowdown`]), returning the still open connection: it stays
/// established until the stream is dropped.
pub fn hold(addr: SocketAddr) -> io::Result<(TcpStream, String, u32)> {
    let (stream, name, pid) = exchange(addr, Instant::now() + crate::scaled(HOLD_TIMEOUT))
        .map_err(|kind| {
            let io_kind = match kind {
                FailureKind::Refused => io::ErrorKind::ConnectionRefused,
                FailureKind::Reset => io::ErrorKind::ConnectionReset,
                FailureKind::Timeout => io::ErrorKind::TimedOut,
                FailureKind::Eof => io::ErrorKind::UnexpectedEof,
                FailureKind::Connect | FailureKind::Status => io::ErrorKind::Other,
            };
            io::Error::new(
                io_kind,
                format!("holding a connection to {addr} failed: {kind}"),
            )
        })?;
    // Later reads by the caller block, as on any fresh stream.
    stream.set_read_timeout(None)?;
    Ok((stream, name, pid))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;

    use super::*;
    use crate::Proc;
    use crate::load::tests::loopback;
    use crate::load::{LoadConfig, run};

    #[test]
    fn nothing_listening_is_refused() {
        assert_eq!(
            connect_once(loopback(), Duration::from_secs(1)),
            Err(FailureKind::Refused)
        );
        let mut cfg = LoadConfig::new(loopback(), 2);
        cfg.count = Some(10);
        let report = run(&cfg, None);
        assert_eq!(
            (report.attempts, report.ok, report.failures.refused),
            (10, 0, 10)
        );
    }

    #[test]
    fn slow_answers_time_out() {
        let addr = loopback();
        let _srv = Proc::spawn_testsrv(&[
            "--name",
            "slow",
            "--listen",
            &addr.to_string(),
            "--delay-ms",
            "500",
        ]);
        assert_eq!(
            connect_once(addr, Duration::from_millis(100)),
            Err(FailureKind::Timeout)
        );
        let mut cfg = LoadConfig::new(addr, 4);
        cfg.count = Some(4);
        cfg.timeout_ms = 100;
        assert_eq!(run(&cfg, None).failures.timeout, 4);
    }

    #[test]
    fn held_connections_stay_open_and_notice_a_dying_server() {
        let addr = loopback();
        let srv = Proc::spawn_testsrv(&["--name", "H", "--listen", &addr.to_string()]);
        let (held, name, pid) = hold(addr).expect("held connection");
        assert_eq!((name.as_str(), pid), ("H", srv.pid));
        assert_eq!(
            connect_once(addr, Duration::from_secs(2)).map(|a| a.0),
            Ok("H".to_owned())
        );
        drop(held);

        // A hold ends early with "eof" when the server dies, and with success on stop.
        let mut cfg = LoadConfig::new(addr, 4);
        cfg.count = Some(4);
        cfg.hold_ms = 10_000;
        let started = Instant::now();
        let killer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            drop(srv);
        });
        let report = run(&cfg, None);
        killer.join().expect("killer thread");
        assert_eq!((report.ok, report.failures.eof), (0, 4), "{report:?}");
        assert!(started.elapsed() < Duration::from_secs(5));

        let addr = loopback();
        let _srv = Proc::spawn_testsrv(&["--name", "S", "--listen", &addr.to_string()]);
        let stop = AtomicBool::new(false);
        let report = thread::scope(|s| {
            let load = s.spawn(|| run(&cfg_for(addr), Some(&stop)));
            thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::Relaxed);
            load.join().expect("load thread")
        });
        assert_eq!((report.ok, report.failures.total()), (4, 0), "{report:?}");
    }

    fn cfg_for(addr: SocketAddr) -> LoadConfig {
        let mut cfg = LoadConfig::new(addr, 4);
        cfg.hold_ms = 10_000;
        cfg
    }
}
