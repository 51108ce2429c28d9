//! Model families: which architecture a checkpoint is, and the two seams the engine uses so that it
//! never branches on it.
//!
//! A family is detected from `config.json` (`model_type`, then `architectures`); anything else is
//! refused with [`ModelError::UnsupportedFamily`], naming the supported ones. Each family lives in
//! its own module and provides:
//! - a [`Reranker`]: token sequences in, one raw logit per sequence out (the device side, run only
//!   by the engine's executor thread);
//! - a [`PairEncoder`]: (query, documents) in, token sequences out under the length policy (the
//!   tokenizer side, run on the blocking pool).
//!
//! | family | `model_type` / architecture | forward | pair encoding |
//! |---|---|---|---|
//! | [`Family::LlamaBidirec`] (default) | `llama_bidirec` | our packed forward (`cross_encoder.rs`) | prompt template (`tokenizer.rs`) |
//! | [`Family::Bert`] | `bert` / `BertForSequenceClassification` | our packed BERT encoder, pooler and classifier ([`bert`]) | `[CLS] q [SEP] d [SEP]`, token types 0/1 ([`segment_pairs`]) |
//! | [`Family::XlmRoberta`] | `xlm-roberta` / `XLMRobertaForSequenceClassification` | the same encoder with RoBERTa's names and positions ([`xlm_roberta`]) | `<s> q </s></s> d </s>` ([`segment_pairs`]) |
//! | [`Family::ModernBert`] | `modernbert` / `ModernBertForSequenceClassification` | candle-transformers `ModernBert` encoder, our pooling, head and classifier ([`modernbert`]) | `[CLS] q [SEP] d [SEP]`, no token types ([`segment_pairs`]) |
//! | [`Family::Qwen3`] | `qwen3` / `Qwen3ForCausalLM` (Qwen3-Reranker) | our packed forward, causal, logit("yes") − logit("no") at the last token ([`qwen3`]) | the model card's chat prompt with an instruction ([`qwen3_prompt`]) |

pub mod bert;
mod llama_bidirec;
pub mod modernbert;
pub mod qwen3;
pub mod qwen3_prompt;
pub mod segment_pairs;
pub mod xlm_roberta;

use std::path::Path;

use candle_core::{DType, Device};

use super::{EncodePairsError, EncodedPair, ModelError, TokenizeWork, Truncation};

pub use segment_pairs::SegmentPairTokenizer;

/// The architectures this build can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `nvidia/llama-nemotron-rerank-1b-v2`: bidirectional Llama, mean pooling, linear head.
    LlamaBidirec,
    /// `BertForSequenceClassification` (cross-encoder/ms-marco-MiniLM-L-6-v2).
    Bert,
    /// `XLMRobertaForSequenceClassification` (BAAI/bge-reranker-v2-m3, bge-reranker-base/large).
    XlmRoberta,
    /// `ModernBertForSequenceClassification` (Alibaba-NLP/gte-reranker-modernbert-base).
    ModernBert,
    /// `Qwen3ForCausalLM` (Qwen/Qwen3-Reranker-0.6B/4B/8B): yes/no logits at the last token.
    Qwen3,
}

/// What [`ModelError::UnsupportedFamily`] lists.
pub const SUPPORTED_FAMILIES: &str =
    "llama_bidirec (LlamaBidirectionalForSequenceClassification), \
    bert (BertForSequenceClassification), xlm-roberta (XLMRobertaForSequenceClassification), \
    modernbert (ModernBertForSequenceClassification), \
    qwen3 (Qwen3ForCausalLM: Qwen3-Reranker)";

