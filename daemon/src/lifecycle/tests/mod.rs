//! Unit tests of the lifecycle machine: a [`Driver`] sends events at a scripted time and
//! answers every reported effect (a step's outcome, a discovery, a tag) with a scripted
//! outcome or a default one (success), so each test reads as a few events and the
//! effects they produced, in order.

mod awkward;
mod drain;
mod during;
mod exit;
mod fuzz;
mod promote;
mod recover;
mod release;
mod resume;
mod rollback;
mod steps;

use std::collections::{HashMap, VecDeque};

use super::*;

/// The drain signal of the default policy.
const QUIT: i32 = libc::SIGQUIT;
/// The retire signal of the default policy.
const TERM: i32 = libc::SIGTERM;
/// The drain timeout of the default policy.
const TIMEOUT: u64 = 10_000;
/// Kill-after of the default policy.
const KILL: u64 = 5_000;

fn policy() -> Policy {
    Policy {
        drain_signal: Some(QUIT),
        retire_signal: TERM,
        drain_timeout_ms: TIMEOUT,
        kill_after_ms: Some(KILL),
    }
}

/// An answer the test chose for the first effect `when` matches: an event, or none (the
/// step stays pending until the test sends its outcome).
struct Rule {
    when: Box<dyn Fn(&Effect) -> bool>,
    answer: Option<Event>,
}

/// A lifecycle and a runtime that answers its reported effects.
struct Driver {
    lc: Lifecycle,
    now: Millis,
    rules: Vec<Rule>,
    /// Listeners a discovery of a pid finds (default: [`cookies`]).
    found: HashMap<i32, Vec<Vec<u64>>>,
}

/// The default listeners of `pid`: two per group.
fn cookies(pid: i32, groups: usize) -> Vec<Vec<u64>> {
    let base = u64::try_from(pid).unwrap_or(0) * 1000;
    (0..groups as u64)
        .map(|g| vec![base + g * 10 + 1, base + g * 10 + 2])
        .collect()
}

/// The tag the driver gives generation `id`'s drains.
fn tag(id: GenId) -> u32 {
    u32::try_from(100 + id).unwrap_or(0)
}

impl Driver {
    fn new(groups: usize) -> Self {
        Self {
            lc: Lifecycle::new(groups, policy()),
            now: Millis(0),
            rules: Vec::new(),
            found: HashMap::new(),
        }
    }

    fn groups(&self) -> usize {
        self.lc.records().len()
    }

    /// From now on, events happen at `ms`.
    fn at(&mut self, ms: u64) -> &mut Self {
        self.now = Millis(ms);
        self
    }

    /// The first effect `when` matches gets `outcome`.
    fn answer(&mut self, when: impl Fn(&Effect) -> bool + 'static, outcome: Outcome) {
        self.rules.push(Rule {
            when: Box::new(when),
            answer: Some(Event::Outcome(outcome)),
        });
    }

    /// The first effect `when` matches gets no answer: its step stays pending.
    fn hold(&mut self, when: impl Fn(&Effect) -> bool + 'static) {
        self.rules.push(Rule {
            when: Box::new(when),
            answer: None,
        });
    }

    /// The default answer to a reported effect (none for an unreported one, and for a
    /// count: tests send counts themselves).
    fn default_answer(&self, effect: &Effect) -> Option<Event> {
        let done = Some(Event::Outcome(Outcome::Done));
        match effect {
            Effect::Discover { pid } => Some(Event::Discovered {
                leader: *pid,
                listeners: self
                    .found
                    .get(pid)
                    .cloned()
                    .unwrap_or_else(|| cookies(*pid, self.groups())),
            }),
            Effect::Insert { .. } | Effect::Attach { .. } | Effect::Publish { .. } => done,
            Effect::Check(_) => done,
            Effect::Probe { expect, .. } => Some(Event::Outcome(Outcome::Probed(ProbeSeen::Slot(
                expect.first,
            )))),
            Effect::Reattach { .. } => Some(Event::Outcome(Outcome::Attached(true))),
            Effect::StartCount { generation } => Some(Event::Tagged {
                generation: *generation,
                tag: tag(*generation),
            }),
            _ => None,
        }
    }

    fn answer_to(&mut self, effect: &Effect) -> Option<Event> {
        match self.rules.iter().position(|r| (r.when)(effect)) {
            Some(i) => self.rules.remove(i).answer,
            None => self.default_answer(effect),
        }
    }

