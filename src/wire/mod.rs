//! Wire format v1: the MessagePack messages exchanged on `rerank.v1`.
//!
//! Serde types only, no I/O and no candle. Maps with named fields (`rmp_serde::to_vec_named`);
//! decoding ignores unknown fields so optional fields can be added within v1 (see `schemas/README.md`).

mod schema;

pub use schema::{json_schemas, SchemaFile};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default request subject; the major version lives in the subject. The pool's default model
/// serves it (besides its own [`model_subject`]).
pub const SUBJECT_V1: &str = "rerank.v1";
/// The token between a base subject and a model's token in [`model_subject`].
pub const MODEL_SUBJECT_INFIX: &str = "model";
/// Default queue group of the worker pool.
pub const DEFAULT_QUEUE_GROUP: &str = "rerank-workers";
/// NATS service name (`$SRV.*.rerank`) and its version.
pub const SERVICE_NAME: &str = "rerank";
/// ADR-32 error headers, set on every error reply next to the MessagePack error body.
pub const HEADER_SERVICE_ERROR: &str = "Nats-Service-Error";
pub const HEADER_SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
/// JetStream jobs: the caller's reply inbox (JetStream keeps no reply subject).
pub const HEADER_REPLY_TO: &str = "Rerank-Reply-To";
/// Content type of every body on the subject.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// How to treat a (query, document) pair longer than the worker's `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Truncate {
    /// Cut the pair from the right (the document's tail goes first).
    #[default]
    End,
    /// Refuse the request with `document_too_long`.
    None,
    /// Split a long document into overlapping windows of `max_length`, each with the query; the
    /// document's score is its best window's.
    Chunk,
}

/// By hand rather than derived, so the error names the field even where the field's path is lost
/// (the HTTP bodies flatten their length options).
impl<'de> Deserialize<'de> for Truncate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        match name.as_ref() {
            "END" => Ok(Truncate::End),
            "NONE" => Ok(Truncate::None),
            "CHUNK" => Ok(Truncate::Chunk),
            other => Err(serde::de::Error::custom(format!(
                "truncate must be END, NONE or CHUNK, not `{other}`"
            ))),
        }
    }
}

/// A rerank request: score every document against the query.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct RerankRequest {
    pub query: String,
    pub documents: Vec<String>,
    /// Return only the best `top_k` indices in `ranked_indices` (scores are always complete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<Truncate>,
    /// Echoed in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Absolute deadline, Unix epoch milliseconds: after it the caller has given up, so the worker
    /// replies `deadline_exceeded` instead of computing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// `CHUNK` only: windows scored per document at most (default 10, up to the worker's limit);
    /// the rest of a longer document is not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_chunks_per_doc: Option<u32>,
    /// `CHUNK` only: document tokens shared by consecutive windows (default 64, at most half a
    /// window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_overlap: Option<u32>,
    /// Add `spans` to the reply: which part of each document produced its score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_spans: Option<bool>,
}

/// A range `[start, end)` of a document's text, in Unicode code points (Python's `str` indices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

/// Token accounting of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Usage {
    /// Pairs scored: one per document, or one per window under `CHUNK`.
    pub pairs: u64,
    /// Tokens the model read, after truncation.
    pub tokens: u64,
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct RerankReply {
    /// Raw logits, one per document, in input order.
    pub scores: Vec<f32>,
    /// Document indices by descending score (ties by index), cut to `top_k` when given.
    pub ranked_indices: Vec<u32>,
    /// The model that produced the scores.
    pub model: String,
    pub usage: Usage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// With `return_spans`: per document, the part of its text that produced its score (the whole
    /// document, the part kept by END, or the best window under CHUNK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spans: Option<Vec<Span>>,
}

