//! handoffctl: promote a process, roll back, reload the configuration, or read the state
//! of handoffd.
//!
//! `promote PID` opens a pidfd of PID in handoffctl's own pid namespace and sends it with
//! the request: the daemon promotes the process the pidfd names, so a pid typed inside a
//! container means what the caller meant, and names only a process the caller can see.
//!
//! An answer is believed only from a socket whose peer (the process that listens on it,
//! as the kernel reports it) is root, the caller's own uid, or `--daemon-uid`: a socket
//! someone else placed at the path is refused with one line.
//!
//! Output goes out in one write; a reader that stops early (`handoffctl status | head
//! -1`) ends handoffctl quietly with status 0: the request was answered, the reader
//! chose to read less.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use handoff::client as control;
use handoff_common::check::CheckSpec;
use handoff_common::proto::{
    DEFAULT_CONTROL_SOCKET, ErrorKind, GenerationStatus, PromoteOptions, Release, Request,
    Response, ServiceStatus, Status,
};

/// Control handoffd.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// handoffd's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    control_socket: PathBuf,
    /// Also believe a daemon running as this uid (besides root and your own uid).
    #[arg(long, value_name = "UID")]
    daemon_uid: Option<u32>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make PID (and its descendants) the active generation; exits 0 once the kernel steers to it.
    Promote {
        /// The process to promote, as handoffctl's pid namespace sees it (a pidfd of it is
        /// passed to handoffd).
        pid: i32,
        /// The service (may be left out when handoffd runs one).
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        how: PromoteFlags,
    },
    /// Take traffic back: abort a canary, else make the standby generation (or the newest
    /// draining one still listening) active again.
    Rollback {
        /// The service (may be left out when handoffd runs one).
        #[arg(long)]
        service: Option<String>,
    },
    /// Reload handoffd's --config file, as SIGHUP does; exits 1 with the reason if refused.
    ///
    /// Answers once the file is applied: one line naming the file and its services. A
    /// refused file changes nothing (the running configuration stays) and is reported as
    /// `Error: configuration refused, the running one stays: FILE:LINE:COL: reason`.
    Reload,
    /// Show services and generations.
    Status {
        /// Print JSON (the shape is stable).
        #[arg(long)]
        json: bool,
    },
}

/// How a promote hands traffic over (each absent flag: the service's configuration).
#[derive(Debug, clap::Args)]
struct PromoteFlags {
    /// Check PID through each of its listeners before any client reaches it: `tcp`,
    /// `http:/PATH[:STATUS]` or `https:/PATH[:STATUS]` (TLS, certificate not verified).
    #[arg(long, value_name = "CHECK")]
    check: Option<CheckSpec>,
    /// Do not run the service's configured check.
    #[arg(long, conflicts_with = "check")]
    no_check: bool,
    /// How long the check may take, retries included (e.g. 5s, 500ms).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    check_timeout: Option<Duration>,
    /// Keep trying until PID listens and passes its check, or the check timeout ends.
    #[arg(long)]
    wait: bool,
    /// Percent of new connections for PID, the rest staying with the active generation
    /// (a canary); 100 completes a canary.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=100))]
    weight: Option<u8>,
    /// After the promote, keep the previous generation ready (no drain signal) this long,
    /// and take traffic back to it at once if PID exits, closes its listeners or fails
    /// its check; 0 turns the service's window off.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    watch: Option<Duration>,
}

