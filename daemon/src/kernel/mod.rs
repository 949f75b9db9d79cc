//! What the running kernel offers handoffd, and the one line that says why it cannot run
//! on a kernel that lacks something it needs.
//!
//! Features are found by trying them (loading the very programs handoffd runs, creating
//! the map types), never by the kernel's version number: distribution kernels backport.
//! The minimum versions below only tell the operator what to upgrade to. The probing
//! itself is in [`crate::kernel::loader::features`]; this module is what it concludes, pure.

pub mod check;
pub mod detach;
pub mod host;
pub mod loader;
pub mod probe;

use std::fmt;

/// A kernel feature handoffd needs (each with the mainline release that brought it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    /// `/sys/kernel/btf/vmlinux`: CO-RE relocations and the iterators' attach points.
    Btf,
    /// The `sk_reuseport` program type and `REUSEPORT_SOCKARRAY`.
    SkReuseport,
    /// `BPF_MAP_TYPE_SK_STORAGE`: the drain tag of each socket.
    SkStorage,
    /// `bpf_get_netns_cookie` in cgroup sock programs (the bind watch).
    NetnsCookieHelper,
    /// `BPF_MAP_TYPE_RINGBUF`: the zero and bind events.
    RingBuf,
    /// `iter/task` and `iter/task_file`: the tag pass and the listener search.
    Iterators,
    /// `cgroup/sock_release`: the countdown of a drain.
    SockRelease,
    /// `cgroup/post_bind4` and `post_bind6`: the bind watch.
    PostBind,
    /// `bpf_sock_from_file` in iterators: the tag pass finds sockets behind fds.
    SockFromFile,
    /// `bpf_sk_storage_get` in tracing programs (the tag pass).
    SkStorageInTracing,
    /// `ctx->migrating_sk` (`BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`): queued connections
    /// move to the new generation instead of being reset.
    MigratingSk,
}

impl Feature {
    /// How the refusal names it.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Btf => "kernel BTF at /sys/kernel/btf/vmlinux",
            Feature::SkReuseport => "sk_reuseport programs",
            Feature::SkStorage => "socket storage maps",
            Feature::NetnsCookieHelper => "bpf_get_netns_cookie in cgroup sock programs",
            Feature::RingBuf => "BPF ring buffers",
            Feature::Iterators => "BPF task and task_file iterators",
            Feature::SockRelease => "cgroup sock_release programs",
            Feature::PostBind => "cgroup post_bind programs",
            Feature::SockFromFile => "bpf_sock_from_file",
            Feature::SkStorageInTracing => "socket storage in tracing programs",
            Feature::MigratingSk => "migrating_sk in sk_reuseport programs",
        }
    }

    /// The mainline release that brought it.
    pub fn since(self) -> &'static str {
        match self {
            Feature::Btf => "5.4",
            Feature::SkReuseport => "4.19",
            Feature::SkStorage => "5.2",
            Feature::NetnsCookieHelper => "5.7",
            Feature::RingBuf => "5.8",
            Feature::Iterators => "5.8",
            Feature::SockRelease => "5.9",
            Feature::PostBind => "4.17",
            Feature::SockFromFile => "5.11",
            Feature::SkStorageInTracing => "5.11",
            Feature::MigratingSk => "5.14",
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (Linux >= {})", self.name(), self.since())
    }
}

/// The kind of program that failed to load, which decides what a verifier message means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramKind {
    /// An `iter/task` or `iter/task_file` program.
    Iterator,
    /// `cgroup/sock_release`.
    SockRelease,
    /// `cgroup/post_bind4` or `post_bind6`.
    PostBind,
    /// The steering program (`sk_reuseport/migrate`).
    Steering,
}

/// How a program failed to load.
#[derive(Debug, Clone, Copy)]
pub enum Failure<'a> {
    /// `BPF_PROG_LOAD` failed with `errno` and the verifier said `log` (maybe nothing).
    Load {
        /// The error number.
        errno: Option<i32>,
        /// The verifier's log.
        log: &'a str,
    },
    /// The kernel's BTF has no attach point for the iterator (no `bpf_iter_task_file`).
    NoIterTarget,
}

