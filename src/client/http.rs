//! The HTTP transport: one `POST {base}/rerank` to the sidecar per attempt.
//!
//! The sidecar's `/rerank` answers exactly the seed shape (`scores`, `ranked_indices`), so replies
//! over HTTP carry no model name and no token usage. A client built with a model names it in the
//! body's optional `model`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::telemetry::propagation;
use crate::wire::{ErrorCode, ErrorReply, RerankReply, RerankRequest, Span, Truncate, Usage};

use super::RerankError;

#[derive(Clone, Debug)]
pub(crate) struct HttpTransport {
    pub http: reqwest::Client,
    /// `{base}/rerank`.
    pub url: String,
    pub bearer_token: Option<String>,
    /// Named in every body; `None`: the pool's default model.
    pub model: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    query: &'a str,
    documents: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    truncate: Option<Truncate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_chunks_per_doc: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_overlap: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    return_spans: bool,
}

#[derive(Deserialize)]
struct Reply {
    scores: Vec<f32>,
    ranked_indices: Vec<u32>,
    #[serde(default)]
    spans: Option<Vec<Span>>,
}

impl HttpTransport {
    pub fn new(
        base_url: &str,
        bearer_token: Option<String>,
        model: Option<String>,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder().build()?,
            url: format!("{}/rerank", base_url.trim_end_matches('/')),
            bearer_token,
            model,
        })
    }

    pub async fn send(
        &self,
        request: &RerankRequest,
        timeout: Duration,
    ) -> Result<RerankReply, RerankError> {
        let mut headers = reqwest::header::HeaderMap::new();
        propagation::inject_http(&tracing::Span::current(), &mut headers);
        let mut builder = self
            .http
            .post(&self.url)
            .headers(headers)
            .timeout(timeout)
            .json(&Body {
                model: self.model.as_deref(),
                query: &request.query,
                documents: &request.documents,
                top_k: request.top_k,
                truncate: request.truncate,
                max_chunks_per_doc: request.max_chunks_per_doc,
                chunk_overlap: request.chunk_overlap,
                return_spans: request.return_spans.unwrap_or(false),
            });
        if let Some(token) = &self.bearer_token {
            builder = builder.bearer_auth(token);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| transport_error(e, timeout))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response
            .bytes()
            .await
            .map_err(|e| transport_error(e, timeout))?;
        if status.is_success() {
            let reply: Reply = serde_json::from_slice(&body).map_err(|e| {
                RerankError::InvalidResponse(format!("the sidecar's answer does not parse: {e}"))
            })?;
            return Ok(RerankReply {
                scores: reply.scores,
                ranked_indices: reply.ranked_indices,
                model: String::new(),
                usage: Usage::default(),
                request_id: request.request_id.clone(),
                spans: reply.spans,
            });
        }
        let (code, message) = match serde_json::from_slice::<ErrorReply>(&body) {
            Ok(e) => (e.error.code, e.error.message),
            Err(_) => (
                ErrorCode::for_status(status.as_u16()),
                format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ),
            ),
        };
        Err(RerankError::Service {
            code,
            message,
            retry_after,
        })
    }
}

fn transport_error(e: reqwest::Error, timeout: Duration) -> RerankError {
    if e.is_timeout() {
        RerankError::Timeout { timeout }
    } else {
        RerankError::Connection(e.to_string())
    }
}
