//! `GET /health` (the seed's shape, answered by asking the worker pool) and the probes.
//!
//! - `/health`: 200 `{"status": "healthy", "model_loaded": true, "device": "cuda:0"}` when at
//!   least one worker answers the NATS service discovery (`$SRV.PING.rerank`) with its model
//!   loaded; otherwise 503 `{"status": "unhealthy", "model_loaded": false, "reason": "..."}`.
//!   It answers within a second: an empty pool is known at once (no responders), a silent one
//!   after the discovery window (250 ms by default).
//!   With the JetStream transport and no worker running (the pool scaled to zero), the sidecar
//!   still accepts requests (they wait in the stream and start a worker through KEDA), so it
//!   answers 200 `{"status": "healthy", "model_loaded": false, "reason": "..."}`: it can serve,
//!   but no model is loaded yet, and the first request pays a cold start.
//! - `/live`: the process is up (never depends on NATS or workers, to avoid restart cascades).
//! - `/ready`: 200 while connected to NATS, so traffic goes to sidecars that can forward it.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::super::AppState;

/// Upper bound on `/health`, whatever NATS does.
const HEALTH_LIMIT: Duration = Duration::from_millis(900);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Healthy,
    Unhealthy,
}

/// The seed's health body; `reason` when unhealthy or when no model is loaded.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct HealthResponse {
    pub status: HealthStatus,
    pub model_loaded: bool,
    /// The device of the worker that answered (`cpu`, `cuda:0`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn unhealthy(reason: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(HealthResponse {
            status: HealthStatus::Unhealthy,
            model_loaded: false,
            device: None,
            reason: Some(reason),
        }),
    )
        .into_response()
}

pub async fn health(State(state): State<AppState>) -> Response {
    let client = &state.inner.client;
    if !client.is_connected() {
        return unhealthy("the sidecar is not connected to NATS".into());
    }
    let wait = state.inner.health_wait;
    match tokio::time::timeout(HEALTH_LIMIT, client.ready_worker(wait)).await {
        Ok(Ok(Some(worker))) => (
            StatusCode::OK,
            Json(HealthResponse {
                status: HealthStatus::Healthy,
                model_loaded: true,
                device: Some(worker.device.unwrap_or_else(|| "unknown".into())),
                reason: None,
            }),
        )
            .into_response(),
        Ok(Ok(None)) if client.queues_jobs() => (
            StatusCode::OK,
            Json(HealthResponse {
                status: HealthStatus::Healthy,
                model_loaded: false,
                device: None,
                reason: Some(
                    "no worker is running (scaled to zero): requests are queued in JetStream and answered once a worker has started".into(),
                ),
            }),
        )
            .into_response(),
        Ok(Ok(None)) => unhealthy(format!(
            "no rerank worker with its model loaded answered within {} ms",
            wait.as_millis()
        )),
        Ok(Err(e)) => unhealthy(format!("worker discovery failed: {e}")),
        Err(_) => unhealthy("worker discovery did not finish in time".into()),
    }
}

pub async fn live() -> Response {
    (StatusCode::OK, "live\n").into_response()
}

pub async fn ready(State(state): State<AppState>) -> Response {
    if state.inner.client.is_connected() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS\n").into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    crate::probe::render_metrics(&state.inner.registry).into_response()
}

pub async fn openapi(State(state): State<AppState>) -> Response {
    Json(state.inner.openapi.clone()).into_response()
}
