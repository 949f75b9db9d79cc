//! The daemon's event loop beside the control socket: kernel events (two rings: zero
//! counts, and binds), members' exits (pidfds), deadlines, and wake-ups when a request
//! brought a deadline forward. On every wake-up it reads the kernel's event counters, so
//! a lost or held-back event is made up for (`Daemon::check_event_stats`). Idle, it
//! sleeps in epoll: no timer runs while nothing drains.

use std::future::pending;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

use crate::kernel::loader::{DrainEvent, EventRings};
use crate::runtime::daemon::Daemon;
use crate::sys;

/// Runs `f` on the daemon off the runtime thread (it may scan /proc or run a tag pass).
async fn with_daemon<T: Send + 'static>(
    daemon: &Arc<Mutex<Daemon>>,
    f: impl FnOnce(&mut Daemon) -> T + Send + 'static,
) -> Option<T> {
    let daemon = Arc::clone(daemon);
    tokio::task::spawn_blocking(move || f(&mut Daemon::lock(&daemon)))
        .await
        .ok()
}

/// Everything `ring` holds now, decoded; clears its readiness.
fn drain_ring(
    guard: &mut tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>,
) -> Vec<DrainEvent> {
    let mut batch = Vec::new();
    while let Some(item) = guard.get_inner_mut().next() {
        batch.extend(DrainEvent::parse(&item));
    }
    guard.clear_ready();
    batch
}

/// Acts on passed deadlines, and starts the watch-window checks that are due.
async fn tick(daemon: &Arc<Mutex<Daemon>>, checks: &mut JoinSet<()>) {
    let now = Instant::now();
    let jobs = with_daemon(daemon, move |d| {
        d.tick(now);
        d.watch_checks_due(now)
    })
    .await
    .unwrap_or_default();
    for (service, job) in jobs {
        let daemon = Arc::clone(daemon);
        // The check waits on the service's processes: never under the lock.
        checks.spawn_blocking(move || {
            let generation = job.generation;
            let result = job.run();
            Daemon::lock(&daemon).watch_checked(&service, generation, result);
        });
    }
}

/// Waits on the event rings, the pidfds sent on `watch`, and the daemon's next deadline,
/// and hands each to the daemon. Returns when `watch` closes.
pub async fn supervise(
    daemon: Arc<Mutex<Daemon>>,
    rings: EventRings,
    mut watch: UnboundedReceiver<Arc<OwnedFd>>,
) -> std::io::Result<()> {
    let mut zeros: AsyncFd<RingBuf<MapData>> = sys::async_ringbuf(rings.zeros)?;
    let mut binds: AsyncFd<RingBuf<MapData>> = sys::async_ringbuf(rings.binds)?;
    let mut exits = JoinSet::new();
    let mut checks = JoinSet::new();
    let Some(wake) = with_daemon(&daemon, |d| d.waker()).await else {
        return Err(std::io::Error::other(
            "the daemon's state is poisoned by an earlier panic",
        ));
    };
    loop {
        let deadline = with_daemon(&daemon, |d| {
            d.check_event_stats();
            d.next_deadline()
        })
        .await
        .flatten();
        let sleep = async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => pending().await,
            }
        };
        tokio::select! {
            // Zero events first: a retirement never waits behind binds. Bind events last:
            // their ring may never be empty while binds stream in faster than this loop
            // takes them (a flood by the service's uid, a slow machine: seen under qemu),
            // and deadlines, exits and watched members must not wait for it to run dry.
            biased;
            ready = zeros.readable_mut() => {
                let batch = drain_ring(&mut ready?);
                if !batch.is_empty() {
                    with_daemon(&daemon, move |d| d.on_events(&batch)).await;
                }
            }
            fd = watch.recv() => match fd {
                Some(fd) => {
                    exits.spawn(async move {
                        // A pidfd polls readable once its process has exited. The member's
                        // own pidfd, shared: one descriptor per member.
                        if let Ok(fd) = sys::async_shared_pidfd(fd) {
                            let _ = fd.readable().await;
                        }
                    });
                }
                None => return Ok(()),
            },
            Some(_) = exits.join_next() => {
                with_daemon(&daemon, Daemon::reap).await;
            }
            () = sleep => tick(&daemon, &mut checks).await,
            Some(_) = checks.join_next() => {}
            ready = binds.readable_mut() => {
                let batch = drain_ring(&mut ready?);
                if !batch.is_empty() {
                    with_daemon(&daemon, move |d| d.on_events(&batch)).await;
                }
            }
            // A deadline was brought forward (a drain started): look again.
            () = wake.notified() => {}
        }
    }
}
