//! One scenario's run: handoffs of nginx under HTTP load in a network namespace of its own,
//! what every scenario must hold, and the figures printed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use handoff_common::proto::{GenerationState, ServiceStatus};
use handoff_tests::load::{self, LoadConfig, LoadReport};
use handoff_tests::{Stream, TempDir, free_port, scaled, scaled_down, slowdown};
use nix::errno::Errno;
use nix::sys::signal::killpg;
use nix::unistd::Pid;

use super::netns::{counter, in_new_netns, tcp_ext};
use super::server::{Nginx, nginx_binary};
use super::support::Handoffd;
use super::{CLIENTS, DWELL, HANDOFFS, LOSS_COUNTERS, REQUEST_TIMEOUT_MS, RunResult, Scenario};

/// Runs the handoffs under load in a network namespace of its own, asserts what every
/// scenario must hold (no failed request, the keep-alive race's retries apart, which the
/// scenario judges; no drain ended by its timeout; no generation left running; no kernel
/// drop) and prints the figures.
pub(super) fn handoffs_under_load(s: &Scenario) -> RunResult {
    handoff_tests::raise_fd_limit().expect("raising the fd limit");
    let nginx = nginx_binary();
    in_new_netns(|| {
        let counters_before = tcp_ext();
        let dir = TempDir::new(s.tag);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));

        let mut first = Nginx::start(&nginx, dir.path(), 1, addr);
        first.wait_ready(addr);
        assert_eq!(
            load::http_once(addr, scaled(Duration::from_secs(2))).map(|a| a.0),
            Ok("g1".to_owned()),
            "g1 answers before handoffd steers"
        );
        let args: Vec<&str> = s.handoffd_args.iter().map(String::as_str).collect();
        let mut d = Handoffd::start_with(s.tag, &[addr], &args);
        d.promote(first.proc.pid);

        let (cfg, clients) = load_config(s, addr);
        let run = Handoffs::run(&nginx, dir.path(), addr, &d, first, &cfg);
        let counters_after = tcp_ext();
        let service = d.service();
        let timeouts: Vec<String> = d
            .proc()
            .lines(Stream::Stderr)
            .into_iter()
            .filter(|l| l.contains("drain timeout"))
            .collect();

        let per_worker = run.per_worker();
        let delta = growth(&counters_before, &counters_after);
        run.print(s, clients, &per_worker, &delta, &service);
        run.assert_no_loss(&per_worker, &timeouts, &delta);
        run.assert_old_gone();
        run.wait_handoffd_agrees(&d, service);
        let drains = run.drains();
        RunResult {
            abort_on_close: delta["TCPAbortOnClose"],
            abort_on_data: delta["TCPAbortOnData"],
            report: run.report,
            drains,
        }
    })
}

/// The HTTP load of scenario `s` on `addr`, and its number of clients.
fn load_config(s: &Scenario, addr: SocketAddr) -> (LoadConfig, u32) {
    let clients = scaled_down(CLIENTS, 16);
    let mut cfg = LoadConfig::new(addr, clients);
    cfg.http = true;
    cfg.requests_per_connection = s.requests_per_connection;
    // See `nginx_keepalive_drain_signal`: HTTP clients retry a request the server closed
    // unanswered on a reused connection; nothing else is retried.
    cfg.retry_keepalive_race = true;
    cfg.timeout_ms = REQUEST_TIMEOUT_MS * u64::from(slowdown());
    // Bounds in case the stop flag is never set; the run ends by the flag.
    cfg.duration_ms = Some(load::MAX_DURATION_MS);
    (cfg, clients)
}

/// How much each kernel counter of interest grew from `before` to `after`.
fn growth(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<&'static str, i128> {
    let names = [
        "ListenOverflows",
        "ListenDrops",
        "TCPMigrateReqFailure",
        "TCPReqQFullDrop",
        "TCPMigrateReqSuccess",
        "TCPAbortOnData",
        "TCPAbortOnClose",
    ];
    names
        .iter()
        .map(|n| (*n, counter(after, n) - counter(before, n)))
        .collect()
}

/// What the handoffs left: the load's report, the generations and the times measured.
struct Handoffs {
    report: LoadReport,
    /// The old generations, in the order they were replaced.
    old: Vec<Draining>,
    /// The last generation, active at the end.
    current: Nginx,
    /// How long each new nginx took to be ready.
    ready_times: Vec<Duration>,
    /// How long each promote took.
    promote_times: Vec<Duration>,
    /// How long the load ran.
    load_time: Duration,
}

