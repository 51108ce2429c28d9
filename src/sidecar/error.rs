//! `ApiError`: every failure the sidecar answers, as `{"error": {"code", "message"}}` with the
//! status from one exhaustive table.
//!
//! | code | status | notes |
//! |---|---|---|
//! | `invalid_request` | 400 | malformed JSON, wrong types, missing fields (also 405 for a wrong method, 408 for a body slower than `--http-body-timeout`) |
//! | `too_many_documents` | 400 | the worker's `--max-documents` |
//! | `document_too_long` | 400 | `truncate: NONE` and a pair over `max_length` |
//! | `payload_too_large` | 413 | body over `--max-body-bytes` (refused before reading when `Content-Length` says so), or the request over NATS `max_payload` |
//! | `overloaded` | 429 | the worker's queue is full; `Retry-After: 1` |
//! | `deadline_exceeded` | 504 | the worker saw the deadline pass |
//! | `model_error` | 500 | the model failed (502 when a worker's reply cannot be decoded) |
//! | `unavailable` | 503 | no worker (NATS no responders), NATS is down, or the sidecar buffers `--http-body-budget-bytes` of bodies already; `Retry-After: 1` |
//! | `timeout` | 504 | no reply within `--request-timeout` |
//! | `unauthorized` | 401 | `RERANK_API_KEY` is set and the bearer token is missing or wrong |
//! | `not_found` | 404 | unknown route |
//! | `model_not_found` | 404 | the request's `model` is served by no worker; the message lists the models that are |

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::client::{RerankError, RerankErrorKind};
use crate::http_server::BodyError;
use crate::wire::{ErrorCode, ErrorReply};

/// Seconds a client should wait before trying again after `overloaded` or `unavailable`.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// The HTTP status of a wire code: [`ErrorCode::status`] is the one table.
fn status_for(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Whether the answer carries `Retry-After` (the failures that go away by themselves).
fn retry_after_for(code: ErrorCode) -> Option<u64> {
    match code {
        ErrorCode::Overloaded | ErrorCode::Unavailable => Some(RETRY_AFTER_SECONDS),
        ErrorCode::InvalidRequest
        | ErrorCode::TooManyDocuments
        | ErrorCode::DocumentTooLong
        | ErrorCode::PayloadTooLarge
        | ErrorCode::DeadlineExceeded
        | ErrorCode::ModelError
        | ErrorCode::Timeout
        | ErrorCode::Unauthorized
        | ErrorCode::NotFound
        | ErrorCode::ModelNotFound => None,
    }
}

/// An error answer of the sidecar.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with the table's status for `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: status_for(code),
            code,
            message: message.into(),
            retry_after: retry_after_for(code),
        }
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("no route for {path}"))
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            ..Self::invalid_request(format!("{path} does not accept {method}"))
        }
    }
}

impl From<RerankError> for ApiError {
    fn from(error: RerankError) -> Self {
        let kind = error.kind();
        let message = match &error {
            // The worker's own words are already meant for the caller.
            RerankError::Service { message, .. } => message.clone(),
            other => other.to_string(),
        };
        let api = ApiError::new(kind.code(), message);
        if kind == RerankErrorKind::InvalidResponse {
            // Not the caller's fault, nor the model's: the hop behind us answered garbage.
            return ApiError {
                status: StatusCode::BAD_GATEWAY,
                ..api
            };
        }
        api
    }
}

impl From<BodyError> for ApiError {
    fn from(error: BodyError) -> Self {
        let api = ApiError::new(error.code(), error.to_string());
        match error {
            BodyError::TooLarge { limit } => ApiError {
                message: format!(
                    "the request body exceeds the sidecar's limit of {limit} bytes (--max-body-bytes; by default twice the NATS server's max_payload plus 64 KiB)"
                ),
                ..api
            },
            BodyError::OverBudget { budget } => ApiError {
                message: format!(
                    "the sidecar is buffering its limit of {budget} bytes of request bodies (--http-body-budget-bytes); try again shortly"
                ),
                ..api
            },
            BodyError::TimedOut(after) => ApiError {
                status: StatusCode::REQUEST_TIMEOUT,
                message: format!(
                    "the request body did not arrive within {} s (--http-body-timeout)",
                    after.as_secs_f64()
                ),
                ..api
            },
            BodyError::Read(_) => api,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = %self.code, status = self.status.as_u16(), message = %self.message, "request failed");
        } else {
            tracing::debug!(code = %self.code, status = self.status.as_u16(), message = %self.message, "request refused");
        }
        let mut response =
            (self.status, Json(ErrorReply::new(self.code, self.message))).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.code == ErrorCode::Unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"rerank\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_the_wire_status() {
        for code in ErrorCode::ALL {
            let error = ApiError::new(code, "m");
            assert_eq!(error.status.as_u16(), code.status(), "{code}");
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), code.status(), "{code}");
            assert_eq!(
                response.headers().contains_key(header::RETRY_AFTER),
                matches!(code, ErrorCode::Overloaded | ErrorCode::Unavailable),
                "{code}"
            );
        }
    }

    #[test]
    fn client_errors_map_to_statuses() {
        let cases = [
            (
                RerankError::NoResponders {
                    subject: "s".into(),
                },
                503,
            ),
            (
                RerankError::Timeout {
                    timeout: std::time::Duration::from_secs(1),
                },
                504,
            ),
            (RerankError::Connection("x".into()), 503),
            (RerankError::PayloadTooLarge { size: 2, limit: 1 }, 413),
            (RerankError::InvalidResponse("x".into()), 502),
            (
                RerankError::Service {
                    code: ErrorCode::Overloaded,
                    message: "full".into(),
                    retry_after: None,
                },
                429,
            ),
            (
                RerankError::Service {
                    code: ErrorCode::DocumentTooLong,
                    message: "long".into(),
                    retry_after: None,
                },
                400,
            ),
        ];
        for (error, status) in cases {
            let text = error.to_string();
            assert_eq!(ApiError::from(error).status.as_u16(), status, "{text}");
        }
    }
}
