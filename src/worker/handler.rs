//! One request: decode → engine → reply. Every message with a reply subject gets exactly one reply.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use bytes::Bytes;
use tracing::Instrument;

use crate::engine::{Engine, EngineError, ScoreRequest};
use crate::model::{ChunkPolicy, Truncation, DEFAULT_CHUNK_OVERLAP, DEFAULT_MAX_CHUNKS_PER_DOC};
use crate::telemetry::propagation;
use crate::wire::{self, ErrorCode, ErrorReply, RerankReply, RerankRequest, Span, Truncate, Usage};

use super::metrics::WorkerMetrics;

/// What every handler needs; shared by all in-flight requests.
pub struct HandlerContext {
    pub engine: Engine,
    pub client: async_nats::Client,
    pub metrics: WorkerMetrics,
    pub model_name: String,
    pub log_text: bool,
    /// Admission for requests still being decoded/tokenized; beyond it, `overloaded` at once.
    pub inflight: Arc<tokio::sync::Semaphore>,
}

/// Handles one NATS message to completion.
pub async fn handle(ctx: Arc<HandlerContext>, message: async_nats::Message) {
    let Some(reply_to) = message.reply.clone() else {
        tracing::debug!(subject = %message.subject, "message without reply subject ignored");
        return;
    };
    let span = tracing::info_span!(
        "worker.request",
        otel.kind = "server",
        messaging.system = "nats",
        messaging.destination.name = %message.subject,
        rerank.documents = tracing::field::Empty,
        rerank.code = tracing::field::Empty,
    );
    propagation::continue_from_nats(&span, message.headers.as_ref());
    let received = Instant::now();
    ctx.metrics.inflight.inc();
    let outcome = process(&ctx, &message.payload)
        .instrument(span.clone())
        .await;
    ctx.metrics.inflight.dec();

    let (body, headers, code) = match outcome {
        Ok(reply) => {
            let body = wire::encode(&reply);
            // Replies count against max_payload too: send a small error instead of nothing.
            if body.len() + 256 > ctx.client.max_payload() {
                let message = format!(
                    "the reply of {} bytes exceeds the server's max_payload of {} bytes; send fewer documents per request",
                    body.len(),
                    ctx.client.max_payload()
                );
                error_reply(ErrorCode::PayloadTooLarge, message)
            } else {
                (body, HeaderMap::new(), None)
            }
        }
        Err(error) => error_reply(error.error.code, error.error.message),
    };
    let code_label = code.map_or("ok", ErrorCode::as_str);
    span.record("rerank.code", code_label);
    let outcome_label = if code.is_some() { "error" } else { "ok" };
    ctx.metrics
        .requests
        .with_label_values(&[outcome_label, code_label])
        .inc();
    ctx.metrics
        .duration
        .with_label_values(&[outcome_label])
        .observe(received.elapsed().as_secs_f64());
    let publish = ctx
        .client
        .publish_with_headers(reply_to, headers, Bytes::from(body))
        .instrument(tracing::info_span!(parent: &span, "worker.reply"))
        .await;
    if let Err(e) = publish {
        tracing::warn!(parent: &span, error = %e, "could not publish the reply");
    }
}

/// MessagePack error body plus the ADR-32 headers.
fn error_reply(code: ErrorCode, message: String) -> (Vec<u8>, HeaderMap, Option<ErrorCode>) {
    let mut headers = HeaderMap::new();
    headers.insert(wire::HEADER_SERVICE_ERROR, message.as_str());
    headers.insert(
        wire::HEADER_SERVICE_ERROR_CODE,
        code.status().to_string().as_str(),
    );
    (
        wire::encode(&ErrorReply::new(code, message)),
        headers,
        Some(code),
    )
}

