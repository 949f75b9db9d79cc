//! Recovery of a canary and of a watch window: what a restarted daemon resumes, and how
//! it squares the saved table with the records the kernel has in force.

use super::*;

/// Generation `id` (pid × 100, block `id`, one listener pair per group) in `phase`.
fn saved(id: GenId, phase: Phase) -> Generation {
    Generation {
        id,
        leader: pid(id),
        phase,
        blocks: cookies(pid(id), 1)
            .into_iter()
            .map(|cookies| Block {
                index: u32::try_from(id).unwrap_or(0),
                cookies,
            })
            .collect(),
        drain: None,
    }
}

fn recover(records: Vec<Steer>, generations: Vec<Generation>) -> Event {
    Event::Recover {
        next_id: 4,
        records,
        generations,
    }
}

fn canary_record(weight: u8) -> Steer {
    Steer {
        canary: Some((sp(3), weight)),
        active: Some(sp(2)),
        previous: Some(sp(1)),
    }
}

#[test]
fn a_standby_stands_by_until_its_window_ends_then_drains() {
    let mut d = Driver::new(1);
    let table = vec![
        saved(
            1,
            Phase::Standby {
                until: Millis(5000),
            },
        ),
        saved(2, Phase::Active),
    ];
    let record = steer(Some(sp(2)), Some(sp(1)));
    let effects = d.at(1000).send(recover(vec![record], table));
    assert_eq!(effects, vec![Effect::Wake], "no drain, no signal");
    assert_eq!(
        d.phase(1),
        Phase::Standby {
            until: Millis(5000)
        }
    );
    assert_eq!(d.lc.next_deadline(), Some(Millis(5000)));
    assert_eq!(d.lc.records(), [record]);
    assert_eq!(d.at(4999).tick(), vec![]);
    let mut want = drain_start(1).to_vec();
    want.push(Effect::Persist);
    assert_eq!(d.at(5000).tick(), want);
    assert_eq!(d.phase(1), Phase::Draining);
    assert_eq!(d.drain(1).started, Millis(5000));
}

#[test]
fn a_standby_whose_window_ended_while_the_daemon_was_away_drains_at_once() {
    let mut d = Driver::new(1);
    let table = vec![
        saved(1, Phase::Standby { until: Millis(900) }),
        saved(2, Phase::Active),
    ];
    let effects = d.at(1000).send(recover(vec![], table));
    let mut want = drain_start(1).to_vec();
    want.push(Effect::Wake);
    assert_eq!(effects, want);
    assert_eq!(d.drain(1).started, Millis(1000));
}

#[test]
fn a_standby_whose_active_generation_ended_while_away_takes_traffic_back() {
    let mut d = Driver::new(1);
    // Generation 2 was active; its processes were not found again.
    let table = vec![saved(
        1,
        Phase::Standby {
            until: Millis(5000),
        },
    )];
    let record = steer(Some(sp(2)), Some(sp(1)));
    let effects = d.at(1000).send(recover(vec![record], table));
    let back = steer(Some(sp(1)), None);
    assert_eq!(effects[0], publish(0, back));
    assert!(
        effects.contains(&Effect::RolledBack {
            to: 1,
            reason: RollbackReason::Exited,
        }),
        "{effects:?}"
    );
    assert_eq!(d.phase(1), Phase::Active);
    assert_eq!(d.lc.records(), [back]);
    assert!(!d.lc.busy());
}

#[test]
fn a_canary_resumes_at_its_weight_and_completes() {
    let mut d = Driver::new(1);
    let table = vec![
        saved(
            1,
            Phase::Standby {
                until: Millis(9000),
            },
        ),
        saved(2, Phase::Active),
        saved(3, Phase::Canary { weight: 10 }),
    ];
    let effects = d.at(1000).send(recover(vec![canary_record(10)], table));
    assert_eq!(effects, vec![Effect::Wake]);
    assert_eq!(d.phase(3), Phase::Canary { weight: 10 });
    assert_eq!(d.lc.records(), [canary_record(10)]);
    // `promote` of the canary's pid completes it, as before the restart.
    let effects = d.promote(pid(3));
    assert_eq!(effects[0], publish(0, steer(Some(sp(3)), Some(sp(2)))));
    assert_eq!(d.phase(3), Phase::Active);
    assert_eq!(d.phase(2), Phase::Draining);
    assert_eq!(d.phase(1), Phase::Draining);
}

