//! `XLMRobertaForSequenceClassification` (BAAI/bge-reranker-v2-m3, bge-reranker-base/large):
//! candle-transformers' model as is (encoder, then `out_proj(tanh(dense(<s>)))`), one raw logit
//! (`num_labels = 1`; other heads are refused at load).
//!
//! Token types are all 0 (transformers' XLM-RoBERTa tokenizers do not return them).
//! Like BERT it takes padded `(batch, longest)` batches with an attention mask (no packed forward),
//! padded with the pad token, from which it derives position ids (`padding_idx + 1 + index`) as
//! transformers does. candle-transformers computes those positions in the compute dtype, which is
//! exact only in f32 (bf16 stops counting integers at 256), so other dtypes are refused at load.

use candle_core::{DType, Device};
use candle_transformers::models::xlm_roberta::{Config, XLMRobertaForSequenceClassification};

use super::{check_sequences, padded_batch, read_config, var_builder, weights_error};
use super::{Family, Reranker, SequenceRef};
use crate::model::{ModelError, ModelFiles};

/// An XLM-RoBERTa cross-encoder on one device.
pub struct XlmRobertaReranker {
    model: XLMRobertaForSequenceClassification,
    pad_id: u32,
    vocab_size: usize,
    max_positions: usize,
    device: Device,
}

impl XlmRobertaReranker {
    /// Loads the checkpoint in `files` for sequences of at most `max_length` tokens.
    pub fn load(
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
        max_length: usize,
    ) -> Result<Self, ModelError> {
        let (config, _) = read_config::<Config>(&files.config)?;
        if dtype != DType::F32 {
            return Err(ModelError::Unsupported {
                field: "dtype",
                value: crate::model::dtype_name(dtype).to_string(),
                supported:
                    "f32 (candle-transformers computes XLM-RoBERTa positions in the compute dtype)",
            });
        }
        if config.position_embedding_type != "absolute" {
            return Err(ModelError::Unsupported {
                field: "position_embedding_type",
                value: config.position_embedding_type.clone(),
                supported: "absolute",
            });
        }
        // Positions start after the padding index.
        let positions = config
            .max_position_embeddings
            .saturating_sub(config.pad_token_id as usize + 1);
        if max_length > positions {
            return Err(ModelError::MaxLength {
                value: max_length,
                max: positions,
            });
        }
        let vb = var_builder(files, dtype, device)?;
        let model = XLMRobertaForSequenceClassification::new(1, &config, vb)
            .map_err(|e| weights_error(files, e))?;
        Ok(Self {
            model,
            pad_id: config.pad_token_id,
            vocab_size: config.vocab_size,
            max_positions: max_length,
            device: device.clone(),
        })
    }
}

impl Reranker for XlmRobertaReranker {
    fn score_sequences(&self, sequences: &[SequenceRef<'_>]) -> candle_core::Result<Vec<f32>> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        check_sequences(sequences, self.max_positions, self.vocab_size)?;
        let (ids, types, mask) = padded_batch(sequences, self.pad_id, &self.device)?;
        // transformers' XLM-RoBERTa tokenizers return no token_type_ids: the model reads zeros.
        let logits = self.model.forward(&ids, &mask, &types.zeros_like()?)?;
        logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()
    }
    fn max_positions(&self) -> usize {
        self.max_positions
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn family(&self) -> Family {
        Family::XlmRoberta
    }
}
