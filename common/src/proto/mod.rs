//! The control protocol between `handoffctl` and `handoffd`.
//!
//! One request per connection: the client writes one JSON document and a newline, the
//! daemon answers with one JSON document and a newline, then closes. A frame longer than
//! [`MAX_FRAME`] is refused before it is parsed.
//!
//! A promote may carry a pidfd of its target: `handoffctl promote PID` opens
//! `pidfd_open(PID)` in its own pid namespace and sends that descriptor with the request
//! (`SCM_RIGHTS`, on the `sendmsg` that carries the frame's first byte). The daemon then
//! promotes the process the pidfd names, whatever the `pid` field says: it reads the
//! process's pid in its own pid namespace from the descriptor (`Pid:` of its fdinfo), so
//! a pid typed in a container means what the caller meant, and a caller can only name a
//! process it can see. At most one descriptor, and only with a promote; anything else
//! that arrives with a request (another kind of descriptor, a thread's pidfd, a second
//! one) refuses the request. Without a descriptor the `pid` is taken in the daemon's pid
//! namespace, as before (callers on the host, older clients).

mod frame;
mod promote;

use serde::{Deserialize, Serialize};

pub use frame::{FrameError, FrameReader, MAX_FRAME, decode, encode};
pub use promote::{MAX_CHECK_TIMEOUT_MS, MAX_WATCH_MS, PromoteOptions, Release, RollbackStatus};

/// Default path of the daemon's control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/handoff/handoffd.sock";

/// What a client asks of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Make `pid` (and its descendants) the active generation of a service.
    Promote {
        /// The process to promote.
        pid: i32,
        /// The service; may be left out when the daemon runs one service.
        #[serde(default)]
        service: Option<String>,
        /// How: a health check first, a canary's weight, a watch window (absent: as
        /// the service's configuration says).
        #[serde(default, skip_serializing_if = "PromoteOptions::is_default")]
        options: PromoteOptions,
    },
    /// Make the newest draining generation active again.
    Rollback {
        /// The service; may be left out when the daemon runs one service.
        #[serde(default)]
        service: Option<String>,
    },
    /// Report services and generations.
    Status {},
    /// Read the daemon's `--config` file again and apply it (what SIGHUP does), answering
    /// with the result.
    Reload {},
}

/// The daemon's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    /// A promote or rollback took effect and the probe saw the kernel steer to it.
    Promoted(Promoted),
    /// The state of every service.
    Status(Status),
    /// The configuration file was read again and applied.
    Reloaded(Reloaded),
    /// The request was refused; nothing changed.
    Error(ErrorReply),
}

/// The outcome of a successful promote or rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promoted {
    /// The service that changed.
    pub service: String,
    /// Id of the generation that is now active.
    pub generation: u64,
    /// Its promoted pid.
    pub pid: i32,
    /// Listeners it has in the service's groups.
    pub listeners: usize,
    /// The generation that started draining, if any.
    pub draining: Option<u64>,
    /// Set when the generation is a canary: its percent of new connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// Set when `draining` stands by instead (a watch window): milliseconds left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_ms: Option<u64>,
}

/// The outcome of a successful reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    /// The configuration file that was read.
    pub file: String,
    /// The services it names, in its order.
    pub services: Vec<String>,
}

/// `status --json`: the shape DESIGN.md's CLI contract fixes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Every service of the daemon, in configuration order.
    pub services: Vec<ServiceStatus>,
    /// What the kernel offers and the modes handoffd runs in (absent from daemons that
    /// predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelStatus>,
}

/// The kernel handoffd runs on and the modes it chose from what the kernel offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelStatus {
    /// `uname -r`.
    pub release: String,
    /// How the tag pass and the listener search find a generation's sockets.
    pub tag_pass: TagPass,
    /// Whether binds are watched in handoffd's network namespace only (SO_NETNS_COOKIE,
    /// Linux >= 5.14); if not, binds in every namespace on a service port are reported.
    pub bind_filter_netns: bool,
    /// Whether the guard of the groups' programs is attached; if not, only the probes
    /// see another program replace handoff's.
    pub guard: bool,
}

