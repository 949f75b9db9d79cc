//! What the guest reported on one kernel, and its tables.

use std::path::PathBuf;
use std::time::Duration;

use super::boot::{Expect, Kernel};

/// What a test executable reported in the guest.
pub(super) struct TestRun {
    pub(super) name: String,
    /// Exit status (124: killed by the guest's timeout).
    pub(super) rc: String,
    pub(super) passed: u32,
    pub(super) failed: u32,
    pub(super) ignored: u32,
    /// Lines with "SKIPPED": a skip is a failure here.
    pub(super) skipped: u32,
}

impl TestRun {
    pub(super) fn ok(&self) -> bool {
        self.rc == "0" && self.failed == 0 && self.skipped == 0 && self.passed > 0
    }

    /// Parses `test NAME rc=R passed=P failed=F ignored=I skipped=S`.
    pub(super) fn parse(rest: &str) -> Option<Self> {
        let mut words = rest.split_whitespace();
        let name = words.next()?.to_owned();
        let mut run = Self {
            name,
            rc: "?".to_owned(),
            passed: 0,
            failed: 0,
            ignored: 0,
            skipped: 0,
        };
        for word in words {
            let (key, value) = word.split_once('=')?;
            let number = value.parse().unwrap_or(0);
            match key {
                "rc" => run.rc = value.to_owned(),
                "passed" => run.passed = number,
                "failed" => run.failed = number,
                "ignored" => run.ignored = number,
                "skipped" => run.skipped = number,
                _ => {}
            }
        }
        Some(run)
    }
}

/// What happened on one kernel.
pub(super) struct Outcome {
    pub(super) kernel: Kernel,
    /// `uname -r` in the guest.
    pub(super) release: Option<String>,
    /// The smoke handoff's or the refusal check's marker: PASS or FAIL with the reason.
    pub(super) check: Option<String>,
    /// The test executables that were to run.
    pub(super) expected_tests: Vec<String>,
    pub(super) tests: Vec<TestRun>,
    /// The guest printed `@@handoff done`.
    pub(super) done: bool,
    /// Why the run stopped early (deadline, qemu failure), if it did.
    pub(super) error: Option<String>,
    pub(super) wall: Duration,
    /// The console log, kept for a failed kernel.
    pub(super) log: Option<PathBuf>,
}

impl Outcome {
    pub(super) fn check_passed(&self) -> bool {
        self.check.as_deref().is_some_and(|c| c.starts_with("PASS"))
    }

    pub(super) fn passed(&self) -> bool {
        let tests_ok = self
            .expected_tests
            .iter()
            .all(|t| self.tests.iter().any(|r| &r.name == t && r.ok()));
        self.done && self.error.is_none() && self.check_passed() && tests_ok
    }

    pub(super) fn print_table(&self) {
        let k = &self.kernel;
        println!();
        println!(
            "kernel {} ({} {}, uname -r {}): {} in {:.0} s",
            k.name,
            k.pin.package,
            k.pin.version,
            self.release.as_deref().unwrap_or("?"),
            if self.passed() { "PASS" } else { "FAIL" },
            self.wall.as_secs_f64()
        );
        let what = match k.expect {
            Expect::Run => "smoke handoff",
            Expect::Refusal => "refusal",
        };
        println!(
            "  {what:<22} {}",
            self.check.as_deref().unwrap_or("no result")
        );
        for name in &self.expected_tests {
            match self.tests.iter().find(|r| &r.name == name) {
                Some(r) => println!(
                    "  {:<22} {:<4} {} passed, {} failed, {} ignored{}{}",
                    r.name,
                    if r.ok() { "ok" } else { "FAIL" },
                    r.passed,
                    r.failed,
                    r.ignored,
                    if r.skipped > 0 {
                        format!(", {} SKIPPED", r.skipped)
                    } else {
                        String::new()
                    },
                    if r.rc == "0" {
                        String::new()
                    } else {
                        format!(" (exit status {})", r.rc)
                    }
                ),
                None => println!("  {name:<22} FAIL did not run to the end"),
            }
        }
        if let Some(error) = &self.error {
            println!("  error: {error}");
        }
        if let Some(log) = &self.log {
            println!("  console log: {}", log.display());
        }
    }

    pub(super) fn summary_row(&self) -> String {
        let (mut p, mut f, mut i) = (0, 0, 0);
        for r in &self.tests {
            p += r.passed;
            f += r.failed;
            i += r.ignored;
        }
        let tests = if self.kernel.expect == Expect::Refusal {
            "-".to_owned()
        } else {
            format!("{p}/{f}/{i}")
        };
        let check = match &self.check {
            Some(c) if c.starts_with("PASS") => "PASS",
            Some(_) => "FAIL",
            None => "none",
        };
        format!(
            "{:<7} {:<22} {:<16} {:<22} {:>5.0} s  {}",
            self.kernel.name,
            self.kernel.pin.version,
            check,
            tests,
            self.wall.as_secs_f64(),
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::TestRun;

    #[test]
    fn test_markers_parse() {
        let run = TestRun::parse("steer rc=0 passed=5 failed=0 ignored=1 skipped=0").unwrap();
        assert_eq!((run.passed, run.failed, run.ignored), (5, 0, 1));
        assert!(run.ok());
        let skipped = TestRun::parse("drain rc=0 passed=3 failed=0 ignored=0 skipped=1").unwrap();
        assert!(!skipped.ok());
        let timed_out =
            TestRun::parse("drain rc=124 passed=? failed=? ignored=? skipped=0").unwrap();
        assert!(!timed_out.ok());
    }
}
