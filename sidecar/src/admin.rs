//! The admin port: `/healthz`, `/readyz`, `/metrics`, `/debug/sessions`, `/debug/endpoints`.

use std::fmt::Write;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::broker::Books;
use crate::metrics::Metrics;
use crate::router::Router as InferenceRouter;

#[derive(Clone)]
struct AdminState {
    books: Arc<Books>,
    metrics: Arc<Metrics>,
    router: Arc<InferenceRouter>,
}

/// The admin routes. The sidecar is ready once the broker socket is bound, which `run` does
/// before it starts serving this router.
pub fn router(books: Arc<Books>, metrics: Arc<Metrics>, router: Arc<InferenceRouter>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_text))
        .route("/debug/sessions", get(sessions))
        .route("/debug/endpoints", get(endpoints))
        .with_state(AdminState {
            books,
            metrics,
            router,
        })
}

async fn metrics_text(State(state): State<AdminState>) -> impl IntoResponse {
    state.metrics.observe(&state.books);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// One line per Hello label: how many sessions, regions and charged bytes. Never an id or token.
async fn sessions(State(state): State<AdminState>) -> String {
    let mut text = String::from("label\tsessions\tregions\tcharged_bytes\n");
    for summary in state.books.summaries() {
        let _ = writeln!(
            text,
            "{}\t{}\t{}\t{}",
            summary.label, summary.sessions, summary.regions, summary.charged_bytes
        );
    }
    text
}

/// One line per endpoint discovery lists now: where each model's requests can go, and whether
/// they go there in place (colocated) or inline.
async fn endpoints(State(state): State<AdminState>) -> String {
    let mut text = String::from("model\taddress\tnode\tcolocated\n");
    for spec in state.router.endpoints().iter() {
        let _ = writeln!(
            text,
            "{}\t{}\t{}\t{}",
            spec.model,
            spec.address,
            spec.node,
            state.router.colocated(spec)
        );
    }
    text
}
