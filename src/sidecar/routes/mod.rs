//! One file per API shape, each a thin translation to `client.send`; plus health and probes.

pub mod cohere;
pub mod health;
pub mod models;
pub mod nim;
pub mod rerank;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::wire::{RerankReply, RerankRequest, Span, Truncate};

use super::error::ApiError;
use super::AppState;

/// How long documents are handled; the same fields on every route (flattened into each body).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct LengthOptions {
    /// `END` (default) cuts pairs longer than the worker's max_length from the right (the
    /// document's tail goes first); `NONE` refuses them with `document_too_long`; `CHUNK` scores
    /// overlapping windows of a long document and keeps the best window's score.
    #[serde(default)]
    pub truncate: Option<Truncate>,
    /// `CHUNK` only: windows per document at most (default 10); the rest of the document is not
    /// read.
    #[serde(default)]
    pub max_chunks_per_doc: Option<u32>,
    /// `CHUNK` only: tokens shared by consecutive windows (default 64).
    #[serde(default)]
    pub chunk_overlap: Option<u32>,
    /// Also return, per document, the range of its text (in Unicode code points) that produced
    /// its score: the best window under `CHUNK`.
    #[serde(default)]
    pub return_spans: bool,
}

impl LengthOptions {
    /// A wire request for `query` and `documents` with these options.
    fn request(&self, query: String, documents: Vec<String>) -> RerankRequest {
        RerankRequest {
            query,
            documents,
            truncate: self.truncate,
            max_chunks_per_doc: self.max_chunks_per_doc,
            chunk_overlap: self.chunk_overlap,
            return_spans: self.return_spans.then_some(true),
            ..RerankRequest::default()
        }
    }
}

/// The span of document `index` in a reply that carries spans.
fn span_of(reply: &RerankReply, index: u32) -> Option<Span> {
    reply.spans.as_ref()?.get(index as usize).copied()
}

/// Sends one request to the worker of `model` (none: the default model) through its client
/// (which sets the deadline and refuses what exceeds NATS `max_payload`), mapping failures to
/// [`ApiError`]; an unknown model is `model_not_found`.
async fn call(
    state: &AppState,
    model: Option<&str>,
    request: RerankRequest,
) -> Result<RerankReply, ApiError> {
    let client = state.inner.models.client_for(model).await?;
    Ok(client.send(request).await?)
}

/// Logistic function, for APIs that ask for probabilities instead of logits.
pub fn sigmoid(logit: f32) -> f32 {
    1.0 / (1.0 + (-logit).exp())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sigmoid_is_the_logistic_function() {
        assert_eq!(super::sigmoid(0.0), 0.5);
        assert!((super::sigmoid(2.0) - 0.880_797).abs() < 1e-6);
        assert!(super::sigmoid(-100.0) >= 0.0 && super::sigmoid(100.0) <= 1.0);
    }
}
