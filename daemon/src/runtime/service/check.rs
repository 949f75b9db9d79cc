//! Health checks of a generation through its own listeners.
//!
//! A check is planned under the daemon's lock (which listener, which slot, a handle of
//! its own on each group's `probes` map) and run without it: a candidate that is slow to
//! answer, or never answers, holds up nothing but its own promote. Every listener of
//! every group is checked, each through the group's address by a connection the program
//! sends to that listener's slot and nowhere else (see [`crate::kernel::check`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use handoff_common::check::CheckSpec;

use crate::health;
use crate::kernel::check;
use crate::kernel::loader::ProbeMap;
use crate::lifecycle::GenId;

/// Pause between two rounds of a check's retries.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Rounds a check without `--wait` takes before it fails.
const ROUNDS: u32 = 3;

/// How a promote checks its candidate.
#[derive(Debug, Clone)]
pub struct CheckPlan {
    /// What is asked of each listener.
    pub spec: CheckSpec,
    /// When the check (retries included) fails at the latest.
    pub deadline: Instant,
    /// Retry until the deadline (`--wait`), not [`ROUNDS`] times.
    pub wait: bool,
}

/// The listeners to check in one group.
#[derive(Debug)]
pub struct GroupTargets {
    /// The group's address (loopback for a wildcard group).
    pub address: SocketAddr,
    /// The group's `probes` map.
    pub map: ProbeMap,
    /// The listeners' slots.
    pub slots: Vec<u32>,
}

/// A check ready to run without the daemon's lock.
#[derive(Debug)]
pub struct CheckJob {
    /// The generation checked.
    pub generation: GenId,
    /// How.
    pub plan: CheckPlan,
    /// Every listener of the generation, per group.
    pub groups: Vec<GroupTargets>,
}

/// The first listener that failed its check, and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("listener {address} (slot {slot}) failed its {spec} check: {reason}")]
pub struct CheckError {
    /// The group's address it was reached through.
    pub address: SocketAddr,
    /// Its slot.
    pub slot: u32,
    /// The check.
    pub spec: String,
    /// What went wrong, on one line.
    pub reason: String,
}

impl CheckJob {
    /// Checks every listener; the ones that fail are tried again (every
    /// [`RETRY_PAUSE`], [`ROUNDS`] times, or until the deadline with `wait`), and the
    /// first still failing at the end is the error.
    pub fn run(mut self) -> Result<(), CheckError> {
        let mut left: Vec<(usize, u32)> = self
            .groups
            .iter()
            .enumerate()
            .flat_map(|(g, t)| t.slots.iter().map(move |&s| (g, s)))
            .collect();
        let mut round = 0;
        loop {
            round += 1;
            let mut failed = None;
            let mut still = Vec::new();
            for (g, slot) in left {
                if let Err(e) = self.one(g, slot) {
                    failed.get_or_insert(e);
                    still.push((g, slot));
                }
            }
            let Some(failed) = failed else {
                return Ok(());
            };
            let next = Instant::now() + RETRY_PAUSE;
            if (!self.plan.wait && round >= ROUNDS) || next >= self.plan.deadline {
                return Err(failed);
            }
            left = still;
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    /// One connection to the listener in `slot` of group `g`, and the check on it.
    fn one(&mut self, g: usize, slot: u32) -> Result<(), CheckError> {
        let deadline = self.plan.deadline;
        let spec = &self.plan.spec;
        let Some(t) = self.groups.get_mut(g) else {
            return Ok(());
        };
        let address = t.address;
        let fail = |reason: String| CheckError {
            address,
            slot,
            spec: spec.to_string(),
            reason,
        };
        if Instant::now() >= deadline {
            return Err(fail("the check timeout ended".into()));
        }
        let stream = check::connect(&mut t.map, address, slot, deadline)
            .map_err(|e| fail(crate::logging::one_line(&e)))?;
        health::run(spec, stream, address, deadline).map_err(|e| fail(crate::logging::one_line(&e)))
    }
}
