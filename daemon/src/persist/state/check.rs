//! [`SavedState::validate`]: a state file is used whole or not at all. Every number in
//! it is checked against what the daemon itself could have written, so that nothing
//! later (block arithmetic, slot indexes, instants) meets a value it cannot handle.

use std::collections::HashSet;

use handoff_common::maps::{BLOCKS, GEN_SLOTS};
use handoff_common::proto::GenerationState;

use super::{MAX_CHECK, SavedDrain, SavedGeneration, SavedService, SavedState, VERSION};
use crate::config::{self, ConfigError, DrainSettings, MAX_DURATION};

/// The most members (leader and descendants) a saved generation may list: the kernel's
/// default `fs.nr_open`, the most pidfds one process can hold.
pub const MAX_MEMBERS: usize = 1 << 20;

/// The largest `next_id` a state file may hold: far beyond any number of promotes
/// (2^53, exact in every JSON reader), and far from overflowing when a promote adds one.
pub const MAX_NEXT_ID: u64 = 1 << 53;

/// What makes a state file inconsistent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Inconsistent {
    /// Another layout version.
    #[error("version {found} (this daemon reads {VERSION})")]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// A service name, address list or group list the daemon would not accept.
    #[error("service {service:?}: {reason}")]
    Service {
        /// The service.
        service: String,
        /// What the configuration check says.
        reason: ConfigError,
    },
    /// Two services with one name.
    #[error("service {0} is listed twice")]
    DuplicateService(String),
    /// Not one group per address, a group on another port, or generations in a group
    /// never fixed.
    #[error(
        "service {service}: {groups} groups for {listen} addresses, a group on another port, or generations in a group never fixed"
    )]
    Groups {
        /// The service.
        service: String,
        /// Groups listed.
        groups: usize,
        /// Addresses listed.
        listen: usize,
    },
    /// A next generation id of 0 or past [`MAX_NEXT_ID`].
    #[error("service {service}: next_id {next_id} is out of range (1 to {MAX_NEXT_ID})")]
    NextId {
        /// The service.
        service: String,
        /// The id in the file.
        next_id: u64,
    },
    /// Something wrong with one generation.
    #[error("service {service}, generation {id}: {what}")]
    Generation {
        /// The service.
        service: String,
        /// The generation's id.
        id: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// More than one active generation.
    #[error("service {0} has more than one active generation")]
    TwoActive(String),
}

impl SavedState {
    /// Checks that the state is one this daemon could have written: version, service
    /// names and addresses, one group and one block per address, block indexes below
    /// `BLOCKS` and not shared, at most `GEN_SLOTS` cookies per block, ids below
    /// `next_id` and increasing, at most one active generation, drain fields exactly on
    /// draining generations, a canary weight or watch window only on a draining one
    /// before its retire signal (never both), positive pids, capped member lists and
    /// durations. The weight's range and the check's length are checked where they are
    /// taken up ([`SavedGeneration::resume`], [`SavedGeneration::check`]): refused
    /// alone, with a warning.
    pub fn validate(&self) -> Result<(), Inconsistent> {
        if self.version != VERSION {
            return Err(Inconsistent::Version {
                found: self.version,
            });
        }
        let mut names = HashSet::new();
        for s in &self.services {
            if !names.insert(s.name.as_str()) {
                return Err(Inconsistent::DuplicateService(s.name.clone()));
            }
            s.validate()?;
        }
        Ok(())
    }
}

impl SavedService {
    fn validate(&self) -> Result<(), Inconsistent> {
        let service = || self.name.clone();
        config::service(&self.name, &self.listen, DrainSettings::default()).map_err(|reason| {
            Inconsistent::Service {
                service: service(),
                reason,
            }
        })?;
        let port = self.listen.first().map_or(0, |a| a.port());
        if self.groups.len() != self.listen.len()
            || self.groups.iter().flatten().any(|k| k.addr.port() != port)
        {
            return Err(Inconsistent::Groups {
                service: service(),
                groups: self.groups.len(),
                listen: self.listen.len(),
            });
        }
        if !self.generations.is_empty() && self.groups.iter().any(Option::is_none) {
            // The first promote fixes every group before a generation exists.
            return Err(Inconsistent::Groups {
                service: service(),
                groups: self.groups.iter().flatten().count(),
                listen: self.listen.len(),
            });
        }
        if self.next_id == 0 || self.next_id > MAX_NEXT_ID {
            return Err(Inconsistent::NextId {
                service: service(),
                next_id: self.next_id,
            });
        }
        let mut previous = 0;
        let mut active = 0;
        let mut used: Vec<HashSet<u32>> = vec![HashSet::new(); self.groups.len()];
        for g in &self.generations {
            let bad = |what| Inconsistent::Generation {
                service: service(),
                id: g.id,
                what,
            };
            if g.id == 0 || g.id >= self.next_id || g.id <= previous {
                return Err(bad("ids must increase and stay below next_id"));
            }
            previous = g.id;
            if g.state == GenerationState::Active {
                active += 1;
                if active > 1 {
                    return Err(Inconsistent::TwoActive(service()));
                }
            }
            g.validate(self.groups.len(), &mut used).map_err(bad)?;
        }
        Ok(())
    }
}