/// The helpers handoff's programs call that a kernel may lack: helper id -> feature.
const HELPERS: &[(u32, Feature)] = &[
    (107, Feature::SkStorageInTracing), // bpf_sk_storage_get
    (108, Feature::SkStorageInTracing), // bpf_sk_storage_delete
    (122, Feature::NetnsCookieHelper),  // bpf_get_netns_cookie
    (126, Feature::Iterators),          // bpf_seq_printf
    (127, Feature::Iterators),          // bpf_seq_write
    (130, Feature::RingBuf),            // bpf_ringbuf_output
    (131, Feature::RingBuf),            // bpf_ringbuf_reserve
    (132, Feature::RingBuf),            // bpf_ringbuf_submit
    (133, Feature::RingBuf),            // bpf_ringbuf_discard
    (162, Feature::SockFromFile),       // bpf_sock_from_file
];

/// What a program's load failure says the kernel lacks; `None` when it says nothing
/// this function knows (the refusal then names the program, not a feature).
///
/// Verifier messages: an unknown helper is `invalid func unknown#162` (an id past the
/// kernel's last helper) or `unknown func bpf_sock_from_file#162` (known, not offered to
/// this program type), newer kernels also say `program of this type cannot use helper
/// bpf_x#N`; a context field the kernel does not have is `invalid bpf_context access`.
/// A program type or attach type the kernel does not know fails with EINVAL before the
/// verifier runs: an empty log.
pub fn classify(kind: ProgramKind, failure: Failure<'_>) -> Option<Feature> {
    let (errno, log) = match failure {
        Failure::NoIterTarget => return Some(Feature::Iterators),
        Failure::Load { errno, log } => (errno, log),
    };
    if let Some(id) = unknown_helper(log) {
        return HELPERS
            .iter()
            .find(|(h, _)| *h == id)
            .map(|&(_, feature)| match (feature, kind) {
                // Socket storage from cgroup sock programs came with the map (5.2).
                (Feature::SkStorageInTracing, ProgramKind::SockRelease | ProgramKind::PostBind) => {
                    Feature::SkStorage
                }
                (feature, _) => feature,
            });
    }
    match kind {
        ProgramKind::Steering if log.contains("invalid bpf_context access") => {
            Some(Feature::MigratingSk)
        }
        ProgramKind::SockRelease if log.trim().is_empty() && errno == Some(libc::EINVAL) => {
            Some(Feature::SockRelease)
        }
        ProgramKind::PostBind if log.trim().is_empty() && errno == Some(libc::EINVAL) => {
            Some(Feature::PostBind)
        }
        _ => None,
    }
}

/// The id of the helper a verifier log calls unknown, if it does.
fn unknown_helper(log: &str) -> Option<u32> {
    const MARKS: [&str; 3] = [
        "invalid func ",
        "unknown func ",
        "program of this type cannot use helper ",
    ];
    log.lines().find_map(|line| {
        let at = MARKS
            .iter()
            .find_map(|m| line.find(m).map(|i| i + m.len()))?;
        let rest = &line[at..];
        let hash = rest.find('#')?;
        let digits: String = rest[hash + 1..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    })
}

/// Why handoffd cannot run on this kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// It lacks features handoffd needs.
    #[error(
        "this kernel (Linux {release}) lacks {}: handoffd cannot run on it",
        list(features)
    )]
    Lacks {
        /// `uname -r`.
        release: String,
        /// What it lacks, each once, in a fixed order.
        features: Vec<Feature>,
    },
    /// The verifier refused a program for a reason not recognised as a missing feature.
    #[error(
        "this kernel (Linux {release}) refused program {program} (run with RUST_LOG=debug for the verifier's log)"
    )]
    Refused {
        /// `uname -r`.
        release: String,
        /// The program's name.
        program: String,
    },
}