/// Machine-readable error codes, identical on the wire, in HTTP bodies, metric labels and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Undecodable body, wrong types, missing fields, invalid values.
    InvalidRequest,
    /// More documents than the worker's `max_documents`.
    TooManyDocuments,
    /// A pair exceeds `max_length` and truncate is NONE.
    DocumentTooLong,
    /// The request or its reply does not fit the size limits.
    PayloadTooLarge,
    /// The worker's queue is full; retry later (another worker may take it).
    Overloaded,
    /// The caller's deadline passed before the work was done.
    DeadlineExceeded,
    /// The model failed; details are in the worker's log.
    ModelError,
    /// No worker answered (no responders, or the pool is draining).
    Unavailable,
    /// A worker took the request but did not answer in time.
    Timeout,
    /// Missing or wrong credentials (HTTP only).
    Unauthorized,
    /// Unknown route (HTTP only).
    NotFound,
    /// The request names a model that no worker of the pool serves; the message lists those
    /// that are served.
    ModelNotFound,
}

impl ErrorCode {
    /// Every code, for exhaustive tables and tests.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::InvalidRequest,
        ErrorCode::TooManyDocuments,
        ErrorCode::DocumentTooLong,
        ErrorCode::PayloadTooLarge,
        ErrorCode::Overloaded,
        ErrorCode::DeadlineExceeded,
        ErrorCode::ModelError,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
        ErrorCode::ModelNotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::TooManyDocuments => "too_many_documents",
            ErrorCode::DocumentTooLong => "document_too_long",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::ModelError => "model_error",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::ModelNotFound => "model_not_found",
        }
    }

    pub fn parse(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == code)
    }

    /// HTTP-style status carried in `Nats-Service-Error-Code` (ADR-32 uses HTTP numbers).
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::TooManyDocuments => 400,
            ErrorCode::DocumentTooLong => 400,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Overloaded => 429,
            ErrorCode::DeadlineExceeded => 504,
            ErrorCode::ModelError => 500,
            ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound => 404,
            ErrorCode::ModelNotFound => 404,
        }
    }

    /// The code for a status that came without one (an ADR-32 header without a body, a proxy's
    /// error page): the inverse of [`status`](Self::status) where it is one-to-one, and the
    /// nearest kind elsewhere (502, a gateway's failure, is `unavailable` and so retryable).
    pub fn for_status(status: u16) -> Self {
        match status {
            401 | 403 => ErrorCode::Unauthorized,
            404 => ErrorCode::NotFound,
            413 => ErrorCode::PayloadTooLarge,
            429 => ErrorCode::Overloaded,
            502 | 503 => ErrorCode::Unavailable,
            504 => ErrorCode::Timeout,
            400..=499 => ErrorCode::InvalidRequest,
            _ => ErrorCode::ModelError,
        }
    }

    /// Whether a caller may safely send the same request again (to any worker).
    pub fn is_retryable(self) -> bool {
        match self {
            ErrorCode::Overloaded | ErrorCode::Unavailable | ErrorCode::Timeout => true,
            ErrorCode::InvalidRequest
            | ErrorCode::TooManyDocuments
            | ErrorCode::DocumentTooLong
            | ErrorCode::PayloadTooLarge
            | ErrorCode::DeadlineExceeded
            | ErrorCode::ModelError
            | ErrorCode::Unauthorized
            | ErrorCode::NotFound
            | ErrorCode::ModelNotFound => false,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// An error reply: `{"error": {"code", "message"}}`, on NATS and over HTTP alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorReply {
    pub error: ErrorBody,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorBody {
                code,
                message: message.into(),
            },
        }
    }
}

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("invalid MessagePack request: {0}")]
pub struct DecodeError(String);

/// Deepest nesting of arrays and maps accepted in a body. Requests nest 2 deep (map, documents
/// array); the cap leaves room for unknown fields of later v1 versions. rmp-serde's own default
/// (1024) recurses deep enough to overflow a 2 MiB tokio thread stack in a debug build: a 1 kB
/// message of nested arrays in an unknown field aborted the worker (tests/hostile.rs).
pub const MAX_DEPTH: usize = 32;

/// `rmp_serde::from_slice` with the [`MAX_DEPTH`] cap.
fn from_slice<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut deserializer = rmp_serde::Deserializer::from_read_ref(body);
    deserializer.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut deserializer)
}

