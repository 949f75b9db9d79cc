//! The start-up check on facts made up for each case: no root, no container needed.

use super::*;

const TMPFS: FsType = nix::sys::statfs::TMPFS_MAGIC;

/// A host as it should be: initial pid namespace, the cgroup2 root, the host's bpffs.
fn host() -> Facts {
    let bpffs = Node {
        fs: BPF_FS_MAGIC,
        dev: 40,
        ino: 1,
    };
    Facts {
        pid_ns: Ok(PidNs {
            inode: INITIAL_PID_NS_INODE,
            levels: 1,
        }),
        cgroup: "/sys/fs/cgroup".into(),
        cgroup_node: Ok(Node {
            fs: CGROUP2_SUPER_MAGIC,
            dev: 30,
            ino: 1,
        }),
        bpffs: Ok(bpffs),
        host_bpffs: HostView::Seen(bpffs),
        mnt_ns: Some((4026531841, 4026531841)),
    }
}

#[test]
fn the_host_passes() {
    assert_eq!(check(&host()), Ok(Checked::default()));
}

#[test]
fn a_pid_namespace_of_its_own_is_refused() {
    let mut f = host();
    f.pid_ns = Ok(PidNs {
        inode: 4026532500,
        levels: 2,
    });
    let e = check(&f).expect_err("refused");
    assert!(
        matches!(
            e,
            HostError::PidNs {
                inode: 4026532500,
                ..
            }
        ),
        "{e}"
    );
    let line = e.to_string();
    assert!(!line.contains('\n'));
    assert!(
        line.contains("pid namespace") && line.contains("--pid=host"),
        "{line}"
    );
    // The initial inode seen through a /proc of a nested namespace: still refused.
    f.pid_ns = Ok(PidNs {
        inode: INITIAL_PID_NS_INODE,
        levels: 2,
    });
    assert!(matches!(check(&f), Err(HostError::PidNs { .. })));
    f.pid_ns = Err("/proc/self/ns/pid: No such file or directory".into());
    assert!(matches!(check(&f), Err(HostError::PidNsUnreadable(_))));
}

#[test]
fn the_pid_namespace_is_checked_first() {
    let mut f = host();
    f.pid_ns = Ok(PidNs {
        inode: 4026532500,
        levels: 2,
    });
    f.cgroup_node = Err("gone".into());
    f.bpffs = Err("gone".into());
    assert!(matches!(check(&f), Err(HostError::PidNs { .. })));
}

#[test]
fn a_cgroup_below_the_root_is_refused() {
    let mut f = host();
    f.cgroup = "/sys/fs/cgroup/system.slice".into();
    f.cgroup_node = Ok(Node {
        fs: CGROUP2_SUPER_MAGIC,
        dev: 30,
        ino: 4242,
    });
    let e = check(&f).expect_err("refused");
    assert_eq!(
        e,
        HostError::CgroupNotRoot {
            path: "/sys/fs/cgroup/system.slice".into(),
            ino: 4242
        }
    );
    assert!(e.to_string().contains("--cgroup-root"), "{e}");
}

#[test]
fn a_directory_of_another_file_system_is_refused() {
    let mut f = host();
    f.cgroup = "/tmp/x".into();
    // A tmpfs root has an inode of its own, but 1 must not pass on its own.
    f.cgroup_node = Ok(Node {
        fs: TMPFS,
        dev: 50,
        ino: 1,
    });
    assert!(matches!(check(&f), Err(HostError::NotCgroup2 { .. })));
    f.cgroup_node = Err("No such file or directory".into());
    let e = check(&f).expect_err("refused");
    assert!(e.to_string().contains("/tmp/x"), "{e}");
}

#[test]
fn a_bpffs_of_its_own_is_refused() {
    let mut f = host();
    f.bpffs = Ok(Node {
        fs: BPF_FS_MAGIC,
        dev: 99,
        ino: 1,
    });
    let e = check(&f).expect_err("refused");
    assert!(matches!(e, HostError::NotHostBpffs { .. }), "{e}");
    assert!(e.to_string().contains("hostPath"), "{e}");
    // The host has none: ours cannot be it.
    f.host_bpffs = HostView::Missing;
    assert!(matches!(check(&f), Err(HostError::NotHostBpffs { .. })));
    f.host_bpffs = HostView::Seen(Node {
        fs: nix::sys::statfs::SYSFS_MAGIC,
        dev: 99,
        ino: 7,
    });
    assert!(matches!(check(&f), Err(HostError::NotHostBpffs { .. })));
}

#[test]
fn an_unreadable_host_root_leaves_the_bpffs_unverified() {
    let mut f = host();
    f.host_bpffs = HostView::Unreadable("Permission denied (os error 13)".into());
    let checked = check(&f).expect("not refused: nothing says it is wrong");
    assert!(checked.bpffs_unverified.is_some_and(
        |w| w.to_string() == "/proc/1/root/sys/fs/bpf: Permission denied (os error 13)"
    ));
}

#[test]
fn no_bpffs_yet_is_fine_in_the_host_mount_namespace_only() {
    let mut f = host();
    f.bpffs = Ok(Node {
        fs: nix::sys::statfs::SYSFS_MAGIC,
        dev: 20,
        ino: 9,
    });
    f.host_bpffs = HostView::Seen(f.bpffs.clone().expect("set"));
    assert_eq!(check(&f), Ok(Checked::default()));
    // Unknown: started, and said.
    f.mnt_ns = None;
    let checked = check(&f).expect("started");
    assert!(
        checked
            .bpffs_unverified
            .is_some_and(|why| why.to_string().contains("mount namespace is unreadable")),
    );
    f.mnt_ns = Some((4026532600, 4026531841));
    assert_eq!(check(&f), Err(HostError::NoBpffs));
    f.bpffs = Err("No such file or directory".into());
    assert!(matches!(check(&f), Err(HostError::BpffsUnreadable(_))));
}

/// The unit tests run on the host (in a new pid namespace the same check says no:
/// see tests/tests/host.rs).
#[test]
fn this_host_is_the_host() {
    let facts = Facts::gather(None);
    assert!(facts.pid_ns.expect("readable").is_initial());
}

#[test]
fn a_foreign_bpffs_is_named_by_its_devices() {
    let mut f = host();
    f.host_bpffs = HostView::Seen(Node {
        fs: BPF_FS_MAGIC,
        dev: nix::sys::stat::makedev(0, 99),
        ino: 1,
    });
    let e = check(&f).expect_err("another bpffs");
    assert!(
        e.to_string().starts_with(&format!(
            "{BPFFS} is a bpf file system of its own (device 0:40), not the host's (device 0:99):"
        )),
        "{e}"
    );
    f.host_bpffs = HostView::Missing;
    let e = check(&f).expect_err("no bpffs on the host");
    assert!(
        e.to_string()
            .contains("(device 0:40), not the host's (no /sys/fs/bpf)"),
        "{e}"
    );
}
