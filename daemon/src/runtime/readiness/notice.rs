//! What one readiness datagram says, and who sent it.

use crate::discover::members::{Member, MemberError, PidfdError, Uids};
use crate::sys::{Credentials, Datagram};

use super::{Identify, MAX_DATAGRAM, ReadinessSocket};

/// Longest `STATUS=` text kept, in characters.
const MAX_STATUS: usize = 256;

/// One message on the readiness socket.
#[derive(Debug)]
pub struct Notice {
    /// The process that sent it, identified by a pidfd and running as the service's uid;
    /// none when the message is ignored (see [`Notice::ignored`]).
    pub sender: Option<Member>,
    /// Why the message is ignored, when it is.
    pub ignored: Option<Ignored>,
    /// The sender's pid (from its credentials; 0 if it has none in handoffd's pid
    /// namespace).
    pub pid: i32,
    /// The sender's uid, from its credentials.
    pub uid: u32,
    /// The sender's gid, from its credentials.
    pub gid: u32,
    /// A line of the message is `READY=1`.
    pub ready: bool,
    /// The text of its last `STATUS=` line (control characters replaced, at most 256
    /// characters).
    pub status: Option<String>,
}

impl Notice {
    /// The sender, if the message is a `READY=1` that counts.
    pub fn ready_sender(&self) -> Option<&Member> {
        self.sender.as_ref().filter(|_| self.ready)
    }
}

/// Why a message does not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    /// Longer than [`MAX_DATAGRAM`]: cut off, not read nor forwarded.
    #[error("a datagram of {len} bytes, more than the {MAX_DATAGRAM} a notify message may have")]
    Oversized {
        /// Its length.
        len: usize,
    },
    /// No credentials came with it (never with `SO_PASSCRED`).
    #[error("no sender credentials came with it")]
    NoCredentials,
    /// The kernel attached no pidfd of the sender.
    #[error("the kernel gave no pidfd of its sender: {why}")]
    NoPidfd {
        /// The error it gave instead of one, or that it gave none.
        why: String,
    },
    /// The sender exited before it could be identified.
    #[error("its sender (pid {pid}) exited before it could be identified")]
    Exited {
        /// Its pid.
        pid: i32,
    },
    /// The pid names a process that started after the datagram was received: the sender
    /// exited and its pid was reused.
    #[error(
        "pid {pid} names a process started after the message was received: its sender exited and the pid was reused"
    )]
    PidReused {
        /// The pid.
        pid: i32,
    },
    /// The sender may never be a member, or could not be read.
    #[error("its sender (pid {pid}) cannot be taken: {why}")]
    Unidentified {
        /// Its pid.
        pid: i32,
        /// Why.
        why: String,
    },
    /// The sender runs as another uid than the service's.
    #[error("its sender (pid {pid}) runs as uids {}/{}/{} (real/effective/saved), not all the service's uid {want}", uids.real, uids.effective, uids.saved)]
    WrongUid {
        /// Its pid.
        pid: i32,
        /// Its uids.
        uids: Uids,
        /// The service's uid.
        want: u32,
    },
}

/// The notice of `datagram`, whose bytes are in `buf`, received at `received` (clock
/// ticks after boot); forwards the message first.
pub(super) fn read(
    socket: &ReadinessSocket,
    mut datagram: Datagram,
    buf: &[u8],
    received: Option<u64>,
) -> Notice {
    let creds = datagram.credentials;
    let Credentials { pid, uid, gid } = creds.unwrap_or(Credentials {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    });
    let mut notice = Notice {
        sender: None,
        ignored: None,
        pid,
        uid,
        gid,
        ready: false,
        status: None,
    };
    if datagram.len > MAX_DATAGRAM {
        socket.log_oversized(pid, datagram.len);
        notice.ignored = Some(Ignored::Oversized { len: datagram.len });
        return notice;
    }
    let bytes = buf.get(..datagram.len).unwrap_or_default();
    let Some(creds) = creds else {
        notice.ignored = Some(Ignored::NoCredentials);
        return notice;
    };
    if datagram.descriptors > 0 {
        tracing::debug!(
            pid,
            descriptors = datagram.descriptors,
            "descriptors sent with a readiness message closed: they are not kept nor forwarded"
        );
    }
    socket.forward(bytes, creds);
    (notice.ready, notice.status) = parse(bytes);
    let sender = match socket.identify {
        Identify::Pidfd => by_pidfd(&mut datagram, pid),
        Identify::Credentials => by_pid(pid, received),
    };
    match sender.and_then(|m| of_uid(m, socket.uid)) {
        Ok(member) => notice.sender = Some(member),
        Err(why) => notice.ignored = Some(why),
    }
    notice
}

