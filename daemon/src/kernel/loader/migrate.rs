//! Groups pinned by handoff before canaries (a 16-byte `records` value, a 4-byte `probes`
//! value, 6 counters) are moved to the current layout without dropping a connection:
//!
//! 1. the layout is read from the pinned maps' info (aya's typed maps refuse the old
//!    sizes outright);
//! 2. a fresh steering program is loaded whose `socks` map is the group's own (the kernel
//!    keeps a socket in one sockarray at most, so the listeners stay where they are, at
//!    the same slots), its other maps new, the old record in force upgraded into the same
//!    ring entry; its program and maps are pinned in a staging directory ([`Pinned`]);
//! 3. the runtime attaches it through any listener of the group: the kernel swaps the
//!    group's program in one store, so no SYN finds the group without one;
//! 4. [`Staged::commit`] renames the staged pins over the old ones, the program's first;
//!    the old program, detached and unpinned, is freed with its maps.
//!
//! An upgrade cut short leaves the staging directory, removed on the next open; its old
//! maps, or any mix of renamed pins, are upgraded again from the record in force (read
//! at the same entry of either ring, both programs steer alike). Until the new program is
//! attached, the old one keeps steering ([`Staged::abandon`] leaves it so).

use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData};
use handoff_common::maps::{
    Counter, LegacyRecord, MAP_COUNTERS, MAP_CURRENT, MAP_PROBES, MAP_RECORDS, MAP_SOCKS, PROGRAM,
    ProbeValue, RECORDS, SteerRecord,
};

use super::{GroupProgram, LoaderError};

/// Where an upgrade stages its pins, inside the group's pin directory.
const STAGING: &str = "next";

/// The `probes` value of the previous layout: the chosen slot alone.
const LEGACY_PROBE_SIZE: u32 = 4;

/// The counters of the previous layout.
const LEGACY_COUNTERS: u32 = 6;

/// The pins renamed into place by [`Staged::commit`], the program first: a pinned program
/// always reads the maps pinned beside it once it is there (a re-attach uses it).
const STAGED: [&str; 5] = [PROGRAM, MAP_RECORDS, MAP_CURRENT, MAP_COUNTERS, MAP_PROBES];

/// A group's pins as [`open`] found them.
#[derive(Debug)]
pub enum Pinned {
    /// The current layout, taken up as it is.
    Current(GroupProgram),
    /// The previous layout: a fresh program steering as the old one does (its record
    /// upgraded, its listeners in the same sockarray), not attached yet; once it is, its
    /// staged pins replace the old ones.
    Previous(GroupProgram, Staged),
}

/// The staged pins of an upgrade.
#[derive(Debug)]
#[must_use = "an upgrade's staged pins are committed or abandoned"]
pub struct Staged {
    /// The group's pin directory.
    dir: PathBuf,
}

/// Opens the pins of a group: taken up as they are in the current layout, a fresh
/// program prepared in the previous one (see the module's steps).
pub fn open(dir: &Path) -> Result<Pinned, LoaderError> {
    let staged = Staged {
        dir: dir.to_path_buf(),
    };
    // An upgrade cut short: its staged pins were never attached, or are stale.
    staged.remove()?;
    if !previous_layout(dir)? {
        return Ok(Pinned::Current(GroupProgram::from_pins(dir)?));
    }
    let (index, record) = record_in_force(dir)?;
    let prepared = GroupProgram::beside(&dir.join(MAP_SOCKS), &staged.staging())
        .and_then(|mut p| p.publish_at(index, record).map(|()| p));
    match prepared {
        Ok(program) => Ok(Pinned::Previous(program, staged)),
        Err(e) => {
            staged.abandon();
            Err(e)
        }
    }
}

impl Staged {
    fn staging(&self) -> PathBuf {
        self.dir.join(STAGING)
    }

