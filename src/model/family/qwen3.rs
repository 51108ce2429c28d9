//! Qwen3-Reranker (`Qwen/Qwen3-Reranker-0.6B/4B/8B`: `Qwen3ForCausalLM`, `model_type` `qwen3`): a
//! causal language model asked "yes" or "no"; the score is `logit("yes") − logit("no")` at the last
//! token of the prompt ([`super::qwen3_prompt`]), so `sigmoid(score)` is the model card's P(yes)
//! (the 2-way softmax over "no"/"yes"), which is what `/v1/rerank` `normalize: true` returns.
//!
//! Reference: transformers 4.51.3 `models/qwen3/modeling_qwen3.py` and the model card's
//! `compute_logits`; `tests/family_golden.rs` compares with it.
//!
//! Why our own module and not candle-transformers' `qwen3.rs`: that one is a causal LM for
//! generation, with a KV cache and no padding mask, and returns the last position's logits over the
//! whole vocabulary; it cannot run a batch of sequences of different lengths. This one is the packed
//! forward of `llama_bidirec` (`layers.rs`: no padding, one 2-D gemm per projection over the real
//! tokens of the whole batch, the fused CPU attention) with the three differences of Qwen3 as
//! [`DecoderShape`] settings: causal attention ([`AttentionMask::Causal`], honoured by the fused
//! CPU kernel and the per-sequence path used on CUDA and in half precision), `q_norm`/`k_norm` over
//! each head before RoPE, and an explicit `head_dim`. Then only the last token of each sequence goes
//! through the final norm, and only the "yes" and "no" rows of the LM head (`embed_tokens` when
//! `tie_word_embeddings`, else `lm_head`) are kept: two dot products instead of a 151k-row matmul.
//!
//! Deviation: the model card left-pads a batch and gives every row positions `0..longest`, so a
//! shorter sequence starts at a later position; here each sequence has positions `0..len`. RoPE
//! depends only on relative offsets and causal attention never sees the padding, so both agree up
//! to rounding (the golden test holds at 1e-4); left or right padding does not matter here, as
//! there is none. A sequence scores the same alone or in any batch.
//! `sliding_window` is ignored when `use_sliding_window` is false (as in the released checkpoints);
//! a checkpoint that turns it on is refused. A plain Qwen3 chat model loads too (same
//! architecture), but its scores mean nothing: serve the Reranker checkpoints.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::{check_sequences, var_builder, weights_error, Family, Reranker, SequenceRef};
use crate::model::attention::AttentionMask;
use crate::model::layers::{BatchRotary, DecoderLayer, DecoderShape, RmsNorm};
use crate::model::packed::PackedBatch;
use crate::model::rope::{inverse_frequencies, RotaryTables};
use crate::model::{ModelError, ModelFiles};

/// The fields of a Qwen3 `config.json` the forward pass reads. Sizes without a safe default
/// (`num_key_value_heads`, `head_dim`: transformers' defaults are those of a 8B model) must be
/// present.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// `Qwen3Config` default: false (the 0.6B and 4B rerankers tie, the 8B does not).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    32_768
}
fn default_hidden_act() -> String {
    "silu".to_string()
}

impl Qwen3Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ModelError> {
        crate::model::config::read_validated(path, Self::validate)
    }

    /// Refuses every setting the forward pass does not implement, naming it.
    pub fn validate(&self) -> Result<(), ModelError> {
        let unsupported = |field, value: String, supported| {
            Err(ModelError::Unsupported {
                field,
                value,
                supported,
            })
        };
        if self.hidden_act != "silu" {
            return unsupported("hidden_act", self.hidden_act.clone(), "silu");
        }
        if self.attention_bias {
            return unsupported("attention_bias", "true".into(), "false");
        }
        if self.use_sliding_window {
            return unsupported("use_sliding_window", "true".into(), "false");
        }
        if let Some(scaling) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            let rope_type = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("<missing>");
            if rope_type != "default" {
                return unsupported("rope_scaling.rope_type", rope_type.into(), "default");
            }
        }
        let bad = |message: String| {
            Err(ModelError::Config {
                path: Default::default(),
                message,
            })
        };
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || self.num_hidden_layers == 0
            || self.vocab_size == 0
        {
            return bad("sizes, heads and layers must be positive".into());
        }
        let kv = self.num_key_value_heads;
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive for rotary embeddings",
                self.head_dim
            ));
        }
        Ok(())
    }

    fn decoder_shape(&self) -> DecoderShape {
        DecoderShape {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            rms_norm_eps: self.rms_norm_eps,
            qk_norm: true,
            mask: AttentionMask::Causal,
        }
    }
}

/// The token ids of the two answers the score compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerIds {
    pub yes: u32,
    pub no: u32,
}

/// A Qwen3-Reranker on one device.
#[derive(Debug)]
pub struct Qwen3Reranker {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// The LM head's "yes" and "no" rows, (1, hidden) each, in f32.
    yes: Tensor,
    no: Tensor,
    rotary: RotaryTables,
    vocab_size: usize,
    device: Device,
}

