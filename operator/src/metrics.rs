//! The operator's Prometheus metrics: one registry, bounded label values, durations in seconds.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CategoryLabels {
    category: &'static str,
}

/// Every metric the operator exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<CategoryLabels, Counter>,
    duration: Histogram,
    leader: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("remotemedia_operator");
        let reconciles = Counter::default();
        let failures = Family::<CategoryLabels, Counter>::default();
        // 1 ms to ~16 s: a reconcile is a few API round trips.
        let duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.001, 2.0, 15,
        ));
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "ModelWorker reconciles started",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "ModelWorker reconciles that failed, by category",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one ModelWorker reconcile took",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the Lease and runs the controller, else 0",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
        }
    }

    pub fn reconcile_started(&self) {
        self.reconciles.inc();
    }

    pub fn reconcile_finished(&self, seconds: f64) {
        self.duration.observe(seconds);
    }

    pub fn reconcile_failed(&self, category: &'static str) {
        self.failures
            .get_or_create(&CategoryLabels { category })
            .inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
