//! How a promote hands traffic over: its options on the wire, and what status shows of
//! a release.

use serde::{Deserialize, Serialize};

use crate::check::CheckSpec;

/// The most a check may take, or a promote wait for one to pass.
pub const MAX_CHECK_TIMEOUT_MS: u64 = 3_600_000;
/// The longest watch window.
pub const MAX_WATCH_MS: u64 = 86_400_000;

/// How a promote hands traffic over; every field absent takes the service's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteOptions {
    /// Check the candidate through each of its listeners before any client reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
    /// Skip the service's configured check.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_check: bool,
    /// How long the check may take, in all (retries included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_timeout_ms: Option<u64>,
    /// Keep trying (finding the candidate's listeners, then its check) until it passes
    /// or the check timeout ends.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wait: bool,
    /// Percent of new connections for the candidate: 1–99 makes it a canary, 100 (or
    /// none) gives it all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// Keep the previous generation ready to take traffic back this long (no drain
    /// signal meanwhile); 0: no watch window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_ms: Option<u64>,
}

impl PromoteOptions {
    /// No option given.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Refuses values out of range, with one line saying which.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(w) = self.weight.filter(|w| !(1..=100).contains(w)) {
            return Err(format!("weight {w} is not a percentage from 1 to 100"));
        }
        if let Some(ms) = self
            .check_timeout_ms
            .filter(|&ms| ms == 0 || ms > MAX_CHECK_TIMEOUT_MS)
        {
            return Err(format!(
                "check timeout {ms} ms is not between 1 ms and {MAX_CHECK_TIMEOUT_MS} ms"
            ));
        }
        if let Some(ms) = self.watch_ms.filter(|&ms| ms > MAX_WATCH_MS) {
            return Err(format!(
                "watch window {ms} ms is longer than {MAX_WATCH_MS} ms"
            ));
        }
        if self.no_check && self.check.is_some() {
            return Err("--check and --no-check contradict each other".into());
        }
        Ok(())
    }
}

/// A generation's part in a release (canary, watch window), shown beside its `state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Release {
    /// Takes `weight` % of new connections (`state` active); the active generation
    /// takes the rest.
    Canary {
        /// Percent of new connections.
        weight: u8,
    },
    /// The generation before the active one, kept ready during the watch window (`state`
    /// draining, its drain signal deferred): traffic goes back to it if the active one
    /// fails.
    Standby {
        /// Milliseconds left in the watch window; then it drains.
        watch_left_ms: u64,
    },
    /// The active generation inside its watch window, checked every second with `check`
    /// (none: watched for exit and lost listeners only).
    Watched {
        /// The check it was promoted with.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check: Option<String>,
    },
}

/// The last time traffic went back to an earlier generation of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackStatus {
    /// Rollbacks of the service since the daemon started.
    pub count: u64,
    /// The last one's reason: operator, exited, listeners_lost or check_failed.
    pub reason: String,
    /// The generation it went back to.
    pub to: u64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}