/// How the tag pass and the listener search walk processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TagPass {
    /// One iterator run per process of the generation (Linux >= 6.1).
    PerProcess,
    /// One run over every process on the host (older kernels).
    WholeHost,
}

impl TagPass {
    /// The name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            TagPass::PerProcess => "per-process",
            TagPass::WholeHost => "whole-host",
        }
    }
}

impl std::fmt::Display for KernelStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "kernel: Linux {}, tag pass {}, bind filter per netns {}, guard {}",
            self.release,
            self.tag_pass.as_str(),
            yes(self.bind_filter_netns),
            if self.guard { "on" } else { "off" }
        )
    }
}

/// One service in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The service's name.
    pub name: String,
    /// Its listen addresses as configured (`127.0.0.1:8080`, `[::1]:8080`).
    pub listen: Vec<String>,
    /// Generations, oldest first.
    pub generations: Vec<GenerationStatus>,
    /// LISTEN sockets on the service's port outside its managed groups: they take
    /// traffic handoff cannot steer.
    #[serde(default)]
    pub foreign_listeners: Vec<ForeignListener>,
    /// Decisions of the kernel program, summed over the service's groups.
    #[serde(default)]
    pub steering: crate::maps::Counters,
    /// Whether the service's groups kept handoff's program, as the probes saw it.
    #[serde(default)]
    pub steering_watch: SteeringWatchStatus,
    /// Rollbacks since the daemon started, and the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollbacks: Option<RollbackStatus>,
}

/// What the probes that follow binds (and the once-a-second backstop) saw of a service's
/// groups: times its program was found missing and put back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SteeringWatchStatus {
    /// Times a probe found a group without handoff's program (another program attached,
    /// ours detached, or the group re-formed).
    pub lost: u64,
    /// Times the daemon attached its program again and a probe confirmed it.
    pub restored: u64,
    /// When steering was last found lost, in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_lost_ms: Option<u64>,
    /// When steering was last restored, in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restored_ms: Option<u64>,
    /// Lost and not restored yet (no listener of a live generation to attach through).
    #[serde(default)]
    pub lost_now: bool,
}

/// One generation in [`ServiceStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationStatus {
    /// The generation's id, unique within the service, growing.
    pub id: u64,
    /// The promoted pid.
    pub pid: i32,
    /// `active`, `draining` or `retired`.
    pub state: GenerationState,
    /// Its listeners still open in the service's groups.
    pub listeners: usize,
    /// Connections it holds: established, and queued on its listeners.
    pub connections: u64,
    /// Draining: milliseconds since the drain started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_age_ms: Option<u64>,
    /// Draining: milliseconds left before the drain timeout sends the retire signal
    /// anyway (0 once it has passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_deadline_ms: Option<u64>,
    /// What a release made of it, beyond `state`: see [`Release`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<Release>,
}

/// The life of a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GenerationState {
    /// Receives every new connection.
    Active,
    /// Receives none; keeps what it has until it retires.
    Draining,
    /// Every member has exited.
    Retired,
}

impl GenerationState {
    /// The lowercase name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            GenerationState::Active => "active",
            GenerationState::Draining => "draining",
            GenerationState::Retired => "retired",
        }
    }
}

/// A LISTEN socket on a service port that handoff does not steer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForeignListener {
    /// Its address, e.g. `127.0.0.1:8080`.
    pub addr: String,
    /// The kernel group it belongs to, in words (`v6only`, `device 1`, `uid 1000`).
    pub group: String,
    /// A process holding it, when one was found.
    pub pid: Option<i32>,
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What kind of refusal, for scripts.
    pub kind: ErrorKind,
    /// One line for the operator.
    pub message: String,
}

