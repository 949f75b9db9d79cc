//! Draining: the first count at the next tick, counts, the retire signal at zero or at
//! the timeout, kill-after, new settings, and the next deadline.

use super::*;

/// Generation 1 draining since 1000 ms (generation 2 active), tagged, not yet counted.
fn draining() -> Driver {
    let mut d = Driver::with_generations(1, 1);
    d.at(1000).promote(200);
    d
}

fn count(generation: GenId, first: bool) -> Effect {
    Effect::Count {
        generation,
        tag: tag(generation),
        first,
    }
}

fn retire_signal(generation: GenId, reason: RetireReason) -> Effect {
    Effect::Signal {
        generation,
        signal: TERM,
        why: Why::Retire(reason),
        scope: SignalScope::Leader,
    }
}

#[test]
fn a_drain_is_tagged_then_counted_first_at_the_next_tick() {
    let mut d = draining();
    assert_eq!(d.drain(1).tag, tag(1));
    assert!(!d.drain(1).counted);
    assert_eq!(d.lc.next_deadline(), Some(Millis(1000)));
    assert_eq!(d.tick(), vec![count(1, true)]);
    d.counted(1, 2, 0);
    assert!(d.drain(1).counted);
    assert_eq!(d.drain(1).recheck_at, None);
    assert_eq!(d.lc.next_deadline(), Some(Millis(1000 + TIMEOUT)));
    assert!(d.at(2000).tick().is_empty(), "nothing due");
}

#[test]
fn a_tagged_event_for_an_unknown_or_undrained_generation_is_ignored() {
    let mut d = draining();
    let before = d.snapshot();
    assert!(
        d.send(Event::Tagged {
            generation: 9,
            tag: 5
        })
        .is_empty()
    );
    assert!(
        d.send(Event::Tagged {
            generation: 2,
            tag: 5
        })
        .is_empty()
    );
    assert_eq!(d.snapshot(), before);
}

#[test]
fn only_queued_connections_count_again_five_ms_later() {
    let mut d = draining();
    d.at(1001).tick();
    assert!(d.counted(1, 0, 4).is_empty());
    assert_eq!(d.drain(1).recheck_at, Some(Millis(1006)));
    assert_eq!(d.lc.next_deadline(), Some(Millis(1006)));
    assert!(d.at(1005).tick().is_empty());
    assert_eq!(d.at(1006).tick(), vec![count(1, false)]);
}

#[test]
fn a_count_of_zero_sends_the_retire_signal_and_sets_kill_after() {
    let mut d = draining();
    d.at(1001).tick();
    let effects = d.at(1500).counted(1, 0, 0);
    let want = vec![retire_signal(1, RetireReason::Drained), Effect::Persist];
    assert_eq!(effects, want);
    let drain = d.drain(1);
    assert_eq!(drain.retire, Some((Millis(1500), RetireReason::Drained)));
    assert_eq!(drain.kill_at, Some(Millis(1500 + KILL)));
    assert_eq!(drain.recheck_at, None);
    assert_eq!(d.lc.next_deadline(), Some(Millis(1500 + KILL)));
    assert!(
        d.counted(1, 0, 0).is_empty(),
        "counted once retiring: ignored"
    );
}

#[test]
fn a_failed_count_leaves_the_drain_to_its_timeout() {
    let mut d = draining();
    d.at(1001).tick();
    assert!(d.send(Event::CountFailed { generation: 1 }).is_empty());
    assert_eq!(d.drain(1).recheck_at, None);
    assert!(d.at(1002).tick().is_empty());
    assert_eq!(d.lc.next_deadline(), Some(Millis(1000 + TIMEOUT)));
}

#[test]
fn a_zero_event_counts_its_tags_generation_once_more() {
    let mut d = draining();
    d.at(1001).tick();
    d.counted(1, 3, 0);
    assert_eq!(d.send(Event::Zero { tag: tag(1) }), vec![count(1, false)]);
    assert!(d.send(Event::Zero { tag: 0 }).is_empty());
    assert!(d.send(Event::Zero { tag: 999 }).is_empty());
    d.counted(1, 0, 0);
    assert!(d.send(Event::Zero { tag: tag(1) }).is_empty(), "retiring");
}

