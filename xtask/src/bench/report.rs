//! The results of a run: rows with their baselines and goals, the table printed at the end,
//! and `BENCHMARKS.md`.
//!
//! `BENCHMARKS.md` is generated down to a marker line; what follows the marker (the
//! analysis: why a goal is missed and what would fix it) is written by hand and kept when
//! the file is generated again.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

/// The line that ends the generated part of `BENCHMARKS.md`.
pub const MARKER: &str =
    "<!-- Generated above by `cargo xtask bench`; kept below when it runs again. -->";

/// How a measure compares with its goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The goal is met.
    Met,
    /// The goal is missed: the notes say why.
    Missed,
    /// The measure cannot tell: the goal lies within the run's noise.
    WithinNoise,
    /// A figure without a goal (a baseline, a comparison).
    Info,
    /// Not measured yet; the detail says what it waits for.
    Pending,
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What is measured.
    pub measure: String,
    /// The result as shown.
    pub result: String,
    /// The main number of the result (`None`: no number came out).
    pub number: Option<f64>,
    /// What it is measured against, in the same run.
    pub baseline: String,
    /// The goal, as text.
    pub goal: String,
    /// Against the goal.
    pub verdict: Verdict,
}

impl Row {
    /// A row with a result and no goal.
    pub fn new(measure: impl Into<String>, result: impl Into<String>, number: Option<f64>) -> Self {
        Self {
            measure: measure.into(),
            result: result.into(),
            number,
            baseline: String::new(),
            goal: String::new(),
            verdict: Verdict::Info,
        }
    }

    /// The baseline it is measured against.
    pub fn baseline(mut self, baseline: impl Into<String>) -> Self {
        self.baseline = baseline.into();
        self
    }

    /// The goal and whether it is met.
    pub fn goal(mut self, goal: impl Into<String>, met: bool) -> Self {
        self.goal = goal.into();
        self.verdict = if met { Verdict::Met } else { Verdict::Missed };
        self
    }

    /// The goal, which the measure's noise neither meets nor misses.
    pub fn goal_within_noise(mut self, goal: impl Into<String>) -> Self {
        self.goal = goal.into();
        self.verdict = Verdict::WithinNoise;
        self
    }

    /// A row that cannot be measured yet.
    pub fn pending(
        measure: impl Into<String>,
        why: impl Into<String>,
        goal: impl Into<String>,
    ) -> Self {
        Self {
            measure: measure.into(),
            result: format!("pending: {}", why.into()),
            number: None,
            baseline: String::new(),
            goal: goal.into(),
            verdict: Verdict::Pending,
        }
    }
}

/// The outcome of one benchmark.
#[derive(Debug, Clone)]
pub struct Section {
    /// Its number in the issue (1-6; 7: the floods of issue 10; 8-9: issue 14's rollback and weight).
    pub id: usize,
    /// Its `--only` name.
    pub name: &'static str,
    /// Its title.
    pub title: &'static str,
    /// Its rows (none if it failed).
    pub rows: Vec<Row>,
    /// How it was measured and the raw figures, one markdown paragraph or list item each.
    pub details: Vec<String>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// How long it ran.
    pub took: Duration,
}

impl Section {
    /// Rows that should carry a number and do not.
    pub fn missing_numbers(&self) -> Vec<&str> {
        self.rows
            .iter()
            .filter(|r| r.verdict != Verdict::Pending)
            .filter(|r| !r.number.is_some_and(f64::is_finite))
            .map(|r| r.measure.as_str())
            .collect()
    }
}