/// Kinds of refusal, stable for scripts. Each says what the operator can do; the
/// message with it says it for the case at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request could not be parsed or is too large: send one frame of this protocol
    /// (a `handoffctl` of the daemon's version does).
    BadRequest,
    /// The peer may not talk to this daemon: run the client as root or as handoffd's
    /// user.
    Unauthorized,
    /// No such service, or a service must be named: pass `--service` with one of the
    /// names the message lists.
    UnknownService,
    /// The pid names no live process: check the pid (in the caller's pid namespace).
    NoSuchProcess,
    /// The process (tree) has no usable listener in the service's groups: promote the
    /// process that holds the service's listeners, once it listens.
    NoListener,
    /// The process can never be a generation (init, handoffd itself or an ancestor of
    /// it, a kernel thread, a process outside handoffd's pid namespace): promote the
    /// server's own process, from where handoffd can see it.
    Excluded,
    /// A listener is in a group the service does not steer, or lacks one it must have:
    /// make the process listen on every address of the service, as its other
    /// generations do (same options, same network namespace).
    WrongGroup,
    /// A listener without SO_REUSEPORT: make the server set it before `bind`.
    NotReuseport,
    /// A socket already belongs to another generation: promote a process that opened
    /// its own listeners.
    SharedSocket,
    /// The pid is already the active generation: nothing to do.
    AlreadyActive,
    /// There is no generation to roll back to: promote a new process instead.
    NothingToRollBack,
    /// The generation named got its retire signal and is exiting, so it cannot take
    /// connections again: start a new process and promote it.
    Retiring,
    /// Every block of slots is taken by a live generation: let a draining generation
    /// retire (or stop its processes), then promote again.
    TooManyGenerations,
    /// The kernel refused an operation, or the probe did not see the new steering:
    /// steering is left as it was; the message says what the kernel did, retry once it
    /// is dealt with.
    Kernel,
    /// Another promote or rollback of the service is under way (a candidate's check may
    /// take seconds): retry once it has answered.
    Busy,
    /// The candidate failed its health check (the message names the listener and why);
    /// no client was sent to it and steering is as it was: fix the new version, or
    /// promote with a longer `--check-timeout` or `--wait`.
    CheckFailed,
    /// The configuration file was refused; the running configuration stays: fix the
    /// file at the place the message names, then reload again.
    ConfigRefused,
    /// A reload was asked of a daemon run without `--config`: restart handoffd with
    /// `--config FILE`.
    NoConfig,
    /// Anything else that went wrong inside the daemon: see handoffd's log, check
    /// `handoffctl status`, and retry.
    Internal,
    /// A kind this client does not know (a newer daemon's): the message says what
    /// happened. Never sent; it keeps an older client reading a newer daemon's refusals.
    #[serde(other)]
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_from_a_newer_daemon_is_read_as_unknown() {
        let text = r#"{"response":"error","kind":"a_kind_of_tomorrow","message":"m"}"#;
        let Ok(Response::Error(e)) = serde_json::from_str::<Response>(text) else {
            panic!("not read as an error");
        };
        assert_eq!(e.kind, ErrorKind::Unknown);
        assert_eq!(e.message, "m");
    }

    #[test]
    fn requests_round_trip() {
        for req in [
            Request::Promote {
                pid: 42,
                service: Some("web".into()),
                options: PromoteOptions::default(),
            },
            Request::Promote {
                pid: 7,
                service: None,
                options: PromoteOptions {
                    check: Some("tcp".parse().expect("tcp")),
                    check_timeout_ms: Some(500),
                    wait: true,
                    weight: Some(10),
                    watch_ms: Some(60_000),
                    no_check: false,
                },
            },
            Request::Rollback { service: None },
            Request::Status {},
            Request::Reload {},
        ] {
            let frame = encode(&req);
            assert_eq!(frame.last(), Some(&b'\n'));
            assert_eq!(decode::<Request>(&frame).expect("decodes"), req);
        }
    }

    #[test]
    fn status_has_the_contract_shape() {
        let status = Status {
            services: vec![ServiceStatus {
                name: "web".into(),
                listen: vec!["127.0.0.1:8080".into()],
                generations: vec![GenerationStatus {
                    id: 1,
                    pid: 10,
                    state: GenerationState::Draining,
                    listeners: 2,
                    connections: 3,
                    drain_age_ms: Some(1500),
                    drain_deadline_ms: Some(298_500),
                    release: Some(Release::Standby {
                        watch_left_ms: 5000,
                    }),
                }],
                foreign_listeners: vec![],
                steering: Default::default(),
                steering_watch: Default::default(),
                rollbacks: None,
            }],
            kernel: Some(KernelStatus {
                release: "6.1.0-57-amd64".into(),
                tag_pass: TagPass::WholeHost,
                bind_filter_netns: true,
                guard: false,
            }),
        };
        let v: serde_json::Value = serde_json::to_value(&status).expect("serializes");
        assert_eq!(v["kernel"]["tag_pass"], "whole-host");
        assert_eq!(v["kernel"]["release"], "6.1.0-57-amd64");
        assert_eq!(
            status.kernel.as_ref().expect("set").to_string(),
            "kernel: Linux 6.1.0-57-amd64, tag pass whole-host, bind filter per netns yes, guard off"
        );
        // A status from a daemon that predates the kernel section still decodes, and
        // one with it decodes where the section is unknown (serde ignores extra fields).
        let old: Status = decode(br#"{"services":[]}"#).expect("decodes");
        assert_eq!(old.kernel, None);
        let g = &v["services"][0]["generations"][0];
        assert_eq!(v["services"][0]["name"], "web");
        assert_eq!(v["services"][0]["listen"][0], "127.0.0.1:8080");
        assert_eq!(g["state"], "draining");
        assert_eq!(g["release"]["role"], "standby");
        assert_eq!(g["release"]["watch_left_ms"], 5000);
        assert_eq!(g["connections"], 3);
        assert_eq!(g["listeners"], 2);
        assert_eq!(g["pid"], 10);
        assert_eq!(g["id"], 1);
        assert_eq!(g["drain_age_ms"], 1500);
    }

    #[test]
    fn reload_has_its_wire_shape() {
        assert_eq!(encode(&Request::Reload {}), b"{\"request\":\"reload\"}\n");
        let r = Response::Reloaded(Reloaded {
            file: "/etc/handoff/handoffd.toml".into(),
            services: vec!["web".into(), "api".into()],
        });
        let v: serde_json::Value = serde_json::to_value(&r).expect("serializes");
        assert_eq!(v["response"], "reloaded");
        assert_eq!(v["services"][1], "api");
        assert_eq!(decode::<Response>(&encode(&r)).expect("decodes"), r);
        let refused = serde_json::to_value(ErrorKind::ConfigRefused).expect("serializes");
        assert_eq!(refused, "config_refused");
    }

    #[test]
    fn new_kinds_have_their_wire_names() {
        for (kind, name) in [
            (ErrorKind::Retiring, "retiring"),
            (ErrorKind::TooManyGenerations, "too_many_generations"),
            (ErrorKind::NothingToRollBack, "nothing_to_roll_back"),
            (ErrorKind::Excluded, "excluded"),
        ] {
            assert_eq!(serde_json::to_value(kind).expect("serializes"), name);
        }
    }

    #[test]
    fn errors_carry_a_kind() {
        let r = Response::Error(ErrorReply {
            kind: ErrorKind::NoSuchProcess,
            message: "no process with pid 4000000".into(),
        });
        let v: serde_json::Value = serde_json::to_value(&r).expect("serializes");
        assert_eq!(v["response"], "error");
        assert_eq!(v["kind"], "no_such_process");
        assert_eq!(decode::<Response>(&encode(&r)).expect("decodes"), r);
    }
}
