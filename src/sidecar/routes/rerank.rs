//! `POST /rerank`: the seed service's API (`docs/seed-api.md`), unchanged but for an optional
//! `model` (absent: the pool's default model).

use axum::extract::State;
use axum::Json;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::wire::{RerankRequest, Span};

use super::super::error::ApiError;
use super::super::extract::ApiJson;
use super::super::AppState;
use super::LengthOptions;

/// `{"query": "...", "documents": ["...", ...]}` plus optional `top_k`, `truncate` and the
/// long-document options.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct RerankBody {
    /// The model to rerank with, as `GET /v1/models` lists it (absent: the pool's default).
    #[serde(default)]
    pub model: Option<String>,
    pub query: String,
    pub documents: Vec<String>,
    /// Return only the best `top_k` indices in `ranked_indices` (scores stay complete).
    #[serde(default)]
    pub top_k: Option<u64>,
    #[serde(flatten)]
    pub length: LengthOptions,
}

/// `{"scores": [...], "ranked_indices": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RerankResponse {
    /// Raw logits, one per document in input order (higher is more relevant; not 0–1).
    pub scores: Vec<f32>,
    /// Document indices by descending score, cut to `top_k` when given.
    pub ranked_indices: Vec<u32>,
    /// With `return_spans`: per document, the part of its text that produced its score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spans: Option<Vec<Span>>,
}

pub async fn rerank(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RerankBody>,
) -> Result<Json<RerankResponse>, ApiError> {
    let request = RerankRequest {
        top_k: body.top_k,
        ..body.length.request(body.query, body.documents)
    };
    let reply = super::call(&state, body.model.as_deref(), request).await?;
    Ok(Json(RerankResponse {
        scores: reply.scores,
        ranked_indices: reply.ranked_indices,
        spans: reply.spans,
    }))
}
