//! `ModernBertForSequenceClassification` (Alibaba-NLP/gte-reranker-modernbert-base and kin):
//! candle-transformers' `ModernBert` encoder, our own pooling, head and classifier:
//! `logit = classifier(norm(gelu(dense(pool(encoder(ids))))))`, one raw logit (`num_labels = 1`;
//! other heads are refused at load), `pool` being `[CLS]` or the masked mean as
//! `classifier_pooling` says (gte-reranker-modernbert-base: `mean`).
//!
//! Reference: transformers `modeling_modernbert.py` (4.51.3; ModernBERT needs ≥ 4.48, hence the
//! second golden pin); the golden test compares with it.
//!
//! # What is candle-transformers', what is ours, and why
//! The encoder is candle-transformers' `ModernBert` as is, checked line by line against
//! transformers: token embeddings + LayerNorm, pre-norm layers (no attention norm in layer 0),
//! fused `Wqkv`, RoPE with the global theta on every `global_attn_every_n_layers`-th layer and the
//! local theta elsewhere, sliding-window attention on the local layers (keys more than
//! `local_attention / 2` positions away are masked, as transformers' `sliding_window_mask`),
//! key-padding mask, GeGLU MLP (exact-erf GELU), final LayerNorm.
//! Its sequence-classification model does not fit, so the rest is ours:
//! - its classifier applies a softmax over the labels, which for a one-label reranker turns every
//!   score into 1.0 (transformers returns the raw logit);
//! - its head has no bias and a fixed activation, where transformers reads `classifier_bias` and
//!   `classifier_activation`;
//! - its config wants `layer_norm_eps` and a numeric `local_rope_theta`, where transformers reads
//!   `norm_eps` and lets `local_rope_theta: null` mean the global theta; we parse config.json
//!   ourselves, with transformers' defaults, and hand candle the fields it reads.
//!
//! Options the candle encoder does not implement are refused at load rather than silently ignored:
//! `attention_bias`, `mlp_bias`, `norm_bias` (it loads no biases), a `hidden_activation` other than
//! `gelu`, `rope_scaling`. It builds its attention masks in f32 and adds them to scores of the
//! compute dtype, so other dtypes are refused too.
//!
//! Like BERT it takes padded `(batch, longest)` batches with an attention mask, padded on the right
//! with the pad token: positions start at 0 in every row, masked keys get `f32::MIN` scores, and the
//! mean pools over real tokens only, so a pair scores the same alone or in any batch.
//! The pair is the tokenizer's own post-processor (`[CLS] q [SEP] d [SEP]`, no token types; the
//! model reads none) through [`super::segment_pairs`].

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use candle_transformers::models::modernbert::{Config as CandleConfig, ModernBert};
use serde::Deserialize;

use super::{check_sequences, padded_batch, read_config, var_builder, weights_error};
use super::{Family, Reranker, SequenceRef};
use crate::model::{ModelError, ModelFiles};

/// How the encoder's output becomes one vector (`classifier_pooling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The first token (`[CLS]`), transformers' default.
    Cls,
    /// The mean over the real (unpadded) tokens.
    Mean,
}

/// The fields of a ModernBERT config.json we read, with transformers' `ModernBertConfig` defaults.
#[derive(Debug, Clone, Deserialize)]
struct ModernBertConfig {
    #[serde(default = "defaults::vocab_size")]
    vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    num_attention_heads: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    max_position_embeddings: usize,
    #[serde(default = "defaults::norm_eps")]
    norm_eps: f64,
    #[serde(default = "defaults::pad_token_id")]
    pad_token_id: u32,
    #[serde(default = "defaults::global_attn_every_n_layers")]
    global_attn_every_n_layers: usize,
    #[serde(default = "defaults::global_rope_theta")]
    global_rope_theta: f64,
    #[serde(default = "defaults::local_attention")]
    local_attention: usize,
    /// `null` means the global theta (transformers: `if config.local_rope_theta is not None`).
    #[serde(default = "defaults::local_rope_theta")]
    local_rope_theta: Option<f64>,
    #[serde(default = "defaults::gelu")]
    hidden_activation: String,
    #[serde(default = "defaults::gelu")]
    classifier_activation: String,
    #[serde(default = "defaults::pooling")]
    classifier_pooling: Pooling,
    #[serde(default)]
    classifier_bias: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    norm_bias: bool,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
}

