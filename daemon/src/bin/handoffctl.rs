//! handoffctl: promote a process, roll back, or read the state of handoffd.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use handoff::control;
use handoff_common::proto::{DEFAULT_CONTROL_SOCKET, Request, Response, Status};

/// Control handoffd.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// handoffd's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    control_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make PID (and its descendants) the active generation; exits 0 once the kernel steers to it.
    Promote {
        /// The process to promote.
        pid: i32,
        /// The service (may be left out when handoffd runs one).
        #[arg(long)]
        service: Option<String>,
    },
    /// Make the newest draining generation active again.
    Rollback {
        /// The service (may be left out when handoffd runs one).
        #[arg(long)]
        service: Option<String>,
    },
    /// Show services and generations.
    Status {
        /// Print JSON (the shape is stable).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (request, json) = match args.command {
        Command::Promote { pid, service } => (Request::Promote { pid, service }, false),
        Command::Rollback { service } => (Request::Rollback { service }, false),
        Command::Status { json } => (Request::Status {}, json),
    };
    match control::request(&args.control_socket, &request) {
        Ok(Response::Promoted(p)) => {
            let draining = p
                .draining
                .map(|d| format!(", generation {d} draining"))
                .unwrap_or_default();
            println!(
                "service {}: generation {} (pid {}, {} listeners) is active{draining}",
                p.service, p.generation, p.pid, p.listeners
            );
            ExitCode::SUCCESS
        }
        Ok(Response::Status(status)) if json => match serde_json::to_string(&status) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        },
        Ok(Response::Status(status)) => {
            print_status(&status);
            ExitCode::SUCCESS
        }
        Ok(Response::Error(e)) => fail(&e.message),
        Err(e) => fail(&control::unreachable(&args.control_socket, &e)),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("handoffctl: {message}");
    ExitCode::FAILURE
}

fn print_status(status: &Status) {
    for s in &status.services {
        println!("service {}  listen {}", s.name, s.listen.join(" "));
        if s.generations.is_empty() {
            println!("  no generation yet: promote a process with `handoffctl promote PID`");
        } else {
            println!(
                "  {:>4}  {:>8}  {:<9} {:>9}  {:>11}",
                "GEN", "PID", "STATE", "LISTENERS", "CONNECTIONS"
            );
            for g in &s.generations {
                println!(
                    "  {:>4}  {:>8}  {:<9} {:>9}  {:>11}",
                    g.id,
                    g.pid,
                    g.state.as_str(),
                    g.listeners,
                    g.connections
                );
            }
        }
        let c = &s.steering;
        println!(
            "  steered: active {} (retried {}), fallback {}, kernel hash {}, migrated {}, probes {}",
            c.active, c.active_retry, c.fallback, c.kernel_hash, c.migrated, c.probe
        );
        let w = &s.steering_watch;
        if w.lost > 0 {
            println!(
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
            );
        }
        for f in &s.foreign_listeners {
            let by = f.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            println!(
                "  warning: {}{by} listens on the service port outside its groups ({}): handoff cannot steer what it accepts",
                f.addr, f.group
            );
        }
    }
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