    fn remove(&self) -> Result<(), LoaderError> {
        match std::fs::remove_dir_all(self.staging()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LoaderError::Io {
                op: "removing",
                path: self.staging(),
                source,
            }),
        }
    }

    /// Once the new program is attached: its pins replace the old ones (the old program
    /// and maps are freed when the last reference goes), the staging directory goes.
    pub fn commit(self) -> Result<(), LoaderError> {
        for name in STAGED {
            let (from, to) = (self.staging().join(name), self.dir.join(name));
            std::fs::rename(&from, &to).map_err(|source| LoaderError::Io {
                op: "renaming",
                path: from,
                source,
            })?;
        }
        std::fs::remove_dir(self.staging()).map_err(|source| LoaderError::Io {
            op: "removing",
            path: self.staging(),
            source,
        })
    }

    /// The new program was not attached: its pins go (the program and its maps with the
    /// last descriptor), the old program keeps steering.
    pub fn abandon(self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "the staged pins of an upgrade could not be removed");
        }
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoaderError {
    move |source| LoaderError::Map { name, source }
}

fn pinned(dir: &Path, name: &'static str) -> Result<MapData, LoaderError> {
    MapData::from_pin(dir.join(name)).map_err(map_err(name))
}

/// Whether the group's maps are (even in part: an upgrade cut short) of the previous
/// layout; an error for shapes of neither.
fn previous_layout(dir: &Path) -> Result<bool, LoaderError> {
    let info = |name| pinned(dir, name)?.info().map_err(map_err(name));
    let records = info(MAP_RECORDS)?.value_size();
    let probes = info(MAP_PROBES)?.value_size();
    let counters = info(MAP_COUNTERS)?.max_entries();
    let all = u32::try_from(Counter::ALL.len()).unwrap_or(u32::MAX);
    let record_now = u32::try_from(SteerRecord::SIZE).unwrap_or(0);
    let record_then = u32::try_from(LegacyRecord::SIZE).unwrap_or(0);
    let probe_now = u32::try_from(ProbeValue::SIZE).unwrap_or(0);
    if records == record_now && probes == probe_now && counters == all {
        return Ok(false);
    }
    let known = [record_now, record_then].contains(&records)
        && [probe_now, LEGACY_PROBE_SIZE].contains(&probes)
        && [all, LEGACY_COUNTERS].contains(&counters);
    if known {
        Ok(true)
    } else {
        Err(LoaderError::MissingMap(MAP_RECORDS))
    }
}