/// transformers 4.51.3 `ModernBertConfig.__init__` defaults.
mod defaults {
    pub fn vocab_size() -> usize {
        50368
    }
    pub fn hidden_size() -> usize {
        768
    }
    pub fn intermediate_size() -> usize {
        1152
    }
    pub fn num_hidden_layers() -> usize {
        22
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn max_position_embeddings() -> usize {
        8192
    }
    pub fn norm_eps() -> f64 {
        1e-5
    }
    pub fn pad_token_id() -> u32 {
        50283
    }
    pub fn global_attn_every_n_layers() -> usize {
        3
    }
    pub fn global_rope_theta() -> f64 {
        160_000.0
    }
    pub fn local_attention() -> usize {
        128
    }
    pub fn local_rope_theta() -> Option<f64> {
        Some(10_000.0)
    }
    pub fn gelu() -> String {
        "gelu".to_string()
    }
    pub fn pooling() -> super::Pooling {
        super::Pooling::Cls
    }
}

impl ModernBertConfig {
    /// Refuses what the candle encoder does not implement (see the module doc).
    fn check(&self, path: &std::path::Path) -> Result<(), ModelError> {
        let unsupported_flag = |field: &'static str, set: bool| {
            if set {
                Err(ModelError::Unsupported {
                    field,
                    value: "true".to_string(),
                    supported: "false (candle-transformers' ModernBERT has no biases there)",
                })
            } else {
                Ok(())
            }
        };
        unsupported_flag("attention_bias", self.attention_bias)?;
        unsupported_flag("mlp_bias", self.mlp_bias)?;
        unsupported_flag("norm_bias", self.norm_bias)?;
        for (field, value) in [
            ("hidden_activation", &self.hidden_activation),
            ("classifier_activation", &self.classifier_activation),
        ] {
            if value != "gelu" {
                return Err(ModelError::Unsupported {
                    field,
                    value: value.clone(),
                    supported: "gelu",
                });
            }
        }
        if let Some(scaling) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(ModelError::Unsupported {
                field: "rope_scaling",
                value: scaling.to_string(),
                supported: "null",
            });
        }
        let invalid = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let heads = self.num_attention_heads;
        if heads == 0
            || !self.hidden_size.is_multiple_of(heads)
            || !(self.hidden_size / heads).is_multiple_of(2)
        {
            return Err(invalid(format!(
                "hidden_size {} is not an even head size times num_attention_heads {heads}",
                self.hidden_size
            )));
        }
        if self.global_attn_every_n_layers == 0 {
            return Err(invalid("global_attn_every_n_layers is 0".into()));
        }
        Ok(())
    }

    fn candle(&self) -> CandleConfig {
        CandleConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
            layer_norm_eps: self.norm_eps,
            pad_token_id: self.pad_token_id,
            global_attn_every_n_layers: self.global_attn_every_n_layers,
            global_rope_theta: self.global_rope_theta,
            local_attention: self.local_attention,
            local_rope_theta: self.local_rope_theta.unwrap_or(self.global_rope_theta),
            classifier_config: None,
        }
    }
}

/// A ModernBERT cross-encoder on one device.
pub struct ModernBertReranker {
    encoder: ModernBert,
    pooling: Pooling,
    /// transformers' `ModernBertPredictionHead`: dense, GELU, LayerNorm.
    dense: Linear,
    norm: LayerNorm,
    classifier: Linear,
    pad_id: u32,
    vocab_size: usize,
    max_positions: usize,
    device: Device,
}

