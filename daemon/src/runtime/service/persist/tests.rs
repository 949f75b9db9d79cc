//! A canary and a watch window through the state file and back, against the real
//! kernel and real processes: what a restarted daemon takes up.

use std::sync::Arc;

use super::*;
use crate::config::DrainSettings;
use crate::kernel::loader::DrainProgram;
use crate::lifecycle::{Millis, PromoteMode};
use crate::runtime::service::drive::Run;
use handoff_tests::Proc;

/// Removes what a test's promotes left in the kernel, also when it fails.
struct Cleanup(String, Arc<std::sync::Mutex<Option<SavedService>>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(saved) = self.1.lock().ok().and_then(|mut s| s.take()) {
            crate::kernel::detach::detach(&saved);
        }
        let _ = pins::remove_service(&self.0);
    }
}

/// Drives `pid`'s promote in `mode` to its end; panics on a refusal.
fn promote(s: &mut Service, pid: u32, mode: PromoteMode, ctx: &mut Ctx) {
    let mut run = Run::new(None);
    let pid = i32::try_from(pid).expect("a pid");
    s.drive_run(Event::Promote { pid, mode }, &mut run, ctx);
    assert!(
        matches!(run.reply, Some(lifecycle::Reply::Promoted(_))),
        "{:?} {:?}",
        run.reply,
        run.error.map(|e| e.to_string())
    );
}

fn phases(s: &Service) -> Vec<(GenId, Phase)> {
    s.machine
        .generations()
        .iter()
        .map(|g| (g.id, g.phase))
        .collect()
}

#[test]
fn a_canary_and_a_standby_are_taken_up_after_a_restart() {
    if !handoff_tests::privileged("a_canary_and_a_standby_are_taken_up_after_a_restart") {
        return;
    }
    let mut ctx = Ctx::new(DrainProgram::load().expect("loading the programs"), None);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], handoff_tests::free_port()));
    let name = format!("persist-{}", std::process::id());
    let config =
        crate::config::service(&name, &[addr], DrainSettings::default()).expect("a valid service");
    let last = Arc::new(std::sync::Mutex::new(None));
    let _cleanup = Cleanup(name.clone(), Arc::clone(&last));
    let listen = addr.to_string();
    let spawn = |n: &str| Proc::spawn_testsrv(&["--name", n, "--listen", &listen]);
    let (a, b, c) = (spawn("A"), spawn("B"), spawn("C"));
    let mut s = Service::new(config.clone());
    promote(&mut s, a.pid, PromoteMode::default(), &mut ctx);
    let watch = PromoteMode {
        watch_ms: Some(600_000),
        ..PromoteMode::default()
    };
    promote(&mut s, b.pid, watch, &mut ctx);
    let canary = PromoteMode {
        weight: Some(10),
        ..PromoteMode::default()
    };
    promote(&mut s, c.pid, canary, &mut ctx);
    s.set_check(3, Some("http:/healthz".into()));
    let before = phases(&s);
    let Phase::Standby { until } = before[0].1 else {
        panic!("A stands by: {before:?}");
    };
    assert_eq!(before[2].1, Phase::Canary { weight: 10 });
    let records = s.records();

    // As the state file carries it, and back.
    let saved = s.save(&ctx);
    *last.lock().expect("not poisoned") = Some(saved.clone());
    let text = serde_json::to_string(&saved).expect("serialises");
    let saved: SavedService = serde_json::from_str(&text).expect("parses");
    drop(s);
    let r = Service::recover(config, saved, &mut ctx);
    let after = phases(&r);
    assert_eq!(after[1..], before[1..], "B active, C a canary at 10 %");
    let Phase::Standby { until: again } = after[0].1 else {
        panic!("A still stands by: {after:?}");
    };
    let apart = Millis::since(until.max(again), until.min(again));
    assert!(apart <= 5, "the watch deadline moved by {apart} ms");
    assert_eq!(
        r.records(),
        records,
        "the kernel's records are left as they were"
    );
    assert_eq!(r.check_of(3), Some("http:/healthz"));
    assert_eq!(r.check_of(2), None);
    *last.lock().expect("not poisoned") = Some(r.save(&ctx));
}
