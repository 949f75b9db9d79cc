//! The steering record of the previous release, read once to migrate its pinned groups.

use super::SteerRecord;

/// The record of handoff 0.x before canaries (`struct handoff_record` of 16 bytes:
/// active first and length, previous first and length), as groups pinned by an older
/// daemon hold it: read once, to move such a group to the current layout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LegacyRecord {
    /// First slot of the active generation's block.
    pub active_first: u32,
    /// Its listeners.
    pub active_len: u32,
    /// First slot of the previous generation's block.
    pub prev_first: u32,
    /// Its listeners.
    pub prev_len: u32,
}

impl LegacyRecord {
    /// Size of the old record.
    pub const SIZE: usize = 16;

    /// Decodes the old record (native byte order); `None` when `bytes` is too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let word = |i: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(
                bytes.get(i * 4..i * 4 + 4)?.try_into().ok()?,
            ))
        };
        Some(Self {
            active_first: word(0)?,
            active_len: word(1)?,
            prev_first: word(2)?,
            prev_len: word(3)?,
        })
    }

    /// The same steering in the current layout (no canary).
    pub fn upgrade(self) -> SteerRecord {
        SteerRecord {
            active_first: self.active_first,
            active_len: self.active_len,
            prev_first: self.prev_first,
            prev_len: self.prev_len,
            ..SteerRecord::default()
        }
    }
}