impl ModernBertReranker {
    /// Loads the checkpoint in `files` for sequences of at most `max_length` tokens.
    pub fn load(
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
        max_length: usize,
    ) -> Result<Self, ModelError> {
        let (config, _) = read_config::<ModernBertConfig>(&files.config)?;
        config.check(&files.config)?;
        if dtype != DType::F32 {
            return Err(ModelError::Unsupported {
                field: "dtype",
                value: crate::model::dtype_name(dtype).to_string(),
                supported: "f32 (candle-transformers builds ModernBERT's attention masks in f32)",
            });
        }
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
        config: &ModernBertConfig,
        max_length: usize,
    ) -> candle_core::Result<Self> {
        // candle loads each layer's attention norm if present (layer 0 has none); a checkpoint
        // missing one elsewhere would silently run without it.
        if let Some(layer) = (1..config.num_hidden_layers)
            .find(|i| !vb.contains_tensor(&format!("model.layers.{i}.attn_norm.weight")))
        {
            candle_core::bail!("model.layers.{layer}.attn_norm.weight is missing");
        }
        let encoder = ModernBert::load(vb.clone(), &config.candle())?;
        let hidden = config.hidden_size;
        let head = vb.pp("head");
        let dense = if config.classifier_bias {
            candle_nn::linear(hidden, hidden, head.pp("dense"))?
        } else {
            candle_nn::linear_no_bias(hidden, hidden, head.pp("dense"))?
        };
        let norm = candle_nn::layer_norm_no_bias(hidden, config.norm_eps, head.pp("norm"))?;
        let classifier = candle_nn::linear(hidden, 1, vb.pp("classifier"))?;
        Ok(Self {
            encoder,
            pooling: config.classifier_pooling,
            dense,
            norm,
            classifier,
            pad_id: config.pad_token_id,
            vocab_size: config.vocab_size,
            max_positions: max_length,
            device: vb.device().clone(),
        })
    }

    /// `(batch, longest, hidden)` → `(batch, hidden)`; `mask` is the `(batch, longest)` u32 mask.
    fn pool(&self, hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        match self.pooling {
            Pooling::Cls => hidden.i((.., 0))?.contiguous(),
            Pooling::Mean => {
                let mask = mask.to_dtype(hidden.dtype())?;
                let summed = hidden.broadcast_mul(&mask.unsqueeze(D::Minus1)?)?.sum(1)?;
                summed.broadcast_div(&mask.sum_keepdim(1)?)
            }
        }
    }
}

impl Reranker for ModernBertReranker {
    fn score_sequences(&self, sequences: &[SequenceRef<'_>]) -> candle_core::Result<Vec<f32>> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        check_sequences(sequences, self.max_positions, self.vocab_size)?;
        // ModernBERT has no token types: the segment boundary is not read.
        let (ids, _, mask) = padded_batch(sequences, self.pad_id, &self.device)?;
        let hidden = self.encoder.forward(&ids, &mask)?;
        let pooled = self.pool(&hidden, &mask)?;
        let head = self
            .norm
            .forward(&self.dense.forward(&pooled)?.gelu_erf()?)?;
        let logits = self.classifier.forward(&head)?;
        logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()
    }
    /// Every sequence padded to the longest.
    fn computed_tokens(&self, sequences: &[SequenceRef<'_>]) -> usize {
        let longest = sequences.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        sequences.len() * longest
    }
    fn max_positions(&self) -> usize {
        self.max_positions
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn family(&self) -> Family {
        Family::ModernBert
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: serde_json::Value) -> ModernBertConfig {
        serde_json::from_value(value).expect("config parses")
    }

    #[test]
    fn configs_default_as_transformers_does() {
        let config = parse(json!({"local_rope_theta": null}));
        assert_eq!(config.classifier_pooling, Pooling::Cls);
        assert_eq!(config.norm_eps, 1e-5);
        let candle = config.candle();
        assert_eq!(
            candle.local_rope_theta, 160_000.0,
            "null is the global theta"
        );
        assert_eq!(candle.local_attention, 128);
        assert_eq!(parse(json!({})).candle().local_rope_theta, 10_000.0);
        assert_eq!(
            parse(json!({"classifier_pooling": "mean"})).classifier_pooling,
            Pooling::Mean
        );
        assert!(parse(json!({})).check(std::path::Path::new("c")).is_ok());
    }

    #[test]
    fn options_the_encoder_lacks_are_refused() {
        let path = std::path::Path::new("config.json");
        for (value, field) in [
            (json!({"attention_bias": true}), "attention_bias"),
            (json!({"mlp_bias": true}), "mlp_bias"),
            (json!({"norm_bias": true}), "norm_bias"),
            (json!({"hidden_activation": "silu"}), "hidden_activation"),
            (
                json!({"classifier_activation": "gelu_pytorch_tanh"}),
                "classifier_activation",
            ),
            (
                json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
                "rope_scaling",
            ),
        ] {
            match parse(value).check(path) {
                Err(ModelError::Unsupported { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        for value in [
            json!({"global_attn_every_n_layers": 0}),
            json!({"hidden_size": 30, "num_attention_heads": 4}),
            json!({"hidden_size": 12, "num_attention_heads": 4}),
        ] {
            assert!(matches!(
                parse(value).check(path),
                Err(ModelError::Config { .. })
            ));
        }
    }
}
