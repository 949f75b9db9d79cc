//! Detaching what a service left in the kernel: its steering program, taken off each
//! group through a listener a live generation still holds.

use std::net::SocketAddr;

use crate::discover;
use crate::discover::candidate::{self, CandidateError};
use crate::discover::members::Member;
use crate::kernel::loader::{self, LoaderError};
use crate::persist::state::SavedService;

/// What [`detach`] did in one group of a service: reported one line each.
#[derive(Debug)]
pub struct Detached {
    /// The service.
    pub service: String,
    /// The listener the group was reached through.
    pub addr: SocketAddr,
    /// The group's index in the service.
    pub group: usize,
    /// Whether the program was detached, or why not.
    pub outcome: Result<(), DetachError>,
}

/// Why a group's program could not be detached.
#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    /// The listener could not be taken from its holder.
    #[error(transparent)]
    Duplicate(#[from] CandidateError),
    /// The kernel refused the detach.
    #[error(transparent)]
    Detach(#[from] LoaderError),
}

impl std::fmt::Display for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Detached {
            service,
            addr,
            group,
            outcome,
        } = self;
        match outcome {
            Ok(()) => write!(
                f,
                "detached the program of service {service} from {addr} (group {group})"
            ),
            Err(e) => write!(f, "could not detach service {service} from {addr}: {e}"),
        }
    }
}

/// Detaches the steering program from each group where a generation of `s` still
/// listens: the kernel's hash decides again, as before handoff. Returns what it did.
pub fn detach(s: &SavedService) -> Vec<Detached> {
    let mut done = Vec::new();
    let port = s.listen.first().map_or(0, |a| a.port());
    for g in &s.generations {
        let Some(leader) = Member::open(g.leader.pid)
            .ok()
            .filter(|m| m.start_time == g.leader.start_time)
        else {
            continue;
        };
        let Ok(tree) = discover::process_tree(leader.pid) else {
            continue;
        };
        let Ok(listeners) = discover::listeners(port, &tree, &mut discover::ProcFs) else {
            continue;
        };
        for (group, block) in g.blocks.iter().enumerate() {
            let found = listeners
                .iter()
                .find(|l| block.cookies.contains(&l.diag.cookie) && l.held_by.is_some());
            let Some((l, at)) = found.and_then(|l| l.held_by.map(|at| (l, at))) else {
                continue;
            };
            let Ok(owner) = Member::open(at.pid) else {
                continue;
            };
            let outcome = candidate::duplicate(&owner, at, l.diag.cookie, l.diag.local)
                .map_err(DetachError::from)
                .and_then(|fd| Ok(loader::detach(&fd)?));
            done.push(Detached {
                service: s.name.clone(),
                addr: l.diag.local,
                group,
                outcome,
            });
        }
        break; // one live generation reaches every group
    }
    done
}
