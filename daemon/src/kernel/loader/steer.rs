//! The steering program: one instance, with its own maps, per reuseport group.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::programs::{SkReuseport, SkReuseportAttachType};
use aya::{Ebpf, EbpfLoader};
use handoff_common::maps::{
    self, Counter, Counters, MAP_COUNTERS, MAP_CURRENT, MAP_PROBES, MAP_RECORDS, MAP_SOCKS,
    PROBE_KEY_SIZE, PROBE_UNSET, ProbeKey, ProbeValue, RECORDS, SteerRecord,
};

use super::{LoaderError, take};

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoaderError {
    move |source| LoaderError::Map { name, source }
}

/// The map data behind the map kinds this object has.
fn map_data<'a>(map: &'a Map, name: &'static str) -> Result<&'a MapData, LoaderError> {
    match map {
        Map::Array(d) | Map::PerCpuArray(d) | Map::ReusePortSockArray(d) | Map::HashMap(d) => Ok(d),
        _ => Err(LoaderError::MissingMap(name)),
    }
}

fn program_err(source: aya::programs::ProgramError) -> LoaderError {
    LoaderError::Program {
        name: maps::PROGRAM,
        source,
    }
}
use crate::sys::{self, MappedIndex};

/// The steering program of one group and its maps.
pub struct GroupProgram {
    /// Owns the program fd (the maps were taken out below); `None` when taken up from
    /// pins, the program being attached already.
    ebpf: Option<Ebpf>,
    /// The program taken up from its pin (a daemon restarted): what a re-attach uses.
    pinned: Option<SkReuseport>,
    /// The REUSEPORT_SOCKARRAY of the generations' listeners.
    socks: MapData,
    /// The record ring.
    records: Array<MapData, [u8; SteerRecord::SIZE]>,
    /// The mmapped index of the record in force (the map itself stays open through it).
    current: MappedIndex,
    /// Keeps the `current` map open for the life of the mapping.
    _current_map: MapData,
    /// Per-CPU decision counters.
    counters: PerCpuArray<MapData, u64>,
    /// Registered probes and checks, and the slot chosen for each.
    probes: ProbeMap,
    /// Whether the program has been attached to the group.
    attached: bool,
}

impl std::fmt::Debug for GroupProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupProgram")
            .field("current", &self.current.load())
            .field("attached", &self.attached)
            .finish()
    }
}

/// Loads a steering program and drops it: the kernel's verifier decides whether it can
/// run it (Debian's 5.10 accepts the SELECT_OR_MIGRATE attach type but refuses the read
/// of `migrating_sk`, so only a load shows it). Nothing is pinned or attached.
pub(super) fn probe() -> Result<(), LoaderError> {
    probe_with(EbpfLoader::new().btf(None))
}

/// [`probe`] with a loader made already (for the drain object: see
/// [`super::DrainProgram`]); it must not give the object the kernel's BTF.
pub(super) fn probe_with(loader: &mut EbpfLoader<'_>) -> Result<(), LoaderError> {
    let mut ebpf = open_object(loader)?;
    steering_program(&mut ebpf)?.load().map_err(|e| {
        LoaderError::Refused(vec![super::features::Refusal::new(
            maps::PROGRAM,
            crate::kernel::ProgramKind::Steering,
            e,
        )])
    })
}

/// The steering object, its maps created, its program not loaded yet.
fn open_object(loader: &mut EbpfLoader<'_>) -> Result<Ebpf, LoaderError> {
    loader
        .load(handoff_ebpf::HANDOFF_BPF)
        .map_err(|source| LoaderError::Load {
            what: "the steering program",
            source,
        })
}

/// The object's sk_reuseport program.
fn steering_program(ebpf: &mut Ebpf) -> Result<&mut SkReuseport, LoaderError> {
    ebpf.program_mut(maps::PROGRAM)
        .ok_or(LoaderError::MissingMap(maps::PROGRAM))?
        .try_into()
        .map_err(program_err)
}

