//! Promote: discovery, then per group insert, publish, attach and probe; a failure at
//! each step undoes what was done, in order, and leaves the table as it was.

use super::*;

/// The effects of installing generation `id` (pid × 100) in every group of `groups`,
/// over `previous` (its span is the record's fallback), after the discovery.
fn install(id: GenId, groups: usize, previous: Option<GenId>) -> Vec<Effect> {
    let block = u32::try_from(id).unwrap_or(0);
    let mut out = Vec::new();
    for g in 0..groups {
        out.push(Effect::Insert { group: g, block });
        out.push(publish(g, steer(Some(sp(id)), previous.map(sp))));
        out.push(Effect::Attach { group: g });
        out.push(probe(g, sp(id)));
    }
    out
}

#[test]
fn first_promote_in_two_groups_inserts_publishes_attaches_and_probes_each_group() {
    let mut d = Driver::new(2);
    let effects = d.promote(100);
    let mut want = vec![Effect::Discover { pid: 100 }];
    want.extend(install(1, 2, None));
    want.extend([
        Effect::Steered { generation: 1 },
        Effect::Persist,
        promoted(1, 100, 4, None),
    ]);
    assert_eq!(effects, want);
    assert_eq!(d.phase(1), Phase::Active);
    assert_eq!(d.lc.next_id(), 2);
    assert_eq!(d.lc.records(), [steer(Some(sp(1)), None); 2]);
    assert_eq!(d.gen_(1).blocks[1].cookies, vec![100_011, 100_012]);
    assert!(!d.lc.busy());
}

#[test]
fn second_promote_steers_to_the_new_generation_falling_back_to_the_old_which_drains() {
    let mut d = Driver::with_generations(2, 1);
    let effects = d.at(50).promote(200);
    let mut want = vec![Effect::Discover { pid: 200 }];
    want.extend(install(2, 2, Some(1)));
    want.push(Effect::Steered { generation: 2 });
    want.extend(drain_start(1));
    want.extend([Effect::Persist, promoted(2, 200, 4, Some(1))]);
    assert_eq!(effects, want);
    assert_eq!(d.phase(1), Phase::Draining);
    assert_eq!(d.phase(2), Phase::Active);
    let drain = d.drain(1);
    assert_eq!((drain.tag, drain.started), (tag(1), Millis(50)));
    assert_eq!(drain.deadline, Millis(50 + TIMEOUT));
    assert_eq!(drain.recheck_at, Some(Millis(50)));
}

#[test]
fn a_pid_leading_the_active_generation_is_refused_and_nothing_is_discovered() {
    let mut d = Driver::with_generations(1, 1);
    let before = d.snapshot();
    let effects = d.promote(100);
    let want = refused(Refusal::AlreadyActive {
        pid: 100,
        generation: 1,
    });
    assert_eq!(effects, vec![want]);
    assert_eq!(d.snapshot(), before);
}

#[test]
fn a_failed_discovery_answers_failed_and_changes_nothing() {
    let mut d = Driver::with_generations(2, 1);
    let before = d.snapshot();
    d.answer(
        |e| matches!(e, Effect::Discover { .. }),
        Outcome::Failed(Failure::Error),
    );
    let effects = d.promote(200);
    assert_eq!(
        effects,
        vec![Effect::Discover { pid: 200 }, refused(Refusal::Failed)]
    );
    assert_eq!(d.snapshot(), before);
}

/// Promotes pid 200 over generation 1 in two groups with `outcome` for the first effect
/// `when` matches; checks that the table is as before, and returns the effects from
/// the failing one.
fn fail_second_promote(
    when: impl Fn(&Effect) -> bool + Copy + 'static,
    outcome: Outcome,
) -> Vec<Effect> {
    let mut d = Driver::with_generations(2, 1);
    let before = d.snapshot();
    d.answer(when, outcome);
    let effects = d.promote(200);
    assert_eq!(d.snapshot(), before, "the table changed");
    assert_eq!(d.lc.next_id(), 2);
    assert!(d.lc.generation(2).is_none());
    from(&effects, when).to_vec()
}

/// The undo of a failed promote of generation 2 over 1 that reached group `groups - 1`.
fn undo(groups: usize) -> Vec<Effect> {
    (0..groups)
        .flat_map(|g| [republish(g, steer(Some(sp(1)), None)), remove_block(g, 2)])
        .collect()
}

#[test]
fn an_insert_failing_in_group_0_empties_its_block_and_puts_the_record_back() {
    let fails = |e: &Effect| matches!(e, Effect::Insert { group: 0, .. });
    let tail = fail_second_promote(fails, Outcome::Failed(Failure::Error));
    let mut want = vec![Effect::Insert { group: 0, block: 2 }];
    want.extend(undo(1));
    want.push(refused(Refusal::Failed));
    assert_eq!(tail, want);
}

