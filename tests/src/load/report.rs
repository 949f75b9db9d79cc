//! What a run counts: [`LoadReport`], with a [`FailureKind`] for every failed attempt.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Answer;

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureKind {
    /// Connect failed other than by refusal or reset (also any other socket error).
    Connect,
    /// ECONNREFUSED: nothing listened.
    Refused,
    /// ECONNRESET at any point, e.g. a listener closed with the connection in its queue.
    Reset,
    /// EOF before a full, well-formed answer line, or during the hold.
    Eof,
    /// No answer within the timeout.
    Timeout,
    /// `--http`: a full response whose status was not 200.
    Status,
}

impl FailureKind {
    /// Every kind, in report order.
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Connect,
        FailureKind::Refused,
        FailureKind::Reset,
        FailureKind::Eof,
        FailureKind::Timeout,
        FailureKind::Status,
    ];

    /// The lowercase name used in the report and the log.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Refused => "refused",
            FailureKind::Reset => "reset",
            FailureKind::Eof => "eof",
            FailureKind::Timeout => "timeout",
            FailureKind::Status => "status",
        }
    }

    pub(super) fn of(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => FailureKind::Refused,
            // EPIPE: a write after the peer reset the connection.
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => FailureKind::Reset,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => FailureKind::Timeout,
            _ => FailureKind::Connect,
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailureKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        FailureKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown failure kind {s:?}"))
    }
}

/// Failed attempts by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    /// See [`FailureKind::Connect`].
    pub connect: u64,
    /// See [`FailureKind::Refused`].
    pub refused: u64,
    /// See [`FailureKind::Reset`].
    pub reset: u64,
    /// See [`FailureKind::Eof`].
    pub eof: u64,
    /// See [`FailureKind::Timeout`].
    pub timeout: u64,
    /// See [`FailureKind::Status`]; absent from reports older than `--http`.
    #[serde(default)]
    pub status: u64,
}

impl Failures {
    /// All failed attempts.
    pub fn total(&self) -> u64 {
        self.connect + self.refused + self.reset + self.eof + self.timeout + self.status
    }

    /// Failed attempts of one kind.
    pub fn of_kind(&self, kind: FailureKind) -> u64 {
        match kind {
            FailureKind::Connect => self.connect,
            FailureKind::Refused => self.refused,
            FailureKind::Reset => self.reset,
            FailureKind::Eof => self.eof,
            FailureKind::Timeout => self.timeout,
            FailureKind::Status => self.status,
        }
    }

    fn slot(&mut self, kind: FailureKind) -> &mut u64 {
        match kind {
            FailureKind::Connect => &mut self.connect,
            FailureKind::Refused => &mut self.refused,
            FailureKind::Reset => &mut self.reset,
            FailureKind::Eof => &mut self.eof,
            FailureKind::Timeout => &mut self.timeout,
            FailureKind::Status => &mut self.status,
        }
    }
}

/// The result of a run; `loadgen` prints it as one JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Attempts made: `ok + failures.total()`.
    pub attempts: u64,
    /// Attempts answered (and held) without error.
    pub ok: u64,
    /// Failed attempts by kind.
    pub failures: Failures,
    /// Successful attempts by generation name.
    pub by_name: BTreeMap<String, u64>,
    /// Successful attempts by the pid that accepted (with `--http`: by `X-Pid` header, when
    /// the server sends one).
    pub by_pid: BTreeMap<u32, u64>,
    /// Wall time of the run.
    pub elapsed_ms: u64,
    /// Slowest connect-to-answer time of a successful attempt (with `--http`: of a request,
    /// counted from the connect on a new connection, from the write on a kept-alive one).
    pub max_latency_ms: u64,
    /// `--http`: kept-alive connections the server had closed before the next request was
    /// sent on them; the client opened a new one (not a failure).
    #[serde(default)]
    pub reopened: u64,
    /// `--http`: requests sent on a reused keep-alive connection which the server closed or
    /// reset before any byte of the answer: the keep-alive race (see the [module
    /// documentation](super)). Without `--retry-keepalive-race` each is a failure too (as
    /// `reset` or `eof`); with it each was retried once and counts as its retry ended.
    #[serde(default)]
    pub keepalive_race: u64,
}

