//! The awkward cases: several drains at once, going back to a draining generation, and
//! a member exiting while a promote waits for a step.

use super::*;

#[test]
fn a_promote_while_two_generations_drain_leaves_them_draining_and_drains_the_third() {
    let mut d = Driver::with_generations(1, 3);
    let effects = d.promote(400);
    assert_eq!(effects[1], Effect::Insert { group: 0, block: 4 });
    assert_eq!(d.lc.records()[0], steer(Some(sp(4)), Some(sp(3))));
    let drained: Vec<GenId> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::StartCount { generation } => Some(*generation),
            _ => None,
        })
        .collect();
    assert_eq!(drained, vec![3]);
    for id in 1..=3 {
        assert_eq!(d.phase(id), Phase::Draining);
    }
    assert_eq!(d.drain(1).tag, tag(1), "its drain goes on");
}

#[test]
fn rolling_back_to_an_older_draining_generation_makes_the_newest_one_the_fallback() {
    let mut d = Driver::with_generations(1, 3);
    d.rollback(&[1]);
    assert_eq!(d.phase(1), Phase::Active);
    assert_eq!(d.lc.records()[0], steer(Some(sp(1)), Some(sp(3))));
    // Generations 2 and 3 drain; the next promote falls back to generation 1.
    d.promote(400);
    assert_eq!(d.lc.records()[0], steer(Some(sp(4)), Some(sp(1))));
    assert_eq!(
        d.send(Event::Resteer),
        vec![republish(0, steer(Some(sp(4)), Some(sp(3))))]
    );
}

/// Promotes pid 300 over generation 2 (1 draining) in one group, its probe held.
fn promote_held() -> Driver {
    let mut d = Driver::with_generations(1, 2);
    d.hold(|e| matches!(e, Effect::Probe { .. }));
    d.promote(300);
    assert!(d.lc.busy());
    d
}

#[test]
fn the_active_generation_exiting_during_a_promote_retires_and_the_promote_goes_on() {
    let mut d = promote_held();
    let effects = d.exited(2);
    assert_eq!(
        effects[1],
        Effect::Retired {
            generation: 2,
            how: Retirement::Exited,
            drained_ms: None,
        }
    );
    assert!(d.lc.busy(), "no fail-over while an operation waits");
    let effects = d.send(Event::Outcome(Outcome::Probed(ProbeSeen::Slot(
        sp(3).first,
    ))));
    let want = vec![
        Effect::Steered { generation: 3 },
        Effect::Persist,
        promoted(3, 300, 2, None),
    ];
    assert_eq!(effects, want);
    assert_eq!(d.phase(3), Phase::Active);
    assert_eq!(d.phase(2), Phase::Retired(Retirement::Exited));
    assert_eq!(d.phase(1), Phase::Draining);
}

#[test]
fn the_active_generation_exiting_during_a_promote_that_fails_leaves_it_retired() {
    let mut d = promote_held();
    d.exited(2);
    let effects = d.send(Event::Outcome(Outcome::Failed(Failure::Error)));
    let want = vec![
        republish(0, steer(Some(sp(2)), Some(sp(1)))),
        remove_block(0, 3),
        refused(Refusal::Failed),
    ];
    assert_eq!(effects, want);
    assert_eq!(d.lc.active(), None);
    assert_eq!(d.lc.next_id(), 3);
    assert!(!d.lc.busy());
}

#[test]
fn a_draining_generation_exiting_during_a_promote_retires_and_the_promote_goes_on() {
    let mut d = promote_held();
    d.exited(1);
    let effects = d.send(Event::Outcome(Outcome::Probed(ProbeSeen::Slot(
        sp(3).first,
    ))));
    assert_eq!(last(&effects), &promoted(3, 300, 2, Some(2)));
    assert_eq!(d.phase(1), Phase::Retired(Retirement::Exited));
    assert_eq!(d.phase(2), Phase::Draining);
}

#[test]
fn a_drain_deadline_during_a_promote_is_acted_on() {
    let mut d = promote_held();
    let effects = d.at(TIMEOUT).tick();
    assert_eq!(
        effects[0],
        Effect::Signal {
            generation: 1,
            signal: TERM,
            why: Why::Retire(RetireReason::Timeout),
            scope: SignalScope::Leader,
        }
    );
    assert!(d.lc.busy());
}

#[test]
fn a_resteer_waits_for_the_operation_under_way() {
    let mut d = promote_held();
    let before = d.lc.records().to_vec();
    assert!(d.lc.busy());
    assert_eq!(d.send(Event::Resteer), vec![]);
    assert_eq!(d.lc.records(), before.as_slice());
}
