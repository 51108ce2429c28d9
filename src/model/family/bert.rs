//! The BERT-style cross-encoders: `BertForSequenceClassification` (cross-encoder/ms-marco-MiniLM-L-6-v2
//! and kin) here, and `XLMRobertaForSequenceClassification` ([`super::xlm_roberta`]) with its own
//! tensor names, positions and no token types. Both run the post-LayerNorm encoder of
//! `model/bert_encoder.rs` over a packed batch (our own module rather than candle-transformers'
//! padded one: see its doc for the profile that decided it), then `out(tanh(dense(first token)))`:
//! one raw logit (`num_labels = 1`; other heads are refused at load).
//!
//! Reference: transformers 4.47.1 `modeling_bert.py` / `modeling_xlm_roberta.py`; the golden tests
//! compare with them. Each sequence is computed from its own rows only, so a pair scores the same
//! alone or in any batch (up to gemm rounding).

use candle_core::{DType, Device, Tensor};

use super::{check_sequences, read_config, var_builder, weights_error};
use super::{Family, Reranker, SequenceRef};
use crate::model::bert_encoder::{Activation, BertEncoder, EncoderConfig, EncoderShape, TanhHead};
use crate::model::packed::PackedBatch;
use crate::model::{ModelError, ModelFiles};

/// Where a BERT-style family keeps what differs between them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Checkpoint {
    pub family: Family,
    /// Prefix of the encoder's tensors.
    pub encoder: &'static str,
    /// The head's dense and output layers.
    pub head: (&'static str, &'static str),
    /// Whether the second segment of a pair has token type 1 (BERT) or every token type 0
    /// (XLM-RoBERTa, whose tokenizers return no token types).
    pub token_types: bool,
}

const BERT: Checkpoint = Checkpoint {
    family: Family::Bert,
    encoder: "bert",
    head: ("bert.pooler.dense", "classifier"),
    token_types: true,
};

/// A BERT-style cross-encoder on one device.
pub struct BertStyleReranker {
    encoder: BertEncoder,
    head: TanhHead,
    checkpoint: Checkpoint,
    vocab_size: usize,
    max_positions: usize,
    device: Device,
}

impl BertStyleReranker {
    /// Loads the BERT checkpoint in `files` for sequences of at most `max_length` tokens.
    pub fn load_bert(
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
        max_length: usize,
    ) -> Result<Self, ModelError> {
        let (config, _) = read_config::<EncoderConfig>(&files.config)?;
        Self::load(files, &config, BERT, 0, dtype, device, max_length)
    }

    /// Loads a checkpoint laid out as `checkpoint` says, its positions counted from
    /// `first_position`.
    pub(super) fn load(
        files: &ModelFiles,
        config: &EncoderConfig,
        checkpoint: Checkpoint,
        first_position: usize,
        dtype: DType,
        device: &Device,
        max_length: usize,
    ) -> Result<Self, ModelError> {
        let invalid = |message: String| ModelError::Config {
            path: files.config.clone(),
            message,
        };
        if config.position_embedding_type != "absolute" {
            return Err(ModelError::Unsupported {
                field: "position_embedding_type",
                value: config.position_embedding_type.clone(),
                supported: "absolute",
            });
        }
        let activation =
            Activation::from_config(&config.hidden_act).ok_or_else(|| ModelError::Unsupported {
                field: "hidden_act",
                value: config.hidden_act.clone(),
                supported: Activation::SUPPORTED,
            })?;
        let heads = config.num_attention_heads;
        if heads == 0 || !config.hidden_size.is_multiple_of(heads) {
            return Err(invalid(format!(
                "hidden_size {} is not a multiple of num_attention_heads {heads}",
                config.hidden_size
            )));
        }
        if checkpoint.token_types && config.type_vocab_size < 2 {
            return Err(invalid(format!(
                "type_vocab_size {}: a {} pair has token types 0 and 1",
                config.type_vocab_size,
                checkpoint.family.name()
            )));
        }
        let positions = config
            .max_position_embeddings
            .saturating_sub(first_position);
        if max_length > positions {
            return Err(ModelError::MaxLength {
                value: max_length,
                max: positions,
            });
        }
        let shape = EncoderShape {
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            layers: config.num_hidden_layers,
            heads,
            intermediate_size: config.intermediate_size,
            activation,
            type_vocab_size: config.type_vocab_size,
            layer_norm_eps: config.layer_norm_eps,
            position_table_rows: config.max_position_embeddings,
            first_position,
            max_positions: max_length,
        };
        let vb = var_builder(files, dtype, device)?;
        let (dense, out) = checkpoint.head;
        let load = || {
            Ok::<_, candle_core::Error>((
                BertEncoder::load(vb.pp(checkpoint.encoder), &shape)?,
                TanhHead::load(&vb, dense, out, config.hidden_size)?,
            ))
        };
        let (encoder, head) = load().map_err(|e| weights_error(files, e))?;
        Ok(Self {
            encoder,
            head,
            checkpoint,
            vocab_size: config.vocab_size,
            max_positions: max_length,
            device: device.clone(),
        })
    }
}

impl Reranker for BertStyleReranker {
    fn score_sequences(&self, sequences: &[SequenceRef<'_>]) -> candle_core::Result<Vec<f32>> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        check_sequences(sequences, self.max_positions, self.vocab_size)?;
        let ids: Vec<&[u32]> = sequences.iter().map(|s| s.ids).collect();
        let batch = PackedBatch::new(&ids, &self.device)?;
        let types: Vec<u32> = sequences
            .iter()
            .flat_map(|s| {
                let second = if self.checkpoint.token_types {
                    s.second_segment
                } else {
                    s.ids.len()
                };
                (0..s.ids.len()).map(move |i| u32::from(i >= second))
            })
            .collect();
        let count = types.len();
        let types = Tensor::from_vec(types, count, &self.device)?;
        let hidden = self.encoder.forward(&batch, &types)?;
        self.head.forward(&hidden, &batch)?.to_vec1::<f32>()
    }
    fn max_positions(&self) -> usize {
        self.max_positions
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn family(&self) -> Family {
        self.checkpoint.family
    }
}
