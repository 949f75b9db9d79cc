//! Failures in the steps of the release states (a checked candidate, a canary, a
//! completion), and the model's small rules.

use super::*;

fn mode(check: bool, weight: Option<u8>, watch_ms: Option<u64>) -> PromoteMode {
    PromoteMode {
        check,
        weight,
        watch_ms,
    }
}

/// Promotes pid 200 over generation 1 in two groups in `mode`, the first effect `when`
/// matches failing; checks the table is as before and returns the effects from it.
fn fail(mode: PromoteMode, when: impl Fn(&Effect) -> bool + Copy + 'static) -> Vec<Effect> {
    let mut d = Driver::with_generations(2, 1);
    let before = d.snapshot();
    d.answer(when, Outcome::Failed(Failure::Error));
    let effects = d.promote_with(200, mode);
    assert_eq!(d.snapshot(), before);
    from(&effects, when).to_vec()
}

/// Both groups put back as they were before generation 2, in order.
fn undone() -> Vec<Effect> {
    let old = steer(Some(sp(1)), None);
    vec![
        republish(0, old),
        remove_block(0, 2),
        republish(1, old),
        remove_block(1, 2),
        refused(Refusal::Failed),
    ]
}

#[test]
fn a_checked_promote_failing_at_an_attach_or_after_the_check_undoes_both_groups() {
    let tail = fail(mode(true, None, None), |e| {
        matches!(e, Effect::Attach { group: 1 })
    });
    assert_eq!(tail[1..], undone()[..]);
    let tail = fail(mode(true, None, None), |e| {
        matches!(e, Effect::Publish { group: 1, .. })
    });
    assert_eq!(tail[1..], undone()[..]);
}

#[test]
fn a_canary_failing_in_group_1_undoes_both_groups() {
    let tail = fail(mode(false, Some(10), None), |e| {
        matches!(e, Effect::Probe { group: 1, .. })
    });
    assert_eq!(tail[1..], undone()[..]);
}

#[test]
fn a_weight_change_failing_leaves_the_canary_at_its_weight() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, mode(false, Some(10), None));
    let before = d.snapshot();
    d.answer(
        |e| matches!(e, Effect::Probe { .. }),
        Outcome::Failed(Failure::Error),
    );
    let effects = d.promote_with(200, mode(false, Some(30), None));
    let old = Steer {
        canary: Some((sp(2), 10)),
        active: Some(sp(1)),
        previous: None,
    };
    assert_eq!(effects[2..], [republish(0, old), refused(Refusal::Failed)]);
    assert_eq!(d.snapshot(), before);
}

#[test]
fn completing_a_canary_with_a_watch_window_stands_the_old_active_by() {
    let mut d = Driver::with_generations(1, 1);
    d.promote_with(200, mode(false, Some(10), None));
    let effects = d.at(10).promote_with(200, mode(false, None, Some(300)));
    assert!(!effects.iter().any(|e| matches!(e, Effect::Signal { .. })));
    assert_eq!(d.phase(1), Phase::Standby { until: Millis(310) });
    assert_eq!(d.phase(2), Phase::Active);
}

#[test]
fn a_probe_answered_done_is_a_group_with_nothing_to_probe() {
    let mut d = Driver::new(1);
    d.answer(|e| matches!(e, Effect::Probe { .. }), Outcome::Done);
    assert_eq!(last(&d.promote(100)), &promoted(1, 100, 2, None));
}

#[test]
fn spans_records_and_phases_follow_their_rules() {
    let s = span(2, 3);
    assert!(s.contains(128) && s.contains(130));
    assert!(!s.contains(127) && !s.contains(131));
    let record = Steer {
        canary: Some((sp(5), 10)),
        active: Some(sp(1)),
        previous: None,
    };
    assert_eq!(record.blocks().collect::<Vec<_>>(), vec![5, 1]);
    use handoff_common::proto::GenerationState as S;
    let standby = Phase::Standby { until: Millis(1) };
    assert_eq!(Phase::Candidate.public(), S::Active);
    assert_eq!(standby.public(), S::Draining);
    assert_eq!(Phase::Retired(Retirement::Killed).public(), S::Retired);
    assert_eq!(Retirement::Timeout.as_str(), "timeout");
    assert_eq!(Millis(5).since(Millis(9)), 0);
    assert_eq!(Millis(u64::MAX).after(1), Millis(u64::MAX));
}