impl LoadReport {
    pub(super) fn record(&mut self, outcome: &Result<Answer, FailureKind>) {
        self.attempts += 1;
        match outcome {
            Ok(answer) => {
                self.ok += 1;
                *self.by_name.entry(answer.name.clone()).or_default() += 1;
                if let Some(pid) = answer.pid {
                    *self.by_pid.entry(pid).or_default() += 1;
                }
                let ms = u64::try_from(answer.latency.as_millis()).unwrap_or(u64::MAX);
                self.max_latency_ms = self.max_latency_ms.max(ms);
            }
            Err(kind) => *self.failures.slot(*kind) += 1,
        }
    }

    pub(super) fn merge(&mut self, other: LoadReport) {
        self.attempts += other.attempts;
        self.ok += other.ok;
        for kind in FailureKind::ALL {
            *self.failures.slot(kind) += other.failures.of_kind(kind);
        }
        for (name, n) in other.by_name {
            *self.by_name.entry(name).or_default() += n;
        }
        for (pid, n) in other.by_pid {
            *self.by_pid.entry(pid).or_default() += n;
        }
        self.max_latency_ms = self.max_latency_ms.max(other.max_latency_ms);
        self.reopened += other.reopened;
        self.keepalive_race += other.keepalive_race;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn errors_are_classified() {
        let kind = |k| FailureKind::of(&io::Error::from(k));
        assert_eq!(kind(io::ErrorKind::ConnectionRefused), FailureKind::Refused);
        assert_eq!(kind(io::ErrorKind::ConnectionReset), FailureKind::Reset);
        assert_eq!(kind(io::ErrorKind::BrokenPipe), FailureKind::Reset);
        assert_eq!(kind(io::ErrorKind::TimedOut), FailureKind::Timeout);
        assert_eq!(kind(io::ErrorKind::WouldBlock), FailureKind::Timeout);
        assert_eq!(kind(io::ErrorKind::HostUnreachable), FailureKind::Connect);
        let os = |errno| FailureKind::of(&io::Error::from_raw_os_error(errno));
        assert_eq!(os(libc::ECONNREFUSED), FailureKind::Refused);
        assert_eq!(os(libc::ECONNRESET), FailureKind::Reset);
        assert_eq!(os(libc::EADDRNOTAVAIL), FailureKind::Connect);
    }

    #[test]
    fn report_serializes_as_documented() {
        let mut report = LoadReport::default();
        report.record(&Ok(Answer {
            name: "A".into(),
            pid: Some(42),
            latency: Duration::from_millis(3),
        }));
        report.record(&Ok(Answer {
            name: "A".into(),
            pid: None,
            latency: Duration::from_millis(1),
        }));
        report.record(&Err(FailureKind::Reset));
        report.record(&Err(FailureKind::Status));
        let json: serde_json::Value = serde_json::to_value(&report).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "attempts": 4, "ok": 2,
                "failures": {"connect": 0, "refused": 0, "reset": 1, "eof": 0, "timeout": 0, "status": 1},
                "by_name": {"A": 2}, "by_pid": {"42": 1}, "elapsed_ms": 0, "max_latency_ms": 3,
                "reopened": 0, "keepalive_race": 0
            })
        );
        let back: LoadReport = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, report);
        assert_eq!(report.failures.total(), 2);

        // A report from before `--http` (no "status", "reopened", "keepalive_race") parses.
        let old = serde_json::json!({
            "attempts": 1, "ok": 0,
            "failures": {"connect": 0, "refused": 0, "reset": 0, "eof": 1, "timeout": 0},
            "by_name": {}, "by_pid": {}, "elapsed_ms": 5, "max_latency_ms": 0
        });
        let old: LoadReport = serde_json::from_value(old).expect("an old report parses");
        assert_eq!(
            (old.failures.eof, old.failures.status, old.reopened),
            (1, 0, 0)
        );
    }
}
