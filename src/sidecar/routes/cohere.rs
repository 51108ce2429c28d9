//! `POST /v1/rerank`: the Cohere / Jina (and vLLM, Infinity) request and response shape.
//!
//! - `documents` are strings or `{"text": "..."}` objects, freely mixed.
//! - `top_n` keeps the best n results (absent or 0: all, as vLLM does).
//! - `return_documents` (default `false`, as Cohere) adds `document: {"text"}` to each result.
//! - `relevance_score` is the **raw logit**, like our `/rerank`. Send `"normalize": true` to get
//!   the sigmoid of the logit (0–1), which is what Cohere and Jina clients usually expect.
//! - `model` picks the model (as `GET /v1/models` lists it; absent: the pool's default; unknown:
//!   404 `model_not_found`); the response names the model that scored.
//! - `truncate` (`END` | `NONE`) is our extension; other unknown fields are ignored.

use axum::extract::State;
use axum::Json;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::wire::{RerankRequest, Span};

use super::super::error::ApiError;
use super::super::extract::ApiJson;
use super::super::AppState;
use super::sigmoid;
use super::{span_of, LengthOptions};

/// A document: a plain string or an object with a `text` field.
#[derive(Debug, Clone, PartialEq, JsonSchema)]
#[schemars(untagged)]
pub enum CohereDocument {
    Text(String),
    Object { text: String },
}

impl CohereDocument {
    fn into_text(self) -> String {
        match self {
            CohereDocument::Text(text) | CohereDocument::Object { text } => text,
        }
    }
}

impl<'de> Deserialize<'de> for CohereDocument {
    // By hand rather than `#[serde(untagged)]`, whose error ("did not match any variant") does
    // not say what is expected.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CohereDocument;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an object {\"text\": string}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CohereDocument::Text(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CohereDocument::Text(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut text = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "text" {
                        text = Some(map.next_value::<String>()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                text.map(|text| CohereDocument::Object { text })
                    .ok_or_else(|| serde::de::Error::missing_field("text"))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Cohere / Jina rerank request.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct CohereRerankRequest {
    /// The model to rerank with, as `GET /v1/models` lists it (absent: the pool's default).
    #[serde(default)]
    pub model: Option<String>,
    pub query: String,
    pub documents: Vec<CohereDocument>,
    /// Number of results to return, best first (absent or 0: all).
    #[serde(default)]
    pub top_n: Option<u64>,
    /// Include each document's text in its result.
    #[serde(default)]
    pub return_documents: bool,
    /// `true`: `relevance_score` is sigmoid(logit) in 0–1; `false` (default): the raw logit.
    #[serde(default)]
    pub normalize: bool,
    /// `truncate` (`END`, `NONE` or `CHUNK`), `max_chunks_per_doc` (Cohere v1's name),
    /// `chunk_overlap` and `return_spans`, as on `/rerank`.
    #[serde(flatten)]
    pub length: LengthOptions,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DocumentText {
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CohereResult {
    /// Position of the document in the request.
    pub index: u32,
    /// Raw logit, or its sigmoid with `normalize: true`.
    pub relevance_score: f32,
    /// Present with `return_documents: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<DocumentText>,
    /// With `return_spans`: the part of the document's text that produced its score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<Span>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CohereUsage {
    /// Tokens the model read (after truncation).
    pub total_tokens: u64,
    /// Same as `total_tokens` (everything is prompt for a cross-encoder).
    pub prompt_tokens: u64,
}

/// Cohere / Jina rerank response: results sorted by `relevance_score`, best first.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CohereRerankResponse {
    pub model: String,
    pub usage: CohereUsage,
    pub results: Vec<CohereResult>,
}

pub async fn rerank(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CohereRerankRequest>,
) -> Result<Json<CohereRerankResponse>, ApiError> {
    let documents: Vec<String> = body
        .documents
        .into_iter()
        .map(CohereDocument::into_text)
        .collect();
    // Keep the texts only when they are echoed back.
    let echo = body.return_documents.then(|| documents.clone());
    let request = RerankRequest {
        top_k: body.top_n.filter(|&n| n > 0),
        ..body.length.request(body.query, documents)
    };
    let reply = super::call(&state, body.model.as_deref(), request).await?;
    let results = reply
        .ranked_indices
        .iter()
        .map(|&index| {
            let logit = reply
                .scores
                .get(index as usize)
                .copied()
                .unwrap_or(f32::NAN);
            CohereResult {
                index,
                relevance_score: if body.normalize {
                    sigmoid(logit)
                } else {
                    logit
                },
                document: echo.as_ref().and_then(|docs| {
                    docs.get(index as usize)
                        .map(|text| DocumentText { text: text.clone() })
                }),
                span: span_of(&reply, index),
            }
        })
        .collect();
    Ok(Json(CohereRerankResponse {
        model: reply.model,
        usage: CohereUsage {
            total_tokens: reply.usage.tokens,
            prompt_tokens: reply.usage.tokens,
        },
        results,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_strings_or_text_objects() {
        let body: CohereRerankRequest = serde_json::from_str(
            r#"{"model": "m", "query": "q", "documents": ["a", {"text": "b", "title": "t"}], "top_n": 1}"#,
        )
        .unwrap();
        let texts: Vec<String> = body
            .documents
            .into_iter()
            .map(CohereDocument::into_text)
            .collect();
        assert_eq!(texts, vec!["a", "b"]);
        assert!(!body.return_documents && !body.normalize);
        let e = serde_json::from_str::<CohereRerankRequest>(r#"{"query": "q", "documents": [3]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("a string or an object"), "{e}");
        assert!(serde_json::from_str::<CohereRerankRequest>(
            r#"{"query": "q", "documents": [{"txt": "a"}]}"#
        )
        .is_err());
    }
}