impl SavedGeneration {
    fn validate(&self, groups: usize, used: &mut [HashSet<u32>]) -> Result<(), &'static str> {
        match (self.state, &self.drain) {
            (GenerationState::Retired, _) => return Err("a retired generation is never saved"),
            (GenerationState::Active, Some(_)) => return Err("drain fields on an active one"),
            (GenerationState::Draining, None) => return Err("draining without drain fields"),
            (_, Some(d)) => d.validate()?,
            _ => {}
        }
        if self.canary.is_some() && self.watch_until_ms.is_some() {
            return Err("both a canary weight and a watch window");
        }
        let resumed = self.canary.is_some() || self.watch_until_ms.is_some();
        if resumed && self.drain.as_ref().is_none_or(|d| d.retired_ms.is_some()) {
            return Err("a canary or standby not saved as draining before its retire signal");
        }
        if self.descendants.len() >= MAX_MEMBERS {
            return Err("more members than one process can hold pidfds for");
        }
        if std::iter::once(&self.leader)
            .chain(&self.descendants)
            .any(|m| m.pid <= 0)
        {
            return Err("a pid that is not positive");
        }
        if self.blocks.len() != groups {
            return Err("not one block per group");
        }
        for (block, used) in self.blocks.iter().zip(used) {
            if block.index >= BLOCKS {
                return Err("a block index beyond the map");
            }
            if block.cookies.len() > GEN_SLOTS as usize {
                return Err("more cookies than a block has slots");
            }
            if !used.insert(block.index) {
                return Err("a block shared with another generation");
            }
        }
        Ok(())
    }
}

/// What a saved generation resumes as, beyond its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// As its state says: active, or draining with its drain.
    AsSaved,
    /// A canary taking this percent of new connections.
    Canary(u8),
    /// A standby until this wall-clock millisecond (capped where it becomes an instant:
    /// [`super::from_wall`]).
    Standby(u64),
}

impl SavedGeneration {
    /// What the generation resumes as. A canary weight outside 1–99 is refused, with the
    /// reason for a warning: the generation is then taken up as its state says
    /// (draining).
    pub fn resume(&self) -> Result<Resume, &'static str> {
        match (self.canary, self.watch_until_ms) {
            (Some(w), _) => u8::try_from(w)
                .ok()
                .filter(|w| (1..=99).contains(w))
                .map(Resume::Canary)
                .ok_or("a canary weight outside 1 to 99: taken up as draining"),
            (None, Some(ms)) => Ok(Resume::Standby(ms)),
            (None, None) => Ok(Resume::AsSaved),
        }
    }

    /// The health check it was promoted with. One longer than [`MAX_CHECK`] bytes, or
    /// with a control character, is refused with the reason for a warning (not kept).
    pub fn check(&self) -> Result<Option<&str>, &'static str> {
        match self.check.as_deref() {
            Some(c) if c.len() > MAX_CHECK => Err("a health check longer than 1100 bytes"),
            Some(c) if c.chars().any(char::is_control) => {
                Err("a health check with a control character")
            }
            other => Ok(other),
        }
    }
}