/// Decodes a request body (MessagePack map with named fields; arrays in field order are accepted
/// too, as rmp-serde does). Nesting deeper than [`MAX_DEPTH`] is refused.
pub fn decode_request(body: &[u8]) -> Result<RerankRequest, DecodeError> {
    from_slice(body).map_err(|e| DecodeError(e.to_string()))
}

/// Encodes any wire message as a MessagePack map with named fields.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serializing these plain structs into a Vec cannot fail (no maps with non-string keys,
    // no I/O). This is a bug if it ever does.
    #[allow(clippy::expect_used)]
    rmp_serde::to_vec_named(message).expect("wire messages always serialize. This is a bug.")
}

/// A reply body: either a reply or an error.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyBody {
    Ok(RerankReply),
    Err(ErrorReply),
}

/// Decodes a reply body, which is a [`RerankReply`] or an [`ErrorReply`].
pub fn decode_reply(body: &[u8]) -> Result<ReplyBody, DecodeError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Err(ErrorReply),
        Ok(RerankReply),
    }
    match from_slice::<Either>(body) {
        Ok(Either::Ok(r)) => Ok(ReplyBody::Ok(r)),
        Ok(Either::Err(e)) => Ok(ReplyBody::Err(e)),
        Err(e) => Err(DecodeError(e.to_string())),
    }
}

/// The request subject of one model: `<base>.model.<token>` ([`model_token`]), e.g.
/// `rerank.v1.model.nvidia_2Fllama-nemotron-rerank-1b-v2` for `nvidia/llama-nemotron-rerank-1b-v2`
/// on the base `rerank.v1`. Workers subscribe to it, callers (the client's `.model(..)`, the
/// sidecar) send to it; the JetStream jobs of a model use the same rule on the jobs subject
/// (`rerank.jobs.v1.model.<token>`, see `crate::jobs`).
pub fn model_subject(base: &str, model_id: &str) -> String {
    format!("{base}.{MODEL_SUBJECT_INFIX}.{}", model_token(model_id))
}

/// The wildcard subject matching every [`model_subject`] of `base`: `<base>.model.*`.
pub fn model_subjects(base: &str) -> String {
    format!("{base}.{MODEL_SUBJECT_INFIX}.*")
}

/// A model id as one subject token: ASCII letters, digits and `-` kept, every other byte of its
/// UTF-8 (`/`, `.`, `_`, spaces...) written as `_` and two uppercase hex digits (`/` → `_2F`,
/// `.` → `_2E`, `_` → `_5F`). So the token holds only `[A-Za-z0-9_-]` (no `.`, `*`, `>` or
/// whitespace: always one valid NATS token, never a wildcard, and a valid JetStream consumer
/// name part), and distinct ids never share a token (the escaping can be undone). The empty id
/// maps to `_`, which no other id produces. This function is the only place the rule lives.
pub fn model_token(model_id: &str) -> String {
    use std::fmt::Write;
    if model_id.is_empty() {
        return "_".into();
    }
    let mut token = String::with_capacity(model_id.len());
    for byte in model_id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            token.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(token, "_{byte:02X}");
        }
    }
    token
}

