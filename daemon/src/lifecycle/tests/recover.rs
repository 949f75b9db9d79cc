//! Recovery of a saved table, and publishing every group's record again.

use super::*;

/// Generation `id` (pid × 100, block `id`, one listener pair per group) in `phase`.
fn saved(id: GenId, groups: usize, phase: Phase, drain: Option<Drain>) -> Generation {
    Generation {
        id,
        leader: pid(id),
        phase,
        blocks: cookies(pid(id), groups)
            .into_iter()
            .map(|cookies| Block {
                index: u32::try_from(id).unwrap_or(0),
                cookies,
            })
            .collect(),
        drain,
    }
}

fn recover(next_id: GenId, records: Vec<Steer>, generations: Vec<Generation>) -> Event {
    Event::Recover {
        next_id,
        records,
        generations,
    }
}

#[test]
fn a_drain_is_resumed_under_a_new_tag_and_counted_at_the_next_tick() {
    let mut d = Driver::new(1);
    let drain = resumed(Millis(10), Millis(10 + TIMEOUT), None, false);
    let table = vec![
        saved(1, 1, Phase::Draining, Some(drain)),
        saved(2, 1, Phase::Active, None),
    ];
    let record = steer(Some(sp(2)), Some(sp(1)));
    let effects = d.at(500).send(recover(3, vec![record], table));
    assert_eq!(
        effects,
        vec![Effect::StartCount { generation: 1 }, Effect::Wake]
    );
    assert_eq!((d.lc.next_id(), d.lc.records()), (3, &[record][..]));
    let drain = d.drain(1);
    assert_eq!((drain.tag, drain.started), (tag(1), Millis(10)));
    assert_eq!(drain.recheck_at, Some(Millis(500)));
    assert_eq!(d.phase(2), Phase::Active);
    let count = Effect::Count {
        generation: 1,
        tag: tag(1),
        first: true,
    };
    assert_eq!(d.tick(), vec![count]);
}

#[test]
fn a_retiring_drain_gets_its_kill_after_from_its_saved_retire_signal() {
    let mut d = Driver::new(1);
    let retire = Some((Millis(300), RetireReason::Drained));
    let table = vec![
        saved(
            1,
            1,
            Phase::Draining,
            Some(resumed(Millis(0), Millis(9), retire, false)),
        ),
        saved(
            2,
            1,
            Phase::Draining,
            Some(resumed(Millis(0), Millis(9), retire, true)),
        ),
        saved(3, 1, Phase::Active, None),
    ];
    d.at(1000).send(recover(4, vec![], table));
    assert_eq!(d.drain(1).kill_at, Some(Millis(300 + KILL)));
    assert_eq!(d.drain(1).recheck_at, None);
    assert_eq!(d.drain(2).kill_at, None, "killed already");
    assert_eq!(d.lc.next_deadline(), Some(Millis(300 + KILL)));
    assert_eq!(d.lc.records(), [Steer::default()], "resized to the groups");
    let effects = d.at(300 + KILL).tick();
    assert_eq!(effects[0], Effect::Adopt { generation: 1 });
    assert_eq!(
        d.exited(2)[2],
        Effect::Retired {
            generation: 2,
            how: Retirement::Killed,
            drained_ms: Some(300 + KILL),
        }
    );
}

#[test]
fn retired_entries_and_entries_of_another_group_count_are_dropped() {
    let mut d = Driver::new(2);
    let table = vec![
        saved(1, 2, Phase::Retired(Retirement::Drained), None),
        saved(2, 1, Phase::Active, None),
        saved(3, 2, Phase::Active, None),
    ];
    let effects = d.send(recover(4, vec![], table));
    assert_eq!(effects, vec![Effect::Wake]);
    let ids: Vec<GenId> = d.lc.generations().iter().map(|g| g.id).collect();
    assert_eq!(ids, vec![3]);
}

#[test]
fn a_standby_or_draining_generation_saved_without_a_drain_starts_one() {
    let mut d = Driver::new(1);
    let table = vec![
        saved(1, 1, Phase::Draining, None),
        saved(2, 1, Phase::Standby { until: Millis(5) }, None),
        saved(3, 1, Phase::Active, None),
    ];
    let effects = d.at(40).send(recover(4, vec![], table));
    let mut want = drain_start(1).to_vec();
    want.extend(drain_start(2));
    want.push(Effect::Wake);
    assert_eq!(effects, want);
    assert_eq!(d.phase(2), Phase::Draining);
    assert_eq!(d.drain(2).started, Millis(40));
}

#[test]
fn a_next_id_below_the_lifecycles_own_is_not_taken() {
    let mut d = Driver::with_generations(1, 2);
    d.send(recover(1, vec![], vec![]));
    assert_eq!(d.lc.next_id(), 3);
}

#[test]
fn a_table_saved_by_a_running_lifecycle_is_taken_up_as_it_was() {
    let mut d = Driver::with_generations(1, 3);
    d.at(2000).counted(1, 0, 0);
    d.exited(2);
    let records = d.lc.records().to_vec();
    let table = d.lc.generations().to_vec();
    let mut r = Driver::new(1);
    r.at(2500).send(recover(d.lc.next_id(), records, table));
    assert_eq!(r.lc.generation(2), None, "retired: dropped");
    assert_eq!(r.drain(1).retire, d.drain(1).retire);
    assert_eq!(r.drain(1).kill_at, Some(Millis(2000 + KILL)));
    assert_eq!(r.phase(3), Phase::Active);
    assert_eq!(r.lc.records(), d.lc.records());
    assert_eq!(r.promote(400)[1], Effect::Insert { group: 0, block: 4 });
}

#[test]
fn resteer_publishes_every_groups_record_as_the_table_says() {
    let mut d = Driver::with_generations(2, 2);
    d.promote_with(
        300,
        PromoteMode {
            weight: Some(20),
            ..PromoteMode::default()
        },
    );
    let record = Steer {
        canary: Some((sp(3), 20)),
        active: Some(sp(2)),
        previous: Some(sp(1)),
    };
    let effects = d.send(Event::Resteer);
    assert_eq!(effects, vec![republish(0, record), republish(1, record)]);
    assert_eq!(d.lc.records(), [record; 2]);

    let mut d = Driver::with_generations(1, 1);
    d.exited(1);
    let effects = d.send(Event::Resteer);
    assert_eq!(
        effects,
        vec![republish(0, Steer::default())],
        "nothing active: the hash"
    );
}
