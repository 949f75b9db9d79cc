//! The fields a canary and a standby add to a saved generation: checked, and refused
//! alone (with a warning) when out of range.

use super::super::{SavedBlock, SavedMember};
use super::*;

/// A draining generation as this version saves a canary or standby.
fn saved(canary: Option<u64>, watch: Option<u64>) -> SavedGeneration {
    SavedGeneration {
        id: 1,
        state: GenerationState::Draining,
        leader: SavedMember {
            pid: 10,
            start_time: 1,
        },
        descendants: vec![],
        blocks: vec![SavedBlock {
            index: 1,
            cookies: vec![7],
        }],
        drain: Some(SavedDrain {
            started_ms: 0,
            deadline_ms: 0,
            retired_ms: None,
            timed_out: false,
            killed: false,
        }),
        canary,
        watch_until_ms: watch,
        check: None,
    }
}

fn valid(g: &SavedGeneration) -> Result<(), &'static str> {
    let mut used = vec![HashSet::new()];
    g.validate(1, &mut used)
}

#[test]
fn a_weight_outside_1_to_99_is_refused_and_the_generation_drains() {
    assert_eq!(saved(Some(10), None).resume(), Ok(Resume::Canary(10)));
    assert_eq!(saved(Some(99), None).resume(), Ok(Resume::Canary(99)));
    for w in [0, 100, 256, u64::MAX] {
        let g = saved(Some(w), None);
        assert_eq!(valid(&g), Ok(()), "the file is used");
        assert!(
            g.resume().is_err_and(|e| e.contains("outside 1 to 99")),
            "{w}"
        );
    }
    assert_eq!(
        saved(None, Some(u64::MAX)).resume(),
        Ok(Resume::Standby(u64::MAX)),
        "capped where it becomes an instant"
    );
    assert_eq!(saved(None, None).resume(), Ok(Resume::AsSaved));
}

#[test]
fn a_canary_or_standby_must_be_saved_draining_before_its_retire_signal() {
    assert_eq!(valid(&saved(Some(10), None)), Ok(()));
    assert_eq!(valid(&saved(None, Some(5))), Ok(()));
    let both = saved(Some(10), Some(5));
    assert_eq!(valid(&both), Err("both a canary weight and a watch window"));
    let mut active = saved(Some(10), None);
    active.state = GenerationState::Active;
    active.drain = None;
    assert!(valid(&active).is_err());
    let mut retiring = saved(None, Some(5));
    if let Some(d) = retiring.drain.as_mut() {
        d.retired_ms = Some(1);
    }
    assert!(valid(&retiring).is_err_and(|e| e.contains("before its retire signal")));
}

#[test]
fn a_check_is_kept_only_short_and_printable() {
    let mut g = saved(None, None);
    assert_eq!(g.check(), Ok(None));
    g.check = Some("http:/healthz:200".into());
    assert_eq!(g.check(), Ok(Some("http:/healthz:200")));
    g.check = Some("x".repeat(MAX_CHECK));
    assert!(g.check().is_ok());
    g.check = Some("x".repeat(MAX_CHECK + 1));
    assert!(g.check().is_err());
    g.check = Some("http:/\nhealthz".into());
    assert!(g.check().is_err());
}
