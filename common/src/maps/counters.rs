//! The per-CPU counters the programs keep: `enum handoff_counter` (the steering
//! program's decisions) and `enum handoff_stat` (the drain object's events), each mirrored
//! by ONE Rust enum that gives a counter's map index, its C name and its label.

/// `enum handoff_counter`: what the steering program decided, one per-CPU counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Counter {
    /// The hashed pick in the active generation took the connection.
    Active = 0,
    /// Another listener of the active generation took it (the hashed one had closed).
    ActiveRetry = 1,
    /// The active generation had no listener left; the one it falls back to took it.
    Fallback = 2,
    /// No listener of either generation: the kernel's hash over the group decided.
    KernelHash = 3,
    /// Decisions for requests migrated off a closing listener (also counted above).
    Migrated = 4,
    /// Probe connections recognised and dropped.
    Probe = 5,
    /// A canary's listener took the connection (its share of new connections).
    Canary = 6,
    /// Health-check connections sent to the listener they named.
    Check = 7,
}

impl Counter {
    /// Every counter, in map order.
    pub const ALL: [Counter; 8] = [
        Counter::Active,
        Counter::ActiveRetry,
        Counter::Fallback,
        Counter::KernelHash,
        Counter::Migrated,
        Counter::Probe,
        Counter::Canary,
        Counter::Check,
    ];

    /// The counter's index in the `counters` map.
    pub fn index(self) -> u32 {
        self as u32
    }

    /// The label in metrics (`target`), and the field of [`Counters`] in status output.
    pub fn label(self) -> &'static str {
        match self {
            Counter::Active => "active",
            Counter::ActiveRetry => "active_retry",
            Counter::Fallback => "fallback",
            Counter::KernelHash => "kernel_hash",
            Counter::Migrated => "migrated",
            Counter::Probe => "probe",
            Counter::Canary => "canary",
            Counter::Check => "check",
        }
    }

    /// The name of the enumerator in `handoff.h`.
    pub fn c_name(self) -> &'static str {
        match self {
            Counter::Active => "HANDOFF_CTR_ACTIVE",
            Counter::ActiveRetry => "HANDOFF_CTR_ACTIVE_RETRY",
            Counter::Fallback => "HANDOFF_CTR_FALLBACK",
            Counter::KernelHash => "HANDOFF_CTR_KERNEL_HASH",
            Counter::Migrated => "HANDOFF_CTR_MIGRATED",
            Counter::Probe => "HANDOFF_CTR_PROBE",
            Counter::Canary => "HANDOFF_CTR_CANARY",
            Counter::Check => "HANDOFF_CTR_CHECK",
        }
    }
}

/// Totals of the per-CPU decision counters of one group, or summed over groups. The
/// field names are the counters' labels ([`Counter::label`]): status output shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// See [`Counter::Active`].
    pub active: u64,
    /// See [`Counter::ActiveRetry`].
    pub active_retry: u64,
    /// See [`Counter::Fallback`].
    pub fallback: u64,
    /// See [`Counter::KernelHash`].
    pub kernel_hash: u64,
    /// See [`Counter::Migrated`].
    pub migrated: u64,
    /// See [`Counter::Probe`].
    pub probe: u64,
    /// See [`Counter::Canary`].
    #[serde(default)]
    pub canary: u64,
    /// See [`Counter::Check`].
    #[serde(default)]
    pub check: u64,
}

impl Counters {
    /// The total of `which`.
    pub fn get(&self, which: Counter) -> u64 {
        let mut copy = *self;
        *copy.field(which)
    }

    fn field(&mut self, which: Counter) -> &mut u64 {
        match which {
            Counter::Active => &mut self.active,
            Counter::ActiveRetry => &mut self.active_retry,
            Counter::Fallback => &mut self.fallback,
            Counter::KernelHash => &mut self.kernel_hash,
            Counter::Migrated => &mut self.migrated,
            Counter::Probe => &mut self.probe,
            Counter::Canary => &mut self.canary,
            Counter::Check => &mut self.check,
        }
    }

    /// Adds `n` to the total of `which`.
    pub fn add(&mut self, which: Counter, n: u64) {
        *self.field(which) += n;
    }

    /// Adds every total of `other`.
    pub fn merge(&mut self, other: &Counters) {
        for c in Counter::ALL {
            self.add(c, other.get(c));
        }
    }
}

/// `enum handoff_stat`: the drain object's per-CPU event counters (the `stats` map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stat {
    /// A zero event did not fit its ring.
    LostZeros = 0,
    /// A bind event did not fit its ring.
    LostBinds = 1,
    /// A bind event over the rate limit, not written.
    Suppressed = 2,
    /// A bind of a watched port from another namespace, address or uid.
    Filtered = 3,
}

impl Stat {
    /// Every counter, in map order (`HANDOFF_STATS` of them).
    pub const ALL: [Stat; 4] = [
        Stat::LostZeros,
        Stat::LostBinds,
        Stat::Suppressed,
        Stat::Filtered,
    ];

    /// The counter's index in the `stats` map.
    pub fn index(self) -> u32 {
        self as u32
    }

    /// The name of the enumerator in `drain.h`.
    pub fn c_name(self) -> &'static str {
        match self {
            Stat::LostZeros => "HANDOFF_STAT_LOST_ZEROS",
            Stat::LostBinds => "HANDOFF_STAT_LOST_BINDS",
            Stat::Suppressed => "HANDOFF_STAT_SUPPRESSED",
            Stat::Filtered => "HANDOFF_STAT_FILTERED",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_field_per_counter() {
        let mut c = Counters::default();
        for (n, which) in (1u64..).zip(Counter::ALL) {
            c.add(which, n);
        }
        let json = serde_json::to_value(c).unwrap();
        for (n, which) in (1u64..).zip(Counter::ALL) {
            assert_eq!(c.get(which), n);
            // The status output's field is the counter's label.
            assert_eq!(json[which.label()], n, "{which:?}");
        }
        let mut sum = c;
        sum.merge(&c);
        assert_eq!(sum.get(Counter::Probe), 12);
        assert_eq!(sum.get(Counter::Check), 16);
    }
}
