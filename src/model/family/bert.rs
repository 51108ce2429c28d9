//! `BertForSequenceClassification` (cross-encoder/ms-marco-MiniLM-L-6-v2 and kin): candle-transformers'
//! `BertModel` for the encoder, our own pooler (`dense` + `tanh` on `[CLS]`, which
//! candle-transformers does not provide) and classifier: `logit = classifier(tanh(pooler([CLS])))`,
//! one raw logit (`num_labels = 1`; other heads are refused at load).
//!
//! Reference: transformers `modeling_bert.py` (4.47.1); the golden test compares with it.
//! The encoder cannot use the packed forward of the default family (`BertModel` takes a padded
//! `(batch, longest)` batch with an attention mask), so each device batch is padded to its
//! longest sequence; masked keys get `f32::MIN` scores, so padding changes no real token's output
//! and a pair scores the same alone or in any batch (up to gemm rounding).

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::bert::{BertModel, Config};

use super::{check_sequences, padded_batch, read_config, var_builder, weights_error};
use super::{Family, Reranker, SequenceRef};
use crate::model::{ModelError, ModelFiles};

/// A BERT cross-encoder on one device.
pub struct BertReranker {
    bert: BertModel,
    pooler: Linear,
    classifier: Linear,
    pad_id: u32,
    vocab_size: usize,
    max_positions: usize,
    device: Device,
}

impl BertReranker {
    /// Loads the checkpoint in `files` for sequences of at most `max_length` tokens.
    pub fn load(
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
        max_length: usize,
    ) -> Result<Self, ModelError> {
        let (config, _) = read_config::<Config>(&files.config)?;
        if max_length > config.max_position_embeddings {
            return Err(ModelError::MaxLength {
                value: max_length,
                max: config.max_position_embeddings,
            });
        }
        let vb = var_builder(files, dtype, device)?;
        Self::from_var_builder(vb, &config, max_length).map_err(|e| weights_error(files, e))
    }

    fn from_var_builder(
        vb: VarBuilder,
        config: &Config,
        max_length: usize,
    ) -> candle_core::Result<Self> {
        let bert = BertModel::load(vb.clone(), config)?;
        let hidden = config.hidden_size;
        let pooler = candle_nn::linear(hidden, hidden, vb.pp("bert.pooler.dense"))?;
        let classifier = candle_nn::linear(hidden, 1, vb.pp("classifier"))?;
        Ok(Self {
            bert,
            pooler,
            classifier,
            pad_id: config.pad_token_id as u32,
            vocab_size: config.vocab_size,
            max_positions: max_length,
            device: vb.device().clone(),
        })
    }
}

impl Reranker for BertReranker {
    fn score_sequences(&self, sequences: &[SequenceRef<'_>]) -> candle_core::Result<Vec<f32>> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        check_sequences(sequences, self.max_positions, self.vocab_size)?;
        let (ids, types, mask) = padded_batch(sequences, self.pad_id, &self.device)?;
        let hidden = self.bert.forward(&ids, &types, Some(&mask))?;
        let cls = hidden.i((.., 0))?.contiguous()?;
        let pooled = self.pooler.forward(&cls)?.tanh()?;
        let logits: Tensor = self.classifier.forward(&pooled)?;
        logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()
    }
    fn max_positions(&self) -> usize {
        self.max_positions
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn family(&self) -> Family {
        Family::Bert
    }
}
