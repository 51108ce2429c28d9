//! `POST /v1/ranking`: the NVIDIA NIM (NeMo Retriever reranking) shape.
//!
//! `{"model"?, "query": {"text"}, "passages": [{"text"}], "truncate": "NONE" | "END"}` →
//! `{"rankings": [{"index", "logit"}], "usage": {...}}`, rankings sorted by logit, best first, raw
//! logits as NIM returns them. `model` picks the model (absent: the pool's default; unknown: 404
//! `model_not_found`). Deviation: an absent `truncate` means `END` here (NIM: `NONE`), so
//! long passages are cut rather than refused unless the caller asks for `NONE`.

use axum::extract::State;
use axum::Json;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::wire::Span;

use super::super::error::ApiError;
use super::super::extract::ApiJson;
use super::super::AppState;
use super::{span_of, LengthOptions};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct NimText {
    pub text: String,
}

/// NIM ranking request.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct NimRankingRequest {
    /// The model to rank with, as `GET /v1/models` lists it (absent: the pool's default).
    #[serde(default)]
    pub model: Option<String>,
    pub query: NimText,
    pub passages: Vec<NimText>,
    /// `truncate` (`END` default here, `NONE`, `CHUNK`), `max_chunks_per_doc`, `chunk_overlap`
    /// and `return_spans`, as on `/rerank`.
    #[serde(flatten)]
    pub length: LengthOptions,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct NimRanking {
    /// Position of the passage in the request.
    pub index: u32,
    /// Raw logit (apply a sigmoid for a 0–1 probability).
    pub logit: f32,
    /// With `return_spans`: the part of the passage's text that produced its logit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<Span>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct NimUsage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

/// NIM ranking response.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct NimRankingResponse {
    /// Every passage, sorted by logit, best first.
    pub rankings: Vec<NimRanking>,
    pub usage: NimUsage,
}

pub async fn ranking(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<NimRankingRequest>,
) -> Result<Json<NimRankingResponse>, ApiError> {
    let passages = body.passages.into_iter().map(|p| p.text).collect();
    let model = body.model.as_deref();
    let reply = super::call(
        &state,
        model,
        body.length.request(body.query.text, passages),
    )
    .await?;
    let rankings = reply
        .ranked_indices
        .iter()
        .map(|&index| NimRanking {
            index,
            logit: reply
                .scores
                .get(index as usize)
                .copied()
                .unwrap_or(f32::NAN),
            span: span_of(&reply, index),
        })
        .collect();
    Ok(Json(NimRankingResponse {
        rankings,
        usage: NimUsage {
            prompt_tokens: reply.usage.tokens,
            total_tokens: reply.usage.tokens,
        },
    }))
}
