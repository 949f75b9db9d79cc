//! The `--log` file: one line `START_NS OUTCOME` per attempt, and the clock of `START_NS`.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::str::FromStr;

use nix::time::{ClockId, clock_gettime};

use super::FailureKind;

/// CLOCK_MONOTONIC in nanoseconds: the clock of the `--log` start times.
pub fn monotonic_ns() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC exists on every Linux kernel");
    // Monotonic time is non-negative and fits u64 nanoseconds for 584 years of uptime.
    (now.tv_sec() as u64) * 1_000_000_000 + now.tv_nsec() as u64
}

/// One line of a `--log` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// CLOCK_MONOTONIC nanoseconds when the attempt started (see [`monotonic_ns`]).
    pub start_ns: u64,
    /// The generation name that answered, or why the attempt failed.
    pub outcome: Result<String, FailureKind>,
}

impl FromStr for LogEntry {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, String> {
        let (start, outcome) = line
            .split_once(' ')
            .ok_or_else(|| format!("bad log line {line:?}"))?;
        let start_ns = start
            .parse()
            .map_err(|e| format!("bad start in {line:?}: {e}"))?;
        let outcome = match outcome.strip_prefix('!') {
            Some(kind) => Err(kind.parse()?),
            None => Ok(outcome.to_owned()),
        };
        Ok(LogEntry { start_ns, outcome })
    }
}

/// Reads a `--log` file.
pub fn read_log(path: &Path) -> io::Result<Vec<LogEntry>> {
    BufReader::new(File::open(path)?)
        .lines()
        .map(|line| {
            line?
                .parse()
                .map_err(|e: String| io::Error::new(io::ErrorKind::InvalidData, e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Proc;
    use crate::load::tests::loopback;
    use crate::load::{LoadConfig, parse_answer, run};

    #[test]
    fn answers_and_log_lines_parse() {
        assert_eq!(parse_answer("A 12"), Some(("A", 12)));
        assert_eq!(parse_answer("A"), None);
        assert_eq!(parse_answer(" 12"), None);
        assert_eq!(parse_answer("A x"), None);
        let ok: LogEntry = "5 gen-b".parse().expect("ok line");
        assert_eq!(
            ok,
            LogEntry {
                start_ns: 5,
                outcome: Ok("gen-b".to_owned())
            }
        );
        for kind in FailureKind::ALL {
            let entry: LogEntry = format!("7 !{kind}").parse().expect("failure line");
            assert_eq!(entry.outcome, Err(kind));
        }
        assert!("7 !nope".parse::<LogEntry>().is_err());
        assert!("x A".parse::<LogEntry>().is_err());
    }

    #[test]
    fn log_records_every_attempt() {
        let addr = loopback();
        let _srv = Proc::spawn_testsrv(&["--name", "logged", "--listen", &addr.to_string()]);
        let path = std::env::temp_dir().join(format!(
            "handoff-loadgen-{}-{}.log",
            std::process::id(),
            monotonic_ns()
        ));
        let mut cfg = LoadConfig::new(addr, 4);
        cfg.count = Some(40);
        cfg.log = Some(path.clone());
        let before = monotonic_ns();
        let report = run(&cfg, None);
        let after = monotonic_ns();
        let entries = read_log(&path).expect("log file");
        let _ = std::fs::remove_file(&path);
        assert_eq!((report.ok, entries.len()), (40, 40));
        for entry in entries {
            assert!((before..=after).contains(&entry.start_ns));
            assert_eq!(entry.outcome, Ok("logged".to_owned()));
        }
    }
}
