//! Pair encoding of Qwen3-Reranker: the model card's chat prompt.
//!
//! ```text
//! prefix: <|im_start|>system\nJudge whether the Document meets the requirements based on the Query
//!         and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n
//!         <|im_start|>user\n
//! body:   <Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}
//! suffix: <|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n
//! ```
//! As the card's `process_inputs` does, the prefix and the suffix are tokenized once, the body
//! without special tokens and cut to its first `max_length − |prefix| − |suffix|` tokens
//! (`truncation='longest_first'` on one text keeps its start), and the three are concatenated.
//! The instruction is the card's default ([`DEFAULT_INSTRUCTION`]) unless the worker is started with
//! another (`--instruction`). The card left-pads its batches; the packed forward has no padding, so
//! that does not matter here.
//!
//! - `Truncation::End`: the body's first tokens (the document's tail goes first; a query longer
//!   than the budget leaves no document token, as in the card).
//! - `Truncation::None`: a pair longer than `max_length` is refused, naming the document.
//! - `Truncation::Chunk`: refused ([`UnsupportedPair::Chunk`]).
//!
//! # Cost bounded by `max_length`
//! The body is tokenized in two halves, `<Instruct>: {instruction}\n<Query>: {query}\n<Document>:`
//! (once per request) and ` {document}` (per document), each through the bounded tokenization of
//! the default family ([`BoundedTokenizer`]: a prefix up to a safe cut, never the whole 5 MB). The
//! halves tokenize exactly as the whole body does: the Qwen2 pre-tokenizer regex always ends a
//! pre-token between `:` and the space (`[^\s\p{L}\p{N}]+` stops at whitespace and the space
//! starts the next one), NFC composes nothing across a space, BPE never merges across pre-tokens,
//! and no added token of the vocabulary contains `": "` (checked at load). The golden test checks
//! the ids against transformers.

use std::path::Path;

use crate::model::tokenizer::{Bounded, BoundedTokenizer, Half, TooLong, UnsupportedPair};
use crate::model::{
    EncodePairsError, EncodedPair, ModelError, TokenizeWork, Truncation, MAX_SUPPORTED_LENGTH,
};

use super::qwen3::AnswerIds;
use super::PairEncoder;

/// The model card's instruction, used when the worker is given none.
pub const DEFAULT_INSTRUCTION: &str =
    "Given a web search query, retrieve relevant passages that answer the query";

const PREFIX: &str = "<|im_start|>system\nJudge whether the Document meets the requirements based \
    on the Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".\
    <|im_end|>\n<|im_start|>user\n";
const SUFFIX: &str = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
/// The end of the query half; the document half starts with the space after it.
const QUERY_TAIL: &str = "\n<Document>:";
const DOCUMENT_HEAD: &str = " ";

/// The tokenizer of a Qwen3-Reranker, its prompt and its length policy.
#[derive(Clone)]
pub struct Qwen3PromptTokenizer {
    bounded: BoundedTokenizer,
    max_length: usize,
    prefix_ids: Vec<u32>,
    suffix_ids: Vec<u32>,
    /// `<Instruct>: {instruction}\n<Query>: `
    query_head: String,
    answers: AnswerIds,
}

impl std::fmt::Debug for Qwen3PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qwen3PromptTokenizer")
            .field("max_length", &self.max_length)
            .field("query_head", &self.query_head)
            .field("answers", &self.answers)
            .finish_non_exhaustive()
    }
}

