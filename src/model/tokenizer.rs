//! Turns (query, document) pairs into the token sequences the model was trained on.
//!
//! Template (NVIDIA model card, NeMo Retriever; `docs/model.md`): `question:{query} \n \n passage:{document}`,
//! tokenized as ONE sequence with BOS (added by the Llama-3 `tokenizer.json` post-processor) and no
//! EOS, cut from the right at `max_length`.
//!
//! The query is tokenized once per request: the text splits into `question:{query} \n \n` and
//! ` passage:{document}`. The Llama-3 pre-tokenizer regex always ends a pre-token at the last newline of
//! ` \n \n` (no alternative can carry a newline run into a following space+letter), and BPE never merges
//! across pre-tokens, so the two halves tokenize exactly as the whole string does. The golden tests
//! check this against the Hugging Face tokenizer.
//!
//! # Cost bounded by `max_length`, not by the text
//! Hugging Face tokenizes the whole text and then truncates; a 5 MB document then costs seconds of
//! CPU only to be cut or refused. Here every half is tokenized at most up to a *safe cut* (see
//! [`SafeCuts`]) that already yields more tokens than the pair can hold, with identical tokens, and
//! a text with more bytes than `max_length` tokens can possibly cover (the longest token of the
//! vocabulary bounds the bytes per token) is refused under `Truncation::None` without tokenizing it
//! at all. [`TokenizeWork`] counts the work, so tests and metrics can see it. `BoundedTokenizer`
//! holds this machinery; the Qwen3-Reranker prompt (`family/qwen3_prompt.rs`) uses it too.

use std::path::Path;

use std::ops::Range;

use tokenizers::{Encoding, ModelWrapper, Tokenizer};

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
    /// Score overlapping windows of a long document; its score is the best window's.
    Chunk(ChunkPolicy),
}

/// How `Truncation::Chunk` splits a document that does not fit in one pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPolicy {
    /// Document tokens shared by consecutive windows (at most half a window).
    pub overlap: usize,
    /// Windows scored per document at most; the rest of a longer document is not read.
    pub max_chunks: usize,
}

impl Default for ChunkPolicy {
    fn default() -> Self {
        Self {
            overlap: DEFAULT_CHUNK_OVERLAP,
            max_chunks: DEFAULT_MAX_CHUNKS_PER_DOC,
        }
    }
}

/// Tokens shared by consecutive windows unless the request says otherwise.
pub const DEFAULT_CHUNK_OVERLAP: usize = 64;
/// Windows per document unless the request says otherwise (Cohere's v1 API used 10 as well).
pub const DEFAULT_MAX_CHUNKS_PER_DOC: usize = 10;

/// One sequence for the model: the query with (a window of) one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    pub ids: Vec<u32>,
    pub doc_index: usize,
    /// Byte range of the document text this sequence read.
    pub span: Range<usize>,
    /// Index of the first token of the second segment (token type 1); `ids.len()` for a
    /// one-segment sequence such as this family's prompt template.
    pub second_segment: usize,
}

/// Under `Truncation::Chunk`, the query leaves no room for any document token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the query has {query_tokens} tokens with the template, which leaves no room for a document window under max_length {max_length}; shorten the query")]
pub struct QueryTooLong {
    pub query_tokens: usize,
    pub max_length: usize,
}

/// A document that does not fit under `Truncation::None`.
///
/// `tokens` is exact when the whole pair was tokenized (`exact`), and a lower bound above
/// `max_length` when tokenizing stopped as soon as the answer was known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "document {doc_index} has {}{tokens} tokens with the query; max_length is {max_length} and truncate is NONE",
    if *exact { "" } else { "at least " }
)]
pub struct TooLong {
    pub doc_index: usize,
    pub tokens: usize,
    pub exact: bool,
    pub max_length: usize,
}

/// The tokenized query half, reused for every document of a request.
#[derive(Debug, Clone)]
pub struct EncodedQuery {
    ids: Vec<u32>,
    /// False when the query alone is longer than `max_length` (then perhaps only its first
    /// tokens, more than `max_length` of them, were computed).
    complete: bool,
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
    bounded: BoundedTokenizer,
    max_length: usize,
    /// ` passage:` alone, repeated at the start of every window of a chunked document.
    passage_ids: Vec<u32>,
}

