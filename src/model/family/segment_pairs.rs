//! Pair encoding of the BERT-style cross-encoders: the query and the document are two segments
//! joined by the tokenizer's own post-processor (`[CLS] q [SEP] d [SEP]` with token types 0/1 for
//! BERT, `<s> q </s></s> d </s>` for XLM-RoBERTa, `[CLS] q [SEP] d [SEP]` without token types for
//! ModernBERT), truncated `longest_first` exactly as
//! transformers' `tokenizer(q, d, truncation=True, max_length=L)` does (it calls the same
//! `tokenizers` code: [`Tokenizer::post_process`] with `LongestFirst`).
//!
//! - `Truncation::End`: `longest_first` (tokens leave the longer segment first).
//! - `Truncation::None`: a pair longer than `max_length` is refused, naming the document.
//! - `Truncation::Chunk`: refused ([`UnsupportedPair::Chunk`]); only the default family chunks.
//!
//! # Cost bounded by `max_length`, not by the text
//! Each segment is tokenized at most up to a *safe cut* past which it already has more tokens than
//! `longest_first` can keep, so a 5 MB document costs what a 5 KB one does ([`TokenizeWork`]
//! counts it).
//!
//! **Safe cut**: an ASCII space whose previous character is alphanumeric or ASCII punctuation.
//! The tokens of `text[..cut]` are then the first tokens of `text`:
//! - *BERT* (`BertNormalizer`, `BertPreTokenizer`, WordPiece): the normalizer is character-local
//!   (control characters dropped, whitespace to space, CJK characters padded with spaces, lower
//!   case, accents stripped), so the prefix normalizes to a prefix of the normalized text; the
//!   pre-tokenizer splits on whitespace (dropped) and punctuation, so the pre-token before the
//!   space ends there in both; WordPiece works within one pre-token.
//! - *XLM-RoBERTa* (NFKC-style `Precompiled` charsmap, collapsing of space runs, `Metaspace`,
//!   Unigram): the text before the cut ends with a visible character, so neither the space
//!   collapsing nor `Metaspace` (which splits before each `▁`) sees anything different before the
//!   cut, no composition joins a character with a following space, and Unigram segments each
//!   pre-token on its own.
//! - *ModernBERT* (NFC, `ByteLevel` with the GPT-2 regex and no prefix space, byte-level BPE): NFC
//!   composes no character with a following space; in the regex a space can only *start* a
//!   pre-token (` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`) or belong to a run of whitespace,
//!   and the character before the cut is neither, so the pre-tokens before the cut are the same
//!   (the one lookahead, `\s+(?!\S)`, only ends whitespace runs, which lie before that character);
//!   BPE merges within one pre-token.
//!
//! Added tokens (`[SEP]`, `<s>`, …) either contain no space, so a cut never falls inside one, or
//! are all whitespace (GPT-NeoX's and so ModernBERT's runs of spaces), so a match that covers the
//! cut starts at it, never before (the character before the cut is visible): the matches before the
//! cut are the same in the prefix. Any other added token with a space is refused at load.
//! `tests/family_golden.rs` checks all this against transformers on multilingual text.
//!
//! Which segment keeps the odd token when both the query and the document exceed the budget
//! depends on which is longer; that comparison needs the whole query, so that one case (a query
//! longer than `max_length` tokens, a long document, an odd budget) is refused with
//! [`UnsupportedPair::QueryAndDocumentTooLong`] rather than computed on the whole text.
//! A segment with a run of more than [`GIANT_RUN_BYTES_PER_TOKEN`] bytes per token of the budget
//! without a safe cut (one giant "word") is read only up to there: under END its last tokens may
//! differ from tokenizing the whole run; under NONE it counts as too long.

use std::path::Path;