/// The ring entry in force and its record, in the current layout (from a ring of either).
fn record_in_force(dir: &Path) -> Result<(u32, SteerRecord), LoaderError> {
    let current = Map::from_map_data(pinned(dir, MAP_CURRENT)?).map_err(map_err(MAP_CURRENT))?;
    let current: Array<MapData, u32> = Array::try_from(current).map_err(map_err(MAP_CURRENT))?;
    let index = current.get(&0, 0).map_err(map_err(MAP_CURRENT))? % RECORDS;
    let records = Map::from_map_data(pinned(dir, MAP_RECORDS)?).map_err(map_err(MAP_RECORDS))?;
    let size = match &records {
        Map::Array(d) => d.info().map_err(map_err(MAP_RECORDS))?.value_size(),
        _ => return Err(LoaderError::MissingMap(MAP_RECORDS)),
    };
    let record = if size == u32::try_from(LegacyRecord::SIZE).unwrap_or(0) {
        let ring: Array<MapData, [u8; LegacyRecord::SIZE]> =
            Array::try_from(records).map_err(map_err(MAP_RECORDS))?;
        let bytes = ring.get(&index, 0).map_err(map_err(MAP_RECORDS))?;
        LegacyRecord::from_bytes(&bytes).map(LegacyRecord::upgrade)
    } else {
        let ring: Array<MapData, [u8; SteerRecord::SIZE]> =
            Array::try_from(records).map_err(map_err(MAP_RECORDS))?;
        let bytes = ring.get(&index, 0).map_err(map_err(MAP_RECORDS))?;
        SteerRecord::from_bytes(&bytes)
    };
    Ok((index, record.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use aya::programs::SkReuseport;
    use handoff_common::maps::MAP_SOCKS;

    use super::*;

    /// The previous release's steering object (see tests/fixtures/README.md).
    const V1: &[u8] = include_bytes!("../../../../tests/fixtures/handoff-v1.bpf.o");

    const OLD: LegacyRecord = LegacyRecord {
        active_first: 128,
        active_len: 2,
        prev_first: 64,
        prev_len: 3,
    };

    /// Pins a group of the previous layout in `dir`, its record [`OLD`] in force at
    /// ring entry 3 (nothing attached, no listener).
    fn pin_v1(dir: &Path) {
        std::fs::create_dir_all(dir).expect("a pin directory");
        let mut ebpf = aya::EbpfLoader::new().btf(None).load(V1).expect("v1 loads");
        let bytes: Vec<u8> = [
            OLD.active_first,
            OLD.active_len,
            OLD.prev_first,
            OLD.prev_len,
        ]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
        let bytes: [u8; LegacyRecord::SIZE] = bytes.try_into().expect("16 bytes");
        let mut records: Array<&mut MapData, [u8; LegacyRecord::SIZE]> =
            Array::try_from(ebpf.map_mut(MAP_RECORDS).expect("records")).expect("16 bytes");
        records.set(3, bytes, 0).expect("a record");
        let mut current: Array<&mut MapData, u32> =
            Array::try_from(ebpf.map_mut(MAP_CURRENT).expect("current")).expect("u32");
        current.set(0, 3, 0).expect("the index");
        for name in [
            MAP_SOCKS,
            MAP_RECORDS,
            MAP_CURRENT,
            MAP_COUNTERS,
            MAP_PROBES,
        ] {
            match ebpf.map(name).expect("a v1 map") {
                Map::Array(d)
                | Map::PerCpuArray(d)
                | Map::HashMap(d)
                | Map::ReusePortSockArray(d) => d.pin(dir.join(name)).expect("pinned"),
                other => panic!("{name}: {other:?}"),
            }
        }
        let program: &mut SkReuseport = ebpf
            .program_mut(PROGRAM)
            .expect("the program")
            .try_into()
            .expect("sk_reuseport");
        program.load().expect("v1 verifies");
        program.pin(dir.join(PROGRAM)).expect("pinned");
    }

    fn record(pinned: Pinned) -> (SteerRecord, Option<Staged>) {
        match pinned {
            Pinned::Current(p) => (p.record().expect("a record"), None),
            Pinned::Previous(p, staged) => (p.record().expect("a record"), Some(staged)),
        }
    }

    #[test]
    fn an_upgrade_cut_short_at_any_point_is_taken_up_again() {
        if !handoff_tests::privileged("an_upgrade_cut_short_at_any_point_is_taken_up_again") {
            return;
        }
        let pins =
            Pins(Path::new("/sys/fs/bpf").join(format!("handoff-migrate-{}", std::process::id())));
        let dir = pins.0.as_path();
        let _ = std::fs::remove_dir_all(dir);
        pin_v1(dir);
        let want = OLD.upgrade();
        // Abandoned: the old pins stay, the staged ones go.
        let (r, staged) = record(open(dir).expect("opens"));
        assert_eq!(r, want);
        staged.expect("the previous layout").abandon();
        assert!(!dir.join(STAGING).exists());
        // Cut short after the program's and the records' pins were renamed: the record
        // is read from the new ring at the same entry, and the upgrade runs again.
        let (_, staged) = record(open(dir).expect("opens"));
        let staged = staged.expect("the previous layout");
        for name in [PROGRAM, MAP_RECORDS] {
            std::fs::rename(staged.staging().join(name), dir.join(name)).expect("renamed");
        }
        drop(staged);
        assert_eq!(previous_layout(dir).ok(), Some(true));
        let (r, staged) = record(open(dir).expect("opens"));
        assert_eq!(r, want);
        // Committed (and the staging directory left, as a crash would): current.
        staged
            .expect("still the previous layout")
            .commit()
            .expect("commits");
        std::fs::create_dir(dir.join(STAGING)).expect("a stale staging directory");
        let (r, staged) = record(open(dir).expect("opens"));
        assert!(staged.is_none(), "the current layout");
        assert_eq!(r, want);
        assert!(!dir.join(STAGING).exists());
    }

    /// The test's pin directory, removed however the test ends.
    struct Pins(PathBuf);

    impl Drop for Pins {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
