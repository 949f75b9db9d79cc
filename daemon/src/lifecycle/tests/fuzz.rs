//! Random event sequences (a fixed seed: deterministic), steps answered late or
//! failing, checking what must hold after every event.

use std::collections::HashSet;

use super::*;

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// An answer to a reported effect: mostly success, sometimes a failure.
fn answer(effect: &Effect, rng: &mut Rng, groups: usize) -> Option<Event> {
    let fail = rng.below(8) == 0;
    let outcome = |ok: Outcome| {
        Some(Event::Outcome(if fail {
            Outcome::Failed(Failure::Error)
        } else {
            ok
        }))
    };
    match effect {
        Effect::Discover { pid } if !fail => Some(Event::Discovered {
            leader: *pid,
            listeners: cookies(*pid, groups),
        }),
        Effect::Probe { expect, .. } => outcome(Outcome::Probed(ProbeSeen::Slot(expect.first))),
        Effect::Reattach { .. } => outcome(Outcome::Attached(true)),
        Effect::Discover { .. }
        | Effect::Insert { .. }
        | Effect::Attach { .. }
        | Effect::Publish { .. }
        | Effect::Check(_) => outcome(Outcome::Done),
        Effect::StartCount { generation } => Some(Event::Tagged {
            generation: *generation,
            tag: tag(*generation),
        }),
        _ => None,
    }
}

fn random_event(rng: &mut Rng, lc: &Lifecycle) -> Event {
    let ids: Vec<GenId> = lc.generations().iter().map(|g| g.id).collect();
    let id = if ids.is_empty() {
        1
    } else {
        ids[rng.below(ids.len() as u64) as usize]
    };
    match rng.below(15) {
        0 | 1 => Event::Promote {
            pid: pid(rng.below(6) + 1),
            mode: PromoteMode {
                check: rng.below(3) == 0,
                weight: [None, None, Some(10), Some(100)][rng.below(4) as usize],
                watch_ms: [None, Some(50)][rng.below(2) as usize],
            },
        },
        2 => Event::Rollback { listening: ids },
        3 | 4 => Event::Tick,
        5 => Event::Counted {
            generation: id,
            counted: rng.below(2),
            queued: rng.below(2),
        },
        6 => Event::Exited { generation: id },
        7 => Event::LeaderExited { generation: id },
        8 => Event::ListenersLost { generation: id },
        9 => Event::ListenerJoined {
            generation: id,
            group: 0,
            offset: 2,
            cookie: 1 + rng.below(1 << 40),
        },
        10 => Event::Zero { tag: tag(id) },
        11 => Event::CountFailed { generation: id },
        // Not during an operation: it would overwrite what the operation published
        // (see the report: whether the machine should ignore it then).
        12 if !lc.busy() => Event::Resteer,
        13 => Event::Policy(Policy {
            drain_timeout_ms: rng.below(300),
            kill_after_ms: [None, Some(0), Some(40)][rng.below(3) as usize],
            ..policy()
        }),
        _ => Event::RecountDraining,
    }
}

fn asks(event: &Event) -> bool {
    matches!(event, Event::Promote { .. } | Event::Rollback { .. })
}

/// After a tick, nothing is overdue.
fn check_due(lc: &Lifecycle, now: Millis, step: usize) {
    for g in lc.generations() {
        if let Phase::Standby { until } = g.phase {
            assert!(until > now, "step {step}: {g:?}");
        }
        let Some(d) = g.drain.as_ref().filter(|_| g.phase == Phase::Draining) else {
            continue;
        };
        // A drain this tick started (a watch window's end) times out at the next one.
        let started = d.started == now;
        assert!(
            d.retire.is_some() || d.deadline > now || started,
            "step {step}: {g:?}"
        );
        assert!(d.kill_at.is_none_or(|k| k > now), "step {step}: {g:?}");
    }
}

/// What holds after every event.
fn check(lc: &Lifecycle, retired: &mut HashSet<GenId>, step: usize) {
    let count = |want: fn(Phase) -> bool| lc.generations().iter().filter(|g| want(g.phase)).count();
    assert!(
        count(|p| p == Phase::Active) <= 1,
        "step {step}: two active: {lc:#?}"
    );
    assert!(
        count(|p| matches!(p, Phase::Canary { .. })) <= 1,
        "step {step}: two canaries: {lc:#?}"
    );
    for g in lc.generations() {
        assert!(g.id < lc.next_id(), "step {step}");
        if retired.contains(&g.id) {
            assert!(
                !g.phase.live(),
                "step {step}: generation {} came back: {lc:#?}",
                g.id
            );
        }
        if !g.phase.live() {
            retired.insert(g.id);
        }
        let drains = matches!(g.phase, Phase::Draining | Phase::Retired(_));
        assert!(g.drain.is_none() || drains, "step {step}: {g:?}");
        assert!(
            g.drain.is_some() || g.phase != Phase::Draining,
            "step {step}: {g:?}"
        );
    }
    for (group, record) in lc.records().iter().enumerate() {
        // Between operations, each group steers to the active generation and the canary.
        let span = |g: &Generation| g.blocks[group].span();
        if let Some(active) = lc.active().filter(|_| !lc.busy()) {
            assert_eq!(record.active, Some(span(active)), "step {step}: {lc:#?}");
            let canary = lc.generations().iter().find_map(|g| match g.phase {
                Phase::Canary { weight } => Some((span(g), weight)),
                _ => None,
            });
            assert_eq!(record.canary, canary, "step {step}: {lc:#?}");
        }
        let mut blocks = HashSet::new();
        for g in lc.generations().iter().filter(|g| g.phase.live()) {
            assert!(
                blocks.insert(g.blocks[group].index),
                "step {step}: shared block: {lc:#?}"
            );
        }
    }
}

#[test]
fn random_sequences_keep_one_active_one_canary_and_the_retired_retired() {
    for seed in 1..=200u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let groups = 1 + (seed % 2) as usize;
        let mut lc = Lifecycle::new(groups, policy());
        let mut late: Vec<Event> = Vec::new();
        let mut retired = HashSet::new();
        let mut now = 0;
        for step in 0..300 {
            now += rng.below(20);
            let event = if !late.is_empty() && rng.below(2) == 0 {
                late.remove(0)
            } else {
                random_event(&mut rng, &lc)
            };
            let mut queue = vec![event];
            while let Some(event) = queue.pop() {
                let (busy, asks, tick) = (lc.busy(), asks(&event), event == Event::Tick);
                let effects = lc.handle(Millis(now), event);
                let replied = effects.iter().any(|e| matches!(e, Effect::Reply(_)));
                assert!(
                    !(busy || asks) || lc.busy() || replied,
                    "step {step}: an operation ended without a reply: {effects:?}"
                );
                if tick {
                    check_due(&lc, Millis(now), step);
                }
                for effect in effects {
                    if let Some(a) = answer(&effect, &mut rng, groups) {
                        // Some answers come late, after other events.
                        if rng.below(4) == 0 {
                            late.push(a)
                        } else {
                            queue.push(a)
                        }
                    }
                }
                check(&lc, &mut retired, step);
            }
        }
    }
}
