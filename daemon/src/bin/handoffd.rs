//! handoffd: steers new connections of each service to its newest promoted generation,
//! and retires older generations when their last connection closes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use handoff::config::{self, DEFAULT_STATE_DIR, OrOff, Overrides, Paths, Sig};
use handoff::logging;
use handoff_common::check::CheckSpec;

/// Zero-downtime restarts for any Linux network service, steered in the kernel.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// An address of the service (repeat for IPv4 and IPv6), e.g. 0.0.0.0:8080 or [::]:8080.
    #[arg(long = "listen", value_name = "ADDR:PORT", required_unless_present_any = ["cleanup", "config"])]
    listen: Vec<SocketAddr>,
    /// The service's name [default: default]; with --cleanup, the one service to clean up.
    #[arg(long)]
    service: Option<String>,
    /// A TOML file of services (see dist/handoffd.toml); SIGHUP reloads it. Flags override
    /// its service when it has exactly one.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The control socket [default: STATE_DIR/handoffd.sock].
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Where the daemon keeps its lock, control socket and generation table.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Signal sent to a generation when it starts draining (e.g. SIGQUIT for nginx,
    /// SIGTERM for a Go server that shuts down gracefully) [default: none].
    #[arg(long, value_name = "SIG")]
    drain_signal: Option<Sig>,
    /// Signal sent to a drained generation once its last connection has closed
    /// [default: SIGTERM].
    #[arg(long, value_name = "SIG")]
    retire_signal: Option<Sig>,
    /// Send the retire signal anyway after this long (e.g. 90s, 5m) [default: 300s].
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration)]
    drain_timeout: Option<Duration>,
    /// SIGKILL every member still alive this long after the retire signal [default: never].
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration)]
    kill_after: Option<Duration>,
    /// The uid the service's processes run as when it is not the promoted process's own
    /// (a name or a number): descendants of that uid are members, and may be the ones
    /// holding the listeners. Like `user` in a service's table of --config.
    #[arg(long, value_name = "NAME|UID", value_parser = config::resolve_user)]
    user: Option<u32>,
    /// Check every promoted process through each of its listeners before any client
    /// reaches it, unless the promote says otherwise: tcp, http:/PATH[:STATUS] or
    /// https:/PATH[:STATUS] (TLS, certificate not verified); none turns off the
    /// --config file's check [default: none].
    #[arg(long, value_name = "CHECK", value_parser = config::parse_check)]
    check: Option<OrOff<CheckSpec>>,
    /// How long a promote's check may take, retries included (1ms to 1h) [default: 5s].
    #[arg(long, value_name = "DUR", value_parser = config::parse_check_timeout)]
    check_timeout: Option<Duration>,
    /// After a promote, keep the previous generation ready this long (no drain signal),
    /// and hand traffic back to it at once if the new one exits, closes its listeners or
    /// fails its check (up to 24h); none turns off the --config file's window
    /// [default: none].
    #[arg(long, value_name = "DUR", value_parser = config::parse_watch)]
    watch: Option<OrOff<Duration>>,
    /// Offer the service a systemd notify socket ($NOTIFY_SOCKET) at this absolute path,
    /// mode 0600, owned by the service's user: a process of the service that sends
    /// READY=1 there is checked and promoted, with no handoffctl [default: none].
    #[arg(long, value_name = "PATH", value_parser = config::parse_notify_socket)]
    notify_socket: Option<PathBuf>,
    /// Forward every message of the notify socket to this one (an absolute path or
    /// @NAME), e.g. /run/systemd/notify for a Type=notify unit. Needs a notify socket.
    #[arg(long, value_name = "PATH", value_parser = config::parse_notify_forward)]
    notify_forward: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`/metrics`), or `off`.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "127.0.0.1:9464")]
    metrics_addr: handoff::MetricsAddr,
    /// Remove what a stopped daemon left (pins, state, socket) and exit.
    #[arg(long, conflicts_with_all = ["listen", "config"])]
    cleanup: bool,
    /// The root of the host's cgroup v2 hierarchy, where the drain programs attach, if
    /// not the mounted one: in a Kubernetes pod (which cannot ask for the host's cgroup
    /// namespace), a hostPath mount of it. Refused unless it is the real root.
    #[arg(long, value_name = "PATH")]
    cgroup_root: Option<PathBuf>,
    /// Log format. Text has no colour unless stderr is a terminal (and NO_COLOR is
    /// unset); under journald each line is prefixed with its priority.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A refusal at start is one line: the error and its causes (`what: why`), with its
