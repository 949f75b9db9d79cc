//! A group pinned by the previous release (16-byte records, 4-byte probe values: the
//! steering object of `tests/fixtures/handoff-v1.bpf.o`) is taken up by this handoffd and
//! moved to the current layout under load, without a failed connection; a promote works
//! after; nothing of the old program or its maps is left.

mod support;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aya::maps::{Array, Map, MapData};
use aya::programs::{ProgramInfo, SkReuseport, loaded_programs};
use handoff_common::maps::{LegacyRecord, SteerRecord};
use handoff_common::proto::GenerationState;
use handoff_tests::load::{self, LoadConfig};
use handoff_tests::{Stream, scaled, scaled_down, slowdown};
use support::{Handoffd, answers, loopback, only, privileged, testsrv, wait_until};

/// The previous release's steering object.
const V1: &[u8] = include_bytes!("../fixtures/handoff-v1.bpf.o");

/// The maps a steering program has besides `socks`, and the program.
const REPINNED: [&str; 5] = ["records", "current", "counters", "probes", "handoff_select"];

fn map(dir: &Path, name: &str) -> Map {
    let data = MapData::from_pin(dir.join(name)).expect("a pinned map");
    Map::from_map_data(data).expect("a map")
}

fn value_size(dir: &Path, name: &str) -> u32 {
    let data = MapData::from_pin(dir.join(name)).expect("a pinned map");
    data.info().expect("map info").value_size()
}

fn program_id(dir: &Path) -> u32 {
    ProgramInfo::from_pin(dir.join("handoff_select"))
        .expect("the pinned program")
        .id()
}

fn loaded(id: u32) -> bool {
    loaded_programs().flatten().any(|p| p.id() == id)
}

