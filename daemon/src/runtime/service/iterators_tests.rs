//! The BPF discovery iterators against /proc, on the real kernel: the process table must
//! give the same tree, and the listener iterator the same listening fds, as the slow
//! path they replace.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use crate::discover::{FdRef, ProcFs, Processes};
use crate::kernel::loader::DrainProgram;
use crate::runtime::service::Ctx;
use handoff_tests::privileged;

/// A child process, killed and reaped when dropped (also when the test fails).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn iterators_agree_with_proc() {
    if !privileged("iterators_agree_with_proc") {
        return;
    }
    let mut ctx = Ctx::new(
        DrainProgram::load().expect("loading the drain programs"),
        None,
    );
    let me = std::process::id() as i32;

    // The tree: this test process and a child of it.
    let child = Child(
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawning sleep"),
    );
    let child_pid = child.0.id() as i32;
    let mut from_bpf = ctx.tree(me).expect("the process table iterator");
    let mut from_proc = ProcFs.tree(me).expect("reading /proc");
    assert_eq!(from_bpf[0], me);
    assert!(from_bpf.contains(&child_pid), "{from_bpf:?}");
    from_bpf.sort_unstable();
    from_proc.sort_unstable();
    assert_eq!(from_bpf, from_proc);

    // The listeners: one on `port`, an IPv6 one and another IPv4 one on ports of their
    // own, and a connection (both ends) on `port`, all held by this process: for `port`
    // only the first may be reported.
    let a = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = a.local_addr().expect("addr").port();
    let b = TcpListener::bind("[::1]:0").expect("bind v6");
    let other = TcpListener::bind("127.0.0.1:0").expect("bind");
    let conn = TcpStream::connect(a.local_addr().expect("addr")).expect("connect");
    let (accepted, _) = a.accept().expect("accept");
    let b_port = b.local_addr().expect("addr").port();

    let found = ctx
        .listener_fds(port, &[me])
        .expect("the listener iterator");
    let expected = HashMap::from([(
        inode(a.as_raw_fd()),
        FdRef {
            pid: me,
            fd: a.as_raw_fd(),
        },
    )]);
    assert_eq!(found, expected, "listeners on port {port}");
    // The /proc path reports every socket of the process; the listener is among them.
    let proc_fds = ProcFs.listener_fds(port, &[me]).expect("reading /proc");
    for (ino, at) in &found {
        assert_eq!(proc_fds.get(ino), Some(at));
    }
    let on_b = ctx
        .listener_fds(b_port, &[me])
        .expect("the listener iterator");
    assert_eq!(
        on_b.len(),
        1,
        "the IPv6 listener on port {b_port}: {on_b:?}"
    );
    // Another process's listeners are not this one's.
    assert!(
        ctx.listener_fds(port, &[child_pid])
            .expect("the listener iterator")
            .is_empty()
    );
    drop((conn, accepted, other));
}

/// The inode of the socket behind `fd` of this process.
fn inode(fd: i32) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .expect("stat of an fd")
        .ino()
}
