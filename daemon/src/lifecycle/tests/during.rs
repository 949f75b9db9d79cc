//! Events that arrive while a flip waits for a step: the generation it goes to exits
//! or is told to retire meanwhile; a second canary.

use super::*;

/// Rolls back from 2 to 1 (one group), the probe held.
fn rollback_held() -> Driver {
    let mut d = Driver::with_generations(1, 2);
    d.hold(|e| matches!(e, Effect::Probe { .. }));
    d.rollback(&[1]);
    assert!(d.lc.busy());
    d
}

/// The held probe saw a slot of generation `id`.
fn probed(d: &mut Driver, id: GenId) -> Vec<Effect> {
    d.send(Event::Outcome(Outcome::Probed(ProbeSeen::Slot(
        sp(id).first,
    ))))
}

#[test]
fn a_rollback_target_exiting_before_the_probe_answers_is_not_made_active() {
    let mut d = rollback_held();
    d.exited(1);
    let effects = probed(&mut d, 1);
    let want = vec![
        republish(0, steer(Some(sp(2)), Some(sp(1)))),
        refused(Refusal::Failed),
    ];
    assert_eq!(effects, want);
    assert_eq!(d.phase(1), Phase::Retired(Retirement::Exited));
    assert_eq!(d.phase(2), Phase::Active);
}

#[test]
fn a_rollback_target_told_to_retire_before_the_probe_answers_is_not_made_active() {
    let mut d = rollback_held();
    d.counted(1, 0, 0);
    assert!(d.gen_(1).retiring());
    let effects = probed(&mut d, 1);
    let want = vec![
        republish(0, steer(Some(sp(2)), Some(sp(1)))),
        refused(Refusal::Retiring {
            pid: 100,
            generation: 1,
        }),
    ];
    assert_eq!(effects, want);
    assert_eq!(d.phase(1), Phase::Draining);
    assert_eq!(d.phase(2), Phase::Active);
}

fn canary_mode(weight: Option<u8>) -> PromoteMode {
    PromoteMode {
        weight,
        ..PromoteMode::default()
    }
}

#[test]
fn a_canary_exiting_before_its_completion_or_weight_is_probed_stays_retired() {
    for weight in [None, Some(30)] {
        let mut d = Driver::with_generations(1, 1);
        d.promote_with(200, canary_mode(Some(10)));
        d.hold(|e| matches!(e, Effect::Probe { .. }));
        d.promote_with(200, canary_mode(weight));
        d.exited(2);
        // Completing expects the canary's slots; weighing, the active's.
        let effects = probed(&mut d, if weight.is_none() { 2 } else { 1 });
        assert_eq!(last(&effects), &refused(Refusal::Failed), "{weight:?}");
        assert_eq!(d.phase(2), Phase::Retired(Retirement::Exited));
        assert_eq!(d.lc.active().map(|g| g.id), Some(1));
        assert_eq!(d.lc.records()[0], steer(Some(sp(1)), None), "{weight:?}");
    }
}

#[test]
fn a_canary_exiting_before_its_abort_is_probed_is_not_drained() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, canary_mode(Some(10)));
    d.hold(|e| matches!(e, Effect::Probe { .. }));
    d.rollback(&[]);
    d.exited(2);
    let effects = probed(&mut d, 1);
    assert_eq!(effects, vec![Effect::Persist, promoted(1, 100, 2, Some(2))]);
    assert_eq!(d.phase(2), Phase::Retired(Retirement::Exited));
}

#[test]
fn a_second_canary_drains_the_first() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, canary_mode(Some(10)));
    let effects = d.promote_with(300, canary_mode(Some(20)));
    let record = Steer {
        canary: Some((sp(3), 20)),
        active: Some(sp(1)),
        previous: None,
    };
    assert_eq!(d.lc.records()[0], record);
    assert!(effects.contains(&Effect::StartCount { generation: 2 }));
    assert_eq!(last(&effects), &promoted(3, 300, 2, Some(2)));
    assert_eq!(d.phase(2), Phase::Draining);
    assert_eq!(d.phase(3), Phase::Canary { weight: 20 });
}

#[test]
fn a_listener_joining_the_active_during_a_promote_stays_in_every_record() {
    let grown = span(1, 3);
    for fails in [false, true] {
        let mut d = Driver::with_generations(1, 1);
        d.hold(|e| matches!(e, Effect::Check(_)));
        d.promote_with(
            200,
            PromoteMode {
                check: true,
                weight: Some(10),
                watch_ms: None,
            },
        );
        d.send(Event::ListenerJoined {
            generation: 1,
            group: 0,
            offset: 2,
            cookie: 9,
        });
        if fails {
            d.answer(
                |e| matches!(e, Effect::Probe { .. }),
                Outcome::Failed(Failure::Error),
            );
        }
        let effects = d.send(Event::Outcome(Outcome::Done));
        assert!(effects.contains(&Effect::Probe {
            group: 0,
            expect: grown,
            patient: true
        }));
        let record = d.lc.records()[0];
        assert_eq!(record.active, Some(grown), "failed: {fails}");
        assert_eq!(
            last(&effects),
            &if fails {
                refused(Refusal::Failed)
            } else {
                promoted(2, 200, 2, None)
            }
        );
    }
}

#[test]
fn a_canary_exiting_while_a_second_one_is_promoted_leaves_the_second_in_the_record() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, canary_mode(Some(10)));
    d.hold(|e| matches!(e, Effect::Probe { .. }));
    d.promote_with(300, canary_mode(Some(20)));
    let effects = d.exited(2);
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::Republish { .. }))
    );
    let effects = probed(&mut d, 1);
    assert_eq!(last(&effects), &promoted(3, 300, 2, None));
    let record = Steer {
        canary: Some((sp(3), 20)),
        active: Some(sp(1)),
        previous: None,
    };
    assert_eq!(d.lc.records()[0], record);
}

fn watched() -> PromoteMode {
    PromoteMode {
        watch_ms: Some(300),
        ..PromoteMode::default()
    }
}

#[test]
fn the_active_exiting_in_its_watch_window_during_a_failed_promote_flips_back_after_it() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, watched());
    d.hold(|e| matches!(e, Effect::Probe { .. }));
    d.promote(300);
    d.exited(2);
    let effects = d.send(Event::Outcome(Outcome::Failed(Failure::Error)));
    let tail = from(&effects, |e| matches!(e, Effect::Reply(_)));
    assert_eq!(tail[0], refused(Refusal::Failed));
    assert_eq!(tail[1], publish(0, steer(Some(sp(1)), None)));
    let rolled = Effect::RolledBack {
        to: 1,
        reason: RollbackReason::Exited,
    };
    assert!(tail.contains(&rolled));
    assert_eq!(d.phase(1), Phase::Active);
}

#[test]
fn a_failed_automatic_flip_back_is_not_tried_again() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, watched());
    d.answer(
        |e| matches!(e, Effect::Probe { .. }),
        Outcome::Failed(Failure::Error),
    );
    let effects = d.exited(2);
    assert_eq!(last(&effects), &refused(Refusal::Failed));
    assert!(!d.lc.busy());
    assert_eq!(d.phase(1), Phase::Standby { until: Millis(300) });
}
