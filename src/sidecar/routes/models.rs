//! `GET /v1/models`: what the pool serves, as an OpenAI-style model list (what vLLM, TEI's
//! OpenAI front and Infinity answer), built from NATS service discovery and, with the JetStream
//! transport, the job stream's consumers (see [`crate::sidecar::models`]): a pool scaled to zero is
//! listed with `workers: 0`.
//!
//! `{"object": "list", "data": [{"id", "object": "model", "created", "owned_by", "family",
//! "default", "workers", "devices"}]}`: the default model first, then by id. `created` is when this
//! sidecar first saw the model (Unix seconds); `owned_by` is `rerank-service`. An empty pool is an
//! empty list; NATS down is 503 `unavailable`.

use axum::extract::State;
use axum::Json;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::super::error::ApiError;
use super::super::AppState;

/// What `owned_by` says for every model (vLLM says `vllm`).
pub const OWNED_BY: &str = "rerank-service";

/// One model of the list.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ModelCard {
    /// The id to send as `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds when this sidecar first saw it (a worker serving it, or its consumer).
    pub created: u64,
    /// Always `rerank-service`.
    pub owned_by: String,
    /// Architecture family (config.json `model_type`, e.g. `llama_bidirec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// Whether requests without `model` go to it.
    pub default: bool,
    /// Workers serving it that answered discovery (0: its pool is scaled to zero; its jobs wait in
    /// the stream until a worker starts).
    pub workers: usize,
    /// Their devices (`cpu`, `cuda:0`...).
    pub devices: Vec<String>,
}

/// The OpenAI-style list.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelCard>,
}

pub async fn list(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let models = state.models().list().await?;
    Ok(Json(ModelList {
        object: "list".into(),
        data: models
            .into_iter()
            .map(|m| ModelCard {
                id: m.id,
                object: "model".into(),
                created: m.first_seen,
                owned_by: OWNED_BY.into(),
                family: m.family,
                default: m.default,
                workers: m.workers,
                devices: m.devices,
            })
            .collect(),
    }))
}
