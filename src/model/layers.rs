//! The Llama decoder stack with **bidirectional** attention, over a packed batch.
//!
//! Every tensor is `(total_tokens, …)`: the sequences of a batch concatenated without padding, so
//! every linear layer, RMSNorm and SwiGLU is one 2-D operation over real tokens only. Only
//! attention ([`varlen_attention`]) and pooling ([`segment_mean`]) see the sequence boundaries.
//!
//! Reference: transformers 4.47.1 `models/llama/modeling_llama.py` (`LlamaAttention` eager path,
//! `LlamaMLP`, `LlamaRMSNorm`, `LlamaDecoderLayer`) as used by NVIDIA's `llama_bidirectional_model.py`,
//! which sets `is_causal = False` and replaces the causal mask by a padding-only key mask.
//! Field names equal the Hugging Face tensor names so `vb.pp(..)` prefixes mirror the checkpoint.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Init, VarBuilder};

use super::attention::varlen_attention;
use super::config::ModelConfig;
use super::packed::PackedBatch;

/// `LlamaRMSNorm`: normalise in f32, scale by the learned weight.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        Ok(Self {
            weight,
            eps: eps as f32,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(xs, &self.weight, self.eps)
    }
}

/// `x @ W^T` without bias, with `W^T` stored contiguous (in, out).
///
/// Batch invariance: gemm picks a different kernel (a horizontal dot-product one, with another
/// rounding) for a column-major right-hand side when `rows × out` is small, so with the plain
/// `W^T` view a pair's output depended on how many rows (pairs × padded length) shared its batch.
/// A row-major right-hand side always takes the same kernel, whatever the row count.
#[derive(Debug, Clone)]
pub struct Linear {
    weight_t: Tensor,
}

impl Module for Linear {
    /// `xs`: (tokens, in) -> (tokens, out), one 2-D gemm.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.matmul(&self.weight_t)
    }
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Linear> {
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    Ok(Linear {
        weight_t: weight.t()?.contiguous()?,
    })
}

/// Multi-head attention with grouped KV heads over a packed batch; every query attends to every
/// token of its own sequence (bidirectional) and to nothing else.
#[derive(Debug, Clone)]
pub struct Attention {
    // projections
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    // hyper params
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    span: tracing::Span,
}

impl Attention {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> candle_core::Result<Self> {
        let (hidden, heads, kv_heads, head_dim) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads(),
            cfg.head_dim(),
        );
        Ok(Self {
            q_proj: linear(vb.pp("q_proj"), hidden, heads * head_dim)?,
            k_proj: linear(vb.pp("k_proj"), hidden, kv_heads * head_dim)?,
            v_proj: linear(vb.pp("v_proj"), hidden, kv_heads * head_dim)?,
            o_proj: linear(vb.pp("o_proj"), heads * head_dim, hidden)?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            span: tracing::trace_span!("attention"),
        })
    }

    /// `xs`: (tokens, hidden) packed; `cos`/`sin`: (tokens, head_dim/2), each token's own position.
    pub fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        batch: &PackedBatch,
    ) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        let n = xs.dim(0)?;
        let (heads, kv_heads, head_dim) = (self.num_heads, self.num_kv_heads, self.head_dim);

        // 1. Project; the (tokens, heads*d) rows are already (tokens, heads, d): no transpose.
        let q = self.q_proj.forward(xs)?.reshape((1, n, heads, head_dim))?;
        let k = self
            .k_proj
            .forward(xs)?
            .reshape((1, n, kv_heads, head_dim))?;
        let v = self.v_proj.forward(xs)?.reshape((n, kv_heads, head_dim))?;

        // 2. Rotary embeddings (rotate-half convention, as transformers' `apply_rotary_pos_emb`),
        //    one position per token, in the (batch, tokens, heads, d) layout.
        let q = candle_nn::rotary_emb::rope_thd(&q, cos, sin)?.reshape((n, heads, head_dim))?;
        let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?.reshape((n, kv_heads, head_dim))?;

        // 3. Attention within each sequence, then merge heads and project.
        let scale = 1.0 / (head_dim as f64).sqrt();
        let out = varlen_attention(&q, &k, &v, batch, scale)?;
        self.o_proj.forward(&out.reshape((n, heads * head_dim))?)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    span: tracing::Span,
}

impl Mlp {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> candle_core::Result<Self> {
        Ok(Self {
            gate_proj: linear(vb.pp("gate_proj"), cfg.hidden_size, cfg.intermediate_size)?,
            up_proj: linear(vb.pp("up_proj"), cfg.hidden_size, cfg.intermediate_size)?,
            down_proj: linear(vb.pp("down_proj"), cfg.intermediate_size, cfg.hidden_size)?,
            span: tracing::trace_span!("mlp"),
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(xs)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
    }
}

/// Pre-norm residual block: attention then MLP.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> candle_core::Result<Self> {
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        batch: &PackedBatch,
    ) -> candle_core::Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(xs)?, cos, sin, batch)?;
        let xs = (xs + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?)?;
        xs + mlp
    }
}

/// Mean over each sequence's tokens, in f32: (tokens, hidden) -> (sequences, hidden).
///
/// Each sequence is summed over its own rows only, in order, so its mean does not depend on the
/// other sequences of the batch (sum, then divide, as the reference `pool(..., "avg")` does).
pub fn segment_mean(hidden: &Tensor, batch: &PackedBatch) -> candle_core::Result<Tensor> {
    let hidden = hidden.to_dtype(DType::F32)?;
    let sums = batch
        .segments()
        .map(|(start, len)| hidden.narrow(0, start, len)?.sum_keepdim(0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let counts: Vec<f32> = batch.lengths().iter().map(|&len| len as f32).collect();
    let counts = Tensor::from_vec(counts, (sums.len(), 1), hidden.device())?;
    Tensor::cat(&sums, 0)?.broadcast_div(&counts)
}