    /// Sends `event`, then the answers to the effects it produced, and so on; returns
    /// every effect, in order.
    fn send(&mut self, event: Event) -> Vec<Effect> {
        let mut all = Vec::new();
        let mut queue = VecDeque::from([event]);
        while let Some(event) = queue.pop_front() {
            for effect in self.lc.handle(self.now, event) {
                if let Some(answer) = self.answer_to(&effect) {
                    queue.push_back(answer);
                }
                all.push(effect);
            }
        }
        all
    }

    fn promote(&mut self, pid: i32) -> Vec<Effect> {
        self.promote_with(pid, PromoteMode::default())
    }

    fn promote_with(&mut self, pid: i32, mode: PromoteMode) -> Vec<Effect> {
        self.send(Event::Promote { pid, mode })
    }

    fn rollback(&mut self, listening: &[GenId]) -> Vec<Effect> {
        self.send(Event::Rollback {
            listening: listening.to_vec(),
        })
    }

    fn tick(&mut self) -> Vec<Effect> {
        self.send(Event::Tick)
    }

    fn exited(&mut self, generation: GenId) -> Vec<Effect> {
        self.send(Event::Exited { generation })
    }

    fn counted(&mut self, generation: GenId, counted: u64, queued: u64) -> Vec<Effect> {
        self.send(Event::Counted {
            generation,
            counted,
            queued,
        })
    }

    fn gen_(&self, id: GenId) -> &Generation {
        self.lc.generation(id).expect("no such generation")
    }

    fn phase(&self, id: GenId) -> Phase {
        self.gen_(id).phase
    }

    fn drain(&self, id: GenId) -> &Drain {
        self.gen_(id).drain.as_ref().expect("not draining")
    }

    /// What a failed operation must leave as it was.
    fn snapshot(&self) -> (Vec<Generation>, Vec<Steer>, GenId, bool) {
        (
            self.lc.generations().to_vec(),
            self.lc.records().to_vec(),
            self.lc.next_id(),
            self.lc.busy(),
        )
    }

    /// Promotes pids 100, 200, … in turn (generation n is pid n × 100, in block n) and
    /// answers each drain's first count with connections left.
    fn with_generations(groups: usize, n: u64) -> Self {
        let mut d = Self::new(groups);
        for id in 1..=n {
            d.promote(pid(id));
            if id > 1 {
                d.tick();
                d.counted(id - 1, 3, 0);
            }
        }
        d
    }
}

/// The pid leading generation `id` in [`Driver::with_generations`].
fn pid(id: GenId) -> i32 {
    i32::try_from(id).unwrap_or(0) * 100
}

/// The span of generation `id`'s two listeners (block `id`).
fn sp(id: GenId) -> Span {
    span(u32::try_from(id).unwrap_or(0), 2)
}

fn span(block: u32, len: u32) -> Span {
    Span {
        first: block * handoff_common::maps::GEN_SLOTS,
        len,
    }
}

fn steer(active: Option<Span>, previous: Option<Span>) -> Steer {
    Steer {
        canary: None,
        active,
        previous,
    }
}

fn publish(group: usize, record: Steer) -> Effect {
    Effect::Publish { group, record }
}

fn republish(group: usize, record: Steer) -> Effect {
    Effect::Republish { group, record }
}

fn probe(group: usize, expect: Span) -> Effect {
    Effect::Probe {
        group,
        expect,
        patient: true,
    }
}

fn remove_block(group: usize, block: u32) -> Effect {
    Effect::RemoveSlots {
        group,
        first: block * handoff_common::maps::GEN_SLOTS,
        count: handoff_common::maps::GEN_SLOTS,
    }
}

/// The effects of a drain's start (drain signal to the leader).
fn drain_start(generation: GenId) -> [Effect; 4] {
    [
        Effect::Adopt { generation },
        Effect::StartCount { generation },
        Effect::Signal {
            generation,
            signal: QUIT,
            why: Why::Drain,
            scope: SignalScope::Leader,
        },
        Effect::Wake,
    ]
}

fn promoted(generation: GenId, pid: i32, listeners: usize, draining: Option<GenId>) -> Effect {
    Effect::Reply(Reply::Promoted(Promoted {
        generation,
        pid,
        listeners,
        draining,
    }))
}

fn refused(refusal: Refusal) -> Effect {
    Effect::Reply(Reply::Refused(refusal))
}

/// The last effect, which ends every operation: its reply.
fn last(effects: &[Effect]) -> &Effect {
    effects.last().expect("no effect")
}

/// The effects from the first that `when` matches (all of them if none does: the
/// assertion then shows them).
fn from(effects: &[Effect], when: impl Fn(&Effect) -> bool) -> &[Effect] {
    let i = effects.iter().position(when).unwrap_or(0);
    &effects[i..]
}