use tokenizers::{
    Encoding, PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::model::tokenizer::{
    ceil_char_boundary, floor_char_boundary, tokenize_bounded, Bounded, TooLong, UnsupportedPair,
    MAX_SUPPORTED_LENGTH,
};
use crate::model::{EncodePairsError, EncodedPair, ModelError, TokenizeWork, Truncation};

use super::PairEncoder;

/// Past this many bytes per token of the budget without a safe cut, a segment is cut anyway.
pub const GIANT_RUN_BYTES_PER_TOKEN: usize = 64;

/// The tokenizer of a BERT-style cross-encoder and its length policy.
#[derive(Clone)]
pub struct SegmentPairTokenizer {
    /// Encodes one segment: no special tokens, no truncation, no padding.
    segments: Tokenizer,
    /// Joins two segments: the post-processor with `longest_first` truncation at `max_length`.
    pairing: Tokenizer,
    max_length: usize,
    /// Special tokens the post-processor adds around a pair.
    added: usize,
    family: &'static str,
}

impl std::fmt::Debug for SegmentPairTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentPairTokenizer")
            .field("family", &self.family)
            .field("max_length", &self.max_length)
            .field("added", &self.added)
            .finish_non_exhaustive()
    }
}

impl SegmentPairTokenizer {
    /// Loads tokenizer.json; `family` names the model family in errors.
    pub fn from_file(
        path: &Path,
        max_length: usize,
        family: &'static str,
    ) -> Result<Self, ModelError> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::new(tokenizer, max_length, family).map_err(|e| match e {
            ModelError::Tokenize(message) => ModelError::Tokenizer {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    pub fn new(
        mut tokenizer: Tokenizer,
        max_length: usize,
        family: &'static str,
    ) -> Result<Self, ModelError> {
        let invalid = |message: String| ModelError::Tokenize(message);
        let added = tokenizer
            .get_post_processor()
            .map(|p| p.added_tokens(true))
            .ok_or_else(|| invalid("tokenizer.json has no post_processor to join a pair".into()))?;
        if max_length <= added || max_length > MAX_SUPPORTED_LENGTH {
            return Err(ModelError::MaxLength {
                value: max_length,
                max: MAX_SUPPORTED_LENGTH,
            });
        }
        if let Some(spaced) = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .find(|t| t.content.contains(' ') && !t.content.chars().all(char::is_whitespace))
        {
            return Err(invalid(format!(
                "added token `{}` contains a space, which the bounded tokenization does not support",
                spaced.content
            )));
        }
        // Padding and truncation are ours to decide, whatever tokenizer.json says.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| invalid(e.to_string()))?;
        let mut pairing = tokenizer.clone();
        pairing
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| invalid(e.to_string()))?;
        let this = Self {
            segments: tokenizer,
            pairing,
            max_length,
            added,
            family,
        };
        // The engine carries one segment boundary per sequence: token types must be 0… then 1….
        let mut work = TokenizeWork::default();
        let probe = this.join(&this.encode("a", &mut work)?, this.encode("b", &mut work)?)?;
        let types = probe.get_type_ids();
        if types.windows(2).any(|w| w[1] < w[0]) || types.iter().any(|&t| t > 1) {
            return Err(invalid(format!(
                "the post-processor's token types {types:?} are not one segment of 0s then 1s"
            )));
        }
        Ok(this)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The sequences of one request, one per document, in order.
    pub fn encode_counting(
        &self,
        query: &str,
        documents: &[&str],
        truncation: Truncation,
        work: &mut TokenizeWork,
    ) -> Result<Vec<EncodedPair>, EncodePairsError> {
        if let Truncation::Chunk(_) = truncation {
            return Err(UnsupportedPair::Chunk {
                family: self.family,
            }
            .into());
        }
        let refuse = truncation == Truncation::None;
        // Tokens the two segments may hold together.
        let budget = self.max_length - self.added;
        let query = self.segment(query, budget, work)?;
        let mut pairs = Vec::with_capacity(documents.len());
        for (doc_index, document) in documents.iter().enumerate() {
            let too_long = |tokens, exact| TooLong {
                doc_index,
                tokens,
                exact,
                max_length: self.max_length,
            };
            let doc = if refuse {
                let Some(left) = budget.checked_sub(query.len()) else {
                    return Err(too_long(self.added + query.len(), false).into());
                };
                let doc = self.segment(document, left, work)?;
                if doc.len() > left || !doc.is_whole() {
                    return Err(too_long(
                        self.added + query.len() + doc.len().max(left + 1),
                        doc.is_whole(),
                    )
                    .into());
                }
                doc
            } else {
                let doc = self.segment(document, budget.max(query.len()), work)?;
                if !query.is_whole() && doc.len() > budget && budget % 2 == 1 {
                    return Err(UnsupportedPair::QueryAndDocumentTooLong {
                        doc_index,
                        max_length: self.max_length,
                    }
                    .into());
                }
                doc
            };
            let read_all = doc.is_whole();
            let doc_tokens = doc.len();
            let pair = self.join(query.encoding(), doc.into_encoding())?;
            pairs.push(self.encoded_pair(&pair, doc_index, document, read_all, doc_tokens));
        }
        Ok(pairs)
    }

    fn encoded_pair(
        &self,
        pair: &Encoding,
        doc_index: usize,
        document: &str,
        read_all: bool,
        doc_tokens: usize,
    ) -> EncodedPair {
        let ids = pair.get_ids().to_vec();
        let second_segment = pair
            .get_type_ids()
            .iter()
            .position(|&t| t != 0)
            .unwrap_or(ids.len());
        // The document's tokens that survived truncation: sequence 1 of the pair.
        let kept: Vec<(usize, usize)> = pair
            .get_sequence_ids()
            .iter()
            .zip(pair.get_offsets())
            .filter(|(sequence, _)| **sequence == Some(1))
            .map(|(_, &offsets)| offsets)
            .collect();
        let span = if read_all && kept.len() == doc_tokens {
            0..document.len()
        } else {
            let end = kept.last().map_or(0, |&(_, end)| end).min(document.len());
            0..ceil_char_boundary(document, end)
        };
        EncodedPair {
            ids,
            doc_index,
            span,
            second_segment,
        }
    }

    /// The post-processor's pair (special tokens, token types), truncated `longest_first`.
    fn join(&self, query: &Encoding, document: Encoding) -> Result<Encoding, ModelError> {
        self.pairing
            .post_process(query.clone(), Some(document), true)
            .map_err(|e| ModelError::Tokenize(e.to_string()))
    }

    /// `text` tokenized whole, or only up to a safe cut once that prefix holds more than `limit`
    /// tokens.
    fn segment(
        &self,
        text: &str,
        limit: usize,
        work: &mut TokenizeWork,
    ) -> Result<Bounded, ModelError> {
        let giant = limit
            .saturating_add(1)
            .saturating_mul(GIANT_RUN_BYTES_PER_TOKEN);
        tokenize_bounded(
            text.len(),
            limit,
            giant,
            |min| first_safe_cut(text, min),
            |end| match end {
                None => self.encode(text, work),
                Some(cut) => self.encode(&text[..floor_char_boundary(text, cut)], work),
            },
        )
    }

    fn encode(&self, text: &str, work: &mut TokenizeWork) -> Result<Encoding, ModelError> {
        work.bytes += text.len() as u64;
        work.calls += 1;
        self.segments
            .encode(text, false)
            .map_err(|e| ModelError::Tokenize(e.to_string()))
    }
}

impl PairEncoder for SegmentPairTokenizer {
    fn encode_pairs_counting(
        &self,
        query: &str,
        documents: &[&str],
        truncation: Truncation,
        work: &mut TokenizeWork,
    ) -> Result<Vec<EncodedPair>, EncodePairsError> {
        self.encode_counting(query, documents, truncation, work)
    }
    fn max_length(&self) -> usize {
        self.max_length
    }
}

/// The first safe cut (see the module doc) at or after byte `min`.
fn first_safe_cut(text: &str, min: usize) -> Option<usize> {
    let start = floor_char_boundary(text, min);
    text[start..]
        .match_indices(' ')
        .map(|(at, _)| start + at)
        .find(|&at| {
            at > 0
                && text[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c.is_ascii_punctuation())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_cuts_are_spaces_after_visible_characters() {
        assert_eq!(first_safe_cut("ab  cd ef", 0), Some(2));
        assert_eq!(first_safe_cut("ab  cd ef", 3), Some(6));
        assert_eq!(first_safe_cut("日本 語", 0), Some(6));
        assert_eq!(first_safe_cut("a\u{200b} b", 0), None);
        assert_eq!(first_safe_cut(" a", 0), None);
    }
}
