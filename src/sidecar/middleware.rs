//! Request middleware: the `sidecar.request` span with metrics (outermost), bearer auth, then
//! body admission (size and budget, before a byte of the body is read).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use subtle::ConstantTimeEq;
use tracing::Instrument;

use crate::telemetry::{metrics as names, propagation};
use crate::wire::ErrorCode;

use super::error::ApiError;
use super::AppState;

/// Label for requests that matched no route (keeps the label set bounded).
const UNMATCHED: &str = "unmatched";

/// Prometheus instruments of the HTTP surface.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    /// By `route` (the route template) and `status` (the HTTP status code).
    pub requests: IntCounterVec,
    /// By `route`.
    pub duration: HistogramVec,
}

impl HttpMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    names::HTTP_REQUESTS_TOTAL,
                    "HTTP requests answered, by route and status",
                ),
                &["route", "status"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    names::HTTP_REQUEST_DURATION_SECONDS,
                    "Time from receiving an HTTP request to its response head, by route",
                )
                .buckets(names::latency_buckets()),
                &["route"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        Ok(m)
    }
}

/// Opens the request span (continuing the caller's trace) and records the metrics.
pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, |p| p.as_str())
        .to_string();
    let span = tracing::info_span!(
        "sidecar.request",
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    propagation::continue_from_http(&span, request.headers());
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    let metrics = &state.inner.metrics;
    metrics
        .requests
        .with_label_values(&[route.as_str(), status.as_str()])
        .inc();
    metrics
        .duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Paths open without the API key (the kubelet's probes carry no token).
fn is_public(path: &str) -> bool {
    matches!(path, "/live" | "/ready")
}

/// Requires `Authorization: Bearer <RERANK_API_KEY>` when a key is configured.
pub async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.inner.api_key.as_deref() else {
        return next.run(request).await;
    };
    if is_public(request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match presented {
        // Constant time: the comparison does not reveal how many leading bytes matched.
        Some(token) if bool::from(token.as_bytes().ct_eq(expected.as_bytes())) => {
            next.run(request).await
        }
        Some(_) => {
            ApiError::new(ErrorCode::Unauthorized, "the bearer token is not valid").into_response()
        }
        None => ApiError::new(
            ErrorCode::Unauthorized,
            "missing `Authorization: Bearer <token>` (RERANK_API_KEY is set on this sidecar)",
        )
        .into_response(),
    }
}

/// Refuses a body over the limit or the buffered-bytes budget before reading it (inside auth).
pub async fn admit_body(request: Request, next: Next) -> Response {
    match crate::http_server::admit(&request) {
        Ok(()) => next.run(request).await,
        Err(refusal) => ApiError::from(refusal).into_response(),
    }
}
