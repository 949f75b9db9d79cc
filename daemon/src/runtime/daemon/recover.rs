//! No panic reaches the daemon's state: every operation on the table runs under
//! `catch_unwind` while the lock is held, and a panic (there or anywhere else the lock
//! is held) rebuilds the table from the last consistent one, as a restarted daemon
//! would take it up.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, MutexGuard};

use super::{Daemon, Service};

impl Daemon {
    /// Runs `f`, one operation on the table, so that a panic in it never escapes: it is
    /// caught while the lock is still held (the daemon's Mutex is never poisoned) and the
    /// table is rebuilt from the last one an operation completed, as a restarted daemon
    /// takes it up (pinned maps, members by pid and start time, drains counted afresh).
    /// The next request finds a working daemon. Panics are not expected: every number is
    /// checked where it is parsed and the request paths have no `unwrap`; this is the
    /// backstop. The kernel's steering records are published again from the rebuilt
    /// table, and the table is written, so kernel, `state.json` and `status` agree.
    pub(super) fn guarded<T>(&mut self, what: &str, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(out) => Some(out),
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(what, panic = %why, "internal error: the table is rebuilt from the last consistent one");
                self.rebuild();
                None
            }
        }
    }

    /// Locks `daemon`. A Mutex poisoned by a panic outside [`Self::guarded`] (code that
    /// holds the lock without going through an operation of the daemon) is recovered the
    /// same way: the table is rebuilt from the last consistent one and the poison
    /// cleared, so one panic never disables later requests.
    pub fn lock(daemon: &Mutex<Daemon>) -> MutexGuard<'_, Daemon> {
        match daemon.lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                let mut guard = poisoned.into_inner();
                tracing::error!(
                    "a panic interrupted work on the table: rebuilt from the last consistent one"
                );
                guard.rebuild();
                daemon.clear_poison();
                guard
            }
        }
    }

    /// Replaces the table with [`Self::last_good`], taken up as at start.
    pub(super) fn rebuild(&mut self) {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // Cloned, not taken: a second panic during the rebuild finds it still there.
            let mut saved = self.last_good.services.clone();
            drop(std::mem::take(&mut self.services));
            for config in self.configs.clone() {
                let mut service = match saved.iter().position(|s| s.name == config.name) {
                    Some(i) => Service::recover(config, saved.remove(i), &mut self.ctx),
                    None => Service::new(config),
                };
                // The failed operation may have flipped a group already: the kernel
                // follows the rebuilt table, so the two never disagree after the reply.
                service.resteer(&mut self.ctx);
                self.services.push(service);
            }
            self.persist();
        }));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::*;
    use crate::config::DrainSettings;
    use crate::kernel::loader::DrainProgram;
    use std::sync::Mutex;

    #[test]
    fn a_panic_in_an_operation_neither_poisons_nor_loses_the_table() {
        if !handoff_tests::privileged("a_panic_in_an_operation_neither_poisons_nor_loses_the_table")
        {
            return;
        }
        let ctx = Ctx::new(DrainProgram::load().expect("loading the programs"), None);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], handoff_tests::free_port()));
        let name = format!("panic-{}", std::process::id());
        let config = crate::config::service(&name, &[addr], DrainSettings::default())
            .expect("a valid service");
        let daemon = Arc::new(Mutex::new(Daemon::new(
            vec![config],
            ctx,
            SavedState::default(),
            None,
        )));
        let held = Arc::clone(&daemon);
        std::thread::spawn(move || {
            let mut d = held.lock().expect("not poisoned");
            // Half done, then a panic: the table must come back whole.
            let out = d.guarded("test", |d| {
                d.services.clear();
                panic!("injected");
            });
            assert!(out.is_none());
        })
        .join()
        .expect("the panic did not escape");
        assert!(!daemon.is_poisoned());
        // A panic outside an operation, with the lock held, poisons the Mutex:
        // Daemon::lock recovers it, and the table.
        let held = Arc::clone(&daemon);
        let _ = std::thread::spawn(move || {
            let mut d = held.lock().expect("not poisoned");
            d.services.clear();
            panic!("injected while holding the lock");
        })
        .join();
        assert!(daemon.is_poisoned());
        let mut d = Daemon::lock(&daemon);
        assert!(!daemon.is_poisoned());
        match d.handle(Request::Status {}) {
            Response::Status(s) => {
                let names: Vec<&str> = s.services.iter().map(|s| s.name.as_str()).collect();
                assert_eq!(names, [name.as_str()]);
            }
            other => panic!("status after a panic: {other:?}"),
        }
    }

    /// Removes what a test's promotes left in the kernel: the program from its groups
    /// and the service's pins, also when the test fails.
    struct Steered(Arc<Mutex<Daemon>>);

    impl Drop for Steered {
        fn drop(&mut self) {
            let d = Daemon::lock(&self.0);
            for s in &d.services {
                crate::kernel::detach::detach(&s.save(&d.ctx));
                let _ = crate::persist::pins::remove_service(s.name());
            }
        }
    }

    #[test]
    fn a_panic_after_a_flip_leaves_the_kernel_steering_as_the_table_says() {
        if !handoff_tests::privileged(
            "a_panic_after_a_flip_leaves_the_kernel_steering_as_the_table_says",
        ) {
            return;
        }
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], handoff_tests::free_port()));
        let name = format!("resteer-{}", std::process::id());
        let config = crate::config::service(&name, &[addr], DrainSettings::default())
            .expect("a valid service");
        let ctx = Ctx::new(DrainProgram::load().expect("loading the programs"), None);
        let daemon = Arc::new(Mutex::new(Daemon::new(
            vec![config],
            ctx,
            SavedState::default(),
            None,
        )));
        let _steered = Steered(Arc::clone(&daemon));
        let listen = addr.to_string();
        let a = handoff_tests::Proc::spawn_testsrv(&["--name", "A", "--listen", &listen]);
        let b = handoff_tests::Proc::spawn_testsrv(&["--name", "B", "--listen", &listen]);
        let promote = |pid: u32| Request::Promote {
            pid: pid as i32,
            service: None,
            options: Default::default(),
        };
        let mut d = Daemon::lock(&daemon);
        assert!(matches!(d.handle(promote(a.pid)), Response::Promoted(_)));
        let steering_a = d.services[0].records();
        assert!(steering_a.iter().all(Option::is_some), "{steering_a:?}");
        // An operation that flipped the kernel to B, then panicked before it completed.
        let out = d.guarded("test", |d| {
            let flipped = d.services[0].promote(b.pid as i32, &Default::default(), &mut d.ctx);
            assert!(
                matches!(flipped, crate::runtime::service::Operated::Done(Ok(_))),
                "{flipped:?}"
            );
            assert_ne!(
                d.services[0].records(),
                steering_a,
                "the kernel steers to B"
            );
            panic!("injected after the flip");
        });
        assert!(out.is_none());
        // The table is the one before the operation, and so is the kernel.
        let gens = &d.services[0].save(&d.ctx).generations;
        assert_eq!(gens.len(), 1, "{gens:?}");
        assert_eq!(gens[0].leader.pid, a.pid as i32);
        assert_eq!(d.services[0].records(), steering_a);
    }
}