impl GroupProgram {
    /// Loads a fresh instance: empty sockarray, record 0 in force and empty (every
    /// connection left to the kernel's hash until a generation is published).
    pub fn load(pin_dir: &Path) -> Result<Self, LoaderError> {
        // No kernel BTF: the steering object has no CO-RE relocation, and parsing the
        // kernel's BTF for every group would cost megabytes of memory each.
        let mut ebpf = open_object(EbpfLoader::new().btf(None))?;
        steering_program(&mut ebpf)?.load().map_err(program_err)?;
        std::fs::create_dir_all(pin_dir).map_err(|source| LoaderError::Io {
            op: "creating",
            path: pin_dir.to_path_buf(),
            source,
        })?;
        let mut group = Self::assemble(|name| {
            let map = take(&mut ebpf, name)?;
            // Pinned, the maps outlive the daemon: a restarted one takes them up again.
            let path = pin_dir.join(name);
            let _ = std::fs::remove_file(&path);
            map_data(&map, name)?
                .pin(&path)
                .map_err(|source| LoaderError::Pin { path, source })?;
            Ok(map)
        })?;
        // Pinned too, so that a restarted daemon can attach it again to a group that lost it.
        let path = pin_dir.join(maps::PROGRAM);
        let _ = std::fs::remove_file(&path);
        steering_program(&mut ebpf)?
            .pin(&path)
            .map_err(|source| LoaderError::Pin { path, source })?;
        group.ebpf = Some(ebpf);
        Ok(group)
    }

    /// Takes up the pinned maps of a group whose program a previous daemon attached.
    pub fn from_pins(pin_dir: &Path) -> Result<Self, LoaderError> {
        let mut group = Self::assemble(|name| {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        })?;
        group.attached = true;
        group.pinned = Some(
            SkReuseport::from_pin(
                pin_dir.join(maps::PROGRAM),
                SkReuseportAttachType::SelectOrMigrate,
            )
            .map_err(program_err)?,
        );
        Ok(group)
    }

    /// A fresh instance for a group pinned in the previous layout (see
    /// [`super::migrate`]): its `socks` map is the group's own, pinned at `socks` (a
    /// socket is in one sockarray at most: its listeners cannot join another), its other
    /// maps and its program new, pinned in `staging`. Not attached.
    pub(super) fn beside(socks: &Path, staging: &Path) -> Result<Self, LoaderError> {
        let mut ebpf = open_object(EbpfLoader::new().btf(None).map_pin_path(MAP_SOCKS, socks))?;
        steering_program(&mut ebpf)?.load().map_err(program_err)?;
        std::fs::create_dir_all(staging).map_err(|source| LoaderError::Io {
            op: "creating",
            path: staging.to_path_buf(),
            source,
        })?;
        let mut group = Self::assemble(|name| {
            let map = take(&mut ebpf, name)?;
            if name != MAP_SOCKS {
                let path = staging.join(name);
                map_data(&map, name)?
                    .pin(&path)
                    .map_err(|source| LoaderError::Pin { path, source })?;
            }
            Ok(map)
        })?;
        let path = staging.join(maps::PROGRAM);
        steering_program(&mut ebpf)?
            .pin(&path)
            .map_err(|source| LoaderError::Pin { path, source })?;
        group.ebpf = Some(ebpf);
        Ok(group)
    }

    /// Makes `record` the one in force at ring entry `index` (a fresh instance taking
    /// over the record in force of an older one, at the same entry).
    pub(super) fn publish_at(
        &mut self,
        index: u32,
        record: SteerRecord,
    ) -> Result<(), LoaderError> {
        let index = index % RECORDS;
        self.records
            .set(index, record.to_bytes(), 0)
            .map_err(map_err(MAP_RECORDS))?;
        self.current.store(index);
        Ok(())
    }

