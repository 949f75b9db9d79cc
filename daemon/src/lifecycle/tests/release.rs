//! The release states: a candidate checked before any client reaches it, a canary, and
//! a watch window with the previous generation standing by.

use super::*;

fn checked() -> PromoteMode {
    PromoteMode {
        check: true,
        ..PromoteMode::default()
    }
}

fn weighed(weight: u8) -> PromoteMode {
    PromoteMode {
        weight: Some(weight),
        ..PromoteMode::default()
    }
}

fn watched(ms: u64) -> PromoteMode {
    PromoteMode {
        watch_ms: Some(ms),
        ..PromoteMode::default()
    }
}

fn canary(canary: Span, weight: u8, active: Span) -> Steer {
    Steer {
        canary: Some((canary, weight)),
        active: Some(active),
        previous: None,
    }
}

#[test]
fn a_checked_promote_inserts_and_attaches_everywhere_checks_then_publishes() {
    let mut d = Driver::with_generations(2, 1);
    let effects = d.promote_with(200, checked());
    let mut want = vec![Effect::Discover { pid: 200 }];
    for group in 0..2 {
        want.extend([Effect::Insert { group, block: 2 }, Effect::Attach { group }]);
    }
    want.push(Effect::Check(Check { generation: 2 }));
    for group in 0..2 {
        want.extend([
            publish(group, steer(Some(sp(2)), Some(sp(1)))),
            probe(group, sp(2)),
        ]);
    }
    want.push(Effect::Steered { generation: 2 });
    want.extend(drain_start(1));
    want.extend([Effect::Persist, promoted(2, 200, 4, Some(1))]);
    assert_eq!(effects, want);
}

#[test]
fn a_failing_check_undoes_the_inserts_and_nothing_was_ever_published() {
    let mut d = Driver::with_generations(2, 1);
    let before = d.snapshot();
    d.answer(
        |e| matches!(e, Effect::Check(_)),
        Outcome::Failed(Failure::Error),
    );
    let effects = d.promote_with(200, checked());
    assert!(!effects.iter().any(|e| matches!(e, Effect::Publish { .. })));
    let tail = from(&effects, |e| matches!(e, Effect::Check(_)));
    let old = steer(Some(sp(1)), None);
    let want = vec![
        Effect::Check(Check { generation: 2 }),
        republish(0, old),
        remove_block(0, 2),
        republish(1, old),
        remove_block(1, 2),
        refused(Refusal::Failed),
    ];
    assert_eq!(tail, want);
    assert_eq!(d.snapshot(), before);
}

#[test]
fn a_canary_shares_new_connections_with_the_active_generation() {
    let mut d = Driver::with_generations(2, 1);
    let effects = d.promote_with(200, weighed(10));
    let mut want = vec![Effect::Discover { pid: 200 }];
    for group in 0..2 {
        want.extend([
            Effect::Insert { group, block: 2 },
            publish(group, canary(sp(2), 10, sp(1))),
            Effect::Attach { group },
            probe(group, sp(1)),
        ]);
    }
    want.extend([Effect::Persist, promoted(2, 200, 4, None)]);
    assert_eq!(effects, want);
    assert_eq!(d.phase(2), Phase::Canary { weight: 10 });
    assert_eq!(d.lc.active().map(|g| g.id), Some(1));
    assert_eq!(
        d.phase(2).public(),
        handoff_common::proto::GenerationState::Active
    );
}

#[test]
fn a_weight_outside_1_to_99_is_refused_and_100_is_a_full_promote() {
    let mut d = Driver::with_generations(1, 1);
    for weight in [0, 150] {
        let want = refused(Refusal::BadWeight { weight });
        assert_eq!(d.promote_with(200, weighed(weight)), vec![want]);
    }
    assert_eq!(
        last(&d.promote_with(200, weighed(100))),
        &promoted(2, 200, 2, Some(1))
    );
    assert_eq!(d.phase(2), Phase::Active);
}

#[test]
fn a_canary_with_no_active_generation_is_refused() {
    let mut d = Driver::new(1);
    let effects = d.promote_with(100, weighed(10));
    // Refused before the candidate is discovered.
    let want = vec![refused(Refusal::NoActive)];
    assert_eq!(effects, want);
    assert_eq!(d.lc.next_id(), 1);
    assert!(d.lc.generations().is_empty());
}

#[test]
fn promoting_the_canarys_pid_with_a_weight_weighs_it_again() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, weighed(10));
    let effects = d.promote_with(200, weighed(30));
    let want = vec![
        publish(0, canary(sp(2), 30, sp(1))),
        probe(0, sp(1)),
        Effect::Persist,
        promoted(2, 200, 2, None),
    ];
    assert_eq!(effects, want);
    assert_eq!(d.phase(2), Phase::Canary { weight: 30 });
}

#[test]
fn promoting_the_canarys_pid_completes_it_and_the_old_active_drains() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, weighed(10));
    let effects = d.promote(200);
    let mut want = vec![
        publish(0, steer(Some(sp(2)), Some(sp(1)))),
        probe(0, sp(2)),
        Effect::Steered { generation: 2 },
    ];
    want.extend(drain_start(1));
    want.extend([Effect::Persist, promoted(2, 200, 2, Some(1))]);
    assert_eq!(effects, want);
    assert_eq!(d.phase(2), Phase::Active);
}