impl Handoffs {
    /// HANDOFFS handoffs, DWELL apart, under the load `cfg`, from `first` on: each a new
    /// nginx (`nginx`) in `root` on `addr`, once ready promoted by `d`; the old ones watched
    /// for their exits, given up to 30 s (scaled) after the load to exit.
    fn run(
        nginx: &Path,
        root: &Path,
        addr: SocketAddr,
        d: &Handoffd,
        first: Nginx,
        cfg: &LoadConfig,
    ) -> Handoffs {
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let mut current = first;
        // The old generations, watched by a thread of their own for their exits.
        let old: Mutex<Vec<Draining>> = Mutex::new(Vec::new());
        let watched = AtomicBool::new(false);
        let mut promote_times = Vec::new();
        let mut ready_times = Vec::new();
        let mut load_time = Duration::ZERO;
        let report = std::thread::scope(|scope| {
            // Stop the load and the watcher even when an assertion below fails, so that the
            // scope can end (and the guards kill what is left).
            let _stop = SetOnDrop(&stop);
            let _watched = SetOnDrop(&watched);
            scope.spawn(|| watch_exits(&old, &watched));
            let load = scope.spawn(|| load::run(cfg, Some(&stop)));
            std::thread::sleep(DWELL);
            for n in 2..=HANDOFFS + 1 {
                let t = Instant::now();
                let mut next = Nginx::start(nginx, root, n, addr);
                next.wait_ready(addr);
                ready_times.push(t.elapsed());
                let promoted = Instant::now();
                d.promote(next.proc.pid);
                promote_times.push(promoted.elapsed());
                lock(&old).push(Draining {
                    nginx: std::mem::replace(&mut current, next),
                    promoted,
                    exited: None,
                });
                std::thread::sleep(DWELL);
            }
            stop.store(true, Ordering::SeqCst);
            let report = load.join().expect("load thread");
            load_time = started.elapsed();
            // Give the last drains time to finish: an exit later than any test's bound is a
            // failure anyway, reported with how long it took.
            let deadline = Instant::now() + scaled(Duration::from_secs(30));
            while lock(&old).iter().any(|o| o.exited.is_none()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            report
        });
        let old = old.into_inner().unwrap_or_else(|p| p.into_inner());
        Handoffs {
            report,
            old,
            current,
            ready_times,
            promote_times,
            load_time,
        }
    }

    /// Every generation, the first one first.
    fn generations(&self) -> Vec<&Nginx> {
        self.old
            .iter()
            .map(|o| &o.nginx)
            .chain(std::iter::once(&self.current))
            .collect()
    }

    /// Answers per worker (X-Pid) of each generation: the program's `hash % n` spreads
    /// the connections over a generation's listeners, one per worker with nginx.
    fn per_worker(&self) -> Vec<(usize, Vec<u64>)> {
        self.generations()
            .iter()
            .map(|g| {
                let counts = g.workers.iter();
                let counts = counts.map(|w| self.report.by_pid.get(w).copied().unwrap_or(0));
                (g.generation, counts.collect())
            })
            .collect()
    }

    /// How long after its promote each old master exited (`None`: it had not).
    fn drains(&self) -> Vec<(String, Option<Duration>)> {
        self.old
            .iter()
            .map(|o| (format!("g{}", o.nginx.generation), o.exited))
            .collect()
    }
}

impl Handoffs {
    /// Prints the figures of scenario `s` with `clients` clients: the load, the answers per
    /// generation and worker, the times, the kernel counters' `delta` and the steering.
    fn print(
        &self,
        s: &Scenario,
        clients: u32,
        per_worker: &[(usize, Vec<u64>)],
        delta: &BTreeMap<&str, i128>,
        service: &ServiceStatus,
    ) {
        let report = &self.report;
        eprintln!(
            "\n{}: {} handoffs in {:.1} s, {} clients, {} request(s) per connection, \
             slowdown {}",
            s.tag,
            HANDOFFS,
            self.load_time.as_secs_f64(),
            clients,
            s.requests_per_connection,
            slowdown()
        );
        eprintln!(
            "{}: {} requests, {} ok, failures {:?} (keep-alive race, retried: {}), max latency {} ms, \
             keep-alive connections found closed and reopened {}",
            s.tag,
            report.attempts,
            report.ok,
            report.failures,
            report.keepalive_race,
            report.max_latency_ms,
            report.reopened
        );
        eprintln!("{}: per generation {:?}", s.tag, report.by_name);
        eprintln!("{}: per generation and worker {per_worker:?}", s.tag);
        let ms = |v: &[Duration]| v.iter().map(|t| t.as_millis()).collect::<Vec<_>>();
        eprintln!(
            "{}: new nginx ready after (ms) {:?}",
            s.tag,
            ms(&self.ready_times)
        );
        eprintln!("{}: promote took (ms) {:?}", s.tag, ms(&self.promote_times));
        eprintln!(
            "{}: old master exited after its promote (ms) {:?}",
            s.tag,
            self.old
                .iter()
                .map(|o| o.exited.map(|t| t.as_millis()))
                .collect::<Vec<_>>()
        );
        eprintln!(
            "{}: kernel counters, growth during the run: {delta:?}",
            s.tag
        );
        eprintln!("{}: steering {:?}\n", s.tag, service.steering);
    }