impl Family {
    /// The family's name in logs and metadata (its `model_type`).
    pub fn name(self) -> &'static str {
        match self {
            Family::LlamaBidirec => "llama_bidirec",
            Family::Bert => "bert",
            Family::XlmRoberta => "xlm-roberta",
            Family::ModernBert => "modernbert",
            Family::Qwen3 => "qwen3",
        }
    }

    /// Reads `config.json` and names its family.
    pub fn detect(config: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(config).map_err(|source| ModelError::Io {
            path: config.to_path_buf(),
            source,
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: config.to_path_buf(),
                message: e.to_string(),
            })?;
        Self::from_config(&value)
    }

    /// The family of a parsed `config.json`: `model_type` decides; for the encoder families the
    /// architecture must also be the sequence-classification head (a bare `BertModel` or a
    /// masked-LM checkpoint has no score head, and scoring it would be silently meaningless).
    pub fn from_config(config: &serde_json::Value) -> Result<Self, ModelError> {
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("<missing>");
        let architectures: Vec<&str> = config
            .get("architectures")
            .and_then(|v| v.as_array())
            .map(|list| list.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let has = |name: &str| architectures.contains(&name);
        let family = match model_type {
            "llama_bidirec" => Some(Family::LlamaBidirec),
            "bert" if has("BertForSequenceClassification") => Some(Family::Bert),
            "xlm-roberta" if has("XLMRobertaForSequenceClassification") => Some(Family::XlmRoberta),
            "modernbert" if has("ModernBertForSequenceClassification") => Some(Family::ModernBert),
            "qwen3" if has("Qwen3ForCausalLM") => Some(Family::Qwen3),
            _ => None,
        };
        family.ok_or_else(|| ModelError::UnsupportedFamily {
            model_type: model_type.to_string(),
            architectures: if architectures.is_empty() {
                "none".to_string()
            } else {
                architectures.join(", ")
            },
            supported: SUPPORTED_FAMILIES,
        })
    }
}

/// One token sequence as a model reads it.
#[derive(Debug, Clone, Copy)]
pub struct SequenceRef<'a> {
    pub ids: &'a [u32],
    /// Index of the first token of the second segment (token type 1); `ids.len()` when the
    /// sequence is one segment.
    pub second_segment: usize,
}

impl<'a> SequenceRef<'a> {
    /// A one-segment sequence.
    pub fn single(ids: &'a [u32]) -> Self {
        Self {
            ids,
            second_segment: ids.len(),
        }
    }
}