#[test]
fn rollback_aborts_a_canary_which_drains() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, weighed(10));
    let effects = d.rollback(&[]);
    let mut want = vec![publish(0, steer(Some(sp(1)), None)), probe(0, sp(1))];
    want.extend(drain_start(2));
    want.extend([Effect::Persist, promoted(1, 100, 2, Some(2))]);
    assert_eq!(effects, want);
    assert_eq!(d.phase(2), Phase::Draining);
    assert_eq!(d.phase(1), Phase::Active);
}

#[test]
fn a_canary_exiting_is_taken_out_of_the_records() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, weighed(10));
    let effects = d.exited(2);
    assert_eq!(last(&effects), &republish(0, steer(Some(sp(1)), None)));
    assert_eq!(d.lc.records()[0], steer(Some(sp(1)), None));
}

#[test]
fn in_a_watch_window_the_old_active_stands_by_undrained_until_its_end() {
    let mut d = Driver::with_generations(1, 1);
    let effects = d.at(100).promote_with(200, watched(300));
    assert!(!effects.iter().any(|e| matches!(e, Effect::Signal { .. })));
    let tail = from(&effects, |e| matches!(e, Effect::Steered { .. }));
    let want = vec![
        Effect::Steered { generation: 2 },
        Effect::Wake,
        Effect::Persist,
        promoted(2, 200, 2, Some(1)),
    ];
    assert_eq!(tail, want);
    assert_eq!(d.phase(1), Phase::Standby { until: Millis(400) });
    assert!(d.at(399).tick().is_empty());
    let mut want = drain_start(1).to_vec();
    want.push(Effect::Persist);
    assert_eq!(d.at(400).tick(), want);
    assert_eq!(d.drain(1).started, Millis(400));
}

#[test]
fn the_active_exiting_in_its_watch_window_flips_back_to_the_standby() {
    let mut d = Driver::with_generations(1, 1);
    d.at(100).promote_with(200, watched(300));
    let effects = d.at(200).exited(2);
    let tail = from(&effects, |e| matches!(e, Effect::Publish { .. }));
    let want = vec![
        publish(0, steer(Some(sp(1)), None)),
        probe(0, sp(1)),
        Effect::Steered { generation: 1 },
        Effect::RolledBack {
            to: 1,
            reason: RollbackReason::Exited,
        },
        Effect::Persist,
        promoted(1, 100, 2, None),
    ];
    assert_eq!(tail, want);
    assert_eq!(d.phase(1), Phase::Active);
    assert_eq!(d.lc.next_deadline(), None);
}

#[test]
fn the_active_losing_its_listeners_in_its_watch_window_flips_back() {
    let mut d = Driver::with_generations(1, 1);
    d.at(100).promote_with(200, watched(300));
    assert!(
        d.send(Event::ListenersLost { generation: 1 }).is_empty(),
        "not active"
    );
    let effects = d.send(Event::ListenersLost { generation: 2 });
    let mut want = vec![
        publish(0, steer(Some(sp(1)), Some(sp(2)))),
        probe(0, sp(1)),
        Effect::Steered { generation: 1 },
    ];
    want.extend(drain_start(2));
    want.extend([
        Effect::RolledBack {
            to: 1,
            reason: RollbackReason::ListenersLost,
        },
        Effect::Persist,
        promoted(1, 100, 2, Some(2)),
    ]);
    assert_eq!(effects, want);
    // Outside a watch window there is nothing to go back to.
    d.at(1000).tick();
    assert!(d.send(Event::ListenersLost { generation: 1 }).is_empty());
}

#[test]
fn rollback_in_a_watch_window_goes_to_the_standby() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, watched(300));
    let effects = d.rollback(&[]);
    assert_eq!(effects[0], publish(0, steer(Some(sp(1)), Some(sp(2)))));
    assert_eq!(last(&effects), &promoted(1, 100, 2, Some(2)));
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::RolledBack { .. }))
    );
}

#[test]
fn a_second_promote_drains_the_standby_and_stands_the_active_by() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, watched(300));
    let effects = d.at(50).promote_with(300, watched(300));
    let tail = from(&effects, |e| matches!(e, Effect::Steered { .. }));
    let mut want = vec![Effect::Steered { generation: 3 }];
    want.extend(drain_start(1));
    want.extend([Effect::Wake, Effect::Persist, promoted(3, 300, 2, Some(2))]);
    assert_eq!(tail, want);
    assert_eq!(d.phase(2), Phase::Standby { until: Millis(350) });
    assert_eq!(d.lc.records()[0], steer(Some(sp(3)), Some(sp(2))));
}

#[test]
fn a_checked_completion_of_a_canary_checks_it_before_publishing() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, weighed(10));
    assert_eq!(d.phase(2), Phase::Canary { weight: 10 });
    let effects = d.promote_with(200, checked());
    assert_eq!(
        effects.first(),
        Some(&Effect::Check(Check { generation: 2 }))
    );
    assert_eq!(d.phase(2), Phase::Active);
    // A failing check leaves the canary as it was, nothing published.
    d.promote_with(300, weighed(20));
    let before = d.snapshot();
    d.answer(
        |e| matches!(e, Effect::Check(_)),
        Outcome::Failed(Failure::Error),
    );
    let effects = d.promote_with(300, checked());
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::Publish { .. } | Effect::Republish { .. })),
        "{effects:?}"
    );
    assert_eq!(d.snapshot(), before);
}