fn list(features: &[Feature]) -> String {
    features
        .iter()
        .map(Feature::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The running kernel's release (`uname -r`), or `unknown`.
pub fn release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether `HANDOFF_FORCE_WHOLE_HOST` asks for the whole-host walk (set, not empty, not
/// `0`): tests take the path of kernels before 6.1 on a newer one.
pub fn force_whole_host(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Debian's 5.10 says of the tag pass (qemu, 2026-11-30), abridged.
    const LOG_5_10_TAG: &str = "func#0 @0\n0: R1=ctx(id=0,off=0,imm=0) R10=fp0\n; struct file *file = ctx->file;\n0: (79) r7 = *(u64 *)(r1 +24)\n...\n23: (85) call unknown#162\ninvalid func unknown#162\nprocessed 24 insns (limit 1000000) max_states_per_insn 0 total_states 2 peak_states 2 mark_read 1\n";

    #[test]
    fn debian_5_10_is_refused_by_name() {
        let load = |log| Failure::Load {
            errno: Some(libc::EINVAL),
            log,
        };
        assert_eq!(
            classify(ProgramKind::Iterator, load(LOG_5_10_TAG)),
            Some(Feature::SockFromFile)
        );
        let steer = "0: R1=ctx(id=0,off=0,imm=0) R10=fp0\n; if (!md->migrating_sk)\n0: (79) r2 = *(u64 *)(r1 +48)\ninvalid bpf_context access off=48 size=8\nprocessed 1 insns\n";
        assert_eq!(
            classify(ProgramKind::Steering, load(steer)),
            Some(Feature::MigratingSk)
        );
        let e = KernelError::Lacks {
            release: "5.10.0-46-amd64".into(),
            features: vec![Feature::SockFromFile, Feature::MigratingSk],
        };
        let line = format!("Error: {e}");
        println!("{line}");
        assert_eq!(
            line,
            "Error: this kernel (Linux 5.10.0-46-amd64) lacks bpf_sock_from_file (Linux >= 5.11), migrating_sk in sk_reuseport programs (Linux >= 5.14): handoffd cannot run on it"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn helper_messages_of_every_form_are_read() {
        let load = |log| Failure::Load { errno: None, log };
        for log in [
            "invalid func unknown#131\n",
            "unknown func bpf_ringbuf_reserve#131\n",
            "program of this type cannot use helper bpf_ringbuf_reserve#131\n",
        ] {
            assert_eq!(
                classify(ProgramKind::SockRelease, load(log)),
                Some(Feature::RingBuf),
                "{log}"
            );
        }
        assert_eq!(
            classify(
                ProgramKind::Iterator,
                load("unknown func bpf_sk_storage_get#107")
            ),
            Some(Feature::SkStorageInTracing)
        );
        assert_eq!(
            classify(
                ProgramKind::SockRelease,
                load("unknown func bpf_sk_storage_get#107")
            ),
            Some(Feature::SkStorage)
        );
        // A helper this table does not know, or another verifier complaint: unclassified.
        assert_eq!(
            classify(ProgramKind::Iterator, load("invalid func unknown#999")),
            None
        );
        assert_eq!(
            classify(
                ProgramKind::Iterator,
                load("R1 invalid mem access 'scalar'")
            ),
            None
        );
        // A context access is only migrating_sk's in the steering program.
        assert_eq!(
            classify(
                ProgramKind::Iterator,
                load("invalid bpf_context access off=8")
            ),
            None
        );
    }

    #[test]
    fn unknown_attach_types_and_iterators_are_named() {
        let einval = Failure::Load {
            errno: Some(libc::EINVAL),
            log: "",
        };
        assert_eq!(
            classify(ProgramKind::SockRelease, einval),
            Some(Feature::SockRelease)
        );
        assert_eq!(
            classify(ProgramKind::PostBind, einval),
            Some(Feature::PostBind)
        );
        assert_eq!(classify(ProgramKind::Steering, einval), None);
        let eperm = Failure::Load {
            errno: Some(libc::EPERM),
            log: "",
        };
        assert_eq!(classify(ProgramKind::SockRelease, eperm), None);
        assert_eq!(
            classify(ProgramKind::Iterator, Failure::NoIterTarget),
            Some(Feature::Iterators)
        );
    }

    #[test]
    fn an_unclassified_refusal_is_one_line_too() {
        let e = KernelError::Refused {
            release: "5.15.0-1-amd64".into(),
            program: "handoff_tag".into(),
        };
        assert_eq!(
            e.to_string(),
            "this kernel (Linux 5.15.0-1-amd64) refused program handoff_tag (run with RUST_LOG=debug for the verifier's log)"
        );
    }

    #[test]
    fn the_forcing_variable() {
        use std::ffi::OsStr;
        assert!(force_whole_host(Some(OsStr::new("1"))));
        assert!(!force_whole_host(Some(OsStr::new("0"))));
        assert!(!force_whole_host(Some(OsStr::new(""))));
        assert!(!force_whole_host(None));
    }
}
