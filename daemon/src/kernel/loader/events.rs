//! The kernel's reports to the daemon: two rings (count-reached-zero events, which cannot
//! overflow, and rate-limited bind events), the per-CPU counters of what the bind watch
//! filtered, held back or could not write, and the watched addresses.
//!
//! The bind watch (`cgroup/post_bind4/6`, Linux >= 4.17) runs only after a bind succeeded,
//! so a flood of failing binds costs the daemon nothing. Of successful TCP binds it reports
//! those in the daemon's network namespace (`bpf_get_netns_cookie`, Linux >= 5.7 for these
//! programs), of a service address or the wildcard of its family, by the service's uid once
//! a promote made it known; at most 320 a second per watched address. The rings need
//! Linux >= 5.8.

use std::net::{IpAddr, SocketAddr};

use aya::maps::{MapData, RingBuf};
use handoff_common::maps::{
    ANY_UID, DrainEventRaw, EventKind, MAP_PORTS, MAP_STATS, MAP_WATCHED, Stat, Watch, WatchKey,
    records,
};

use super::LoaderError;
use super::drain::{DrainProgram, map_err};

/// What a ring reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEvent {
    /// The count of this tag dropped to zero.
    Zero(u32),
    /// A process of the service's uid bound a watched address.
    Bind {
        /// The port.
        port: u16,
        /// The process that bound it.
        pid: i32,
    },
    /// The rate limit began holding back bind events of this port (once per window).
    Held {
        /// The port.
        port: u16,
    },
}

impl DrainEvent {
    /// Decodes one ring buffer record.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let raw = DrainEventRaw::from_bytes(bytes)?;
        match EventKind::from_raw(raw.kind)? {
            EventKind::Zero => Some(DrainEvent::Zero(raw.value)),
            EventKind::Bind => Some(DrainEvent::Bind {
                port: u16::try_from(raw.value).ok()?,
                pid: i32::try_from(raw.pid).ok()?,
            }),
            EventKind::Held => Some(DrainEvent::Held {
                port: u16::try_from(raw.value).ok()?,
            }),
        }
    }
}

/// The two rings the kernel writes to, for the task that waits on them.
pub struct EventRings {
    /// Count-reached-zero events only: at most one unread per tag, so never full.
    pub zeros: RingBuf<MapData>,
    /// Bind events, rate-limited in the kernel.
    pub binds: RingBuf<MapData>,
}

impl std::fmt::Debug for EventRings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRings").finish_non_exhaustive()
    }
}

/// The bind watch's and the rings' counters since the programs were loaded (summed over
/// CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Zero events that did not fit their ring (never expected; recounted).
    pub lost_zeros: u64,
    /// Bind events that did not fit their ring.
    pub lost_binds: u64,
    /// Bind events over the rate limit, not written.
    pub suppressed: u64,
    /// Binds of a watched port refused by namespace, address or uid.
    pub filtered: u64,
}

impl EventStats {
    /// The total of `stat`.
    fn field(&mut self, stat: Stat) -> &mut u64 {
        match stat {
            Stat::LostZeros => &mut self.lost_zeros,
            Stat::LostBinds => &mut self.lost_binds,
            Stat::Suppressed => &mut self.suppressed,
            Stat::Filtered => &mut self.filtered,
        }
    }
}

/// The key of `addr` in the watched map.
fn key(ip: IpAddr, port: u16) -> WatchKey {
    let family = match ip {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    };
    WatchKey {
        family: family as u32,
        port: u32::from(port),
        addr: records::addr_words(ip),
    }
}