/// The table of every section, in markdown. `quick`: no verdicts (timings mean nothing).
pub fn table(sections: &[Section], quick: bool) -> String {
    let mut out = String::new();
    out.push_str("| # | measure | result | baseline (same run) | goal | |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for s in sections {
        if let Some(e) = &s.error {
            let _ = writeln!(
                out,
                "| {} | {} | **FAILED**: {} | | | ✗ |",
                s.id,
                s.title,
                cell(e)
            );
            continue;
        }
        for r in &s.rows {
            let verdict = match (quick, r.verdict) {
                (_, Verdict::Pending) => "pending",
                (true, _) => "ran",
                (false, Verdict::Met) => "met",
                (false, Verdict::Missed) => "**MISSED**",
                (false, Verdict::WithinNoise) => "within noise",
                (false, Verdict::Info) => "",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                s.id,
                cell(&r.measure),
                cell(&r.result),
                cell(&r.baseline),
                cell(&r.goal),
                verdict
            );
        }
    }
    out
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// Writes `path`: the generated header, table and details, then the marker and whatever
/// followed the marker in the existing file.
pub fn write_markdown(
    root: &Path,
    path: &Path,
    sections: &[Section],
    took: Duration,
    built: Duration,
) -> Result<()> {
    let kept = std::fs::read_to_string(path)
        .ok()
        .and_then(|old| old.split_once(MARKER).map(|(_, rest)| rest.to_owned()))
        .unwrap_or_else(|| "\n\n## Notes\n\n(none yet)\n".to_owned());
    let mut out = String::new();
    out.push_str("# Benchmarks\n\n");
    let _ = writeln!(
        out,
        "Generated by `sudo cargo xtask bench` on {}, {}, {}. The full run took {} \
         (of which {:.0} s building the release binaries); anyone can repeat it with that \
         command (root: BPF, network namespaces). \
         `cargo xtask bench --quick` (CI, under 2 minutes) runs every benchmark briefly and checks \
         only that each produces a number; `--only NAME` runs one \
         (`path`, `promote`, `drain`, `restarts`, `footprint`, `scale`, `flood`, `rollback`, `weight`).\n",
        utc_now(),
        revision(root),
        machine(),
        minutes(took),
        built.as_secs_f64()
    );
    out.push_str(
        "Every benchmark runs in a network namespace of its own, with the release build. \
         Baselines are measured in the same run, interleaved where the machine's noise could \
         bias them. The machine is shared and noisy (each section gives the load average \
         around it): compare within a row, not across runs. Verdicts: met, **MISSED** (the \
         notes below say why and what would fix it), or within noise (the goal lies inside \
         the measure's 95 % confidence interval).\n\n",
    );
    out.push_str(&table(sections, false));
    for s in sections {
        let _ = writeln!(
            out,
            "\n## {}. {} (`{}`, {:.0} s)\n",
            s.id,
            s.title,
            s.name,
            s.took.as_secs_f64()
        );
        if let Some(e) = &s.error {
            let _ = writeln!(out, "Failed: {e}\n");
        }
        for d in &s.details {
            out.push_str(d);
            out.push('\n');
        }
    }
    out.push('\n');
    out.push_str(MARKER);
    out.push_str(&kept);
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

/// `4 min 12 s`.
pub fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{} min {} s", s / 60, s % 60)
}

/// The date and time, UTC, from `date` (no date crate for one line).
fn utc_now() -> String {
    command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "an unknown date".into())
}

/// `commit abc1234` (`+ uncommitted changes` if the tree differs), from git in `root`.
fn revision(root: &Path) -> String {
    let root = root.to_string_lossy();
    let Some(commit) = command_line("git", &["-C", &root, "rev-parse", "--short", "HEAD"]) else {
        return "outside a git checkout".into();
    };
    let dirty =
        command_line("git", &["-C", &root, "status", "--porcelain"]).is_some_and(|s| !s.is_empty());
    format!(
        "commit {commit}{}",
        if dirty { " + uncommitted changes" } else { "" }
    )
}

/// CPU model, cores, memory, kernel and rustc of this machine.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = command_line("uname", &["-r"]).unwrap_or_default();
    let rustc = command_line("rustc", &["--version"]).unwrap_or_default();
    format!("{model}, {cores} cores, {mem_gib:.0} GiB, Linux {kernel}, {rustc}")
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(rows: Vec<Row>) -> Section {
        Section {
            id: 1,
            name: "x",
            title: "X",
            rows,
            details: vec!["detail".into()],
            error: None,
            took: Duration::from_secs(1),
        }
    }

    #[test]
    fn table_shows_verdicts_only_in_full_runs() {
        let s = section(vec![
            Row::new("a|b", "1 ms", Some(1.0)).goal("< 5 ms", true),
            Row::new("c", "9 ms", Some(9.0)).goal("< 5 ms", false),
            Row::pending("d", "needs --config", "< 20 MB"),
        ]);
        let full = table(std::slice::from_ref(&s), false);
        assert!(
            full.contains("| 1 | a\\|b | 1 ms |  | < 5 ms | met |"),
            "{full}"
        );
        assert!(full.contains("**MISSED**") && full.contains("| pending |"));
        let quick = table(&[s], true);
        assert!(!quick.contains("met") && !quick.contains("MISSED") && quick.contains("| ran |"));
    }

    #[test]
    fn rows_without_a_number_are_found() {
        let s = section(vec![
            Row::new("a", "1", Some(1.0)),
            Row::new("b", "none", None),
            Row::new("c", "NaN", Some(f64::NAN)),
            Row::pending("d", "later", ""),
        ]);
        assert_eq!(s.missing_numbers(), ["b", "c"]);
    }

    #[test]
    fn notes_after_the_marker_survive_regeneration() {
        let dir = crate::TempDir::new("report-test").unwrap();
        let path = dir.path().join("BENCHMARKS.md");
        std::fs::write(
            &path,
            format!("old table\n{MARKER}\n\n## Notes\n\nkeep me\n"),
        )
        .unwrap();
        write_markdown(
            dir.path(),
            &path,
            &[section(vec![Row::new("a", "1", Some(1.0))])],
            Duration::from_secs(75),
            Duration::from_secs(5),
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("old table") && text.contains("keep me"),
            "{text}"
        );
        assert!(text.contains("1 min 15 s") && text.matches(MARKER).count() == 1);
    }
}
