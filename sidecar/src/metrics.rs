//! The sidecar's Prometheus metrics: one registry, bounded label values, node totals only
//! (per-session numbers live on `/debug/sessions`).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use remotemedia_runtime_core::shm::broker::ErrorCode;
use remotemedia_runtime_core::shm::broker::wire::Response;

use crate::broker::Books;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// How an inference travelled: brokered regions to a colocated worker by grant (`shm_local`),
/// bytes inline to a colocated worker (`inline_local`) or to a worker on another node
/// (`inline_remote`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Path {
    ShmLocal,
    InlineLocal,
    InlineRemote,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::ShmLocal => "shm_local",
            Path::InlineLocal => "inline_local",
            Path::InlineRemote => "inline_remote",
        }
    }
}

/// How an ask for one replica (scale from zero) ended: the sidecar scaled the ModelWorker from 0
/// to 1 (`scaled`), found it already above 0 (`already_scaled`: another sidecar or a person was
/// first), or the API server refused or could not be reached (`failed`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ScaleUp {
    Scaled,
    AlreadyScaled,
    Failed,
}

impl ScaleUp {
    fn label(self) -> &'static str {
        match self {
            ScaleUp::Scaled => "scaled",
            ScaleUp::AlreadyScaled => "already_scaled",
            ScaleUp::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InferenceLabels {
    path: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    path: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the sidecar exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    protocol_errors: Family<ReasonLabels, Counter>,
    sessions: Gauge,
    regions: Gauge,
    bytes: Gauge,
    inferences: Family<InferenceLabels, Counter>,
    latency: Family<PathLabels, Histogram, fn() -> Histogram>,
    forwarded_bytes: Family<PathLabels, Counter>,
    held: Gauge,
    scale_ups: Family<OutcomeLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("remotemedia_sidecar");
        let requests = Family::<RequestLabels, Counter>::default();
        let protocol_errors = Family::<ReasonLabels, Counter>::default();
        let (sessions, regions, bytes) = (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register(
            "broker_requests",
            "Broker requests by kind and outcome (ok or the refusal code)",
            requests.clone(),
        );
        registry.register(
            "broker_protocol_errors",
            "Broker connections closed for a bad packet, by reason",
            protocol_errors.clone(),
        );
        registry.register("broker_sessions", "Open broker sessions", sessions.clone());
        registry.register(
            "shm_regions",
            "Brokered regions alive on the node",
            regions.clone(),
        );
        registry.register(
            "shm_bytes",
            "Bytes of brokered regions alive on the node (counted against --max-shm-bytes)",
            bytes.clone(),
        );
        let inferences = Family::<InferenceLabels, Counter>::default();
        registry.register(
            "inference_requests",
            "Inference requests routed, by path (shm_local, inline_local, inline_remote) and outcome",
            inferences.clone(),
        );
        let latency: Family<PathLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "inference_duration",
            "Time from receiving an inference to answering it, by path",
            prometheus_client::registry::Unit::Seconds,
            latency.clone(),
        );
        let forwarded_bytes = Family::<PathLabels, Counter>::default();
        registry.register_with_unit(
            "forwarded",
            "Tensor bytes of routed inferences, by path (shm_local: passed by grant, not copied)",
            prometheus_client::registry::Unit::Bytes,
            forwarded_bytes.clone(),
        );
        let held = Gauge::default();
        registry.register(
            "held_requests",
            "Inference requests waiting for a ready worker",
            held.clone(),
        );
        let scale_ups = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "scale_ups",
            "Asks for one replica of a ModelWorker at zero (scale from zero), by outcome: scaled, \
             already_scaled (another sidecar or a person was first), failed",
            scale_ups.clone(),
        );
        Self {
            inferences,
            latency,
            forwarded_bytes,
            held,
            scale_ups,
            registry,
            requests,
            protocol_errors,
            sessions,
            regions,
            bytes,
        }
    }

    pub fn request(&self, kind: &'static str, reply: &Response<Arc<OwnedFd>>) {
        let outcome = match reply {
            Response::Error(refusal) => match refusal.code {
                ErrorCode::InvalidArgument => "invalid_argument",
                ErrorCode::NotFound => "not_found",
                ErrorCode::ResourceExhausted => "resource_exhausted",
                ErrorCode::FailedPrecondition => "failed_precondition",
                ErrorCode::Internal => "internal",
            },
            _ => "ok",
        };
        self.requests
            .get_or_create(&RequestLabels { kind, outcome })
            .inc();
    }

    /// One routed inference.
    pub fn inference(&self, path: Path, outcome: &'static str, elapsed: std::time::Duration) {
        let path = path.label();
        self.inferences
            .get_or_create(&InferenceLabels { path, outcome })
            .inc();
        self.latency
            .get_or_create(&PathLabels { path })
            .observe(elapsed.as_secs_f64());
    }

    /// Tensor bytes a routed inference moved.
    pub fn forwarded(&self, path: Path, bytes: u64) {
        self.forwarded_bytes
            .get_or_create(&PathLabels { path: path.label() })
            .inc_by(bytes);
    }

    /// The gauge of held requests, which the router keeps current.
    pub fn held(&self) -> Gauge {
        self.held.clone()
    }

    /// One ask for a replica through a ModelWorker's scale subresource.
    pub fn scale_up(&self, outcome: ScaleUp) {
        self.scale_ups
            .get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            })
            .inc();
    }

    pub fn protocol_error(&self, reason: &'static str) {
        self.protocol_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Copies the node totals into the gauges.
    pub fn observe(&self, books: &Books) {
        let totals = books.totals();
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.sessions.set(gauge(totals.sessions));
        self.regions.set(gauge(totals.regions));
        self.bytes.set(gauge(totals.bytes));
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