#[test]
fn an_insert_failing_in_group_1_undoes_both_groups_in_order() {
    let fails = |e: &Effect| matches!(e, Effect::Insert { group: 1, .. });
    let tail = fail_second_promote(fails, Outcome::Failed(Failure::Error));
    let mut want = vec![Effect::Insert { group: 1, block: 2 }];
    want.extend(undo(2));
    want.push(refused(Refusal::Failed));
    assert_eq!(tail, want);
}

#[test]
fn a_publish_failing_in_either_group_undoes_every_group_touched() {
    for group in 0..2 {
        let fails = move |e: &Effect| matches!(e, Effect::Publish { group: g, .. } if *g == group);
        let tail = fail_second_promote(fails, Outcome::Failed(Failure::Error));
        let mut want = vec![publish(group, steer(Some(sp(2)), Some(sp(1))))];
        want.extend(undo(group + 1));
        want.push(refused(Refusal::Failed));
        assert_eq!(tail, want, "group {group}");
    }
}

#[test]
fn an_attach_failing_in_either_group_undoes_every_group_touched() {
    for group in 0..2 {
        let fails = move |e: &Effect| matches!(e, Effect::Attach { group: g } if *g == group);
        let tail = fail_second_promote(fails, Outcome::Failed(Failure::Error));
        let mut want = vec![Effect::Attach { group }];
        want.extend(undo(group + 1));
        want.push(refused(Refusal::Failed));
        assert_eq!(tail, want, "group {group}");
    }
}

#[test]
fn a_probe_failing_lost_or_choosing_elsewhere_in_either_group_undoes_and_says_why() {
    let cases = [
        (Outcome::Failed(Failure::Error), None),
        // A promote attached the program just before: no second attach.
        (Outcome::Failed(Failure::Lost), None),
        (
            Outcome::Probed(ProbeSeen::NoSocket),
            Some(ProbeSeen::NoSocket),
        ),
        (
            Outcome::Probed(ProbeSeen::Slot(64)),
            Some(ProbeSeen::Slot(64)),
        ),
        (
            Outcome::Probed(ProbeSeen::Slot(130)),
            Some(ProbeSeen::Slot(130)),
        ),
    ];
    for group in 0..2 {
        for (outcome, seen) in cases {
            let fails =
                move |e: &Effect| matches!(e, Effect::Probe { group: g, .. } if *g == group);
            let tail = fail_second_promote(fails, outcome);
            let mut want = vec![probe(group, sp(2))];
            want.extend(undo(group + 1));
            want.push(refused(match seen {
                Some(seen) => Refusal::ProbeMismatch { group, seen },
                None => Refusal::Failed,
            }));
            assert_eq!(tail, want, "group {group}, {outcome:?}");
        }
    }
}

#[test]
fn a_probe_choosing_any_slot_of_the_new_span_is_enough() {
    let mut d = Driver::with_generations(1, 1);
    d.answer(
        |e| matches!(e, Effect::Probe { .. }),
        Outcome::Probed(ProbeSeen::Slot(129)),
    );
    assert_eq!(last(&d.promote(200)), &promoted(2, 200, 2, Some(1)));
}

#[test]
fn a_listener_of_a_live_generation_is_refused_as_shared() {
    let mut d = Driver::with_generations(2, 1);
    d.found.insert(300, vec![vec![7], vec![100_011]]);
    let before = d.snapshot();
    let effects = d.promote(300);
    let want = refused(Refusal::SharedSocket {
        group: 1,
        cookie: 100_011,
        generation: 1,
        owner: 100,
    });
    assert_eq!(effects, vec![Effect::Discover { pid: 300 }, want]);
    assert_eq!(d.snapshot(), before);
}

#[test]
fn a_promote_while_another_waits_for_a_step_is_refused_busy() {
    let mut d = Driver::new(1);
    d.hold(|e| matches!(e, Effect::Probe { .. }));
    d.promote(100);
    assert!(d.lc.busy());
    assert_eq!(d.promote(200), vec![refused(Refusal::Busy)]);
    assert_eq!(d.rollback(&[]), vec![refused(Refusal::Busy)]);
    let effects = d.send(Event::Outcome(Outcome::Probed(ProbeSeen::Slot(64))));
    assert_eq!(last(&effects), &promoted(1, 100, 2, None));
}

#[test]
fn blocks_rotate_and_skip_those_held_or_named_by_a_record() {
    let mut d = Driver::with_generations(1, 3);
    // Generation 1 retires: its block is free but the rotation reaches it last.
    d.exited(1);
    d.promote(400);
    assert_eq!(d.gen_(4).blocks[0].index, 4);
    assert_eq!(d.lc.records()[0], steer(Some(sp(4)), Some(sp(3))));
}

#[test]
fn an_outcome_with_no_operation_under_way_is_ignored() {
    let mut d = Driver::with_generations(1, 1);
    let before = d.snapshot();
    assert!(d.send(Event::Outcome(Outcome::Done)).is_empty());
    let found = Event::Discovered {
        leader: 5,
        listeners: vec![vec![5]],
    };
    assert!(d.send(found).is_empty());
    assert_eq!(d.snapshot(), before);
}
