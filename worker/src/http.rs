//! Plain HTTP endpoints: health on the gRPC port (for `curl` and KServe-style probes) and the
//! admin port's `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;

use crate::lifecycle::{Lifecycle, Phase};

/// What the health handlers read.
#[derive(Clone)]
pub struct Health {
    pub lifecycle: Arc<Lifecycle>,
    pub model_id: Arc<str>,
}

/// Adds `GET /health`, `/v2/health/live` and `/v2/health/ready` to the gRPC router, so one
/// port answers both gRPC (HTTP/2) and plain HTTP/1.1 health checks.
pub fn with_health_routes(grpc: Router, health: Health) -> Router {
    Router::new()
        .route("/health", get(health_summary))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .with_state(health)
        .merge(grpc)
}

/// gRPC's status for a message over the size limit is RESOURCE_EXHAUSTED, as grpc-core and
/// Triton answer, but tonic's codec answers OUT_OF_RANGE. Our handlers never return OUT_OF_RANGE,
/// so on a gRPC response it can only be that limit: rewrite it.
pub async fn size_limit_status(mut response: Response) -> Response {
    let headers = response.headers_mut();
    if headers.get(GRPC_STATUS).and_then(|code| code.to_str().ok()) == Some(OUT_OF_RANGE_CODE) {
        headers.insert(
            GRPC_STATUS,
            HeaderValue::from_static(RESOURCE_EXHAUSTED_CODE),
        );
    }
    response
}

const GRPC_STATUS: &str = "grpc-status";
const OUT_OF_RANGE_CODE: &str = "11";
const RESOURCE_EXHAUSTED_CODE: &str = "8";

/// The admin port's routes.
pub fn admin_router(health: Health, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(health)
        .route("/metrics", get(metrics).with_state(registry))
}

fn ready_status(health: &Health) -> StatusCode {
    if health.lifecycle.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// A one-line JSON summary: the phase and the model, 200 only when ready.
async fn health_summary(State(health): State<Health>) -> impl IntoResponse {
    let phase: Phase = health.lifecycle.phase();
    // The model id is validated to letters, digits and `._-`: safe inside a JSON string.
    let body = format!(
        "{{\"status\":\"{}\",\"model\":\"{}\"}}\n",
        phase.name(),
        health.model_id
    );
    (
        ready_status(&health),
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
}

async fn ready(State(health): State<Health>) -> StatusCode {
    ready_status(&health)
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    (
        ready_status(&health),
        format!("{}\n", health.lifecycle.phase().name()),
    )
}

async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    match crate::metrics::encode(&registry) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
