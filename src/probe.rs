//! The worker's small HTTP listener: `/live`, `/ready` and `/metrics`.
//!
//! Liveness never depends on NATS or the GPU (a restart would not fix either); readiness is true only
//! while the model is warm and the subscription is active.
//!
//! Served by [`crate::http_server`] with the same header, body and idle timeouts as the sidecar,
//! and small fixed caps: its callers are the kubelet and a Prometheus scraper, never a crowd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::http_server::{self, BodyError, BodyLimit, ServerLimits, Timeouts};
use crate::wire::ErrorCode;

/// Connections the probe serves at once: the kubelet, a scraper and an operator need a handful;
/// room for more keeps /live answering while stuck connections wait for their timeouts. Counted
/// in `http_server::RESERVED_FDS` when the sidecar shares the process (`rerank serve`).
pub const PROBE_MAX_CONNECTIONS: usize = 256;
/// The probe's routes take no body; anything larger than this is refused unread.
const PROBE_MAX_BODY_BYTES: usize = 16 * 1024;
const PROBE_BODY_BUDGET_BYTES: usize = 1024 * 1024;

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
        .layer(axum::middleware::from_fn(admit_body))
        .with_state(state)
}

/// Serves the probe on `listener` until the task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ProbeState,
    timeouts: Timeouts,
) -> std::io::Result<()> {
    let limits = ServerLimits {
        timeouts,
        max_connections: PROBE_MAX_CONNECTIONS,
        body_limit: BodyLimit::Fixed(PROBE_MAX_BODY_BYTES),
        body_budget_bytes: PROBE_BODY_BUDGET_BYTES,
    };
    http_server::serve(listener, router(state), limits, std::future::pending()).await
}

/// Refuses an oversized body unread, in plain text like the probe's other answers.
async fn admit_body(request: Request, next: Next) -> Response {
    match http_server::admit(&request) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal_response(&refusal),
    }
}

fn refusal_response(refusal: &BodyError) -> Response {
    let code = refusal.code();
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = (status, format!("{code}: {refusal}\n")).into_response();
    if code == ErrorCode::Unavailable {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
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