/// Indices by descending score, ties by ascending index; NaN sorts last. Cut to `top_k`.
pub fn rank(scores: &[f32], top_k: Option<u64>) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (scores[a as usize], scores[b as usize]);
        sb.partial_cmp(&sa)
            .unwrap_or_else(|| sa.is_nan().cmp(&sb.is_nan()))
            .then(a.cmp(&b))
    });
    if let Some(k) = top_k {
        order.truncate(usize::try_from(k).unwrap_or(usize::MAX));
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_ignores_unknown_fields() {
        let req = RerankRequest {
            query: "q".into(),
            documents: vec!["a".into(), "b".into()],
            top_k: Some(1),
            truncate: Some(Truncate::None),
            request_id: Some("r1".into()),
            ..Default::default()
        };
        let bytes = encode(&req);
        assert_eq!(decode_request(&bytes).unwrap(), req);

        #[derive(Serialize)]
        struct Extra<'a> {
            query: &'a str,
            documents: Vec<&'a str>,
            future_field: u32,
        }
        let bytes = rmp_serde::to_vec_named(&Extra {
            query: "q",
            documents: vec!["x"],
            future_field: 7,
        })
        .unwrap();
        let decoded = decode_request(&bytes).unwrap();
        assert_eq!(decoded.documents, vec!["x".to_string()]);
        assert_eq!(decoded.top_k, None);
    }

    #[test]
    fn wrong_types_are_decode_errors() {
        #[derive(Serialize)]
        struct Bad {
            query: u32,
            documents: Vec<u32>,
        }
        let bytes = rmp_serde::to_vec_named(&Bad {
            query: 1,
            documents: vec![1],
        })
        .unwrap();
        assert!(decode_request(&bytes).is_err());
        assert!(decode_request(b"\xc1garbage").is_err());
        assert!(decode_request(&[]).is_err());
    }

    #[test]
    fn replies_and_errors_are_told_apart() {
        let ok = RerankReply {
            scores: vec![1.0, 2.0],
            ranked_indices: vec![1, 0],
            model: "m".into(),
            usage: Usage {
                pairs: 2,
                tokens: 10,
            },
            request_id: None,
            spans: Some(vec![Span { start: 0, end: 3 }, Span::default()]),
        };
        assert_eq!(decode_reply(&encode(&ok)).unwrap(), ReplyBody::Ok(ok));
        let err = ErrorReply::new(ErrorCode::Overloaded, "full");
        assert_eq!(decode_reply(&encode(&err)).unwrap(), ReplyBody::Err(err));
    }

    #[test]
    fn model_subjects_are_single_safe_tokens_and_distinct() {
        assert_eq!(
            model_subject(SUBJECT_V1, "nvidia/llama-nemotron-rerank-1b-v2"),
            "rerank.v1.model.nvidia_2Fllama-nemotron-rerank-1b-v2"
        );
        assert_eq!(
            model_subject("rerank.v1", "Qwen/Qwen3-Reranker-0.6B"),
            "rerank.v1.model.Qwen_2FQwen3-Reranker-0_2E6B"
        );
        assert_eq!(model_subject("b", ""), "b.model._");
        let ids = [
            "a_2E",
            "a.",
            "a_",
            "a/b",
            "a b",
            "a*",
            "a>",
            "ü",
            "tests/fixtures/tiny-model",
            "",
            "_",
            "__",
            "A",
            "a",
        ];
        let subjects: std::collections::HashSet<String> = ids
            .iter()
            .map(|id| model_subject("rerank.v1", id))
            .collect();
        assert_eq!(subjects.len(), ids.len(), "{subjects:?}");
        for subject in &subjects {
            let token = subject.strip_prefix("rerank.v1.model.").unwrap();
            assert!(!token.is_empty());
            assert!(token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }

    #[test]
    fn ranking_is_descending_with_index_ties() {
        assert_eq!(rank(&[0.5, 2.0, 0.5, -1.0], None), vec![1, 0, 2, 3]);
        assert_eq!(rank(&[0.5, 2.0, 0.5], Some(2)), vec![1, 0]);
        assert_eq!(rank(&[f32::NAN, 1.0], None), vec![1, 0]);
        assert_eq!(rank(&[1.0], Some(u64::MAX)), vec![0]);
        assert!(rank(&[], Some(3)).is_empty());
    }

    #[test]
    fn error_codes_round_trip_and_have_statuses() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert!((400..600).contains(&code.status()));
        }
        assert!(ErrorCode::Overloaded.is_retryable());
        assert!(!ErrorCode::InvalidRequest.is_retryable());
        // A status without a code maps back where `status` is one-to-one, and 502 is retryable.
        for code in ErrorCode::ALL {
            let status = code.status();
            if ErrorCode::ALL
                .iter()
                .filter(|c| c.status() == status)
                .count()
                == 1
            {
                assert_eq!(ErrorCode::for_status(status), code, "{status}");
            }
        }
        assert!(ErrorCode::for_status(502).is_retryable());
        assert_eq!(ErrorCode::for_status(418), ErrorCode::InvalidRequest);
    }
}