    /// No request failed, every generation and both workers of each served, only ours
    /// answered, no drain ended by its timeout (`timeouts`), no kernel loss counter grew.
    fn assert_no_loss(
        &self,
        per_worker: &[(usize, Vec<u64>)],
        timeouts: &[String],
        delta: &BTreeMap<&str, i128>,
    ) {
        let report = &self.report;
        // Requests retried after the keep-alive race are the scenario's to judge; any
        // failure, a failed retry included, is a loss.
        assert_eq!(
            report.failures.total(),
            0,
            "no request failed ({} retried after the keep-alive race): {:?}",
            report.keepalive_race,
            report.failures
        );
        assert_eq!(report.ok + report.failures.total(), report.attempts);
        for n in 1..=HANDOFFS + 1 {
            assert!(
                report.by_name.get(&format!("g{n}")).copied().unwrap_or(0) > 0,
                "generation g{n} served requests: {:?}",
                report.by_name
            );
        }
        assert_eq!(
            report.by_name.len(),
            HANDOFFS + 1,
            "only our generations answered: {:?}",
            report.by_name
        );
        let workers: Vec<u32> = self
            .generations()
            .iter()
            .flat_map(|g| g.workers.clone())
            .collect();
        assert!(
            report.by_pid.keys().all(|pid| workers.contains(pid)),
            "only our workers answered: {:?}",
            report.by_pid
        );
        assert_eq!(
            report.by_pid.values().sum::<u64>(),
            report.ok,
            "every answer named its worker"
        );
        assert!(
            per_worker
                .iter()
                .all(|(_, counts)| counts.iter().all(|&n| n > 0)),
            "both workers of every generation served: {per_worker:?}"
        );
        assert!(
            timeouts.is_empty(),
            "every drain ended by its count, none by the drain timeout: {timeouts:?}"
        );
        for name in LOSS_COUNTERS {
            assert_eq!(
                delta[name], 0,
                "kernel counter {name} grew during the run: {delta:?}"
            );
        }
    }

    /// No old generation is left running: its master has been reaped and no process of
    /// its group (the workers) lives.
    fn assert_old_gone(&self) {
        for o in &self.old {
            if o.exited.is_some() {
                assert_eq!(
                    killpg(Pid::from_raw(o.nginx.proc.pid as i32), None),
                    Err(Errno::ESRCH),
                    "g{}: a process of the old nginx (pgid {}) still lives",
                    o.nginx.generation,
                    o.nginx.proc.pid
                );
            }
        }
    }

    /// handoffd `d` agrees (`service` its first view): the exited generations it still lists
    /// are retired (it learns of an exit through a pidfd, so allow it a moment), the last
    /// one is the active one.
    fn wait_handoffd_agrees(&self, d: &Handoffd, service: ServiceStatus) {
        let expected = |pid: u32| {
            if pid == self.current.proc.pid {
                Some(GenerationState::Active)
            } else if self
                .old
                .iter()
                .any(|o| o.exited.is_some() && o.nginx.proc.pid == pid)
            {
                Some(GenerationState::Retired)
            } else {
                None
            }
        };
        let deadline = Instant::now() + scaled(Duration::from_secs(5));
        let mut service = service;
        while !service
            .generations
            .iter()
            .all(|g| expected(g.pid as u32).is_none_or(|want| g.state == want))
        {
            assert!(
                Instant::now() < deadline,
                "handoffd's view of the generations: {service:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
            service = d.service();
        }
        let active: Vec<u32> = service
            .generations
            .iter()
            .filter(|g| g.state == GenerationState::Active)
            .map(|g| g.pid as u32)
            .collect();
        assert_eq!(active, [self.current.proc.pid], "{service:?}");
    }
}

/// An old generation, from its promote on.
struct Draining {
    nginx: Nginx,
    /// When `handoffctl promote` of its successor started.
    promoted: Instant,
    /// How long after `promoted` its master had exited, once it has (seen within 5 ms; an
    /// exit during the promote call is seen when the call returns).
    exited: Option<Duration>,
}

/// Notes every 5 ms which old nginx masters have exited (and reaps them), until `done`.
fn watch_exits(old: &Mutex<Vec<Draining>>, done: &AtomicBool) {
    while !done.load(Ordering::SeqCst) {
        for o in lock(old).iter_mut().filter(|o| o.exited.is_none()) {
            if o.nginx.proc.wait_exit(Duration::ZERO).is_some() {
                o.exited = Some(o.promoted.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets the flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