/// The keys a service listening on `addrs` is watched under: each address and the
/// wildcard of its family on the same port.
fn keys(addrs: &[SocketAddr]) -> Vec<WatchKey> {
    let mut keys = Vec::new();
    for a in addrs {
        let wildcard = match a.ip() {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        };
        for k in [key(a.ip(), a.port()), key(wildcard, a.port())] {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    keys
}

impl DrainProgram {
    /// Reports binds of `addrs` (and the wildcard of their family) from now on, by any uid
    /// until [`DrainProgram::set_owner`] names the service's.
    pub fn watch(&mut self, addrs: &[SocketAddr]) -> Result<(), LoaderError> {
        for a in addrs {
            self.ports
                .insert(u32::from(a.port()), 1, 0)
                .map_err(map_err(MAP_PORTS))?;
        }
        self.set_uids(addrs, [ANY_UID, ANY_UID])
    }

    /// Reports binds of `addrs` only by `uid` (the active generation's leader) or `user`
    /// (the service's configured user, if any).
    pub fn set_owner(
        &mut self,
        addrs: &[SocketAddr],
        uid: u32,
        user: Option<u32>,
    ) -> Result<(), LoaderError> {
        // ANY_UID as the second uid matches no process: no uid is u32::MAX ((uid_t)-1).
        self.set_uids(addrs, [uid, user.unwrap_or(ANY_UID)])
    }

    fn set_uids(&mut self, addrs: &[SocketAddr], uids: [u32; 2]) -> Result<(), LoaderError> {
        for k in keys(addrs) {
            self.watched
                .insert(k.to_bytes(), Watch::new(uids).to_bytes(), 0)
                .map_err(map_err(MAP_WATCHED))?;
        }
        Ok(())
    }

    /// The daemon took the zero event of `tag`: a later zero of it is written again.
    /// Called before the tag is counted again, so no zero after the count is missed.
    pub fn ack_zero(&mut self, tag: u32) {
        let _ = self.zero_pending.remove(&tag);
    }

    /// Every tag's zero event taken (after a loss: the daemon recounts them all).
    pub fn ack_all_zeros(&mut self) {
        let tags: Vec<u32> = self.zero_pending.keys().filter_map(Result::ok).collect();
        for t in tags {
            self.ack_zero(t);
        }
    }

    /// The counters, summed over CPUs.
    pub fn stats(&self) -> Result<EventStats, LoaderError> {
        let mut out = EventStats::default();
        for stat in Stat::ALL {
            let per_cpu = self
                .stats
                .get(&stat.index(), 0)
                .map_err(map_err(MAP_STATS))?;
            *out.field(stat) = per_cpu.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_decode() {
        let event = |kind: u32, value: u32, pid: u32| {
            DrainEventRaw {
                kind,
                value,
                pid,
                reserved: 0,
            }
            .to_bytes()
        };
        let b = event(EventKind::Zero as u32, 7, 0);
        assert_eq!(DrainEvent::parse(&b), Some(DrainEvent::Zero(7)));
        let b = event(EventKind::Bind as u32, 8080, 4242);
        assert_eq!(
            DrainEvent::parse(&b),
            Some(DrainEvent::Bind {
                port: 8080,
                pid: 4242
            })
        );
        let b = event(EventKind::Held as u32, 8080, 4242);
        assert_eq!(DrainEvent::parse(&b), Some(DrainEvent::Held { port: 8080 }));
        let b = event(9, 8080, 4242);
        assert_eq!(DrainEvent::parse(&b), None, "an unknown kind");
        let b = event(EventKind::Zero as u32, 7, 0);
        assert_eq!(DrainEvent::parse(&b[..8]), None);
    }

    #[test]
    fn watched_keys_add_the_wildcard_once() {
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.2:8080".parse().unwrap(),
            "[::1]:8080".parse().unwrap(),
        ];
        let k = keys(&addrs);
        assert_eq!(k.len(), 5, "two v4, one v6, and a wildcard of each family");
        let lo = key("127.0.0.1".parse().unwrap(), 8080);
        // The address in network byte order, as the kernel's src_ip4 holds it.
        assert_eq!(lo.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(lo.port, 8080);
        assert_eq!(lo.family, libc::AF_INET as u32);
        assert!(k.contains(&key("0.0.0.0".parse().unwrap(), 8080)));
        assert!(k.contains(&key("::".parse().unwrap(), 8080)));
    }
}
