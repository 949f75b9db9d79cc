//! The daemon's readiness sockets at work: one per service that asks for one, each read
//! by a task of its own; a `READY=1` from a process of the service's uid promotes that
//! process (through every check of a promote, and the service's health check).

use std::sync::{Arc, Mutex};

use handoff_common::proto::{PromoteOptions, Response};
use std::os::fd::AsFd;

use super::ReadinessSocket;
use crate::config::ServiceConfig;
use crate::discover::members::Member;
use crate::runtime::daemon::{self, Daemon, Who};

/// Binds the readiness socket of every service in `services` that has one, and spawns
/// the task that reads it. A socket that cannot be bound is logged and left out: the
/// service is promoted by `handoffctl` as ever.
pub fn spawn_all(
    services: &[ServiceConfig],
    daemon: &Arc<Mutex<Daemon>>,
) -> Vec<tokio::task::AbortHandle> {
    let mut tasks = Vec::new();
    for config in services {
        let Some(notify) = &config.release.notify else {
            continue;
        };
        let uid = config.user.unwrap_or_else(|| {
            tracing::warn!(service = %config.name, "notify_socket without a `user`: the socket is root's, and only a root process's READY=1 is taken");
            0
        });
        let gid = nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map_or(0, |u| u.gid.as_raw());
        match ReadinessSocket::bind(&notify.socket, uid, gid, notify.forward.clone()) {
            Ok(socket) => {
                tracing::info!(service = %config.name, socket = %socket.path().display(), identify = ?socket.identify(), "readiness socket ready: a READY=1 from uid {uid} promotes its sender");
                let task = serve(socket, config.name.clone(), Arc::clone(daemon));
                tasks.push(tokio::spawn(task).abort_handle());
            }
            Err(e) => {
                tracing::error!(service = %config.name, error = %crate::logging::one_line(&e), "cannot offer the readiness socket");
            }
        }
    }
    tasks
}

/// Reads `socket` until the daemon stops; promotes each ready sender, one at a time.
async fn serve(socket: ReadinessSocket, service: String, daemon: Arc<Mutex<Daemon>>) {
    // A second descriptor of the same socket, for the reactor: readiness is the
    // socket's, whichever descriptor reads it.
    let watched = socket
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| crate::sys::async_readable(Arc::new(fd)));
    let fd = match watched {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(service, error = %e, "cannot watch the readiness socket");
            return;
        }
    };
    // One promote at a time; a READY=1 that comes meanwhile waits in `queued` (the newest
    // only: a sender that is ready again replaces an older one).
    let mut promoting: Option<tokio::task::JoinHandle<()>> = None;
    let mut queued: Option<Member> = None;
    loop {
        tokio::select! {
            ready = fd.readable() => {
                let Ok(mut ready) = ready else { return };
                for sender in read_all(&socket, &service) {
                    if promoting.is_some() {
                        tracing::info!(service, pid = sender.pid, "READY=1 while another sender is being promoted: it is promoted next");
                        queued = Some(sender);
                    } else {
                        promoting = Some(start(&daemon, &service, sender));
                    }
                }
                ready.clear_ready();
            }
            _ = async { promoting.as_mut()?.await.ok() }, if promoting.is_some() => {
                promoting = queued.take().map(|sender| start(&daemon, &service, sender));
            }
        }
    }
}

/// Every message waiting on `socket`; the senders of those that count as `READY=1`.
fn read_all(socket: &ReadinessSocket, service: &str) -> Vec<Member> {
    let mut ready = Vec::new();
    loop {
        match socket.receive() {
            Ok(None) => return ready,
            Ok(Some(notice)) => {
                if let Some(why) = &notice.ignored {
                    tracing::debug!(service, pid = notice.pid, uid = notice.uid, gid = notice.gid, %why, "notify message not taken");
                }
                ready.extend(notice.ready_sender().cloned());
            }
            Err(e) => {
                tracing::warn!(service, error = %crate::logging::one_line(&e), "reading the readiness socket failed");
                return ready;
            }
        }
    }
}

/// Starts the promote of `sender`, off the runtime's threads.
fn start(
    daemon: &Arc<Mutex<Daemon>>,
    service: &str,
    sender: Member,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(promote(Arc::clone(daemon), service.to_owned(), sender))
}

/// The promote of a ready sender, as `handoffctl promote` with no flag would do it.
fn promote(daemon: Arc<Mutex<Daemon>>, service: String, sender: Member) -> impl FnOnce() {
    move || {
        let pid = sender.pid;
        tracing::info!(service, pid, "READY=1: promoting its sender");
        let options = PromoteOptions::default();
        match daemon::promote(&daemon, Who::Member(sender), Some(&service), &options) {
            Response::Promoted(p) => {
                tracing::info!(
                    service,
                    pid,
                    generation = p.generation,
                    "promoted on READY=1"
                );
            }
            Response::Error(e) => {
                tracing::warn!(service, pid, kind = ?e.kind, error = %e.message, "promote on READY=1 refused");
            }
            other => {
                tracing::warn!(service, pid, answer = ?other, "promote on READY=1: unexpected answer")
            }
        }
    }
}
