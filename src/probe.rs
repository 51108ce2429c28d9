//! The worker's small HTTP listener: `/live`, `/ready` and `/metrics`.
//!
//! Liveness never depends on NATS or the GPU (a restart would not fix either); readiness is true only
//! while the model is warm and the subscription is active.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// Shared readiness flag and the registry to expose.
#[derive(Clone)]
pub struct ProbeState {
    pub ready: Arc<AtomicBool>,
    pub registry: prometheus::Registry,
}

pub fn router(state: ProbeState) -> Router {
    Router::new()
        .route("/live", get(|| async { (StatusCode::OK, "live\n") }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(State(state): State<ProbeState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(state): State<ProbeState>) -> impl IntoResponse {
    render_metrics(&state.registry)
}

/// Prometheus text exposition of `registry`.
pub fn render_metrics(registry: &prometheus::Registry) -> impl IntoResponse {
    use prometheus::Encoder;
    let encoder = prometheus::TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_string())],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_string())],
            e.to_string().into_bytes(),
        ),
    }
}