impl PromoteFlags {
    fn options(self) -> PromoteOptions {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        PromoteOptions {
            check: self.check,
            no_check: self.no_check,
            check_timeout_ms: self.check_timeout.map(ms),
            wait: self.wait,
            weight: self.weight,
            watch_ms: self.watch.map(ms),
        }
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    handoff::config::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut typed = None;
    let mut pidfd = None;
    let (request, json) = match args.command {
        Command::Promote { pid, service, how } => {
            typed = Some(pid);
            let options = how.options();
            if let Err(e) = options.validate() {
                return fail(&e);
            }
            match control::caller_pidfd(pid) {
                Ok(fd) => pidfd = fd,
                Err(e) => return fail(&handoff::logging::one_line(&e)),
            }
            (
                Request::Promote {
                    pid,
                    service,
                    options,
                },
                false,
            )
        }
        Command::Rollback { service } => (Request::Rollback { service }, false),
        Command::Reload => (Request::Reload {}, false),
        Command::Status { json } => (Request::Status {}, json),
    };
    let answer = control::request_with_fd(
        &args.control_socket,
        &request,
        pidfd.as_ref().map(AsFd::as_fd),
        args.daemon_uid,
    );
    let text = match answer {
        Ok(Response::Promoted(p)) => promoted_text(&p, typed.filter(|_| pidfd.is_some())),
        Ok(Response::Reloaded(r)) => {
            format!("reloaded {}: services {}\n", r.file, r.services.join(", "))
        }
        Ok(Response::Status(status)) if json => match serde_json::to_string(&status) {
            Ok(text) => text + "\n",
            Err(e) => return fail(&e.to_string()),
        },
        Ok(Response::Status(status)) => status_text(&status),
        // The reload's refusals, in the form the unit's `ExecReload=` logs.
        Ok(Response::Error(e))
            if matches!(e.kind, ErrorKind::ConfigRefused | ErrorKind::NoConfig) =>
        {
            // `<3>` first when run by the unit (journald's stream is stderr).
            handoff::logging::write_stderr(
                handoff::logging::Target::detect(),
                3,
                &format!("Error: {}\n", e.message),
            );
            return ExitCode::FAILURE;
        }
        Ok(Response::Error(e)) => return fail(&e.message),
        Err(e) => return fail(&e.to_string()),
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(&format!("writing the answer failed: {e}")),
    }
}

/// The line a promote or rollback answers with; `typed` is the pid as the caller typed
/// it, when a pidfd went with it.
fn promoted_text(p: &handoff_common::proto::Promoted, typed: Option<i32>) -> String {
    let draining = match (p.draining, p.standby_ms) {
        (Some(d), Some(ms)) => format!(
            ", generation {d} stands by for {:.0} s (watch window)",
            ms as f64 / 1e3
        ),
        (Some(d), None) => format!(", generation {d} draining"),
        (None, _) => String::new(),
    };
    // The daemon answers with the pid in its own (the host's) pid namespace.
    let pid = match typed {
        Some(t) if t != p.pid => format!("pid {t}, host pid {}", p.pid),
        _ => format!("pid {}", p.pid),
    };
    let role = match p.weight {
        Some(w) => format!("takes {w} % of new connections (a canary)"),
        None => "is active".to_owned(),
    };
    format!(
        "service {}: generation {} ({pid}, {} listeners) {role}{draining}\n",
        p.service, p.generation, p.listeners
    )
}

fn fail(message: &str) -> ExitCode {
    // Not eprintln!: it panics when stderr is closed. Under journald (handoffctl run by a
    // unit) the line carries its priority.
    handoff::logging::write_stderr(
        handoff::logging::Target::detect(),
        3,
        &format!("handoffctl: {message}\n"),
    );
    ExitCode::FAILURE
}

fn status_text(status: &Status) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_status(&mut out, status);
    out
}

/// A generation's STATE column: its state, or its part in a release.
fn state_text(g: &GenerationStatus) -> String {
    match &g.release {
        Some(Release::Canary { weight }) => format!("canary {weight}%"),
        Some(Release::Standby { .. }) => "standby".to_owned(),
        _ => g.state.as_str().to_owned(),
    }
}

/// The watch window and the last rollback, if any.
fn write_release(out: &mut String, s: &ServiceStatus) -> std::fmt::Result {
    for g in &s.generations {
        match &g.release {
            Some(Release::Standby { watch_left_ms }) => writeln!(
                out,
                "  watch: generation {} stands by for {:.1} s more; traffic goes back to it if the active one fails",
                g.id,
                *watch_left_ms as f64 / 1e3
            )?,
            Some(Release::Watched { check }) => writeln!(
                out,
                "  watch: generation {} is watched ({})",
                g.id,
                check
                    .as_ref()
                    .map_or("exit and listeners".to_owned(), |c| format!(
                        "checked with {c} every second, exit and listeners"
                    ))
            )?,
            _ => {}
        }
    }
    if let Some(r) = &s.rollbacks {
        writeln!(
            out,
            "  rollbacks: {} (last: {}, back to generation {}, at {} ms since the epoch)",
            r.count, r.reason, r.to, r.at_ms
        )?;
    }
    Ok(())
}

fn write_status(out: &mut String, status: &Status) -> std::fmt::Result {
    for s in &status.services {
        writeln!(out, "service {}  listen {}", s.name, s.listen.join(" "))?;
        if s.generations.is_empty() {
            writeln!(
                out,
                "  no generation yet: promote a process with `handoffctl promote PID`"
            )?;
        } else {
            writeln!(
                out,
                "  {:>4}  {:>8}  {:<11} {:>9}  {:>11}",
                "GEN", "PID", "STATE", "LISTENERS", "CONNECTIONS"
            )?;
            for g in &s.generations {
                writeln!(
                    out,
                    "  {:>4}  {:>8}  {:<11} {:>9}  {:>11}",
                    g.id,
                    g.pid,
                    state_text(g),
                    g.listeners,
                    g.connections
                )?;
            }
            write_release(out, s)?;
        }
        let c = &s.steering;
        writeln!(
            out,
            "  steered: active {} (retried {}), canary {}, fallback {}, kernel hash {}, migrated {}, probes {}, checks {}",
            c.active,
            c.active_retry,
            c.canary,
            c.fallback,
            c.kernel_hash,
            c.migrated,
            c.probe,
            c.check
        )?;
        let w = &s.steering_watch;
        if w.lost > 0 {
            writeln!(
                out,
                "  {}steering lost {} times (last at {} ms since the epoch), restored {} times (last at {})",
                if w.lost_now {
                    "warning: NOT RESTORED: "
                } else {
                    ""
                },
                w.lost,
                w.last_lost_ms.unwrap_or(0),
                w.restored,
                w.last_restored_ms
                    .map_or("never".into(), |t| format!("{t} ms")),
            )?;
        }
        for f in &s.foreign_listeners {
            let by = f.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            writeln!(
                out,
                "  warning: {}{by} listens on the service port outside its groups ({}): handoff cannot steer what it accepts",
                f.addr, f.group
            )?;
        }
    }
    if let Some(k) = &status.kernel {
        writeln!(out, "{k}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }
}
