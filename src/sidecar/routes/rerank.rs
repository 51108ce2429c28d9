//! `POST /rerank`: the seed spec's API, unchanged.

use axum::extract::State;
use axum::Json;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::wire::{RerankRequest, Truncate};

use super::super::error::ApiError;
use super::super::extract::ApiJson;
use super::super::AppState;

/// `{"query": "...", "documents": ["...", ...]}` plus optional `top_k` and `truncate`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct RerankBody {
    pub query: String,
    pub documents: Vec<String>,
    /// Return only the best `top_k` indices in `ranked_indices` (scores stay complete).
    #[serde(default)]
    pub top_k: Option<u64>,
    /// `END` (default) cuts pairs longer than the worker's max_length from the right (the
    /// document's tail goes first); `NONE` refuses them with `document_too_long`.
    #[serde(default)]
    pub truncate: Option<Truncate>,
}

/// `{"scores": [...], "ranked_indices": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RerankResponse {
    /// Raw logits, one per document in input order (higher is more relevant; not 0–1).
    pub scores: Vec<f32>,
    /// Document indices by descending score, cut to `top_k` when given.
    pub ranked_indices: Vec<u32>,
}

pub async fn rerank(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RerankBody>,
) -> Result<Json<RerankResponse>, ApiError> {
    let reply = super::call(
        &state,
        RerankRequest {
            query: body.query,
            documents: body.documents,
            top_k: body.top_k,
            truncate: body.truncate,
            ..RerankRequest::default()
        },
    )
    .await?;
    Ok(Json(RerankResponse {
        scores: reply.scores,
        ranked_indices: reply.ranked_indices,
    }))
}
