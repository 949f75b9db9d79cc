//! Reading the children's output: lines captured by a thread and waited for with a
//! deadline, testsrv's `key=value` fields, and loadgen's JSON report.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::children::{POLL, check_interrupted};

/// Parses `ready pid=M workers=W1,W2`.
pub fn parse_ready(line: &str) -> Option<(u32, Vec<u32>)> {
    let rest = line.trim().strip_prefix("ready pid=")?;
    let (pid, workers) = rest.split_once(" workers=")?;
    let workers = if workers.is_empty() {
        Vec::new()
    } else {
        workers
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?
    };
    Some((pid.parse().ok()?, workers))
}

/// The number after `key` (e.g. `ns=`) among the space-separated fields of `line`.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.parse().ok())
}

/// The lines of a child's pipe, kept (and copied to a log file) by a reader thread.
#[derive(Clone)]
pub struct Captured(Arc<(Mutex<CapturedLines>, Condvar)>);

#[derive(Default)]
struct CapturedLines {
    lines: Vec<String>,
    /// The pipe reached its end.
    closed: bool,
}

impl Captured {
    pub fn start(pipe: impl Read + Send + 'static, mut log: Option<File>) -> Self {
        let shared = Arc::new((Mutex::new(CapturedLines::default()), Condvar::new()));
        let writer = Arc::clone(&shared);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(log) = &mut log {
                    let _ = writeln!(log, "{line}");
                }
                writer
                    .0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .lines
                    .push(line);
                writer.1.notify_all();
            }
            writer.0.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
            writer.1.notify_all();
        });
        Self(shared)
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        self.0
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .clone()
    }

    /// The last few lines, for error messages.
    pub fn tail(&self) -> String {
        let lines = self.all();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// Waits for the first line that satisfies `pred`.
    pub fn wait(
        &self,
        what: &str,
        deadline: Instant,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let mut first = self.wait_n(what, deadline, 1, pred)?;
        Ok(first.remove(0))
    }

    /// Waits until `count` lines satisfy `pred`; returns the first `count` of them.
    pub fn wait_n(
        &self,
        what: &str,
        deadline: Instant,
        count: usize,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>> {
        let (lock, changed) = &*self.0;
        let mut lines = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let found: Vec<String> = lines
                .lines
                .iter()
                .filter(|l| pred(l))
                .take(count)
                .cloned()
                .collect();
            if found.len() == count {
                return Ok(found);
            }
            if lines.closed {
                bail!("the output ended before {what}");
            }
            check_interrupted()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out waiting for {what}");
            }
            lines = changed
                .wait_timeout(lines, left.min(POLL * 5))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The figures of a loadgen report that the benchmarks use.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Connections tried.
    pub attempts: u64,
    /// Connections answered.
    pub ok: u64,
    /// Failed connections, every kind.
    pub failed: u64,
    /// The failures by kind, e.g. `reset 3, eof 1` (empty: none).
    pub kinds: String,
    /// Duration of the run.
    pub elapsed_ms: u64,
    /// The slowest answer.
    pub max_latency_ms: u64,
    /// Answers per generation name.
    pub by_name: BTreeMap<String, u64>,
}

impl LoadReport {
    pub fn from_json(v: &Value) -> Result<Self> {
        let n = |key: &str| {
            v[key]
                .as_u64()
                .with_context(|| format!("loadgen report: no {key}: {v}"))
        };
        let failures = v["failures"]
            .as_object()
            .with_context(|| format!("loadgen report: no failures: {v}"))?;
        let mut failed = 0;
        let mut kinds = Vec::new();
        for (kind, count) in failures {
            let count = count.as_u64().unwrap_or(0);
            if count > 0 {
                failed += count;
                kinds.push(format!("{kind} {count}"));
            }
        }
        let attempts = n("attempts")?;
        let ok = n("ok")?;
        let by_name = v["by_name"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
            .collect();
        Ok(Self {
            attempts,
            ok,
            // An attempt neither answered nor counted as a kind still failed.
            failed: failed.max(attempts.saturating_sub(ok)),
            kinds: kinds.join(", "),
            elapsed_ms: n("elapsed_ms")?,
            max_latency_ms: n("max_latency_ms")?,
            by_name,
        })
    }

    /// Answered connections per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / (self.elapsed_ms.max(1) as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_and_fields() {
        assert_eq!(parse_ready("ready pid=7 workers="), Some((7, vec![])));
        assert_eq!(
            parse_ready("ready pid=7 workers=8,9\n"),
            Some((7, vec![8, 9]))
        );
        assert_eq!(parse_ready("ready pid=7"), None);
        assert_eq!(field("term A pid=5 ns=123", "ns="), Some(123));
        assert_eq!(
            field("closed A pid=5 count=3 first_ns=1 last_ns=2", "last_ns="),
            Some(2)
        );
        assert_eq!(field("term A pid=5", "ns="), None);
    }

    #[test]
    fn load_report_counts_every_failure() {
        let v: Value = serde_json::from_str(
            r#"{"attempts":10,"ok":7,"failures":{"connect":0,"reset":2,"eof":1},
                "by_name":{"A":4,"B":3},"by_pid":{},"elapsed_ms":500,"max_latency_ms":9}"#,
        )
        .unwrap();
        let r = LoadReport::from_json(&v).unwrap();
        assert_eq!((r.failed, r.kinds.as_str()), (3, "eof 1, reset 2"));
        assert_eq!(r.by_name["B"], 3);
        assert_eq!(r.rate(), 14.0);
    }
}
