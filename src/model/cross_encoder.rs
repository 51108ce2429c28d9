//! `LlamaBidirectionalForSequenceClassification`: backbone, masked mean pooling, score head, temperature.
//!
//! Model card: <https://huggingface.co/nvidia/llama-nemotron-rerank-1b-v2>. Reference: NVIDIA's
//! `llama_bidirectional_model.py` on transformers 4.47.1 (see `docs/model.md` §2):
//! `logit = score(mean_{real tokens}(norm(h))) / temperature`, a raw logit (no sigmoid).
//!
//! Deliberate deviations from the bf16 reference: pooling, the head and the temperature division run
//! in f32 whatever the compute dtype (the reference does them in bf16, which only adds rounding);
//! sequences are packed without padding, each with positions `0..len` (the reference left-pads with
//! `arange(T)`; RoPE depends only on relative offsets, so both agree up to rounding).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::config::ModelConfig;
use super::layers::{segment_mean, BatchRotary, DecoderLayer, DecoderShape, RmsNorm};
use super::packed::PackedBatch;
use super::rope::{inverse_frequencies, RotaryTables};

/// The reranker. Owns its weights on one device; `score_batch` is the only entry point.
#[derive(Debug)]
pub struct CrossEncoder {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `score.weight` (1, hidden), kept in f32.
    score: Tensor,
    temperature: f64,
    rotary: RotaryTables,
    vocab_size: usize,
    device: Device,
}

impl CrossEncoder {
    /// Builds the model from `vb` (dtype and device come from the builder), with RoPE tables for
    /// `max_positions` tokens.
    pub fn load(
        vb: VarBuilder,
        cfg: &ModelConfig,
        max_positions: usize,
    ) -> candle_core::Result<Self> {
        let scaling = cfg
            .rope_scaling()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let inner = vb.pp("model");
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, inner.pp("embed_tokens"))?;
        let shape = DecoderShape::llama_bidirec(cfg);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(inner.pp("layers").pp(i), &shape))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = RmsNorm::load(inner.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let score = vb
            .pp("score")
            .get_with_hints(
                (1, cfg.hidden_size),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?
            .to_dtype(DType::F32)?;
        let inv_freqs = inverse_frequencies(cfg.head_dim(), cfg.rope_theta, scaling);
        let rotary = RotaryTables::new(&inv_freqs, max_positions, vb.dtype(), vb.device())?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            score,
            temperature: cfg.temperature,
            rotary,
            vocab_size: cfg.vocab_size,
            device: vb.device().clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Longest sequence the RoPE tables cover.
    pub fn max_positions(&self) -> usize {
        self.rotary.max_positions()
    }

    /// Scores token sequences (each already `[BOS, ...]` and truncated). One packed forward pass
    /// over their real tokens (no padding); returns one raw logit per sequence, in order.
    pub fn score_batch(&self, sequences: &[&[u32]]) -> candle_core::Result<Vec<f32>> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        let longest = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        if sequences.iter().any(|s| s.is_empty()) {
            candle_core::bail!("every sequence needs at least one token (BOS)");
        }
        if longest > self.max_positions() {
            candle_core::bail!(
                "sequence of {longest} tokens exceeds the {} positions the model was loaded for",
                self.max_positions()
            );
        }
        // A tokenizer with more entries than the embedding (e.g. the Vision tokenizer's `<|image|>`)
        // must not index past the table.
        if let Some(bad) = sequences
            .iter()
            .flat_map(|s| s.iter())
            .find(|&&id| id as usize >= self.vocab_size)
        {
            candle_core::bail!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.vocab_size
            );
        }
        let batch = PackedBatch::new(sequences, &self.device)?;
        self.forward(&batch)?.to_vec1::<f32>()
    }

    /// The packed forward pass: f32 logits (sequences,).
    fn forward(&self, batch: &PackedBatch) -> candle_core::Result<Tensor> {
        let mut xs = self.embed_tokens.forward(&batch.input_ids)?;
        let rotary = BatchRotary::for_batch(&self.rotary, &xs, batch)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &rotary, batch)?;
        }
        let hidden = self.norm.forward(&xs)?;
        let pooled = segment_mean(&hidden, batch)?;
        // A per-row dot product (not a (b, hidden) x (hidden, 1) matmul, whose gemm kernel depends
        // on the number of rows), so a pair's logit does not depend on its batch.
        let logits = pooled.broadcast_mul(&self.score)?.sum(1)?;
        logits / self.temperature
    }
}