impl std::fmt::Debug for PairTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairTokenizer")
            .field("max_length", &self.max_length)
            .field("max_token_bytes", &self.bounded.max_token_bytes)
            .finish_non_exhaustive()
    }
}

/// A byte-level BPE tokenizer that tokenizes a template half only as far as a token limit needs
/// (see the module doc): the length-bounded core shared by the prompt-template families.
#[derive(Clone)]
pub(crate) struct BoundedTokenizer {
    tokenizer: Tokenizer,
    /// Most UTF-8 bytes one token can stand for (the longest byte-level token of the vocabulary,
    /// times 3 under an NFC normalizer, which composes at most 3 code points, a Hangul L V T run of
    /// 9 bytes, into one of 3): a text of `n` bytes has at least `n / max_token_bytes` tokens.
    pub(crate) max_token_bytes: usize,
    cuts: SafeCuts,
}

impl BoundedTokenizer {
    /// Loads tokenizer.json, with padding and truncation off (ours to decide, whatever the file
    /// says). Errors name the file.
    pub(crate) fn from_file(path: &Path) -> Result<Self, ModelError> {
        let invalid = |message: String| ModelError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| invalid(e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| invalid(e.to_string()))?;
        Self::new(tokenizer).map_err(|e| match e {
            ModelError::Tokenize(message) => invalid(message),
            other => other,
        })
    }

    pub(crate) fn new(tokenizer: Tokenizer) -> Result<Self, ModelError> {
        // Only no normalizer (Llama 3) or NFC (Qwen2/3) keep the byte bound and the safe cuts
        // (module doc) true.
        let composes = match tokenizer.get_normalizer() {
            None => false,
            Some(tokenizers::NormalizerWrapper::NFC(_)) => true,
            Some(_) => {
                return Err(ModelError::Tokenize(
                    "unsupported normalizer (expected none or NFC)".into(),
                ))
            }
        };
        let max_token_bytes = max_token_bytes(&tokenizer)? * if composes { 3 } else { 1 };
        let cuts = SafeCuts::new(&tokenizer, composes);
        Ok(Self {
            tokenizer,
            max_token_bytes,
            cuts,
        })
    }

    pub(crate) fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// All tokens of `text`, without special tokens (a fixed template piece).
    pub(crate) fn ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Tokenize(e.to_string()))?
            .get_ids()
            .to_vec())
    }
}

