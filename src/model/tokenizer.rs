//! Turns (query, document) pairs into the token sequences the model was trained on.
//!
//! Template (NVIDIA model card, NeMo Retriever): `question:{query} \n \n passage:{document}`, tokenized
//! as ONE sequence with BOS (added by the Llama-3 `tokenizer.json` post-processor) and no EOS, cut from
//! the right at `max_length`.
//!
//! The query is tokenized once per request: the text splits into `question:{query} \n \n` and
//! ` passage:{document}`. The Llama-3 pre-tokenizer regex always ends a pre-token at the last newline of
//! ` \n \n` (no alternative can carry a newline run into a following space+letter), and BPE never merges
//! across pre-tokens, so the two halves tokenize exactly as the whole string does. The golden tests
//! check this against the Hugging Face tokenizer.

use std::path::Path;
use tokenizers::Tokenizer;

use super::ModelError;

/// Longest `max_length` the model supports (model card: "evaluated … up to 8192 tokens").
pub const MAX_SUPPORTED_LENGTH: usize = 8192;

/// What to do with a pair longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Cut from the right (the passage tail goes first), as `truncation=True` does.
    #[default]
    End,
    /// Refuse the request, naming the document.
    None,
}

/// A document that does not fit under `Truncation::None`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document {doc_index} has {tokens} tokens with the query; max_length is {max_length} and truncate is NONE")]
pub struct TooLong {
    pub doc_index: usize,
    pub tokens: usize,
    pub max_length: usize,
}

/// The tokenized query half, reused for every document of a request.
#[derive(Debug, Clone)]
pub struct EncodedQuery {
    ids: Vec<u32>,
}

impl EncodedQuery {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The model's tokenizer plus the prompt template and the length policy.
#[derive(Clone)]
pub struct PairTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
}

impl std::fmt::Debug for PairTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairTokenizer")
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl PairTokenizer {
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, ModelError> {
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        // Padding and truncation are ours to decide, whatever tokenizer.json says.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Self::new(tokenizer, max_length)
    }

    pub fn new(tokenizer: Tokenizer, max_length: usize) -> Result<Self, ModelError> {
        if max_length == 0 || max_length > MAX_SUPPORTED_LENGTH {
            return Err(ModelError::MaxLength {
                value: max_length,
                max: MAX_SUPPORTED_LENGTH,
            });
        }
        Ok(Self {
            tokenizer,
            max_length,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// `[BOS] question:{query} \n \n`.
    pub fn encode_query(&self, query: &str) -> Result<EncodedQuery, ModelError> {
        let text = format!("question:{query} \n \n");
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenize(e.to_string()))?;
        Ok(EncodedQuery {
            ids: encoding.get_ids().to_vec(),
        })
    }

    /// Token ids of ` passage:{document}` (no special tokens), for each document.
    ///
    /// With `Truncation::End` a very long document is tokenized only up to a cut that cannot change
    /// the tokens before it (see [`safe_cut`]) whenever that prefix already holds `max_length`
    /// tokens: a 10 MB document then costs what a 32 kB one does, with identical results.
    pub fn encode_documents(
        &self,
        documents: &[&str],
        truncation: Truncation,
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        let encode = |text: &str| {
            self.tokenizer
                .encode(format!(" passage:{text}"), false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenize(e.to_string()))
        };
        documents
            .iter()
            .map(|doc| {
                if truncation == Truncation::End {
                    if let Some(cut) = safe_cut(doc, self.max_length * PREFIX_BYTES_PER_TOKEN) {
                        let ids = encode(&doc[..cut])?;
                        if ids.len() >= self.max_length {
                            return Ok(ids);
                        }
                    }
                }
                encode(doc)
            })
            .collect()
    }

    /// Joins the query half with each document half and applies the length policy.
    /// Returns one sequence per document, in order.
    pub fn join(
        &self,
        query: &EncodedQuery,
        documents: Vec<Vec<u32>>,
        truncation: Truncation,
    ) -> Result<Vec<Vec<u32>>, TooLong> {
        documents
            .into_iter()
            .enumerate()
            .map(|(doc_index, doc)| {
                let total = query.ids.len() + doc.len();
                if total > self.max_length && truncation == Truncation::None {
                    return Err(TooLong {
                        doc_index,
                        tokens: total,
                        max_length: self.max_length,
                    });
                }
                let mut ids = Vec::with_capacity(total.min(self.max_length));
                ids.extend_from_slice(&query.ids);
                ids.extend_from_slice(&doc);
                ids.truncate(self.max_length);
                Ok(ids)
            })
            .collect()
    }

    /// Convenience: the full pipeline for one request.
    pub fn encode_pairs(
        &self,
        query: &str,
        documents: &[&str],
        truncation: Truncation,
    ) -> Result<Vec<Vec<u32>>, EncodePairsError> {
        let query = self.encode_query(query)?;
        let docs = self.encode_documents(documents, truncation)?;
        Ok(self.join(&query, docs, truncation)?)
    }
}

/// Bytes of document text tokenized per token of `max_length` before trying a cut (English averages
/// ~4 bytes per token; a prefix that still yields too few tokens falls back to the whole text).
const PREFIX_BYTES_PER_TOKEN: usize = 8;

/// The first byte offset at or after `min` where `text` can be cut without changing the tokens
/// before the cut: a space followed by an ASCII letter, after a non-whitespace character. Every
/// alternative of the Llama-3 pre-tokenizer regex that matches before such a point stops at it
/// (letter runs stop at the space, whitespace runs cannot start before a non-whitespace
/// character and reach it, ` ?[^\s\p{L}\p{N}]+` stops at the space), and BPE never merges across
/// pre-tokens, so the tokens of `text[..cut]` are a prefix of the tokens of `text`.
fn safe_cut(text: &str, min: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    (min.max(1)..bytes.len().saturating_sub(1)).find(|&i| {
        bytes[i] == b' '
            && bytes[i + 1].is_ascii_alphabetic()
            && text[..i]
                .chars()
                .next_back()
                .is_some_and(|c| !c.is_whitespace())
    })
}

/// Failure of [`PairTokenizer::encode_pairs`].
#[derive(Debug, thiserror::Error)]
pub enum EncodePairsError {
    #[error(transparent)]
    Tokenizer(#[from] ModelError),
    #[error(transparent)]
    TooLong(#[from] TooLong),
}
