//! Rollback and the promote of a live generation's pid: a flip per group back to
//! listeners that never left their slots, probed, re-attached once when the program was
//! lost.

use super::*;

/// The effects of flipping every group back to `to` over the active `from`.
fn flip(groups: usize, to: GenId, from: GenId, patient: bool) -> Vec<Effect> {
    (0..groups)
        .flat_map(|g| {
            [
                publish(g, steer(Some(sp(to)), Some(sp(from)))),
                Effect::Probe {
                    group: g,
                    expect: sp(to),
                    patient,
                },
            ]
        })
        .collect()
}

/// Generation `to` took over from `from`, which drains.
fn took_back(to: GenId, from: GenId, groups: usize) -> Vec<Effect> {
    let mut want = vec![
        Effect::Forget { tag: tag(to) },
        Effect::Steered { generation: to },
    ];
    want.extend(drain_start(from));
    want.extend([
        Effect::Persist,
        promoted(to, pid(to), 2 * groups, Some(from)),
    ]);
    want
}

#[test]
fn promoting_a_draining_generations_pid_reactivates_it_and_drains_the_active() {
    let mut d = Driver::with_generations(1, 3);
    let effects = d.at(70).promote(200);
    let mut want = flip(1, 2, 3, true);
    want.extend(took_back(2, 3, 1));
    assert_eq!(effects, want);
    assert_eq!(d.phase(2), Phase::Active);
    assert_eq!(d.gen_(2).drain, None);
    assert_eq!(d.phase(3), Phase::Draining);
    assert_eq!(d.drain(3).started, Millis(70));
    assert_eq!(d.lc.next_id(), 4, "a flip takes no id");
}

#[test]
fn promoting_a_retiring_generations_pid_is_refused_retiring() {
    let mut d = Driver::with_generations(1, 2);
    d.counted(1, 0, 0);
    assert!(d.gen_(1).retiring());
    let before = d.snapshot();
    let want = refused(Refusal::Retiring {
        pid: 100,
        generation: 1,
    });
    assert_eq!(d.promote(100), vec![want]);
    assert_eq!(d.snapshot(), before);
}

#[test]
fn rollback_with_nothing_before_the_active_generation_is_refused() {
    let mut d = Driver::new(1);
    assert_eq!(d.rollback(&[]), vec![refused(Refusal::NothingToRollBack)]);
    d.promote(100);
    assert_eq!(d.rollback(&[1]), vec![refused(Refusal::NothingToRollBack)]);
}

#[test]
fn rollback_skips_a_generation_not_listening_and_one_retiring() {
    let mut d = Driver::with_generations(1, 2);
    let before = d.snapshot();
    assert_eq!(d.rollback(&[2]), vec![refused(Refusal::NothingToRollBack)]);
    assert_eq!(d.snapshot(), before);
    d.counted(1, 0, 0);
    assert_eq!(
        d.rollback(&[1, 2]),
        vec![refused(Refusal::NothingToRollBack)]
    );
}

#[test]
fn rollback_goes_to_the_newest_draining_generation_listening() {
    let mut d = Driver::with_generations(2, 3);
    let effects = d.rollback(&[1, 2, 3]);
    let mut want = flip(2, 2, 3, true);
    want.extend(took_back(2, 3, 2));
    assert_eq!(effects, want);

    let mut d = Driver::with_generations(1, 3);
    let effects = d.rollback(&[1]);
    assert_eq!(effects[0], publish(0, steer(Some(sp(1)), Some(sp(3)))));
    assert_eq!(last(&effects), &promoted(1, 100, 2, Some(3)));
    assert_eq!(d.phase(2), Phase::Draining, "untouched");
}

#[test]
fn a_lost_probe_reattaches_then_probes_again_at_once() {
    let mut d = Driver::with_generations(1, 2);
    d.answer(
        |e| matches!(e, Effect::Probe { .. }),
        Outcome::Failed(Failure::Lost),
    );
    let effects = d.rollback(&[1]);
    let mut want = flip(1, 1, 2, true);
    want.push(Effect::Reattach { group: 0 });
    want.extend(flip(1, 1, 2, false).into_iter().skip(1));
    want.extend(took_back(1, 2, 1));
    assert_eq!(effects, want);
}

/// Rolls back from 2 to 1 in two groups, group 1's probe lost, and the reattach (or
/// the probe after it) answered `outcome`: every group flipped is put back.
fn reattach_fails(outcome: Outcome, reprobe: bool) {
    let mut d = Driver::with_generations(2, 2);
    let before = d.snapshot();
    d.answer(
        |e| matches!(e, Effect::Probe { group: 1, .. }),
        Outcome::Failed(Failure::Lost),
    );
    if reprobe {
        d.answer(
            |e| matches!(e, Effect::Probe { patient: false, .. }),
            outcome,
        );
    } else {
        d.answer(|e| matches!(e, Effect::Reattach { .. }), outcome);
    }
    let effects = d.rollback(&[1]);
    let tail = from(&effects, |e| matches!(e, Effect::Reattach { .. }));
    let mut want = vec![Effect::Reattach { group: 1 }];
    if reprobe {
        want.push(Effect::Probe {
            group: 1,
            expect: sp(1),
            patient: false,
        });
    }
    want.extend([
        republish(0, steer(Some(sp(2)), Some(sp(1)))),
        republish(1, steer(Some(sp(2)), Some(sp(1)))),
        refused(Refusal::Failed),
    ]);
    assert_eq!(tail, want, "{outcome:?}");
    assert_eq!(d.snapshot(), before);
}

#[test]
fn a_reattach_finding_no_listener_undoes_the_flip() {
    reattach_fails(Outcome::Attached(false), false);
}

#[test]
fn a_reattach_failing_undoes_the_flip() {
    reattach_fails(Outcome::Failed(Failure::Error), false);
}

#[test]
fn a_probe_lost_again_after_the_reattach_undoes_the_flip() {
    reattach_fails(Outcome::Failed(Failure::Lost), true);
}

#[test]
fn a_flip_probe_choosing_elsewhere_undoes_the_flip() {
    let mut d = Driver::with_generations(2, 2);
    let before = d.snapshot();
    let seen = ProbeSeen::Slot(128);
    d.answer(
        |e| matches!(e, Effect::Probe { group: 1, .. }),
        Outcome::Probed(seen),
    );
    let effects = d.promote(100);
    let want = refused(Refusal::ProbeMismatch { group: 1, seen });
    assert_eq!(last(&effects), &want);
    assert_eq!(d.snapshot(), before);
}