/// priority (error) under journald, like every line of the log.
fn main() -> std::process::ExitCode {
    handoff::compact_malloc();
    let target = logging::Target::detect();
    let args = match Args::try_parse() {
        Ok(args) => args,
        // Usage errors too carry their priority in the journal; --help and --version
        // (stdout) are clap's as they are.
        Err(e) if target.journald && e.use_stderr() => {
            logging::write_stderr(target, 3, &e.render().to_string());
            return std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
        Err(e) => e.exit(),
    };
    match run(args, target) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            logging::write_stderr(target, 3, &format!("Error: {e:#}\n"));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Starts logging, then cleans up (`--cleanup`) or runs the daemon until SIGTERM or SIGINT.
fn run(args: Args, target: logging::Target) -> anyhow::Result<()> {
    // aya's own warnings (e.g. an object's BTF the kernel would not take, which it works
    // around) are not the operator's business unless asked for: handoffd states what it
    // lacks itself, and a refused start prints its one line alone.
    logging::init(
        target,
        matches!(args.log_format, LogFormat::Json),
        "info,aya=error,aya_obj=error",
    );
    let paths = Paths::new(args.state_dir, args.control_socket);
    if args.cleanup {
        return Ok(handoff::cleanup(&paths, args.service.as_deref())?);
    }
    let overrides = Overrides {
        listen: args.listen,
        service: args.service,
        drain_signal: args.drain_signal,
        retire_signal: args.retire_signal,
        drain_timeout: args.drain_timeout,
        kill_after: args.kill_after,
        user: args.user,
        check: args.check,
        check_timeout: args.check_timeout,
        watch: args.watch,
        notify_socket: args.notify_socket,
        notify_forward: args.notify_forward,
    };
    let options = handoff::Options {
        paths,
        config_file: args.config,
        overrides,
        metrics_addr: args.metrics_addr.0,
        cgroup_root: args.cgroup_root,
    };
    Ok(handoff::run(options, handoff::on_signal)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(
            ["handoffd", "--config", "/etc/handoff/handoffd.toml"]
                .iter()
                .chain(flags),
        )
    }

    #[test]
    fn release_flags_are_read_and_checked() {
        let args = parse(&[
            "--check",
            "http:/healthz:204",
            "--check-timeout",
            "750ms",
            "--watch",
            "60s",
            "--notify-socket",
            "/run/handoff/web.notify",
            "--notify-forward",
            "/run/systemd/notify",
        ])
        .expect("good flags");
        let check = "http:/healthz:204".parse().unwrap();
        assert_eq!(args.check, Some(OrOff(Some(check))));
        assert_eq!(args.check_timeout, Some(Duration::from_millis(750)));
        assert_eq!(args.watch, Some(OrOff(Some(Duration::from_secs(60)))));
        assert_eq!(args.notify_socket, Some("/run/handoff/web.notify".into()));
        assert_eq!(args.notify_forward, Some("/run/systemd/notify".into()));
        let off = parse(&["--check", "none", "--watch", "off"]).expect("none and off");
        assert_eq!(
            (off.check, off.watch),
            (Some(OrOff(None)), Some(OrOff(None)))
        );
        for bad in [
            ["--check", "udp"],
            ["--check-timeout", "2h"],
            ["--check-timeout", "none"],
            ["--watch", "25h"],
            ["--notify-socket", "web.notify"],
            ["--notify-forward", "systemd/notify"],
        ] {
            let e = parse(&bad).expect_err(&format!("{bad:?} accepted"));
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}");
        }
    }
}