impl Qwen3Reranker {
    /// Loads the checkpoint in `files` for sequences of at most `max_length` tokens, scoring the
    /// `answers` tokens (from the tokenizer).
    pub fn load(
        files: &ModelFiles,
        answers: AnswerIds,
        dtype: DType,
        device: &Device,
        max_length: usize,
    ) -> Result<Self, ModelError> {
        let config = Qwen3Config::from_file(&files.config)?;
        if max_length > config.max_position_embeddings {
            return Err(ModelError::MaxLength {
                value: max_length,
                max: config.max_position_embeddings,
            });
        }
        if let Some(id) = [answers.yes, answers.no]
            .into_iter()
            .find(|&id| id as usize >= config.vocab_size)
        {
            return Err(ModelError::Config {
                path: files.config.clone(),
                message: format!(
                    "the tokenizer's answer token {id} is outside vocab_size {}",
                    config.vocab_size
                ),
            });
        }
        let vb = var_builder(files, dtype, device)?;
        Self::from_var_builder(vb, &config, answers, max_length)
            .map_err(|e| weights_error(files, e))
    }

    fn from_var_builder(
        vb: VarBuilder,
        cfg: &Qwen3Config,
        answers: AnswerIds,
        max_length: usize,
    ) -> candle_core::Result<Self> {
        let inner = vb.pp("model");
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, inner.pp("embed_tokens"))?;
        let shape = cfg.decoder_shape();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(inner.pp("layers").pp(i), &shape))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = RmsNorm::load(inner.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let head = if cfg.tie_word_embeddings {
            embed_tokens.embeddings().clone()
        } else {
            vb.pp("lm_head").get_with_hints(
                (cfg.vocab_size, cfg.hidden_size),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?
        };
        let row = |id: u32| head.narrow(0, id as usize, 1)?.to_dtype(DType::F32);
        let inv_freqs = inverse_frequencies(cfg.head_dim, cfg.rope_theta, None);
        Ok(Self {
            yes: row(answers.yes)?,
            no: row(answers.no)?,
            rotary: RotaryTables::new(&inv_freqs, max_length, vb.dtype(), vb.device())?,
            embed_tokens,
            layers,
            norm,
            vocab_size: cfg.vocab_size,
            device: vb.device().clone(),
        })
    }
}

impl Reranker for Qwen3Reranker {
    fn score_sequences(&self, sequences: &[SequenceRef<'_>]) -> candle_core::Result<Vec<f32>> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        check_sequences(sequences, self.max_positions(), self.vocab_size)?;
        let ids: Vec<&[u32]> = sequences.iter().map(|s| s.ids).collect();
        let batch = PackedBatch::new(&ids, &self.device)?;
        let mut xs = self.embed_tokens.forward(&batch.input_ids)?;
        let rotary = BatchRotary::for_batch(&self.rotary, &xs, &batch)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &rotary, &batch)?;
        }
        // Each sequence's last token, through the final norm (row-wise, so only these rows).
        let last: Vec<u32> = batch
            .segments()
            .map(|(start, len)| (start + len - 1) as u32)
            .collect();
        let last = Tensor::from_vec(last, sequences.len(), &self.device)?;
        let hidden = self
            .norm
            .forward(&xs.index_select(&last, 0)?)?
            .to_dtype(DType::F32)?;
        // Per-row dot products (not a matmul whose kernel depends on the row count), so a pair's
        // score does not depend on its batch.
        let yes = hidden.broadcast_mul(&self.yes)?.sum(1)?;
        let no = hidden.broadcast_mul(&self.no)?.sum(1)?;
        (yes - no)?.to_vec1::<f32>()
    }
    fn max_positions(&self) -> usize {
        self.rotary.max_positions()
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn family(&self) -> Family {
        Family::Qwen3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(patch: serde_json::Value) -> Result<Qwen3Config, ModelError> {
        let mut base = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 6, "rms_norm_eps": 1e-6,
            "rope_scaling": null, "use_sliding_window": false, "sliding_window": null
        });
        for (k, v) in patch.as_object().unwrap() {
            base[k] = v.clone();
        }
        let c: Qwen3Config = serde_json::from_value(base).map_err(|e| ModelError::Config {
            path: Default::default(),
            message: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn unsupported_settings_are_named() {
        assert!(config(serde_json::json!({})).is_ok());
        for (patch, named) in [
            (
                serde_json::json!({"use_sliding_window": true}),
                "use_sliding_window",
            ),
            (
                serde_json::json!({"attention_bias": true}),
                "attention_bias",
            ),
            (serde_json::json!({"hidden_act": "gelu"}), "hidden_act"),
            (
                serde_json::json!({"rope_scaling": {"rope_type": "yarn"}}),
                "yarn",
            ),
            (serde_json::json!({"num_key_value_heads": 3}), "multiple"),
            (serde_json::json!({"head_dim": 5}), "head_dim"),
        ] {
            let e = config(patch).unwrap_err().to_string();
            assert!(e.contains(named), "{e}");
        }
        let mut missing = serde_json::json!({"vocab_size": 10});
        missing["head_dim"] = serde_json::Value::Null;
        assert!(config(missing).is_err(), "head_dim is required");
    }
}