impl SavedDrain {
    fn validate(&self) -> Result<(), &'static str> {
        let max = u64::try_from(MAX_DURATION.as_millis()).unwrap_or(u64::MAX);
        if self.deadline_ms < self.started_ms || self.deadline_ms - self.started_ms > max {
            return Err("a drain deadline before its start or beyond the longest drain timeout");
        }
        if self.retired_ms.is_none() && (self.timed_out || self.killed) {
            return Err("timed out or killed but never retired");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{SavedBlock, SavedMember};
    use super::*;

    fn member(pid: i32) -> SavedMember {
        SavedMember {
            pid,
            start_time: 100,
        }
    }

    fn generation(id: u64, state: GenerationState, block: u32) -> SavedGeneration {
        SavedGeneration {
            id,
            state,
            leader: member(10),
            descendants: vec![member(11)],
            blocks: vec![SavedBlock {
                index: block,
                cookies: vec![7, 8],
            }],
            drain: (state == GenerationState::Draining).then_some(SavedDrain {
                started_ms: 1_000,
                deadline_ms: 301_000,
                retired_ms: None,
                timed_out: false,
                killed: false,
            }),
            canary: None,
            watch_until_ms: None,
            check: None,
        }
    }

    fn key(port: u16) -> crate::discover::group::GroupKey {
        crate::discover::group::GroupKey {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            v6only: None,
            ifindex: 0,
            uid: 0,
        }
    }

    fn good() -> SavedState {
        SavedState {
            version: VERSION,
            services: vec![SavedService {
                name: "web".into(),
                listen: vec!["127.0.0.1:8080".parse().unwrap()],
                next_id: 3,
                groups: vec![Some(key(8080))],
                generations: vec![
                    generation(1, GenerationState::Draining, 1),
                    generation(2, GenerationState::Active, 2),
                ],
            }],
        }
    }

    /// `f` applied to a good state makes it refused, with `needle` in the message.
    fn refused(f: impl FnOnce(&mut SavedState), needle: &str) {
        let mut s = good();
        f(&mut s);
        let err = s.validate().expect_err(needle);
        let message = err.to_string();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        assert!(!message.contains('\n'));
    }

    fn svc(s: &mut SavedState) -> &mut SavedService {
        &mut s.services[0]
    }

    fn gen_(s: &mut SavedState, i: usize) -> &mut SavedGeneration {
        &mut s.services[0].generations[i]
    }

    #[test]
    fn a_consistent_state_passes() {
        assert_eq!(good().validate(), Ok(()));
        assert_eq!(
            SavedState::default().validate().map_err(|e| e.to_string()),
            Err("version 0 (this daemon reads 1)".into())
        );
    }

    #[test]
    fn each_inconsistency_is_refused() {
        refused(|s| s.version = 2, "version 2");
        refused(|s| svc(s).name = "../etc".into(), "service name");
        refused(
            |s| {
                let dup = s.services[0].clone();
                s.services.push(dup);
            },
            "listed twice",
        );
        refused(|s| svc(s).listen.clear(), "no --listen");
        refused(
            |s| svc(s).listen = vec!["127.0.0.1:0".parse().unwrap()],
            "port 0",
        );
        refused(|s| svc(s).groups.clear(), "0 groups for 1 addresses");
        refused(|s| svc(s).groups = vec![Some(key(9))], "another port");
        refused(|s| svc(s).groups = vec![None], "never fixed");
        refused(|s| svc(s).next_id = 2, "below next_id");
        refused(|s| svc(s).next_id = u64::MAX, "out of range");
        refused(|s| gen_(s, 0).id = 0, "ids must increase");
        refused(|s| gen_(s, 1).id = 1, "ids must increase");
        refused(
            |s| {
                gen_(s, 0).state = GenerationState::Active;
                gen_(s, 0).drain = None;
            },
            "more than one active",
        );
        refused(|s| gen_(s, 0).state = GenerationState::Retired, "retired");
        refused(|s| gen_(s, 0).drain = None, "draining without drain fields");
        refused(
            |s| gen_(s, 1).drain = gen_(s, 0).drain.clone(),
            "drain fields on an active one",
        );
        refused(
            |s| {
                if let Some(d) = gen_(s, 0).drain.as_mut() {
                    d.deadline_ms = u64::MAX;
                }
            },
            "longest drain timeout",
        );
        refused(
            |s| {
                if let Some(d) = gen_(s, 0).drain.as_mut() {
                    d.deadline_ms = 0;
                }
            },
            "before its start",
        );
        refused(
            |s| {
                if let Some(d) = gen_(s, 0).drain.as_mut() {
                    d.killed = true;
                }
            },
            "never retired",
        );
        refused(|s| gen_(s, 0).leader.pid = 0, "not positive");
        refused(|s| gen_(s, 0).descendants[0].pid = -1, "not positive");
        refused(
            |s| gen_(s, 0).descendants = vec![member(5); MAX_MEMBERS],
            "pidfds",
        );
        refused(|s| gen_(s, 0).blocks.clear(), "one block per group");
        refused(|s| gen_(s, 0).blocks[0].index = BLOCKS, "beyond the map");
        refused(
            |s| gen_(s, 0).blocks[0].cookies = vec![1; GEN_SLOTS as usize + 1],
            "slots",
        );
        refused(|s| gen_(s, 1).blocks[0].index = 1, "shared");
    }
}

#[cfg(test)]
mod resume_tests;
