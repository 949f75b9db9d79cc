//! Prometheus metrics: events counted as they happen, the rest (connections per
//! generation, the kernel program's per-CPU counters, foreign listeners) read when a
//! scrape needs them, at most once a second (see [`crate::runtime::scrape`]), so that an idle daemon does
//! no work for them and a flood of scrapers no more than one.

mod labels;

pub use labels::{PromotionResult, Retirement, RollbackReason, SteeringWatch};

use handoff_common::maps::Counter as SteerCounter;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GenerationLabels {
    service: String,
    generation: u64,
    pid: i32,
    /// [`handoff_common::proto::GenerationState::as_str`].
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    service: String,
    result: PromotionResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetireLabels {
    service: String,
    reason: Retirement,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RollbackLabels {
    service: String,
    reason: RollbackReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    service: String,
    reason: SteeringWatch,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    service: String,
    /// [`SteerCounter::label`].
    target: &'static str,
}

/// 0.5 ms to ~4 s: a promote is a few milliseconds.
fn promote_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// 10 ms to ~40 min: a drain lasts as long as the longest connection.
fn drain_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 18))
}

/// Every metric of the daemon, and the registry that encodes them. A clone shares them
/// all: the daemon counts events in one, the metrics thread encodes another.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    connections: Family<GenerationLabels, Gauge>,
    promotions: Family<ResultLabels, Counter>,
    retirements: Family<RetireLabels, Counter>,
    steered: Family<TargetLabels, Counter>,
    promote_duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    drain_duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    foreign: Family<ServiceLabels, Gauge>,
    steering_watch: Family<WatchLabels, Counter>,
    rollbacks: Family<RollbackLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric. prometheus-client appends `_total` to counters itself.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connections = Family::default();
        registry.register(
            "handoff_generation_connections",
            "Connections a generation holds (established and queued on its listeners)",
            connections.clone(),
        );
        let promotions = Family::default();
        registry.register(
            "handoff_promotions",
            "Promote and rollback requests by result",
            promotions.clone(),
        );
        let retirements = Family::default();
        registry.register(
            "handoff_retirements",
            format!(
                "Generations retired, by how: {}",
                labels::listed(Retirement::ALL.iter().map(|r| r.as_str()))
            ),
            retirements.clone(),
        );
        let steered = Family::default();
        registry.register(
            "handoff_steered_connections",
            format!(
                "Decisions of the kernel program by target: {}",
                labels::listed(SteerCounter::ALL.map(SteerCounter::label))
            ),
            steered.clone(),
        );
        let promote_duration: Family<_, _, fn() -> Histogram> =
            Family::new_with_constructor(promote_buckets);
        registry.register(
            "handoff_promote_duration_seconds",
            "Promote request to its verified return",
            promote_duration.clone(),
        );
        let drain_duration: Family<_, _, fn() -> Histogram> =
            Family::new_with_constructor(drain_buckets);
        registry.register(
            "handoff_drain_duration_seconds",
            "Start of a drain to the generation's retirement",
            drain_duration.clone(),
        );
        let foreign = Family::default();
        registry.register(
            "handoff_foreign_listeners",
            "LISTEN sockets on a service's port outside its groups",
            foreign.clone(),
        );
        let steering_watch = Family::default();
        registry.register(
            "handoff_steering_watch",
            "Probes that found a group without handoff's program (reason lost) and re-attaches that a probe confirmed (reason restored)",
            steering_watch.clone(),
        );
        let rollbacks = Family::default();
        registry.register(
            "handoff_rollbacks",
            format!(
                "Traffic taken back to an earlier generation, by reason: {}",
                labels::listed(RollbackReason::ALL.iter().map(|r| r.as_str()))
            ),
            rollbacks.clone(),
        );
        Self {
            rollbacks,
            steering_watch,
            registry: Arc::new(registry),
            connections,
            promotions,
            retirements,
            steered,
            promote_duration,
            drain_duration,
            foreign,
        }
    }

    /// Counts a promote or rollback, with how long it took if it succeeded.
    pub fn promotion(&self, service: &str, result: PromotionResult, seconds: Option<f64>) {
        self.promotions
            .get_or_create(&ResultLabels {
                service: service.into(),
                result,
            })
            .inc();
        if let Some(s) = seconds {
            self.promote_duration
                .get_or_create(&ServiceLabels {
                    service: service.into(),
                })
                .observe(s);
        }
    }

    /// Counts a rollback of `service`.
    pub fn rollback(&self, service: &str, reason: RollbackReason) {
        self.rollbacks
            .get_or_create(&RollbackLabels {
                service: service.into(),
                reason,
            })
            .inc();
    }

    /// Counts a retirement, with how long its drain took if it drained.
    pub fn retirement(&self, service: &str, reason: Retirement, drain_seconds: Option<f64>) {
        self.retirements
            .get_or_create(&RetireLabels {
                service: service.into(),
                reason,
            })
            .inc();
        if let Some(s) = drain_seconds {
            self.drain_duration
                .get_or_create(&ServiceLabels {
                    service: service.into(),
                })
                .observe(s);
        }
    }

    /// Counts a steering watch event of `service`.
    pub fn steering_watch(&self, service: &str, event: SteeringWatch) {
        self.steering_watch
            .get_or_create(&WatchLabels {
                service: service.into(),
                reason: event,
            })
            .inc();
    }

    /// Refreshes the scrape-time metrics from a status and encodes everything.
    pub fn render(&self, status: &handoff_common::proto::Status) -> String {
        self.connections.clear();
        for s in &status.services {
            for g in &s.generations {
                self.connections
                    .get_or_create(&GenerationLabels {
                        service: s.name.clone(),
                        generation: g.id,
                        pid: g.pid,
                        state: g.state.as_str(),
                    })
                    .set(i64::try_from(g.connections).unwrap_or(i64::MAX));
            }
            for counter in SteerCounter::ALL {
                // The kernel's counters are the source; the metric mirrors them.
                self.steered
                    .get_or_create(&TargetLabels {
                        service: s.name.clone(),
                        target: counter.label(),
                    })
                    .inner()
                    .store(s.steering.get(counter), Ordering::Relaxed);
            }
            self.foreign
                .get_or_create(&ServiceLabels {
                    service: s.name.clone(),
                })
                .set(s.foreign_listeners.len() as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `--metrics-addr`: where to serve `/metrics`, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

/// `--metrics-addr` was given something else than `ADDR:PORT` or `off`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not ADDR:PORT or off")]
pub struct BadMetricsAddr {
    /// What was given.
    pub given: String,
}

impl std::str::FromStr for MetricsAddr {
    type Err = BadMetricsAddr;

    fn from_str(s: &str) -> Result<Self, BadMetricsAddr> {
        if s == "off" {
            return Ok(MetricsAddr(None));
        }
        s.parse()
            .map(|a| MetricsAddr(Some(a)))
            .map_err(|_| BadMetricsAddr { given: s.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_common::proto::{GenerationState, GenerationStatus, ServiceStatus, Status};

    #[test]
    fn exposes_the_documented_names() {
        let m = Metrics::new();
        m.promotion("web", PromotionResult::Ok, Some(0.002));
        m.retirement("web", Retirement::Drained, Some(1.5));
        m.steering_watch("web", SteeringWatch::Restored);
        let steering = handoff_common::maps::Counters {
            active: 300,
            ..Default::default()
        };
        let status = Status {
            services: vec![ServiceStatus {
                name: "web".into(),
                listen: vec!["127.0.0.1:80".into()],
                generations: vec![GenerationStatus {
                    id: 2,
                    pid: 42,
                    state: GenerationState::Active,
                    listeners: 1,
                    connections: 7,
                    drain_age_ms: None,
                    drain_deadline_ms: None,
                    release: None,
                }],
                foreign_listeners: vec![],
                steering,
                steering_watch: Default::default(),
                rollbacks: None,
            }],
            kernel: None,
        };
        let text = m.render(&status);
        for needle in [
            "handoff_generation_connections{service=\"web\",generation=\"2\",pid=\"42\",state=\"active\"} 7",
            "handoff_promotions_total{service=\"web\",result=\"ok\"} 1",
            "handoff_retirements_total{service=\"web\",reason=\"drained\"} 1",
            "handoff_steered_connections_total{service=\"web\",target=\"active\"} 300",
            "handoff_promote_duration_seconds_count{service=\"web\"} 1",
            "handoff_drain_duration_seconds_count{service=\"web\"} 1",
            "handoff_foreign_listeners{service=\"web\"} 0",
            "handoff_steering_watch_total{service=\"web\",reason=\"restored\"} 1",
            "# HELP handoff_retirements Generations retired, by how: drained, timeout, exited, killed",
            "# HELP handoff_steered_connections Decisions of the kernel program by target: active, active_retry, fallback, kernel_hash, migrated, probe",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn metrics_addr_may_be_off() {
        assert_eq!("off".parse(), Ok(MetricsAddr(None)));
        assert_eq!(
            "127.0.0.1:9464".parse(),
            Ok(MetricsAddr(Some("127.0.0.1:9464".parse().unwrap())))
        );
        let bad = "nine".parse::<MetricsAddr>().unwrap_err();
        assert_eq!(bad.to_string(), "\"nine\" is not ADDR:PORT or off");
    }
}
