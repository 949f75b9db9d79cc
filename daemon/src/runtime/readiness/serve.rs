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
                let (newest, drained) = read_some(&socket, &service, BATCH);
                if let Some(sender) = newest {
                    if promoting.is_some() {
                        tracing::info!(service, pid = sender.pid, "READY=1 while another sender is being promoted: it is promoted next");
                        queued = Some(sender);
                    } else {
                        promoting = Some(start(&daemon, &service, sender));
                    }
                }
                if drained {
                    ready.clear_ready();
                }
            }
            _ = async { promoting.as_mut()?.await.ok() }, if promoting.is_some() => {
                promoting = queued.take().map(|sender| start(&daemon, &service, sender));
            }
        }
    }
}

/// Messages read from the socket at one wake-up, at most: a sender that floods it (only
/// the service's uid can) delays the daemon's other tasks by this many reads at a time.
const BATCH: usize = 64;

/// Reads up to `batch` waiting messages; returns the newest sender whose `READY=1`
/// counts (an older one in the same batch is superseded), and whether the socket was
/// read dry. (The kernel holds few datagrams per socket, `net.unix.max_dgram_qlen`, but
/// a sender may refill the queue as fast as it is read.)
fn read_some(socket: &ReadinessSocket, service: &str, batch: usize) -> (Option<Member>, bool) {
    let mut newest = None;
    for _ in 0..batch {
        match socket.receive() {
            Ok(None) => return (newest, true),
            Ok(Some(notice)) => {
                if let Some(why) = &notice.ignored {
                    tracing::debug!(service, pid = notice.pid, uid = notice.uid, gid = notice.gid, %why, "notify message not taken");
                }
                if let Some(sender) = notice.ready_sender() {
                    newest = Some(sender.clone());
                }
            }
            Err(e) => {
                tracing::warn!(service, error = %crate::logging::one_line(&e), "reading the readiness socket failed");
                return (newest, true);
            }
        }
    }
    (newest, false)
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

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use handoff_tests::{TempDir, privileged};

    use super::read_some;
    use crate::runtime::readiness::ReadinessSocket;

    /// A flood of `READY=1` is read a batch at a time, and only the newest sender of a
    /// batch is kept: a sender of the service's uid cannot make the task hold a pidfd
    /// per message, nor read without end.
    #[test]
    fn a_flood_is_read_a_batch_at_a_time_keeping_the_newest_sender() {
        if !privileged("a_flood_is_read_a_batch_at_a_time_keeping_the_newest_sender") {
            return;
        }
        let dir = TempDir::new("readiness-flood");
        let path = dir.path().join("n.sock");
        // The service's uid is root's here: this test process is the sender.
        let socket = ReadinessSocket::bind(&path, 0, 0, None).expect("bind");
        // A sender of root's uid that is not this process (handoffd's own process is
        // never a member): 8 datagrams, fewer than the kernel queues per socket
        // (net.unix.max_dgram_qlen, 10 by default); it lives on until killed.
        let script = "import socket,sys,time\n\
            s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\n\
            [s.sendto(b'READY=1',sys.argv[1]) for _ in range(8)]\n\
            print('sent',flush=True)\n\
            time.sleep(60)\n";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .arg(&path)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("its stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("its line");
        let me = i32::try_from(child.id()).expect("a pid");
        let outcome = std::panic::catch_unwind(|| {
            assert_eq!(line.trim(), "sent");
            for _ in 0..2 {
                let (newest, drained) = read_some(&socket, "flood", 4);
                assert_eq!(newest.map(|m| m.pid), Some(me));
                assert!(!drained, "more than a batch was read at once");
            }
            let (newest, drained) = read_some(&socket, "flood", 4);
            assert_eq!((newest.map(|m| m.pid), drained), (None, true));
        });
        let _ = child.kill();
        let _ = child.wait();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}