    fn assemble(
        mut map: impl FnMut(&'static str) -> Result<Map, LoaderError>,
    ) -> Result<Self, LoaderError> {
        let Map::ReusePortSockArray(socks) = map(MAP_SOCKS)? else {
            return Err(LoaderError::MissingMap(MAP_SOCKS));
        };
        let Map::Array(current_map) = map(MAP_CURRENT)? else {
            return Err(LoaderError::MissingMap(MAP_CURRENT));
        };
        let records = Array::try_from(map(MAP_RECORDS)?).map_err(map_err(MAP_RECORDS))?;
        let counters = PerCpuArray::try_from(map(MAP_COUNTERS)?).map_err(map_err(MAP_COUNTERS))?;
        let probes = ProbeMap::new(map(MAP_PROBES)?)?;
        let current = MappedIndex::new(current_map.fd()).map_err(|source| LoaderError::Sys {
            op: "mmap",
            name: MAP_CURRENT,
            source,
        })?;
        Ok(Self {
            ebpf: None,
            pinned: None,
            socks,
            records,
            current,
            _current_map: current_map,
            counters,
            probes,
            attached: false,
        })
    }

    /// Attaches the program to the group of `socket` (any listener of the group: the
    /// program belongs to the whole group, and replaces whatever program it had).
    pub fn attach(&mut self, socket: BorrowedFd<'_>) -> Result<(), LoaderError> {
        let program: &SkReuseport = match (&self.pinned, &self.ebpf) {
            (Some(p), _) => p,
            (None, Some(e)) => e
                .program(maps::PROGRAM)
                .ok_or(LoaderError::MissingMap(maps::PROGRAM))?
                .try_into()
                .map_err(program_err)?,
            (None, None) => return Err(LoaderError::MissingMap(maps::PROGRAM)),
        };
        program.attach(socket).map_err(program_err)?;
        self.attached = true;
        Ok(())
    }

    /// Puts a listener into an empty slot.
    pub fn insert(&self, slot: u32, socket: BorrowedFd<'_>) -> Result<(), LoaderError> {
        sys::sockarray_insert(self.socks.fd().as_fd(), slot, socket, sys::BPF_NOEXIST).map_err(
            |source| LoaderError::Sys {
                op: "insert",
                name: MAP_SOCKS,
                source,
            },
        )
    }

    /// Empties a slot.
    pub fn remove(&self, slot: u32) -> Result<(), LoaderError> {
        sys::sockarray_remove(self.socks.fd().as_fd(), slot).map_err(|source| LoaderError::Sys {
            op: "remove",
            name: MAP_SOCKS,
            source,
        })
    }

    /// The cookie of the listener in `slot`; `None` once it has closed.
    pub fn cookie_at(&self, slot: u32) -> Result<Option<u64>, LoaderError> {
        sys::sockarray_cookie(self.socks.fd().as_fd(), slot).map_err(|source| LoaderError::Sys {
            op: "lookup",
            name: MAP_SOCKS,
            source,
        })
    }

    /// The record in force.
    pub fn record(&self) -> Result<SteerRecord, LoaderError> {
        let bytes = self
            .records
            .get(&self.current.load(), 0)
            .map_err(|source| LoaderError::Map {
                name: MAP_RECORDS,
                source,
            })?;
        // The map's values are SteerRecord::SIZE bytes: the decoder cannot come up short.
        Ok(SteerRecord::from_bytes(&bytes).unwrap_or_default())
    }

    /// Makes `record` the one in force: written into the next ring entry (which nothing
    /// refers to), then the index flips in one atomic store.
    pub fn publish(&mut self, record: SteerRecord) -> Result<(), LoaderError> {
        let next = (self.current.load() + 1) % RECORDS;
        self.records
            .set(next, record.to_bytes(), 0)
            .map_err(|source| LoaderError::Map {
                name: MAP_RECORDS,
                source,
            })?;
        self.current.store(next);
        Ok(())
    }

    /// The program's decision counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, LoaderError> {
        let mut out = Counters::default();
        for c in Counter::ALL {
            let per_cpu = self
                .counters
                .get(&c.index(), 0)
                .map_err(|source| LoaderError::Map {
                    name: MAP_COUNTERS,
                    source,
                })?;
            out.add(c, per_cpu.iter().sum());
        }
        Ok(out)
    }

