//! Why the engine could not score a request.

use crate::model::{QueryTooLong, TooLong, UnsupportedPair};

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("{count} documents exceed the limit of {max} per request")]
    TooManyDocuments { count: usize, max: usize },
    #[error("{documents} documents make {pairs} windows under truncate CHUNK, over the limit of {max} pairs per request")]
    TooManyWindows {
        documents: usize,
        pairs: usize,
        max: usize,
    },
    #[error(transparent)]
    DocumentTooLong(#[from] TooLong),
    #[error(transparent)]
    QueryTooLong(#[from] QueryTooLong),
    /// What the model family's pair encoding cannot do (e.g. CHUNK for BERT-style models).
    #[error(transparent)]
    Unsupported(#[from] UnsupportedPair),
    #[error(
        "the queue holds {queued} of {capacity} pairs; {requested} more do not fit, retry later"
    )]
    Overloaded {
        queued: usize,
        requested: usize,
        capacity: usize,
    },
    #[error("the caller's deadline passed before the request was scored")]
    DeadlineExceeded,
    #[error("tokenization failed: {0}")]
    Tokenizer(String),
    #[error("model failure: {0}")]
    Model(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
}
