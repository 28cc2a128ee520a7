//! Prometheus metrics served on the admin port's `/metrics`.

use std::{fmt::Write as _, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tonic::Code;

/// How a request ended: success or its gRPC status code, a bounded set of label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Outcome(Option<Code>);

impl Outcome {
    pub fn of<T>(result: &Result<T, tonic::Status>) -> Self {
        Outcome(result.as_ref().err().map(tonic::Status::code))
    }

    fn label(self) -> &'static str {
        match self.0 {
            None => "success",
            Some(Code::Ok) => "ok",
            Some(Code::Cancelled) => "cancelled",
            Some(Code::Unknown) => "unknown",
            Some(Code::InvalidArgument) => "invalid_argument",
            Some(Code::DeadlineExceeded) => "deadline_exceeded",
            Some(Code::NotFound) => "not_found",
            Some(Code::AlreadyExists) => "already_exists",
            Some(Code::PermissionDenied) => "permission_denied",
            Some(Code::ResourceExhausted) => "resource_exhausted",
            Some(Code::FailedPrecondition) => "failed_precondition",
            Some(Code::Aborted) => "aborted",
            Some(Code::OutOfRange) => "out_of_range",
            Some(Code::Unimplemented) => "unimplemented",
            Some(Code::Internal) => "internal",
            Some(Code::Unavailable) => "unavailable",
            Some(Code::DataLoss) => "data_loss",
            Some(Code::Unauthenticated) => "unauthenticated",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.label())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

/// The worker's metrics; cheap to clone, every clone updates the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    requests: Family<OutcomeLabels, Counter>,
    duration: Histogram,
    /// Requests admitted and waiting for an executor.
    pub queue_depth: Gauge,
    /// Forward passes running now.
    pub in_flight: Gauge,
    /// Requests per forward pass.
    pub batch_size: Histogram,
    /// Time from queueing a request to the start of its pass.
    pub queue_delay: Histogram,
    /// Input bytes copied to concatenate batches (a request run alone is never copied).
    pub batch_copied_bytes: Counter,
    /// Shared-memory inputs copied because their address did not suit their datatype.
    pub shm_misaligned_copies: Counter,
    /// System shared-memory regions registered now.
    pub shm_regions: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            requests: Family::default(),
            // 0.5 ms to about 16 s.
            duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            queue_depth: Gauge::default(),
            in_flight: Gauge::default(),
            // 1 to 1024 requests.
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            // 10 µs to about 5 s.
            queue_delay: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            batch_copied_bytes: Counter::default(),
            shm_misaligned_copies: Counter::default(),
            shm_regions: Gauge::default(),
        };
        registry.register(
            "requests",
            "Inference requests, by outcome",
            metrics.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receiving an inference request to answering it",
            metrics.duration.clone(),
        );
        registry.register(
            "queue_depth",
            "Inference requests waiting for an executor",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "batch_size",
            "Requests run together in one forward pass (dynamic batching)",
            metrics.batch_size.clone(),
        );
        registry.register(
            "queue_delay_seconds",
            "Time from queueing an inference request to the start of its forward pass",
            metrics.queue_delay.clone(),
        );
        registry.register(
            "batch_copied_bytes",
            "Input bytes copied to concatenate requests into batches; a request run alone is read in place",
            metrics.batch_copied_bytes.clone(),
        );
        registry.register(
            "in_flight",
            "Forward passes running",
            metrics.in_flight.clone(),
        );
        registry.register(
            "shm_misaligned_copies",
            "Shared-memory inputs copied to an aligned buffer instead of read in place",
            metrics.shm_misaligned_copies.clone(),
        );
        registry.register(
            "shm_regions",
            "System shared-memory regions registered",
            metrics.shm_regions.clone(),
        );
        metrics
    }

    /// Counts one finished inference request.
    pub fn record(&self, outcome: Outcome, elapsed: Duration) {
        self.requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// Raises a gauge for as long as the guard lives, also when the holder panics or is cancelled.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_outcome() {
        let mut registry = Registry::with_prefix("remotemedia_worker");
        let metrics = Metrics::register(&mut registry);
        metrics.record(Outcome::of(&Ok(())), Duration::from_millis(3));
        metrics.record(
            Outcome::of::<()>(&Err(tonic::Status::not_found("x"))),
            Duration::from_millis(1),
        );
        {
            let _guard = GaugeGuard::new(&metrics.in_flight);
            assert_eq!(metrics.in_flight.get(), 1);
        }
        let text = encode(&registry).unwrap();
        assert!(
            text.contains(r#"remotemedia_worker_requests_total{outcome="success"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"remotemedia_worker_requests_total{outcome="not_found"} 1"#));
        assert!(text.contains("remotemedia_worker_request_duration_seconds_count 2"));
        assert!(text.contains("remotemedia_worker_in_flight 0"));
    }
}