impl Qwen3PromptTokenizer {
    /// Loads tokenizer.json; `instruction` replaces [`DEFAULT_INSTRUCTION`].
    pub fn from_file(
        path: &Path,
        max_length: usize,
        instruction: Option<&str>,
    ) -> Result<Self, ModelError> {
        let bounded = BoundedTokenizer::from_file(path)?;
        Self::new(bounded, max_length, instruction).map_err(|e| match e {
            ModelError::Tokenize(message) => ModelError::Tokenizer {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    fn new(
        bounded: BoundedTokenizer,
        max_length: usize,
        instruction: Option<&str>,
    ) -> Result<Self, ModelError> {
        let invalid = ModelError::Tokenize;
        if max_length > MAX_SUPPORTED_LENGTH {
            return Err(ModelError::MaxLength {
                value: max_length,
                max: MAX_SUPPORTED_LENGTH,
            });
        }
        let tokenizer = bounded.tokenizer();
        if let Some(token) = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .find(|t| t.content.contains(": "))
        {
            return Err(invalid(format!(
                "added token `{}` contains \": \", where the prompt is split",
                token.content
            )));
        }
        for marker in ["<|im_start|>", "<|im_end|>"] {
            if tokenizer.token_to_id(marker).is_none() {
                return Err(invalid(format!(
                    "no `{marker}` token: not a Qwen3 chat tokenizer"
                )));
            }
        }
        // The card reads the logits at `convert_tokens_to_ids("yes")` / `("no")`: vocabulary
        // entries, which must also be how the words tokenize.
        let answer = |word: &str| match tokenizer.token_to_id(word) {
            Some(id) if bounded.ids(word)? == [id] => Ok(id),
            _ => Err(invalid(format!(
                "\"{word}\" is not a single token of this vocabulary (the score reads its logit)"
            ))),
        };
        let answers = AnswerIds {
            yes: answer("yes")?,
            no: answer("no")?,
        };
        let prefix_ids = bounded.ids(PREFIX)?;
        let suffix_ids = bounded.ids(SUFFIX)?;
        let fixed = prefix_ids.len() + suffix_ids.len();
        if max_length <= fixed {
            return Err(invalid(format!(
                "max_length {max_length} leaves no room for the query and document after the \
                prompt's {fixed} tokens"
            )));
        }
        let instruction = instruction.unwrap_or(DEFAULT_INSTRUCTION);
        Ok(Self {
            bounded,
            max_length,
            prefix_ids,
            suffix_ids,
            query_head: format!("<Instruct>: {instruction}\n<Query>: "),
            answers,
        })
    }

    /// The "yes" and "no" token ids, whose logits the model compares.
    pub fn answers(&self) -> AnswerIds {
        self.answers
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
            return Err(UnsupportedPair::Chunk { family: "qwen3" }.into());
        }
        let refuse = truncation == Truncation::None;
        let fixed = self.prefix_ids.len() + self.suffix_ids.len();
        // Body tokens a pair can hold (positive: checked at load).
        let budget = self.max_length - fixed;
        let too_long = |doc_index, tokens, exact| TooLong {
            doc_index,
            tokens,
            exact,
            max_length: self.max_length,
        };
        let query_half = Half {
            head: &self.query_head,
            body: query,
            tail: QUERY_TAIL,
            special_tokens: false,
        };
        let (query_ids, query_fits) =
            match self.bounded.encode_bounded(&query_half, budget, work)? {
                Bounded::Whole(e) => (e.get_ids().to_vec(), e.len() <= budget),
                Bounded::Prefix(e) => (e.get_ids().to_vec(), false),
            };
        let pair = |body: &[&[u32]], doc_index, span| {
            let ids = [&self.prefix_ids[..]]
                .into_iter()
                .chain(body.iter().copied())
                .chain([&self.suffix_ids[..]])
                .collect::<Vec<_>>()
                .concat();
            EncodedPair {
                second_segment: ids.len(),
                ids,
                doc_index,
                span,
            }
        };
        if !query_fits {
            // The query alone fills the body: every pair is its first tokens, no document.
            if refuse && !documents.is_empty() {
                return Err(too_long(0, fixed + query_ids.len(), false).into());
            }
            let body = &query_ids[..budget];
            return Ok((0..documents.len())
                .map(|doc_index| pair(&[body], doc_index, 0..0))
                .collect());
        }
        let left = budget - query_ids.len();
        let mut pairs = Vec::with_capacity(documents.len());
        for (doc_index, document) in documents.iter().enumerate() {
            let half = Half {
                head: DOCUMENT_HEAD,
                body: document,
                tail: "",
                special_tokens: false,
            };
            if refuse {
                // Too many bytes for `left` tokens to cover: refuse without tokenizing.
                let at_least = half.bytes() / self.bounded.max_token_bytes;
                if at_least > left {
                    let tokens = fixed + query_ids.len() + at_least;
                    return Err(too_long(doc_index, tokens, false).into());
                }
            }
            let (doc, exact) = match self.bounded.encode_bounded(&half, left, work)? {
                Bounded::Whole(doc) => (doc, true),
                Bounded::Prefix(doc) => (doc, false),
            };
            if refuse && doc.len() > left {
                let tokens = fixed + query_ids.len() + doc.len();
                return Err(too_long(doc_index, tokens, exact).into());
            }
            let kept = doc.len().min(left);
            let span = if exact && kept == doc.len() {
                0..document.len()
            } else {
                half.body_span(&doc, 0..kept)
            };
            pairs.push(pair(&[&query_ids, &doc.get_ids()[..kept]], doc_index, span));
        }
        Ok(pairs)
    }
}

impl PairEncoder for Qwen3PromptTokenizer {
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
