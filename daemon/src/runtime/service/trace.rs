//! A record of what the lifecycle machine was told and answered, one JSON line each, for
//! replaying a real daemon's run in a unit test (see `lifecycle::tests::replay`). Off
//! unless `HANDOFF_LIFECYCLE_TRACE` names a file to append to when the daemon starts.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, OnceLock};

use serde::Serialize;

use crate::lifecycle::{Effect, Event, Millis, Policy};

/// The environment variable naming the trace file.
pub const TRACE_ENV: &str = "HANDOFF_LIFECYCLE_TRACE";

/// One line of a trace.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Line<'a> {
    /// A service's machine was made.
    New {
        /// The service.
        service: &'a str,
        /// Its groups.
        groups: usize,
        /// Its drain policy.
        policy: Policy,
    },
    /// An event, and the effects the machine answered.
    Step {
        /// The service.
        service: &'a str,
        /// When.
        now: Millis,
        /// The event.
        event: &'a Event,
        /// The answer.
        effects: &'a [Effect],
    },
}

fn sink() -> Option<&'static Mutex<std::fs::File>> {
    static SINK: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
    SINK.get_or_init(|| {
        let path = std::env::var_os(TRACE_ENV)?;
        // 0600: the trace names processes and sockets of every service.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path);
        match file {
            Ok(f) => Some(Mutex::new(f)),
            Err(e) => {
                tracing::warn!(path = ?path, error = %e, "cannot open the lifecycle trace; not tracing");
                None
            }
        }
    })
    .as_ref()
}

/// Whether a trace is kept.
pub fn enabled() -> bool {
    sink().is_some()
}

/// Appends `line` to the trace, if one is kept.
pub fn record(line: &Line<'_>) {
    let Some(sink) = sink() else { return };
    let Ok(mut text) = serde_json::to_vec(line) else {
        return;
    };
    text.push(b'\n');
    if let Ok(mut file) = sink.lock() {
        let _ = file.write_all(&text);
    }
}