#[test]
fn recount_draining_counts_every_drain_not_retiring() {
    let mut d = Driver::with_generations(1, 4);
    d.counted(1, 0, 0);
    let effects = d.send(Event::RecountDraining);
    assert_eq!(effects, vec![count(2, false), count(3, false)]);
}

#[test]
fn the_drain_timeout_sends_the_retire_signal_with_connections_left() {
    let mut d = draining();
    d.at(1001).tick();
    d.counted(1, 5, 0);
    assert!(d.at(1000 + TIMEOUT - 1).tick().is_empty());
    let effects = d.at(1000 + TIMEOUT).tick();
    let want = vec![retire_signal(1, RetireReason::Timeout), Effect::Persist];
    assert_eq!(effects, want);
    assert_eq!(d.drain(1).kill_at, Some(Millis(1000 + TIMEOUT + KILL)));
}

#[test]
fn kill_after_adopts_then_kills_every_member() {
    let mut d = draining();
    d.at(1001).tick();
    d.counted(1, 0, 0);
    assert!(d.at(1001 + KILL - 1).tick().is_empty());
    let effects = d.at(1001 + KILL).tick();
    let kill = Effect::Signal {
        generation: 1,
        signal: libc::SIGKILL,
        why: Why::Kill,
        scope: SignalScope::All,
    };
    assert_eq!(
        effects,
        vec![Effect::Adopt { generation: 1 }, kill, Effect::Persist]
    );
    assert!(d.drain(1).killed);
    assert_eq!(d.drain(1).kill_at, None);
    assert_eq!(d.lc.next_deadline(), None);
    assert!(d.at(99_999).tick().is_empty());
}

#[test]
fn a_timeout_and_a_zero_kill_after_in_one_tick_send_both_signals() {
    let mut d = draining();
    let p = Policy {
        kill_after_ms: Some(0),
        ..policy()
    };
    d.send(Event::Policy(p));
    let effects = d.at(1000 + TIMEOUT).tick();
    assert_eq!(effects[0], retire_signal(1, RetireReason::Timeout));
    assert_eq!(effects[2], Effect::Adopt { generation: 1 });
    assert_eq!(effects.len(), 5, "{effects:?}");
}

#[test]
fn without_a_drain_signal_or_kill_after_neither_is_sent() {
    let mut d = Driver::with_generations(1, 1);
    let p = Policy {
        drain_signal: None,
        kill_after_ms: None,
        ..policy()
    };
    d.send(Event::Policy(p));
    let effects = d.promote(200);
    assert!(!effects.iter().any(|e| matches!(e, Effect::Signal { .. })));
    d.tick();
    d.counted(1, 0, 0);
    assert_eq!(d.drain(1).kill_at, None);
}

#[test]
fn new_settings_move_every_drains_deadline_from_its_start() {
    let mut d = Driver::with_generations(1, 3);
    let (s1, s2) = (d.drain(1).started, d.drain(2).started);
    let p = Policy {
        drain_timeout_ms: 50,
        ..policy()
    };
    assert!(d.at(10).send(Event::Policy(p)).is_empty());
    assert_eq!(d.lc.policy(), p);
    assert_eq!(d.drain(1).deadline, s1.after(50));
    assert_eq!(d.drain(2).deadline, s2.after(50));
    assert_eq!(d.at(50).tick()[0], retire_signal(1, RetireReason::Timeout));
}

#[test]
fn next_deadline_is_the_earliest_of_timeouts_rechecks_kill_after_and_windows() {
    let mut d = Driver::with_generations(1, 2);
    assert_eq!(d.lc.next_deadline(), Some(Millis(TIMEOUT)));
    let watch = PromoteMode {
        watch_ms: Some(300),
        ..PromoteMode::default()
    };
    d.at(100).promote_with(300, watch);
    assert_eq!(d.lc.next_deadline(), Some(Millis(400)));
    d.at(200).counted(1, 0, 0);
    assert_eq!(d.lc.next_deadline(), Some(Millis(400)));
    assert_eq!(Driver::new(1).lc.next_deadline(), None);
}
