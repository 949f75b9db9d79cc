//! The test's network namespace and its TCP counters.

use std::collections::BTreeMap;
use std::process::Command;

use nix::sched::{CloneFlags, unshare};

/// Kernel counters (TcpExt in /proc/net/netstat) that must not grow: any of them means a
/// connection was dropped or reset by the kernel.
pub const LOSS_COUNTERS: [&str; 4] = [
    "ListenOverflows",
    "ListenDrops",
    "TCPMigrateReqFailure",
    "TCPReqQFullDrop",
];

/// Runs `f` on a thread in a new network namespace with loopback up. The processes started
/// there (nginx, handoffd, handoffctl) and the threads it starts (the load) live in it too.
pub(super) fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    for tool in ["ip", "ss"] {
        assert!(
            Command::new(tool).arg("-V").output().is_ok(),
            "`{tool}` not found: this test needs iproute2 (apt-get install -y iproute2)"
        );
    }
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("netns".to_owned())
            .spawn_scoped(s, || {
                unshare(CloneFlags::CLONE_NEWNET).expect("a network namespace for this test");
                let up = Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .output()
                    .expect("running ip");
                assert!(
                    up.status.success(),
                    "ip link set lo up: {}",
                    String::from_utf8_lossy(&up.stderr)
                );
                f()
            })
            .expect("starting the netns thread")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// TcpExt counters of the calling thread's network namespace.
pub(super) fn tcp_ext() -> BTreeMap<String, u64> {
    // /proc/net is the netns of the process's main thread; thread-self is this thread's.
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").expect("reading netstat");
    let mut rows = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        panic!("no TcpExt rows in netstat:\n{text}");
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .map(|(n, v)| (n.to_owned(), v.parse().expect("a counter is a number")))
        .collect()
}

/// Counter `name` of `counters`, signed so that differences can be taken.
pub(super) fn counter(counters: &BTreeMap<String, u64>, name: &str) -> i128 {
    i128::from(
        *counters
            .get(name)
            .unwrap_or_else(|| panic!("no TcpExt counter {name}")),
    )
}
