//! The worker's phase — loading, ready, draining — and the health views derived from it: gRPC
//! health, `/readyz`, `/v2/health/ready`, ServerReady and ModelReady all read this one state.

use std::sync::atomic::{AtomicU8, Ordering};

use remotemedia_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};

/// Where the worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The model is loading or warming up: live, not ready.
    Loading = 0,
    /// The model answered its warm-up pass.
    Ready = 1,
    /// SIGTERM arrived: still serving, but no longer ready, so no new traffic is routed here.
    Draining = 2,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Loading => "loading",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
        }
    }
}

/// The gRPC health service names the worker reports: the server as a whole, and the inference
/// service.
const HEALTH_SERVICES: [&str; 2] = [
    "",
    <GrpcInferenceServiceServer<crate::service::InferenceService> as NamedService>::NAME,
];

/// The shared phase, kept in step with gRPC health.
pub struct Lifecycle {
    phase: AtomicU8,
    health: HealthReporter,
}

impl Lifecycle {
    /// Starts in [`Phase::Loading`], with gRPC health NOT_SERVING.
    pub async fn new(health: HealthReporter) -> Self {
        let lifecycle = Lifecycle {
            phase: AtomicU8::new(Phase::Loading as u8),
            health,
        };
        lifecycle.report(ServingStatus::NotServing).await;
        lifecycle
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Loading,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.phase() == Phase::Ready
    }

    /// Loading → ready. A worker already draining stays draining.
    pub async fn mark_ready(&self) {
        let became_ready = self
            .phase
            .compare_exchange(
                Phase::Loading as u8,
                Phase::Ready as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if became_ready {
            self.report(ServingStatus::Serving).await;
        }
    }

    /// Any phase → draining, and gRPC health NOT_SERVING at once.
    pub async fn begin_drain(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::Release);
        self.report(ServingStatus::NotServing).await;
    }

    async fn report(&self, status: ServingStatus) {
        for service in HEALTH_SERVICES {
            self.health.set_service_status(service, status).await;
        }
    }
}
