//! One nginx generation, and how the test sees that its workers accept.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use handoff_tests::{Proc, scaled};

use super::READY_TIMEOUT;

/// The nginx binary (from Debian's `nginx`, which `nginx-light` pulls in).
pub(super) fn nginx_binary() -> PathBuf {
    let path = PathBuf::from("/usr/sbin/nginx");
    assert!(
        path.is_file(),
        "{} not found: this test needs nginx (apt-get install -y nginx-light)",
        path.display()
    );
    path
}

/// One nginx generation: master and workers in a process group of their own, killed when
/// dropped (the [`Proc`] guard). On a failing test its error log is printed.
pub(super) struct Nginx {
    /// N of `gN`: what it answers.
    pub(super) generation: usize,
    /// The master, in a process group of its own.
    pub(super) proc: Proc,
    /// Worker pids, once ready.
    pub(super) workers: Vec<u32>,
    /// Its prefix directory: configuration, pid file and error log.
    dir: PathBuf,
}

impl Nginx {
    /// Starts generation `n` (answering `gN`) on `addr`, in `root/gN`.
    pub(super) fn start(binary: &Path, root: &Path, n: usize, addr: SocketAddr) -> Nginx {
        let dir = root.join(format!("g{n}"));
        std::fs::create_dir_all(&dir).expect("creating the nginx prefix dir");
        let d = dir.display();
        let conf = format!(
            "daemon off;\n\
             master_process on;\n\
             worker_processes 2;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   keepalive_timeout 65s;\n\
             \x20   server {{\n\
             \x20       listen {addr} reuseport;\n\
             \x20       location / {{ add_header X-Pid $pid; return 200 \"g{n}\\n\"; }}\n\
             \x20   }}\n\
             }}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("writing nginx.conf");
        let proc = Proc::spawn(
            Command::new(binary)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf_path),
        );
        Nginx {
            generation: n,
            proc,
            workers: Vec::new(),
            dir,
        }
    }

    /// Waits until both workers have the listener of `addr` in their epoll set: they accept.
    /// (nginx 1.22 workers hold every worker's reuseport socket but poll their own only.)
    pub(super) fn wait_ready(&mut self, addr: SocketAddr) {
        let timeout = scaled(READY_TIMEOUT);
        let deadline = Instant::now() + timeout;
        loop {
            let listeners = listening_inodes(addr);
            let workers = children(self.proc.pid);
            let polling = workers
                .iter()
                .filter(|&&w| {
                    polled_sockets(w)
                        .iter()
                        .any(|inode| listeners.contains(inode))
                })
                .count();
            if workers.len() == 2 && polling == 2 {
                self.workers = workers;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nginx g{} (pid {}) not ready within {timeout:?}: workers {workers:?}, \
                 {polling} polling a listener of {addr}; error.log:\n{}",
                self.generation,
                self.proc.pid,
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- nginx g{} (pid {}) error.log:\n{}",
                self.generation,
                self.proc.pid,
                self.error_log()
            );
        }
    }
}

/// Inodes of the TCP LISTEN sockets on `addr` in this thread's network namespace, from
/// sock_diag (`ss`): /proc/net/tcp lists every socket, tens of thousands of TIME_WAIT ones
/// under this load, and is too slow to poll.
fn listening_inodes(addr: SocketAddr) -> Vec<u64> {
    let Ok(out) = Command::new("ss")
        .args(["-Hltne", &format!("src {addr}")])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|field| field.strip_prefix("ino:")?.parse().ok())
        .collect()
}

/// Child pids of `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Inodes of the sockets in the epoll sets of process `pid`.
fn polled_sockets(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let link = |fd: &str| {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut inodes = Vec::new();
    for fd in fds.flatten() {
        let fd = fd.file_name().to_string_lossy().into_owned();
        if link(&fd) != "anon_inode:[eventpoll]" {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        // "tfd:        5 events:     2019 data: …": fd 5 of this process is polled.
        for target in info.lines().filter_map(|l| {
            l.strip_prefix("tfd:")
                .and_then(|rest| rest.split_whitespace().next())
        }) {
            if let Some(inode) = link(target)
                .strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
            {
                inodes.push(inode);
            }
        }
    }
    inodes
}
