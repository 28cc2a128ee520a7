//! The sidecar's Prometheus metrics: one registry, bounded label values, node totals only
//! (per-session numbers live on `/debug/sessions`).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

/// Every metric the sidecar exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    protocol_errors: Family<ReasonLabels, Counter>,
    sessions: Gauge,
    regions: Gauge,
    bytes: Gauge,
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
        Self {
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
