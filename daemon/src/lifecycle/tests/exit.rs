//! Exits: retirement of every kind, slots emptied, counts forgotten, old entries
//! pruned; a leader's exit; listeners joining the active generation.

use super::*;

/// The effects of generation `id`'s exit (one group): its counting forgotten if it was
/// tagged, its slots emptied, its retirement.
fn retired(id: GenId, how: Retirement, drained_ms: Option<u64>, tagged: bool) -> Vec<Effect> {
    let mut want = Vec::new();
    if tagged {
        want.push(Effect::Forget { tag: tag(id) });
    }
    want.extend([
        Effect::RemoveSlots {
            group: 0,
            first: sp(id).first,
            count: 2,
        },
        Effect::Retired {
            generation: id,
            how,
            drained_ms,
        },
        Effect::Persist,
    ]);
    want
}

#[test]
fn the_active_generation_exiting_retires_it_as_exited_with_no_drain_time() {
    let mut d = Driver::with_generations(1, 1);
    assert_eq!(d.exited(1), retired(1, Retirement::Exited, None, false));
    assert_eq!(d.phase(1), Phase::Retired(Retirement::Exited));
    assert_eq!(d.lc.live(), 0);
    assert!(d.lc.active().is_none());
    assert!(d.exited(1).is_empty(), "retired once");
    assert!(d.exited(42).is_empty(), "unknown");
}

#[test]
fn a_draining_generation_exiting_on_its_own_is_exited_after_its_drain_time() {
    let mut d = Driver::with_generations(1, 1);
    d.at(100).promote(200);
    let want = retired(1, Retirement::Exited, Some(400), true);
    assert_eq!(d.at(500).exited(1), want);
}

#[test]
fn a_retired_generation_is_drained_timed_out_or_killed_as_its_signals_say() {
    let mut d = Driver::with_generations(1, 1);
    d.at(100).promote(200);
    d.tick();
    d.at(200).counted(1, 0, 0);
    let want = retired(1, Retirement::Drained, Some(200), true);
    assert_eq!(d.at(300).exited(1), want);

    d.at(400).promote(300);
    d.at(400 + TIMEOUT).tick();
    let want = retired(2, Retirement::Timeout, Some(TIMEOUT + 1), true);
    assert_eq!(d.at(401 + TIMEOUT).exited(2), want);

    d.at(20_000).promote(400);
    d.at(20_001).tick();
    d.counted(3, 0, 0);
    d.at(20_001 + KILL).tick();
    let want = retired(3, Retirement::Killed, Some(KILL + 2), true);
    assert_eq!(d.at(20_002 + KILL).exited(3), want);
}

#[test]
fn every_group_of_an_exited_generation_is_emptied() {
    let mut d = Driver::with_generations(3, 2);
    let effects = d.exited(1);
    let removed: Vec<_> = effects
        .iter()
        .filter(|e| matches!(e, Effect::RemoveSlots { .. }))
        .cloned()
        .collect();
    let want: Vec<_> = (0..3)
        .map(|group| Effect::RemoveSlots {
            group,
            first: sp(1).first,
            count: 2,
        })
        .collect();
    assert_eq!(removed, want);
}

#[test]
fn beyond_eight_retired_generations_the_oldest_is_released() {
    let mut d = Driver::with_generations(1, 10);
    for id in 1..=8 {
        let effects = d.exited(id);
        assert!(!effects.iter().any(|e| matches!(e, Effect::Release { .. })));
    }
    let effects = d.exited(9);
    assert_eq!(last(&effects), &Effect::Release { generation: 1 });
    assert!(d.lc.generation(1).is_none());
    assert_eq!(d.lc.generations().len(), 9);
    assert_eq!(last(&d.exited(10)), &Effect::Release { generation: 2 });
}

#[test]
fn after_its_leader_exited_a_generations_pid_is_discovered_anew() {
    let mut d = Driver::with_generations(1, 2);
    assert!(d.send(Event::LeaderExited { generation: 1 }).is_empty());
    assert!(d.send(Event::LeaderExited { generation: 9 }).is_empty());
    assert_eq!(d.gen_(1).leader, 100, "replies still name it");
    assert!(d.lc.leader_gone(1) && !d.lc.leader_gone(2));
    assert_eq!(d.phase(1), Phase::Draining, "its members live on");
    // A new process that reused the pid would be discovered; this one holds generation
    // 1's sockets, so it is refused as shared.
    let effects = d.promote(100);
    let shared = refused(Refusal::SharedSocket {
        group: 0,
        cookie: 100_001,
        generation: 1,
        owner: 100,
    });
    assert_eq!(effects, vec![Effect::Discover { pid: 100 }, shared]);
    // A rollback to it answers with the pid it was promoted as, as the old code did.
    assert_eq!(last(&d.rollback(&[1])), &promoted(1, 100, 2, Some(2)));
}

fn joined(generation: GenId, group: usize, offset: usize, cookie: u64) -> Event {
    Event::ListenerJoined {
        generation,
        group,
        offset,
        cookie,
    }
}

#[test]
fn a_listener_joining_in_a_closed_slot_replaces_its_cookie() {
    let mut d = Driver::with_generations(1, 2);
    assert!(d.send(joined(2, 0, 1, 9)).is_empty());
    assert_eq!(d.gen_(2).blocks[0].cookies, vec![200_001, 9]);
    assert_eq!(d.lc.records()[0], steer(Some(sp(2)), Some(sp(1))));
}

#[test]
fn a_listener_joining_after_the_last_grows_the_block_and_its_record() {
    let mut d = Driver::with_generations(2, 2);
    let effects = d.send(joined(2, 1, 2, 9));
    let grown = steer(Some(span(2, 3)), Some(sp(1)));
    assert_eq!(effects, vec![republish(1, grown), Effect::Persist]);
    assert_eq!(d.lc.records(), [steer(Some(sp(2)), Some(sp(1))), grown]);
    assert_eq!(d.gen_(2).blocks[1].cookies, vec![200_011, 200_012, 9]);
}

#[test]
fn a_listener_joining_anything_but_the_active_block_or_past_its_end_is_ignored() {
    let mut d = Driver::with_generations(1, 2);
    let before = d.snapshot();
    for event in [
        joined(1, 0, 2, 9), // draining
        joined(7, 0, 2, 9), // unknown
        joined(2, 0, 3, 9), // a gap
        joined(2, 4, 0, 9), // no such group
    ] {
        assert!(d.send(event).is_empty());
    }
    assert_eq!(d.snapshot(), before);

    let mut d = Driver::new(1);
    d.found.insert(100, vec![(0..64).collect()]);
    d.promote(100);
    let before = d.snapshot();
    assert!(d.send(joined(1, 0, 64, 99)).is_empty(), "a full block");
    assert_eq!(d.snapshot(), before);
}