async fn process(ctx: &HandlerContext, payload: &[u8]) -> Result<RerankReply, ErrorReply> {
    let _permit = ctx.inflight.clone().try_acquire_owned().map_err(|_| {
        ErrorReply::new(
            ErrorCode::Overloaded,
            "too many requests in flight on this worker; retry",
        )
    })?;
    let request: RerankRequest = tracing::info_span!("worker.decode", bytes = payload.len())
        .in_scope(|| wire::decode_request(payload))
        .map_err(|e| ErrorReply::new(ErrorCode::InvalidRequest, e.to_string()))?;
    tracing::Span::current().record("rerank.documents", request.documents.len());
    if ctx.log_text {
        tracing::info!(query = %request.query, documents = ?request.documents, "request text");
    }
    let deadline = match request.deadline_ms {
        Some(ms) => Some(deadline_from_epoch_ms(ms).ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::DeadlineExceeded,
                "the request's deadline_ms has already passed",
            )
        })?),
        None => None,
    };
    let truncation = truncation(&request, ctx.engine.config().max_chunks_per_doc)?;
    let response = ctx
        .engine
        .score(ScoreRequest {
            query: request.query,
            documents: request.documents,
            truncation,
            deadline,
        })
        .await
        .map_err(engine_error_reply)?;
    let spans = request.return_spans.unwrap_or(false).then(|| {
        response
            .spans
            .iter()
            .map(|span| Span {
                start: span.start as u64,
                end: span.end as u64,
            })
            .collect()
    });
    Ok(RerankReply {
        ranked_indices: wire::rank(&response.scores, request.top_k),
        scores: response.scores,
        model: ctx.model_name.clone(),
        usage: Usage {
            pairs: response.pairs as u64,
            tokens: response.tokens as u64,
        },
        request_id: request.request_id,
        spans,
    })
}

/// The request's length policy for the engine; chunking options are checked against this
/// worker's limit.
fn truncation(request: &RerankRequest, max_chunks_limit: usize) -> Result<Truncation, ErrorReply> {
    let invalid = |message: String| ErrorReply::new(ErrorCode::InvalidRequest, message);
    let chunk_option_without_chunk =
        request.max_chunks_per_doc.is_some() || request.chunk_overlap.is_some();
    match request.truncate.unwrap_or_default() {
        Truncate::End | Truncate::None if chunk_option_without_chunk => Err(invalid(
            "max_chunks_per_doc and chunk_overlap apply only to truncate CHUNK".into(),
        )),
        Truncate::End => Ok(Truncation::End),
        Truncate::None => Ok(Truncation::None),
        Truncate::Chunk => {
            let max_chunks = request
                .max_chunks_per_doc
                .map_or(DEFAULT_MAX_CHUNKS_PER_DOC, |n| n as usize);
            if max_chunks == 0 || max_chunks > max_chunks_limit {
                return Err(invalid(format!(
                    "max_chunks_per_doc {max_chunks} is out of range (1..={max_chunks_limit} on this worker)"
                )));
            }
            Ok(Truncation::Chunk(ChunkPolicy {
                max_chunks,
                overlap: request
                    .chunk_overlap
                    .map_or(DEFAULT_CHUNK_OVERLAP, |n| n as usize),
            }))
        }
    }
}

/// The engine's failures in the wire vocabulary.
pub fn engine_error_reply(error: EngineError) -> ErrorReply {
    let code = match &error {
        EngineError::TooManyDocuments { .. } => ErrorCode::TooManyDocuments,
        EngineError::TooManyWindows { .. } => ErrorCode::TooManyDocuments,
        EngineError::DocumentTooLong(_) => ErrorCode::DocumentTooLong,
        EngineError::QueryTooLong(_) => ErrorCode::InvalidRequest,
        EngineError::Overloaded { .. } => ErrorCode::Overloaded,
        EngineError::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        EngineError::Tokenizer(_) | EngineError::Model(_) => ErrorCode::ModelError,
        EngineError::ShuttingDown => ErrorCode::Unavailable,
    };
    if code == ErrorCode::ModelError {
        tracing::error!(error = %error, "request failed inside the model");
    }
    ErrorReply::new(code, error.to_string())
}

/// Converts an absolute Unix-epoch deadline into an `Instant`; `None` if it has passed.
fn deadline_from_epoch_ms(ms: u64) -> Option<Instant> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let left = ms.checked_sub(now_ms).filter(|&left| left > 0)?;
    Instant::now().checked_add(Duration::from_millis(left))
}
