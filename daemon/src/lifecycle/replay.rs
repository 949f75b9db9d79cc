//! Replays traces of real daemon runs (recorded with `HANDOFF_LIFECYCLE_TRACE`, see
//! `generation::trace`) through fresh machines and checks that every event gets the
//! effects it got then: a change of the machine that alters what the daemon does shows
//! up here, without root.

use serde::Deserialize;

use super::{Effect, Event, Lifecycle, Millis, Policy};

/// One line of a trace, as `generation::trace::Line` writes it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    New {
        service: String,
        groups: usize,
        policy: Policy,
    },
    Step {
        service: String,
        now: Millis,
        event: Event,
        effects: Vec<Effect>,
    },
}

/// Replays `trace`; returns how many steps were compared.
fn replay(name: &str, trace: &str) -> usize {
    let mut machines: std::collections::HashMap<String, Lifecycle> = Default::default();
    let mut steps = 0;
    for (n, text) in trace
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let line: Line = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{name}:{}: not a trace line: {e}", n + 1));
        match line {
            Line::New {
                service,
                groups,
                policy,
            } => {
                machines.insert(service, Lifecycle::new(groups, policy));
            }
            Line::Step {
                service,
                now,
                event,
                effects,
            } => {
                let machine = machines
                    .get_mut(&service)
                    .unwrap_or_else(|| panic!("{name}:{}: no `new` line for {service}", n + 1));
                let got = machine.handle(now, event.clone());
                assert_eq!(
                    got,
                    effects,
                    "{name}:{}: {service} at {now:?} answered {event:?} differently",
                    n + 1
                );
                steps += 1;
            }
        }
    }
    steps
}

#[test]
fn a_recorded_daemon_run_replays_to_the_same_effects() {
    let trace = include_str!("testdata/acceptance.jsonl");
    let steps = replay("acceptance.jsonl", trace);
    assert!(
        steps > 50,
        "the trace holds {steps} steps: too few to mean much"
    );
}

#[test]
fn a_changed_answer_is_caught() {
    let trace = include_str!("testdata/acceptance.jsonl");
    // A drain started for another generation than the one recorded: the replay must
    // fail on that line, and only there.
    let mut lines: Vec<String> = trace.lines().map(str::to_owned).collect();
    let at = lines
        .iter()
        .position(|l| l.contains("{\"StartCount\":{\"generation\":"))
        .expect("the trace holds a drain");
    lines[at] = lines[at].replacen(
        "{\"StartCount\":{\"generation\":",
        "{\"StartCount\":{\"generation\":9",
        1,
    );
    let changed = lines.join("\n");
    let result = std::panic::catch_unwind(|| replay("changed", &changed));
    let message = result.expect_err("a changed effect went unnoticed");
    let message = message
        .downcast_ref::<String>()
        .map(String::as_str)
        .unwrap_or_default();
    assert!(
        message.contains(&format!("changed:{}:", at + 1)),
        "failed elsewhere: {message}"
    );
}