/// Puts the group pinned at `dir` back into the previous layout, as the previous
/// handoffd left it: the v1 program (with the group's own sockarray) attached through a
/// listener of the group at `addr`, the record in force in the old 16-byte layout at the
/// same ring entry, its maps and program pinned in place of the current ones. Returns
/// the id of the v1 program.
fn downgrade(dir: &Path, addr: std::net::SocketAddr) -> u32 {
    let current: Array<MapData, u32> = Array::try_from(map(dir, "current")).expect("current");
    let index = current.get(&0, 0).expect("the index in force");
    let records: Array<MapData, [u8; SteerRecord::SIZE]> =
        Array::try_from(map(dir, "records")).expect("records");
    let r =
        SteerRecord::from_bytes(&records.get(&index, 0).expect("the record")).expect("a record");
    assert!(r.active_len > 0, "steering to A: {r:?}");
    let old: Vec<u8> = [r.active_first, r.active_len, r.prev_first, r.prev_len]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    assert_eq!(
        LegacyRecord::from_bytes(&old).map(LegacyRecord::upgrade),
        Some(r)
    );

    let socks = dir.join("socks");
    let mut ebpf = aya::EbpfLoader::new()
        .btf(None)
        .map_pin_path("socks", socks.as_path())
        .load(V1)
        .expect("loading the v1 object");
    let old: [u8; LegacyRecord::SIZE] = old.try_into().expect("16 bytes");
    let mut v1_records: Array<&mut MapData, [u8; LegacyRecord::SIZE]> =
        Array::try_from(ebpf.map_mut("records").expect("v1 records")).expect("16-byte records");
    v1_records.set(index, old, 0).expect("the v1 record");
    let mut v1_current: Array<&mut MapData, u32> =
        Array::try_from(ebpf.map_mut("current").expect("v1 current")).expect("current");
    v1_current.set(0, index, 0).expect("the v1 index");
    let program: &mut SkReuseport = ebpf
        .program_mut("handoff_select")
        .expect("the v1 program")
        .try_into()
        .expect("sk_reuseport");
    program.load().expect("the v1 program loads");
    let id = program.info().expect("program info").id();
    // Any listener of the group attaches for all of it; this one joins and leaves it.
    let member = handoff_tests::reuseport_listener(addr).expect("a listener in the group");
    program.attach(member.as_fd()).expect("attaching v1");
    drop(member);
    for name in ["records", "current", "counters", "probes"] {
        let path = dir.join(name);
        std::fs::remove_file(&path).expect("removing the current pin");
        match ebpf.map(name).expect("a v1 map") {
            Map::Array(d) | Map::PerCpuArray(d) | Map::HashMap(d) => {
                d.pin(&path).expect("pinning v1")
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    let path = dir.join("handoff_select");
    std::fs::remove_file(&path).expect("removing the program pin");
    let program: &mut SkReuseport = ebpf
        .program_mut("handoff_select")
        .expect("the v1 program")
        .try_into()
        .expect("sk_reuseport");
    program.pin(&path).expect("pinning the v1 program");
    assert_eq!(value_size(dir, "records"), 16);
    assert_eq!(value_size(dir, "probes"), 4);
    id
}

/// Under load: the daemon is started again on the previous layout (and moves the
/// group), then B is promoted. The load's report, and whether the daemon said it moved
/// the group.
fn restart_and_promote_under_load(
    d: &mut Handoffd,
    addr: std::net::SocketAddr,
    b: u32,
) -> (load::LoadReport, bool) {
    let mut cfg = LoadConfig::new(addr, scaled_down(64u32, 16));
    cfg.timeout_ms *= u64::from(slowdown());
    cfg.duration_ms = Some(30_000 * u64::from(slowdown()));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let load = s.spawn(|| load::run(&cfg, Some(&stop)));
        std::thread::sleep(Duration::from_millis(300));
        d.spawn(&[addr], &[]);
        let moved = d
            .proc()
            .wait_line(
                Stream::Stderr,
                "group moved to the current map layout",
                scaled(Duration::from_secs(5)),
            )
            .is_some();
        std::thread::sleep(Duration::from_millis(300));
        d.promote(b);
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        (load.join().expect("load thread"), moved)
    })
}

/// The pin directory of the daemon's only group.
fn group_dir(d: &Handoffd) -> PathBuf {
    Path::new("/sys/fs/bpf/handoff")
        .join(&d.service)
        .join("v2")
        .join("g0")
}

#[test]
fn a_group_pinned_in_the_previous_layout_is_moved_under_load() {
    if !privileged("a_group_pinned_in_the_previous_layout_is_moved_under_load") {
        return;
    }
    handoff_tests::raise_fd_limit().expect("raising the fd limit");
    let addr = loopback();
    let a = testsrv("A", &[addr], &["--workers", "2", "--mode", "per-worker"]);
    let mut d = Handoffd::start("upgrade", &[addr]);
    let dir = group_dir(&d);
    d.promote(a.pid);
    let first = program_id(&dir);
    d.crash();
    let v1 = downgrade(&dir, addr);
    wait_until(
        "the first program to be freed",
        scaled(Duration::from_secs(5)),
        || !loaded(first),
    );
    assert_eq!(answers(addr, 50), only("A", 50), "v1 steers to A");
    // An upgrade cut short left staged pins: removed, never taken up.
    std::fs::create_dir(dir.join("next")).expect("a staging directory");
    let stale = MapData::from_pin(dir.join("counters")).expect("the v1 counters");
    stale.pin(dir.join("next/counters")).expect("a stale pin");
    drop(stale);

    let b = testsrv("B", &[addr], &["--workers", "2", "--mode", "per-worker"]);
    let (report, moved) = restart_and_promote_under_load(&mut d, addr, b.pid);
    eprintln!("load across the upgrade and a promote: {report:?}");
    assert!(moved, "the daemon moved the group");
    assert_eq!(report.failures.total(), 0, "{:?}", report.failures);
    let names: Vec<&String> = report.by_name.keys().collect();
    assert_eq!(names, ["A", "B"], "A until the promote, then B");
    assert!(
        report.ok >= scaled_down(300u64, 30),
        "the load ran ({})",
        report.ok
    );

    assert_eq!(value_size(&dir, "records"), SteerRecord::SIZE as u32);
    assert_eq!(value_size(&dir, "probes"), 8);
    assert!(!dir.join("next").exists(), "no staged pins left");
    wait_until(
        "the v1 program to be freed",
        scaled(Duration::from_secs(5)),
        || !loaded(v1),
    );
    let now = program_id(&dir);
    assert_eq!(answers(addr, 50), only("B", 50));
    let a_state = d.state_of(a.pid);
    assert!(
        matches!(
            a_state,
            Some(GenerationState::Draining | GenerationState::Retired)
        ),
        "A was taken up and demoted: {a_state:?}"
    );
    assert_eq!(d.state_of(b.pid), Some(GenerationState::Active));
    for name in REPINNED {
        assert!(dir.join(name).exists(), "{name} is pinned");
    }
    let pins = Path::new("/sys/fs/bpf/handoff").join(&d.service);
    drop(d);
    assert!(!pins.exists(), "--cleanup removed the pins");
    drop((a, b));
    wait_until(
        "the program to be freed",
        scaled(Duration::from_secs(5)),
        || !loaded(now),
    );
}