/// `READY=1` among the lines of `bytes`, and the last `STATUS=`.
pub(super) fn parse(bytes: &[u8]) -> (bool, Option<String>) {
    let mut ready = false;
    let mut status = None;
    for line in bytes.split(|&b| b == b'\n') {
        if line == b"READY=1" {
            ready = true;
        } else if let Some(text) = line.strip_prefix(b"STATUS=") {
            let text = String::from_utf8_lossy(text);
            status = Some(
                text.chars()
                    .take(MAX_STATUS)
                    .map(|c| if c.is_control() { '\u{fffd}' } else { c })
                    .collect(),
            );
        }
    }
    (ready, status)
}

/// The sender named by the datagram's `SCM_PIDFD`.
fn by_pidfd(datagram: &mut Datagram, pid: i32) -> Result<Member, Ignored> {
    let pidfd = match datagram.pidfd.take() {
        Some(Ok(fd)) => fd,
        Some(Err(errno)) if errno == libc::ESRCH => return Err(Ignored::Exited { pid }),
        Some(Err(errno)) => {
            let why = std::io::Error::from_raw_os_error(errno).to_string();
            return Err(Ignored::NoPidfd { why });
        }
        None => {
            let why = "no SCM_PIDFD came with the message".into();
            return Err(Ignored::NoPidfd { why });
        }
    };
    Member::from_pidfd(pidfd).map_err(|e| match e {
        PidfdError::Exited => Ignored::Exited { pid },
        PidfdError::Member(e) => member_error(pid, e),
        e => Ignored::Unidentified {
            pid,
            why: e.to_string(),
        },
    })
}

/// The sender `pid` of the credentials, if the process it names now started no later
/// than `received`.
pub(super) fn by_pid(pid: i32, received: Option<u64>) -> Result<Member, Ignored> {
    let member = Member::open(pid).map_err(|e| member_error(pid, e))?;
    match received {
        Some(received) if member.start_time <= received => Ok(member),
        Some(_) => Err(Ignored::PidReused { pid }),
        None => Err(Ignored::Unidentified {
            pid,
            why: "CLOCK_BOOTTIME could not be read".into(),
        }),
    }
}

fn member_error(pid: i32, e: MemberError) -> Ignored {
    match e {
        MemberError::NoSuchProcess { .. } => Ignored::Exited { pid },
        e => Ignored::Unidentified {
            pid,
            why: e.to_string(),
        },
    }
}

/// `member`, if its real, effective and saved uids are all `uid`.
fn of_uid(member: Member, uid: u32) -> Result<Member, Ignored> {
    if member.uids.within(&[uid]) {
        Ok(member)
    } else {
        Err(Ignored::WrongUid {
            pid: member.pid,
            uids: member.uids,
            want: uid,
        })
    }
}

/// `CLOCK_BOOTTIME` in clock ticks, truncated as /proc's start times are.
pub(super) fn boottime_ticks() -> Option<u64> {
    use nix::time::{ClockId, clock_gettime};
    use nix::unistd::{SysconfVar, sysconf};
    let now = clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?;
    let hz = u64::try_from(sysconf(SysconfVar::CLK_TCK).ok()??).ok()?;
    let ns_per_tick = 1_000_000_000u64.checked_div(hz)?;
    let ns = u64::try_from(now.tv_sec())
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(now.tv_nsec()).ok()?)?;
    ns.checked_div(ns_per_tick)
}
