//! `RerankError`: why a rerank call failed, and whether trying again is safe.

use std::time::Duration;

use crate::wire::ErrorCode;

/// What went wrong, coarsely: the retry loop and callers decide by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RerankErrorKind {
    /// No worker is there to take the request (NATS no responders, the sidecar's 503).
    Unavailable,
    /// No answer within the per-attempt timeout (or the service reported a timeout).
    Timeout,
    /// A worker's queue is full; another attempt may land on a less busy worker.
    Overloaded,
    /// The connection to NATS or to the sidecar failed.
    Connection,
    /// The service refused the request for a reason that another attempt would not change.
    Rejected(ErrorCode),
    /// The answer could not be understood (a version mismatch or a bug).
    InvalidResponse,
}

impl RerankErrorKind {
    /// Whether sending the same request again is safe and may succeed.
    ///
    /// Reranking is idempotent, so every transient failure may be retried; refusals follow the
    /// wire table ([`ErrorCode::is_retryable`]), which says no for `invalid_request` and the like.
    pub fn is_retryable(self) -> bool {
        match self {
            RerankErrorKind::Unavailable
            | RerankErrorKind::Timeout
            | RerankErrorKind::Overloaded
            | RerankErrorKind::Connection => true,
            RerankErrorKind::Rejected(code) => code.is_retryable(),
            RerankErrorKind::InvalidResponse => false,
        }
    }

    /// The wire code that names this failure (for HTTP bodies, metrics and logs).
    pub fn code(self) -> ErrorCode {
        match self {
            RerankErrorKind::Unavailable | RerankErrorKind::Connection => ErrorCode::Unavailable,
            RerankErrorKind::Timeout => ErrorCode::Timeout,
            RerankErrorKind::Overloaded => ErrorCode::Overloaded,
            RerankErrorKind::Rejected(code) => code,
            RerankErrorKind::InvalidResponse => ErrorCode::ModelError,
        }
    }

    /// The kind of an error the service reported with `code`.
    pub fn from_code(code: ErrorCode) -> Self {
        match code {
            ErrorCode::Overloaded => RerankErrorKind::Overloaded,
            ErrorCode::Unavailable => RerankErrorKind::Unavailable,
            ErrorCode::Timeout => RerankErrorKind::Timeout,
            ErrorCode::InvalidRequest
            | ErrorCode::TooManyDocuments
            | ErrorCode::DocumentTooLong
            | ErrorCode::PayloadTooLarge
            | ErrorCode::DeadlineExceeded
            | ErrorCode::ModelError
            | ErrorCode::Unauthorized
            | ErrorCode::NotFound
            | ErrorCode::ModelNotFound => RerankErrorKind::Rejected(code),
        }
    }
}

/// A failed rerank call (after the retries the client was configured with).
#[derive(Debug, thiserror::Error)]
pub enum RerankError {
    /// NATS answered "no responders": no worker subscribes to the subject.
    #[error("no rerank worker is subscribed to {subject} (no responders)")]
    NoResponders { subject: String },
    /// No answer within the per-attempt timeout.
    #[error("no answer within {timeout:?}")]
    Timeout { timeout: Duration },
    /// The connection failed (NATS or HTTP).
    #[error("connection failed: {0}")]
    Connection(String),
    /// The request does not fit NATS `max_payload`; it was not sent.
    #[error(
        "the request of {size} bytes exceeds the NATS server's max_payload of {limit} bytes; send fewer or shorter documents"
    )]
    PayloadTooLarge { size: usize, limit: usize },
    /// The worker (or the sidecar) answered with a typed error.
    #[error("{code}: {message}")]
    Service {
        code: ErrorCode,
        message: String,
        /// The sidecar's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// The answer could not be decoded or does not match the request.
    #[error("invalid response: {0}")]
    InvalidResponse(String),
    /// The operation needs the other transport (worker discovery needs NATS).
    #[error("not supported over this transport: {0}")]
    Unsupported(&'static str),
}

impl RerankError {
    pub fn kind(&self) -> RerankErrorKind {
        match self {
            RerankError::NoResponders { .. } => RerankErrorKind::Unavailable,
            RerankError::Timeout { .. } => RerankErrorKind::Timeout,
            RerankError::Connection(_) => RerankErrorKind::Connection,
            RerankError::PayloadTooLarge { .. } => {
                RerankErrorKind::Rejected(ErrorCode::PayloadTooLarge)
            }
            RerankError::Service { code, .. } => RerankErrorKind::from_code(*code),
            RerankError::InvalidResponse(_) => RerankErrorKind::InvalidResponse,
            RerankError::Unsupported(_) => RerankErrorKind::Rejected(ErrorCode::InvalidRequest),
        }
    }

    /// Whether the same request may be sent again ([`RerankErrorKind::is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// The wire code of this failure.
    pub fn code(&self) -> ErrorCode {
        self.kind().code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_table_follows_the_wire_codes() {
        for code in ErrorCode::ALL {
            let kind = RerankErrorKind::from_code(code);
            assert_eq!(kind.is_retryable(), code.is_retryable(), "{code}");
            assert_eq!(kind.code(), code, "{code}");
        }
        assert!(RerankErrorKind::Connection.is_retryable());
        assert!(!RerankErrorKind::InvalidResponse.is_retryable());
        let invalid = RerankError::Service {
            code: ErrorCode::InvalidRequest,
            message: "bad".into(),
            retry_after: None,
        };
        assert!(!invalid.is_retryable());
        assert!(RerankError::NoResponders {
            subject: "s".into()
        }
        .is_retryable());
        assert!(!RerankError::PayloadTooLarge { size: 2, limit: 1 }.is_retryable());
    }
}
