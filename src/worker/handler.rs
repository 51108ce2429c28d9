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

use super::discovery::ServiceStats;
use super::metrics::WorkerMetrics;

/// What every handler needs; shared by all in-flight requests.
pub struct HandlerContext {
    pub engine: Engine,
    pub client: async_nats::Client,
    pub metrics: WorkerMetrics,
    /// Counters served on `$SRV.STATS`.
    pub stats: ServiceStats,
    pub model_name: String,
    pub log_text: bool,
    /// Admission for requests still being decoded/tokenized; beyond it, `overloaded` at once.
    pub inflight: Arc<tokio::sync::Semaphore>,
}

/// What a request is answered with: the body, the ADR-32 headers of an error, and its code.
pub struct Answer {
    pub body: Vec<u8>,
    pub headers: HeaderMap,
    /// `None` for a successful reply.
    pub code: Option<ErrorCode>,
    /// The error's message (for discovery's `last_error`).
    pub message: Option<String>,
}

impl Answer {
    /// An error answer: MessagePack error body plus the ADR-32 headers.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        let message = message.into();
        let mut headers = HeaderMap::new();
        headers.insert(wire::HEADER_SERVICE_ERROR, message.as_str());
        headers.insert(
            wire::HEADER_SERVICE_ERROR_CODE,
            code.status().to_string().as_str(),
        );
        Self {
            body: wire::encode(&ErrorReply::new(code, message.clone())),
            headers,
            code: Some(code),
            message: Some(message),
        }
    }
}

/// The span of one request, continuing the caller's trace from the message headers.
pub fn request_span(subject: &str, headers: Option<&HeaderMap>) -> tracing::Span {
    let span = tracing::info_span!(
        "worker.request",
        otel.kind = "server",
        messaging.system = "nats",
        messaging.destination.name = %subject,
        rerank.documents = tracing::field::Empty,
        rerank.code = tracing::field::Empty,
        rerank.tokenize_ms = tracing::field::Empty,
        rerank.queue_ms = tracing::field::Empty,
        rerank.inference_ms = tracing::field::Empty,
    );
    propagation::continue_from_nats(&span, headers);
    span
}

/// Decode → engine → encoded answer, for every intake. Nothing is sent or counted here: the
/// intake decides whether to reply (the JetStream intake hands an `overloaded` job back to the
/// stream instead), then calls [`reply`].
pub async fn answer(ctx: &HandlerContext, payload: &[u8], span: &tracing::Span) -> Answer {
    ctx.metrics.inflight.inc();
    let outcome = process(ctx, payload).instrument(span.clone()).await;
    ctx.metrics.inflight.dec();
    match outcome {
        Ok(reply) => {
            let body = wire::encode(&reply);
            // Replies count against max_payload too: send a small error instead of nothing.
            if body.len() + 256 > ctx.client.max_payload() {
                let message = format!(
                    "the reply of {} bytes exceeds the server's max_payload of {} bytes; send fewer documents per request",
                    body.len(),
                    ctx.client.max_payload()
                );
                Answer::error(ErrorCode::PayloadTooLarge, message)
            } else {
                Answer {
                    body,
                    headers: HeaderMap::new(),
                    code: None,
                    message: None,
                }
            }
        }
        Err(error) => Answer::error(error.error.code, error.error.message),
    }
}

/// Counts the answer (Prometheus and service discovery) and publishes it to `reply_to`.
pub async fn reply(
    ctx: &HandlerContext,
    reply_to: async_nats::Subject,
    answer: Answer,
    received: Instant,
    span: &tracing::Span,
) -> Result<(), async_nats::PublishError> {
    let code_label = answer.code.map_or("ok", ErrorCode::as_str);
    span.record("rerank.code", code_label);
    let outcome_label = if answer.code.is_some() { "error" } else { "ok" };
    ctx.metrics
        .requests
        .with_label_values(&[outcome_label, code_label])
        .inc();
    let took = received.elapsed();
    ctx.metrics
        .duration
        .with_label_values(&[outcome_label])
        .observe(took.as_secs_f64());
    ctx.stats.record(
        took,
        answer
            .code
            .map(|c| (c.status(), answer.message.as_deref().unwrap_or(c.as_str()))),
    );
    ctx.client
        .publish_with_headers(reply_to, answer.headers, Bytes::from(answer.body))
        .instrument(tracing::info_span!(parent: span, "worker.reply"))
        .await
}

/// Handles one core NATS message to completion: exactly one reply per message with a reply subject.
pub async fn handle(ctx: Arc<HandlerContext>, message: async_nats::Message) {
    let Some(reply_to) = message.reply.clone() else {
        tracing::debug!(subject = %message.subject, "message without reply subject ignored");
        return;
    };
    let span = request_span(&message.subject, message.headers.as_ref());
    let received = Instant::now();
    let answer = answer(&ctx, &message.payload, &span).await;
    if let Err(e) = reply(&ctx, reply_to, answer, received, &span).await {
        tracing::warn!(parent: &span, error = %e, "could not publish the reply");
    }
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
    // Where the time went, on the request's span (a trace shows it without a child span per stage).
    let current = tracing::Span::current();
    let timings = response.timings;
    current.record("rerank.tokenize_ms", timings.tokenize.as_secs_f64() * 1e3);
    current.record("rerank.queue_ms", timings.queue.as_secs_f64() * 1e3);
    current.record("rerank.inference_ms", timings.inference.as_secs_f64() * 1e3);
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
        EngineError::QueryTooLong(_) | EngineError::Unsupported(_) => ErrorCode::InvalidRequest,
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