/// The device side of a family: scores token sequences.
pub trait Reranker: Send {
    /// One raw logit per sequence, in order; a sequence scores the same alone or in any batch.
    fn score_sequences(&self, sequences: &[SequenceRef<'_>]) -> candle_core::Result<Vec<f32>>;
    /// The token positions one forward pass over `sequences` computes: their real tokens for the
    /// packed families (the default), `sequences × longest` for a family that pads its batches.
    /// The engine reports it as `rerank_batch_padded_tokens`.
    fn computed_tokens(&self, sequences: &[SequenceRef<'_>]) -> usize {
        sequences.iter().map(|s| s.ids.len()).sum()
    }
    /// Longest sequence the model was loaded for.
    fn max_positions(&self) -> usize;
    fn device(&self) -> &Device;
    fn family(&self) -> Family;
}

/// The tokenizer side of a family: the pair encoding and the length policy.
pub trait PairEncoder: Send + Sync {
    /// The sequences the model reads for one request (several per document only under
    /// `Truncation::Chunk`), adding the tokenizer's work to `work`; cost bounded by `max_length`.
    fn encode_pairs_counting(
        &self,
        query: &str,
        documents: &[&str],
        truncation: Truncation,
        work: &mut TokenizeWork,
    ) -> Result<Vec<EncodedPair>, EncodePairsError>;
    fn max_length(&self) -> usize;
}

/// A loaded model of any family: its scorer and its pair encoder.
pub struct LoadedModel {
    pub family: Family,
    pub reranker: Box<dyn Reranker>,
    pub encoder: Box<dyn PairEncoder>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

/// Per-worker settings of the families that take any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The task instruction of the instruction-following families (Qwen3-Reranker); `None`: the
    /// family's default ([`qwen3_prompt::DEFAULT_INSTRUCTION`]). Refused by the other families.
    pub instruction: Option<String>,
}

/// Loads the model in `files` (its family detected from config.json), computing in `dtype` on
/// `device`, with sequences of at most `max_length` tokens; `tokenizer` overrides the model's own
/// tokenizer.json.
pub fn load(
    files: &super::ModelFiles,
    tokenizer: Option<&Path>,
    dtype: DType,
    device: &Device,
    max_length: usize,
) -> Result<LoadedModel, ModelError> {
    load_with(
        files,
        tokenizer,
        dtype,
        device,
        max_length,
        &LoadOptions::default(),
    )
}

/// [`load`] with per-worker [`LoadOptions`].
pub fn load_with(
    files: &super::ModelFiles,
    tokenizer: Option<&Path>,
    dtype: DType,
    device: &Device,
    max_length: usize,
    options: &LoadOptions,
) -> Result<LoadedModel, ModelError> {
    let family = Family::detect(&files.config)?;
    if options.instruction.is_some() && family != Family::Qwen3 {
        return Err(ModelError::InstructionUnsupported {
            family: family.name(),
        });
    }
    let tokenizer = tokenizer.unwrap_or(&files.tokenizer);
    let (reranker, encoder): (Box<dyn Reranker>, Box<dyn PairEncoder>) = match family {
        Family::LlamaBidirec => {
            let config = super::ModelConfig::from_file(&files.config)?;
            let encoder = super::PairTokenizer::from_file(tokenizer, max_length)?;
            let model = files.load_model(&config, dtype, device, max_length)?;
            (Box::new(model), Box::new(encoder))
        }
        Family::Bert => {
            let model = bert::BertStyleReranker::load_bert(files, dtype, device, max_length)?;
            let encoder = SegmentPairTokenizer::from_file(tokenizer, max_length, family.name())?;
            (Box::new(model), Box::new(encoder))
        }
        Family::XlmRoberta => {
            let model = xlm_roberta::load(files, dtype, device, max_length)?;
            let encoder = SegmentPairTokenizer::from_file(tokenizer, max_length, family.name())?;
            (Box::new(model), Box::new(encoder))
        }
        Family::ModernBert => {
            let model = modernbert::ModernBertReranker::load(files, dtype, device, max_length)?;
            let encoder = SegmentPairTokenizer::from_file(tokenizer, max_length, family.name())?;
            (Box::new(model), Box::new(encoder))
        }
        Family::Qwen3 => {
            // The tokenizer first: it names the answer tokens the model scores.
            let encoder = qwen3_prompt::Qwen3PromptTokenizer::from_file(
                tokenizer,
                max_length,
                options.instruction.as_deref(),
            )?;
            let model =
                qwen3::Qwen3Reranker::load(files, encoder.answers(), dtype, device, max_length)?;
            (Box::new(model), Box::new(encoder))
        }
    };
    Ok(LoadedModel {
        family,
        reranker,
        encoder,
    })
}

/// `id2label`'s size (transformers' `num_labels`; 2 when absent, as `PretrainedConfig` defaults).
fn num_labels(config: &serde_json::Value) -> usize {
    config
        .get("id2label")
        .and_then(|v| v.as_object())
        .map(|m| m.len())
        .or_else(|| {
            config
                .get("num_labels")
                .and_then(|v| v.as_u64())
                .map(|n| n as usize)
        })
        .unwrap_or(2)
}

/// Reads config.json into `T` and the raw JSON value (for the fields `T` does not carry).
fn read_config<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<(T, serde_json::Value), ModelError> {
    let invalid = |message: String| ModelError::Config {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let typed = serde_json::from_value(value.clone()).map_err(|e| invalid(e.to_string()))?;
    if num_labels(&value) != 1 {
        return Err(invalid(format!(
            "the classifier has {} labels; a reranker has one (num_labels = 1)",
            num_labels(&value)
        )));
    }
    Ok((typed, value))
}

/// Pads `sequences` on the right to the longest into (batch, longest) `input_ids`, `token_type_ids`
/// and `attention_mask` (u32) on `device`: ModernBERT runs padded batches.
fn padded_batch(
    sequences: &[SequenceRef<'_>],
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<(
    candle_core::Tensor,
    candle_core::Tensor,
    candle_core::Tensor,
)> {
    let longest = sequences.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let rows = sequences.len();
    let mut ids = Vec::with_capacity(rows * longest);
    let mut types = Vec::with_capacity(rows * longest);
    let mut mask = Vec::with_capacity(rows * longest);
    for sequence in sequences {
        let len = sequence.ids.len();
        ids.extend_from_slice(sequence.ids);
        ids.extend(std::iter::repeat_n(pad_id, longest - len));
        types.extend((0..longest).map(|i| u32::from(i >= sequence.second_segment && i < len)));
        mask.extend((0..longest).map(|i| u32::from(i < len)));
    }
    let shape = (rows, longest);
    Ok((
        candle_core::Tensor::from_vec(ids, shape, device)?,
        candle_core::Tensor::from_vec(types, shape, device)?,
        candle_core::Tensor::from_vec(mask, shape, device)?,
    ))
}

/// Refuses empty sequences, sequences past `max_positions` and ids outside the vocabulary.
fn check_sequences(
    sequences: &[SequenceRef<'_>],
    max_positions: usize,
    vocab_size: usize,
) -> candle_core::Result<()> {
    if let Some(bad) = sequences
        .iter()
        .find(|s| s.ids.is_empty() || s.ids.len() > max_positions)
    {
        candle_core::bail!(
            "a sequence of {} tokens is outside 1..={max_positions}",
            bad.ids.len()
        );
    }
    if let Some(bad) = sequences
        .iter()
        .flat_map(|s| s.ids.iter())
        .find(|&&id| id as usize >= vocab_size)
    {
        candle_core::bail!("token id {bad} is outside the model's vocabulary of {vocab_size}");
    }
    Ok(())
}

/// Loads safetensors into a `VarBuilder` (memory-mapped).
fn var_builder(
    files: &super::ModelFiles,
    dtype: DType,
    device: &Device,
) -> Result<candle_nn::VarBuilder<'static>, ModelError> {
    // SAFETY: as in `ModelFiles::load_model`: read-only maps of files nobody rewrites meanwhile.
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files.weights, dtype, device) }
        .map_err(|source| weights_error(files, source))
}

fn weights_error(files: &super::ModelFiles, source: candle_core::Error) -> ModelError {
    ModelError::Weights {
        files: files
            .weights
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn families_are_detected_from_model_type_and_architecture() {
        let detect = |v: serde_json::Value| Family::from_config(&v);
        assert_eq!(
            detect(json!({"model_type": "llama_bidirec"})).unwrap(),
            Family::LlamaBidirec
        );
        assert_eq!(
            detect(
                json!({"model_type": "bert", "architectures": ["BertForSequenceClassification"]})
            )
            .unwrap(),
            Family::Bert
        );
        assert_eq!(
            detect(json!({"model_type": "xlm-roberta",
                "architectures": ["XLMRobertaForSequenceClassification"]}))
            .unwrap(),
            Family::XlmRoberta
        );
        assert_eq!(
            detect(json!({"model_type": "modernbert",
                "architectures": ["ModernBertForSequenceClassification"]}))
            .unwrap(),
            Family::ModernBert
        );
        assert_eq!(
            detect(json!({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]})).unwrap(),
            Family::Qwen3
        );
    }

    #[test]
    fn unsupported_families_are_named_with_the_supported_list() {
        let e = Family::from_config(
            &json!({"model_type": "bert", "architectures": ["BertForMaskedLM"]}),
        )
        .unwrap_err();
        assert!(matches!(e, ModelError::UnsupportedFamily { .. }), "{e}");
        let message = e.to_string();
        assert!(
            message.contains("`bert`") && message.contains("BertForMaskedLM"),
            "{message}"
        );
        assert!(
            message.contains("XLMRobertaForSequenceClassification"),
            "{message}"
        );
        let e = Family::from_config(
            &json!({"model_type": "modernbert", "architectures": ["ModernBertForMaskedLM"]}),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("ModernBertForMaskedLM")
                && e.to_string()
                    .contains("ModernBertForSequenceClassification"),
            "{e}"
        );
        let message = Family::from_config(&json!({"model_type": "qwen3"}))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("`qwen3`") && message.contains("llama_bidirec"),
            "{message}"
        );
        let message = Family::from_config(&json!({})).unwrap_err().to_string();
        assert!(message.contains("<missing>"), "{message}");
    }

    #[test]
    fn padded_batches_carry_token_types_and_masks() {
        let a = [1u32, 2, 3, 4];
        let b = [5u32, 6];
        let (ids, types, mask) = padded_batch(
            &[
                SequenceRef {
                    ids: &a,
                    second_segment: 2,
                },
                SequenceRef::single(&b),
            ],
            0,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2, 3, 4], vec![5, 6, 0, 0]]
        );
        assert_eq!(
            types.to_vec2::<u32>().unwrap(),
            vec![vec![0, 0, 1, 1], vec![0, 0, 0, 0]]
        );
        assert_eq!(
            mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]]
        );
    }
}