impl PairTokenizer {
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, ModelError> {
        Self::with_bounded(BoundedTokenizer::from_file(path)?, max_length).map_err(|e| match e {
            ModelError::Tokenize(message) => ModelError::Tokenizer {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    pub fn new(tokenizer: Tokenizer, max_length: usize) -> Result<Self, ModelError> {
        Self::with_bounded(BoundedTokenizer::new(tokenizer)?, max_length)
    }

    fn with_bounded(bounded: BoundedTokenizer, max_length: usize) -> Result<Self, ModelError> {
        if max_length == 0 || max_length > MAX_SUPPORTED_LENGTH {
            return Err(ModelError::MaxLength {
                value: max_length,
                max: MAX_SUPPORTED_LENGTH,
            });
        }
        let passage_ids = bounded.ids(Half::PASSAGE_HEAD)?;
        Ok(Self {
            bounded,
            max_length,
            passage_ids,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// `[BOS] question:{query} \n \n`, or its first tokens when the query alone overflows
    /// `max_length`.
    pub fn encode_query(
        &self,
        query: &str,
        work: &mut TokenizeWork,
    ) -> Result<EncodedQuery, ModelError> {
        let half = Half {
            head: "question:",
            body: query,
            tail: " \n \n",
            special_tokens: true,
        };
        Ok(
            match self.bounded.encode_bounded(&half, self.max_length, work)? {
                Bounded::Whole(encoding) => EncodedQuery {
                    ids: encoding.get_ids().to_vec(),
                    complete: encoding.len() <= self.max_length,
                },
                Bounded::Prefix(encoding) => EncodedQuery {
                    ids: encoding.get_ids().to_vec(),
                    complete: false,
                },
            },
        )
    }

    /// Joins the query with each document under the length policy; one sequence per document, in
    /// order (for `Truncation::Chunk`, see [`encode_counting`](Self::encode_counting)).
    pub fn encode_pairs(
        &self,
        query: &str,
        documents: &[&str],
        truncation: Truncation,
    ) -> Result<Vec<Vec<u32>>, EncodePairsError> {
        let pairs =
            self.encode_counting(query, documents, truncation, &mut TokenizeWork::default())?;
        Ok(pairs.into_iter().map(|pair| pair.ids).collect())
    }

    /// The sequences the model reads for one request, document by document (several windows per
    /// document under `Truncation::Chunk`), adding the tokenizer's work to `work`. Each document is
    /// tokenized only as far as its pairs can use it.
    pub fn encode_counting(
        &self,
        query: &str,
        documents: &[&str],
        truncation: Truncation,
        work: &mut TokenizeWork,
    ) -> Result<Vec<EncodedPair>, EncodePairsError> {
        let query = self.encode_query(query, work)?;
        if let Truncation::Chunk(policy) = truncation {
            return self.encode_windows(&query, documents, policy, work);
        }
        let refuse = truncation == Truncation::None;
        let too_long = |doc_index, tokens, exact| TooLong {
            doc_index,
            tokens,
            exact,
            max_length: self.max_length,
        };
        if !query.complete {
            // The query alone fills the window: every pair is the query's first tokens.
            if refuse && !documents.is_empty() {
                return Err(too_long(0, query.len(), false).into());
            }
            let ids = &query.ids[..self.max_length.min(query.len())];
            return Ok((0..documents.len())
                .map(|doc_index| EncodedPair {
                    ids: ids.to_vec(),
                    doc_index,
                    span: 0..0,
                    second_segment: ids.len(),
                })
                .collect());
        }
        // Tokens left for the document half; more than this and the pair is too long.
        let budget = self.max_length.saturating_sub(query.len());
        let mut pairs = Vec::with_capacity(documents.len());
        for (doc_index, document) in documents.iter().enumerate() {
            let half = Half::passage(document);
            if refuse {
                // Too many bytes for `budget` tokens to cover: refuse without tokenizing.
                let at_least = half.bytes() / self.bounded.max_token_bytes;
                if at_least > budget {
                    return Err(too_long(doc_index, query.len() + at_least, false).into());
                }
            }
            let (doc, exact) = match self.bounded.encode_bounded(&half, budget, work)? {
                Bounded::Whole(doc) => (doc, true),
                Bounded::Prefix(doc) => (doc, false),
            };
            if refuse && doc.len() > budget {
                return Err(too_long(doc_index, query.len() + doc.len(), exact).into());
            }
            let kept = doc.len().min(budget);
            pairs.push(EncodedPair {
                second_segment: query.len() + kept,
                ids: [&query.ids[..], &doc.get_ids()[..kept]].concat(),
                doc_index,
                span: if exact && kept == doc.len() {
                    0..document.len()
                } else {
                    half.body_span(&doc, 0..kept)
                },
            });
        }
        Ok(pairs)
    }

    /// `Truncation::Chunk`: a document that fits is one ordinary pair; a longer one becomes
    /// overlapping windows of its own tokens, each repeating the query and ` passage:`.
    ///
    /// Windows start and end where the text has a space after a non-space character whenever
    /// the window holds one: such a cut changes no token on either side (the previous pre-token
    /// ends there and `:` never joins a following space), so the text of a window's span, sent
    /// back as a document, is tokenized into exactly the window's ids. Text without such spaces
    /// (CJK, one giant word) is cut on plain token boundaries instead.
    fn encode_windows(
        &self,
        query: &EncodedQuery,
        documents: &[&str],
        policy: ChunkPolicy,
        work: &mut TokenizeWork,
    ) -> Result<Vec<EncodedPair>, EncodePairsError> {
        let no_room = || QueryTooLong {
            query_tokens: query.len(),
            max_length: self.max_length,
        };
        // Document tokens per window: the query and ` passage:` come first in every window.
        let window = self
            .max_length
            .checked_sub(query.len() + self.passage_ids.len())
            .filter(|&tokens| tokens > 0 && query.complete)
            .ok_or_else(no_room)?;
        let overlap = policy.overlap.min(window / 2);
        let max_chunks = policy.max_chunks.max(1);
        let budget = self.max_length - query.len();
        let mut pairs = Vec::new();
        for (doc_index, document) in documents.iter().enumerate() {
            let half = Half::passage(document);
            // Enough tokens for `max_chunks` windows after the template's own tokens.
            let needed = self.passage_ids.len() + max_chunks * window;
            let (encoding, whole) =
                match self
                    .bounded
                    .encode_bounded(&half, needed.max(budget), work)?
                {
                    Bounded::Whole(doc) if doc.len() <= budget => {
                        pairs.push(EncodedPair {
                            second_segment: query.len() + doc.len(),
                            ids: [&query.ids[..], doc.get_ids()].concat(),
                            doc_index,
                            span: 0..document.len(),
                        });
                        continue;
                    }
                    Bounded::Whole(doc) => (doc, true),
                    Bounded::Prefix(doc) => (doc, false),
                };
            let windows = DocumentWindows::new(&half, &encoding, whole);
            let ids = encoding.get_ids();
            for tokens in windows.split(window, overlap, max_chunks) {
                // The first window keeps the document's own start (` passage:` may have merged
                // with a leading `...`); later ones repeat ` passage:` alone.
                let head = if tokens.start == windows.content.start {
                    &ids[..windows.content.start]
                } else {
                    &self.passage_ids[..]
                };
                pairs.push(EncodedPair {
                    second_segment: query.len() + head.len() + tokens.len(),
                    ids: [&query.ids[..], head, &ids[tokens.clone()]].concat(),
                    doc_index,
                    span: windows.span(tokens),
                });
            }
        }
        Ok(pairs)
    }
}

impl BoundedTokenizer {
    /// Tokenizes `half` whole, or only a prefix of it once that prefix is known to hold more than
    /// `limit` tokens (identical to the first tokens of the whole text; see [`SafeCuts`]).
    pub(crate) fn encode_bounded(
        &self,
        half: &Half<'_>,
        limit: usize,
        work: &mut TokenizeWork,
    ) -> Result<Bounded, ModelError> {
        // Past this many bytes a text surely has more than `limit` tokens.
        let surely_longer = (limit + 1).saturating_mul(self.max_token_bytes);
        tokenize_bounded(
            half.bytes(),
            limit,
            surely_longer,
            |min| self.cuts.first_at_or_after(half.body, min),
            |end| match end {
                None => self.encode_text(&half.whole(), half.special_tokens, work),
                Some(cut) => {
                    let cut = floor_char_boundary(half.body, cut);
                    self.encode_text(&half.prefix(cut), half.special_tokens, work)
                }
            },
        )
    }

    fn encode_text(
        &self,
        text: &str,
        special_tokens: bool,
        work: &mut TokenizeWork,
    ) -> Result<Encoding, ModelError> {
        work.bytes += text.len() as u64;
        work.calls += 1;
        self.tokenizer
            .encode(text, special_tokens)
            .map_err(|e| ModelError::Tokenize(e.to_string()))
    }
}

/// Work done by the tokenizer: what bounds the cost of a request, whatever its size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenizeWork {
    /// Text bytes handed to the underlying tokenizer.
    pub bytes: u64,
    /// Calls into the underlying tokenizer.
    pub calls: u64,
}

/// One half of the template: `head + body + tail`, where only `body` comes from the caller.
pub(crate) struct Half<'a> {
    pub(crate) head: &'a str,
    pub(crate) body: &'a str,
    pub(crate) tail: &'a str,
    pub(crate) special_tokens: bool,
}

impl<'a> Half<'a> {
    /// Template head of the document half.
    const PASSAGE_HEAD: &'static str = " passage:";

    fn passage(document: &'a str) -> Self {
        Self {
            head: Self::PASSAGE_HEAD,
            body: document,
            tail: "",
            special_tokens: false,
        }
    }

    /// Byte range of `body` covered by `tokens` of `encoding` (an encoding of this half or of
    /// a prefix of it), on char boundaries.
    pub(crate) fn body_span(&self, encoding: &Encoding, tokens: Range<usize>) -> Range<usize> {
        let offsets = encoding.get_offsets();
        let (Some(first), Some(last)) = (
            offsets.get(tokens.start),
            tokens.end.checked_sub(1).and_then(|i| offsets.get(i)),
        ) else {
            return 0..0;
        };
        let to_body = |at: usize| at.saturating_sub(self.head.len()).min(self.body.len());
        let start = floor_char_boundary(self.body, to_body(first.0));
        let end = ceil_char_boundary(self.body, to_body(last.1));
        start..end.max(start)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.head.len() + self.body.len() + self.tail.len()
    }
    fn whole(&self) -> String {
        [self.head, self.body, self.tail].concat()
    }
    /// `head + body[..cut]`: the tail is past the cut.
    fn prefix(&self, cut: usize) -> String {
        [self.head, &self.body[..cut]].concat()
    }
}

/// The tokens of one long document (an encoding of ` passage:{document}` or of a prefix of it),
/// to be split into windows.
struct DocumentWindows<'a> {
    body: &'a str,
    /// Byte offset of the first document token in `body`, per token (offsets count from the
    /// start of ` passage:`).
    starts: Vec<usize>,
    /// Token index range of the document's own tokens (after those of ` passage:`).
    content: Range<usize>,
    /// End of the text the last token covers, in `body`.
    end: usize,
}

impl<'a> DocumentWindows<'a> {
    fn new(half: &Half<'a>, encoding: &Encoding, whole: bool) -> Self {
        let head = half.head.len();
        let offsets = encoding.get_offsets();
        // The document's own tokens start after those lying wholly inside the head.
        let first = offsets.iter().take_while(|&&(_, end)| end <= head).count();
        let last_end = offsets.last().map_or(head, |&(_, end)| end);
        Self {
            body: half.body,
            starts: offsets
                .iter()
                .map(|&(start, _)| start.saturating_sub(head))
                .collect(),
            content: first..offsets.len(),
            end: if whole {
                half.body.len()
            } else {
                last_end.saturating_sub(head).min(half.body.len())
            },
        }
    }

    /// Whether a window may start (or end before) token `token` without changing any token: it
    /// starts with a space that follows a non-space character.
    fn is_clean_cut(&self, token: usize) -> bool {
        let Some(&at) = self.starts.get(token) else {
            return false;
        };
        let bytes = self.body.as_bytes();
        at > 0
            && bytes.get(at) == Some(&b' ')
            && self.body[..at]
                .chars()
                .next_back()
                .is_some_and(|c| !c.is_whitespace())
    }

    /// Token ranges of at most `max_chunks` windows of `window` tokens, consecutive windows
    /// sharing at least `overlap` tokens, snapped to clean cuts where the window has one.
    fn split(&self, window: usize, overlap: usize, max_chunks: usize) -> Vec<Range<usize>> {
        let mut windows = Vec::new();
        let mut start = self.content.start;
        while windows.len() < max_chunks && start < self.content.end {
            let limit = (start + window).min(self.content.end);
            // Snap back to a clean cut in the window's second half, if there is one.
            let end = if limit == self.content.end {
                limit
            } else {
                (start + (limit - start).div_ceil(2)..=limit)
                    .rev()
                    .find(|&end| self.is_clean_cut(end))
                    .unwrap_or(limit)
            };
            windows.push(start..end);
            if end == self.content.end {
                break;
            }
            // The next window starts `overlap` tokens back, or up to `overlap` more at a clean cut.
            let latest = end.saturating_sub(overlap).max(start + 1);
            let earliest = latest.saturating_sub(overlap).max(start + 1);
            start = (earliest..=latest)
                .rev()
                .find(|&next| self.is_clean_cut(next))
                .unwrap_or(latest);
        }
        windows
    }

    /// Byte range of `body` that a window of `tokens` read.
    fn span(&self, tokens: Range<usize>) -> Range<usize> {
        let start = if tokens.start <= self.content.start {
            0
        } else {
            self.starts.get(tokens.start).copied().unwrap_or(self.end)
        };
        let end = if tokens.end >= self.content.end {
            self.end
        } else {
            self.starts.get(tokens.end).copied().unwrap_or(self.end)
        };
        let start = floor_char_boundary(self.body, start.min(self.end));
        start..ceil_char_boundary(self.body, end).max(start)
    }
}

/// What [`tokenize_bounded`] computed.
pub(crate) enum Bounded {
    /// Every token of the text.
    Whole(Encoding),
    /// The first tokens of the text, more than the limit asked for.
    Prefix(Encoding),
}

impl Bounded {
    pub(crate) fn encoding(&self) -> &Encoding {
        match self {
            Bounded::Whole(e) | Bounded::Prefix(e) => e,
        }
    }
    pub(crate) fn into_encoding(self) -> Encoding {
        match self {
            Bounded::Whole(e) | Bounded::Prefix(e) => e,
        }
    }
    /// Tokens computed (for a prefix: more than the limit).
    pub(crate) fn len(&self) -> usize {
        self.encoding().len()
    }
    pub(crate) fn is_whole(&self) -> bool {
        matches!(self, Bounded::Whole(_))
    }
}

/// Bytes of text tokenized per token of the limit before trying a cut (English averages ~4 bytes
/// per token; a prefix that yields too few tokens is doubled).
const PREFIX_BYTES_PER_TOKEN: usize = 8;

/// The bounded-prefix search every pair encoder uses (this module's prompt template, the BERT-style
/// segments, the Qwen3 prompt), so a 5 MB text costs what `limit` allows, not its size.
///
/// A text of `bytes` bytes is tokenized whole (`encode(None)`) when it is short; otherwise a
/// prefix ending at the first safe cut (`first_cut_at_or_after`, whose tokens are the first tokens
/// of the whole text) past `PREFIX_BYTES_PER_TOKEN` bytes per token of the limit is tokenized
/// (`encode(Some(cut))`), doubling until it holds more than `limit` tokens. Past `surely_longer`
/// bytes the text surely holds more than `limit` tokens: with no cut before that, it is cut there
/// anyway (`encode` floors the offset to a char boundary), the one case where the last tokens may
/// differ from tokenizing the whole run.
pub(crate) fn tokenize_bounded<E>(
    bytes: usize,
    limit: usize,
    surely_longer: usize,
    first_cut_at_or_after: impl Fn(usize) -> Option<usize>,
    mut encode: impl FnMut(Option<usize>) -> Result<Encoding, E>,
) -> Result<Bounded, E> {
    let mut window = limit
        .saturating_add(1)
        .saturating_mul(PREFIX_BYTES_PER_TOKEN);
    if bytes <= window {
        return encode(None).map(Bounded::Whole);
    }
    while let Some(cut) = first_cut_at_or_after(window) {
        if cut > surely_longer {
            break;
        }
        let prefix = encode(Some(cut))?;
        if prefix.len() > limit {
            return Ok(Bounded::Prefix(prefix));
        }
        window = cut.saturating_mul(2);
    }
    if bytes <= surely_longer {
        return encode(None).map(Bounded::Whole);
    }
    encode(Some(surely_longer)).map(Bounded::Prefix)
}

/// Byte offsets where a text can be cut without changing the tokens before the cut: a letter
/// (`\p{L}`) followed by a non-letter.
///
/// Why this is safe for the Llama-3 pre-tokenizer regex
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`:
/// only the contractions and the letter-run alternative can contain a letter; a contraction that
/// contains the letter before the cut ends with it (the next character is no letter), and a letter
/// run stops at the first non-letter. So the pre-token holding the last letter ends exactly at the
/// cut, and every earlier pre-token was decided by characters before it (greedy whitespace runs
/// stop at that letter, and the one lookahead `(?!\S)` looks one character past a match that ends
/// before the cut). BPE never merges across pre-tokens, so the tokens of `text[..cut]` are a prefix
/// of the tokens of `text`. `tests/model_golden.rs` checks this against whole-text tokenization on
/// mixed scripts, numbers, contractions and emoji.
///
/// The Qwen2/Qwen3 pattern differs only in `\p{N}` (one digit per pre-token), which holds no letter,
/// so the argument is the same. Under an NFC normalizer (Qwen) a letter followed by a combining mark
/// (`\p{M}`) may compose with it, so there the character after the letter must be no mark either
/// (the few compositions with a following starter are Hangul jamo, letters, and spacing marks).
///
/// Added tokens (`<|eot_id|>` and the like) are matched in the raw text before the regex runs, so a
/// cut must not fall inside one of them either.
#[derive(Clone)]
struct SafeCuts {
    letter_then_other: regex::Regex,
    /// Contents of the tokenizer's added tokens.
    added_tokens: Vec<String>,
}

impl SafeCuts {
    fn new(tokenizer: &Tokenizer, composes: bool) -> Self {
        let pattern = if composes {
            r"\p{L}[^\p{L}\p{M}]"
        } else {
            r"\p{L}[^\p{L}]"
        };
        // A constant pattern: it compiles, or every tokenizer test fails at once.
        #[allow(clippy::expect_used)]
        let letter_then_other = regex::Regex::new(pattern).expect("constant regex");
        let added_tokens = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .map(|token| token.content)
            .filter(|content| !content.is_empty())
            .collect();
        Self {
            letter_then_other,
            added_tokens,
        }
    }

    /// The first safe cut at or after byte `min` (which need not be a char boundary).
    fn first_at_or_after(&self, text: &str, min: usize) -> Option<usize> {
        // Start a little early so a letter just before `min` can pair with the character after it.
        let start = floor_char_boundary(text, min.saturating_sub(4));
        self.letter_then_other
            .find_iter(&text[start..])
            .map(|m| {
                let letter = m.as_str().chars().next().map_or(0, char::len_utf8);
                start + m.start() + letter
            })
            .find(|&cut| cut >= min && !self.inside_added_token(text, cut))
    }

    /// Whether an occurrence of an added token starts before `cut` and ends after it.
    fn inside_added_token(&self, text: &str, cut: usize) -> bool {
        self.added_tokens.iter().any(|token| {
            let from = floor_char_boundary(text, cut.saturating_sub(token.len() - 1));
            let to = ceil_char_boundary(text, cut + token.len() - 1);
            text[from..to]
                .match_indices(token.as_str())
                .any(|(at, _)| from + at < cut && from + at + token.len() > cut)
        })
    }
}

/// The largest char boundary of `text` at or below `at`.
pub(crate) fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The smallest char boundary of `text` at or above `at`.
pub(crate) fn ceil_char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at += 1;
    }
    at
}

/// The longest token of a byte-level BPE vocabulary, in bytes (each vocabulary character stands for
/// one byte). Other tokenizer kinds can map one token to an unbounded run of text (an unknown-word
/// token), which would void the byte bound, so they are refused.
fn max_token_bytes(tokenizer: &Tokenizer) -> Result<usize, ModelError> {
    let byte_level = match tokenizer.get_model() {
        ModelWrapper::BPE(bpe) => bpe.unk_token.is_none(),
        _ => false,
    };
    if !byte_level {
        return Err(ModelError::Tokenize(
            "expected a byte-level BPE tokenizer (Llama 3 tokenizer.json) without an unknown token"
                .into(),
        ));
    }
    tokenizer
        .get_vocab(true)
        .keys()
        .map(|token| token.chars().count())
        .max()
        .filter(|&longest| longest > 0)
        .ok_or_else(|| ModelError::Tokenize("the tokenizer's vocabulary is empty".into()))
}

/// Failure of [`PairTokenizer::encode_pairs`].
#[derive(Debug, thiserror::Error)]
pub enum EncodePairsError {
    #[error(transparent)]
    Tokenizer(#[from] ModelError),
    #[error(transparent)]
    TooLong(#[from] TooLong),
    #[error(transparent)]
    QueryTooLong(#[from] QueryTooLong),
    #[error(transparent)]
    Unsupported(#[from] UnsupportedPair),
}

/// A request that this family's pair encoding cannot honour exactly (refused, not approximated).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsupportedPair {
    #[error("truncate CHUNK is not supported for {family} models; use END or NONE")]
    Chunk { family: &'static str },
    #[error(
        "the query has more than {max_length} tokens and so has document {doc_index}: which one \
        keeps the odd token under longest_first truncation is not computed; shorten the query"
    )]
    QueryAndDocumentTooLong { doc_index: usize, max_length: usize },
}