#[test]
fn a_canary_no_record_names_drains() {
    let mut d = Driver::new(1);
    let table = vec![
        saved(2, Phase::Active),
        saved(3, Phase::Canary { weight: 10 }),
    ];
    // Its abort was published, then the daemon stopped before saving it.
    let record = steer(Some(sp(2)), None);
    let effects = d.at(1000).send(recover(vec![record], table));
    let mut want = drain_start(3).to_vec();
    want.push(Effect::Wake);
    assert_eq!(effects, want);
    assert_eq!(d.phase(3), Phase::Draining);
    assert_eq!(d.lc.records(), [record], "nothing to publish");
}

#[test]
fn a_record_naming_a_canary_the_table_lacks_is_published_without_it() {
    let mut d = Driver::new(1);
    // Generation 3 was a canary; it ended while no daemon ran.
    let table = vec![saved(1, Phase::Draining), saved(2, Phase::Active)];
    let effects = d.at(1000).send(recover(vec![canary_record(10)], table));
    let without = steer(Some(sp(2)), Some(sp(1)));
    assert!(effects.contains(&republish(0, without)), "{effects:?}");
    assert_eq!(d.lc.records(), [without], "its block is no longer named");
}

#[test]
fn a_record_with_another_weight_is_published_with_the_tables() {
    let mut d = Driver::new(1);
    let table = vec![
        saved(2, Phase::Active),
        saved(3, Phase::Canary { weight: 25 }),
    ];
    let effects = d.at(1000).send(recover(vec![canary_record(10)], table));
    assert_eq!(
        effects,
        vec![republish(0, canary_record(25)), Effect::Wake],
        "the record names the canary: it stays one, at the saved weight"
    );
    assert_eq!(d.phase(3), Phase::Canary { weight: 25 });
}

#[test]
fn of_two_saved_canaries_only_the_newest_stays_one() {
    let mut d = Driver::new(1);
    let mut older = saved(1, Phase::Canary { weight: 5 });
    older.blocks[0].index = 1;
    let table = vec![
        older,
        saved(2, Phase::Active),
        saved(3, Phase::Canary { weight: 10 }),
    ];
    let effects = d.at(1000).send(recover(vec![canary_record(10)], table));
    assert_eq!(&effects[..4], &drain_start(1));
    assert_eq!(d.phase(1), Phase::Draining);
    assert_eq!(d.phase(3), Phase::Canary { weight: 10 });
}

#[test]
fn a_table_with_a_canary_and_a_standby_is_taken_up_as_it_was() {
    let mut d = Driver::with_generations(1, 2);
    // 3 completes with a watch window: 2 stands by; 4 is a canary beside 3.
    d.at(1000).promote_with(
        pid(3),
        PromoteMode {
            watch_ms: Some(60_000),
            ..PromoteMode::default()
        },
    );
    d.promote_with(
        pid(4),
        PromoteMode {
            weight: Some(30),
            ..PromoteMode::default()
        },
    );
    assert_eq!(
        d.phase(2),
        Phase::Standby {
            until: Millis(61_000)
        }
    );
    assert_eq!(d.phase(4), Phase::Canary { weight: 30 });
    let records = d.lc.records().to_vec();
    let table = d.lc.generations().to_vec();
    let mut r = Driver::new(1);
    let effects = r.at(2000).send(Event::Recover {
        next_id: d.lc.next_id(),
        records,
        generations: table,
    });
    assert!(!effects.iter().any(|e| matches!(e, Effect::Signal { .. })));
    for id in 1..=4 {
        assert_eq!(r.phase(id), d.phase(id), "generation {id}");
    }
    assert_eq!(r.lc.records(), d.lc.records());
    assert_eq!(
        r.lc.next_deadline(),
        Some(Millis(2000)),
        "1's drain is counted"
    );
}