    /// Registers a probe: from now on the program treats a SYN matching `key` as one.
    pub fn register_probe(&mut self, key: ProbeKey) -> Result<(), LoaderError> {
        self.probes.register(key, PROBE_UNSET)
    }

    /// The slot the program chose for the probe `key` ([`PROBE_UNSET`]: not seen).
    pub fn probe_result(&self, key: ProbeKey) -> Result<u32, LoaderError> {
        self.probes.chosen(key)
    }

    /// Removes the registration of probe `key`.
    pub fn unregister_probe(&mut self, key: ProbeKey) {
        self.probes.unregister(key);
    }

    /// A handle of its own on the group's `probes` map, for health checks that run
    /// without the daemon's lock (see [`crate::kernel::check`]).
    pub fn probe_map(&self) -> Result<ProbeMap, LoaderError> {
        self.probes.try_clone()
    }
}

/// A group's `probes` map: the connections the program treats as probes or checks.
pub struct ProbeMap {
    map: HashMap<MapData, [u8; PROBE_KEY_SIZE], [u8; ProbeValue::SIZE]>,
    /// A descriptor of the map of its own, to open further handles from.
    fd: std::os::fd::OwnedFd,
}

impl std::fmt::Debug for ProbeMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProbeMap")
    }
}

fn dup_err(source: std::io::Error) -> LoaderError {
    LoaderError::Io {
        op: "duplicating",
        path: MAP_PROBES.into(),
        source,
    }
}

impl ProbeMap {
    fn new(map: Map) -> Result<Self, LoaderError> {
        let fd = map_data(&map, MAP_PROBES)?
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(dup_err)?;
        let map = HashMap::try_from(map).map_err(map_err(MAP_PROBES))?;
        Ok(Self { map, fd })
    }

    /// A second handle on the same kernel map (descriptors of its own).
    fn try_clone(&self) -> Result<ProbeMap, LoaderError> {
        let fd = self.fd.try_clone().map_err(dup_err)?;
        let data = MapData::from_fd(fd).map_err(map_err(MAP_PROBES))?;
        Self::new(Map::HashMap(data))
    }

    /// Registers `key` with `target`: [`PROBE_UNSET`] for a probe, else the slot a
    /// check connection must reach.
    fn register(&mut self, key: ProbeKey, target: u32) -> Result<(), LoaderError> {
        let value = ProbeValue {
            target,
            chosen: PROBE_UNSET,
        };
        self.map
            .insert(key.to_bytes(), value.to_bytes(), 0)
            .map_err(map_err(MAP_PROBES))
    }

    /// Registers a health-check connection: the program sends a SYN matching `key` to
    /// the listener in `slot`, and to no other.
    pub fn register_check(&mut self, key: ProbeKey, slot: u32) -> Result<(), LoaderError> {
        if slot >= maps::SOCK_SLOTS {
            return Err(LoaderError::MissingMap("check slot"));
        }
        self.register(key, slot)
    }

    /// The slot the program chose for `key` ([`PROBE_UNSET`]: not seen yet).
    pub fn chosen(&self, key: ProbeKey) -> Result<u32, LoaderError> {
        let bytes = self
            .map
            .get(&key.to_bytes(), 0)
            .map_err(map_err(MAP_PROBES))?;
        // The map's values are ProbeValue::SIZE bytes: the decoder cannot come up short.
        Ok(ProbeValue::from_bytes(&bytes).map_or(PROBE_UNSET, |v| v.chosen))
    }

    /// Removes the registration of `key`.
    pub fn unregister(&mut self, key: ProbeKey) {
        // Absent (never inserted) is fine; the map is only ever small.
        let _ = self.map.remove(&key.to_bytes());
    }
}
