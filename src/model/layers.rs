//! The Llama-style decoder stack over a packed batch: **bidirectional** attention for
//! `llama_bidirec`, causal with per-head q/k RMSNorm for Qwen3 ([`DecoderShape`] says which).
//!
//! Every tensor is `(total_tokens, …)`: the sequences of a batch concatenated without padding, so
//! every linear layer, RMSNorm and SwiGLU is one 2-D operation over real tokens only. Only
//! attention ([`Attention`]) and pooling ([`segment_mean`]) see the sequence boundaries.
//!
//! Reference: transformers 4.47.1 `models/llama/modeling_llama.py` (`LlamaAttention` eager path,
//! `LlamaMLP`, `LlamaRMSNorm`, `LlamaDecoderLayer`) as used by NVIDIA's `llama_bidirectional_model.py`,
//! which sets `is_causal = False` and replaces the causal mask by a padding-only key mask; and
//! transformers 4.51.3 `models/qwen3/modeling_qwen3.py` (`Qwen3Attention`: `q_norm`/`k_norm` over
//! each head's `head_dim` values, before RoPE; otherwise Llama's layer, causal).
//! Field names equal the Hugging Face tensor names so `vb.pp(..)` prefixes mirror the checkpoint.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Init, VarBuilder};

use super::attention::{per_sequence_attention, AttentionMask};
use super::config::ModelConfig;
use super::cpu_kernels::{self, MatMul, PackedSelfAttention, ResidualMatMul, RotaryRows, SwiGlu};
use super::packed::PackedBatch;
use super::rope::RotaryTables;

/// The sizes and the two variations of one decoder stack: what a layer needs from its config.
#[derive(Debug, Clone, Copy)]
pub struct DecoderShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// Qwen3: `q_norm` and `k_norm` (RMSNorm over each head's values) before RoPE.
    pub qk_norm: bool,
    pub mask: AttentionMask,
}

impl DecoderShape {
    /// `llama_bidirec`: bidirectional, no q/k norm.
    pub fn llama_bidirec(cfg: &ModelConfig) -> Self {
        Self {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads(),
            head_dim: cfg.head_dim(),
            rms_norm_eps: cfg.rms_norm_eps,
            qk_norm: false,
            mask: AttentionMask::Bidirectional,
        }
    }
}

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
        if cpu_kernels::run_on(xs) && xs.is_contiguous() {
            xs.apply_op2_no_bwd(&self.weight_t, &MatMul)
        } else {
            xs.matmul(&self.weight_t)
        }
    }
}

impl Linear {
    /// `residual + xs · Wᵀ`: on the CPU in f32 one gemm that adds into a copy of the residual.
    pub fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        let fused = cpu_kernels::run_on(xs) && cpu_kernels::run_on(residual);
        if fused && xs.is_contiguous() && residual.is_contiguous() {
            residual.apply_op3_no_bwd(xs, &self.weight_t, &ResidualMatMul)
        } else {
            residual + xs.matmul(&self.weight_t)?
        }
    }
}

/// Several checkpoint projections of the same input as one: their `W^T` side by side, (in, Σ out).
pub(crate) fn fused_linear(
    vb: &VarBuilder,
    parts: &[(&str, usize)],
    in_dim: usize,
) -> candle_core::Result<Linear> {
    let weights_t = parts
        .iter()
        .map(|&(name, out_dim)| Ok(linear(vb.pp(name), in_dim, out_dim)?.weight_t))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Linear {
        weight_t: Tensor::cat(&weights_t, 1)?,
    })
}

pub(crate) fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Linear> {
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    Ok(Linear {
        weight_t: weight.t()?.contiguous()?,
    })
}

/// Multi-head attention with grouped KV heads over a packed batch; every query attends to the
/// tokens of its own sequence that its [`AttentionMask`] allows, and to nothing else.
///
/// Q, K and V come from one fused projection (the three checkpoint matrices side by side): one gemm
/// over the batch instead of three.
#[derive(Debug, Clone)]
pub struct Attention {
    qkv_proj: Linear,
    o_proj: Linear,
    /// Qwen3's `q_norm` and `k_norm`, over `head_dim`.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    mask: AttentionMask,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    span: tracing::Span,
}

impl Attention {
    pub fn load(vb: VarBuilder, shape: &DecoderShape) -> candle_core::Result<Self> {
        let (hidden, heads, kv_heads, head_dim) = (
            shape.hidden_size,
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
        );
        let qk_norm = if shape.qk_norm {
            Some((
                RmsNorm::load(vb.pp("q_norm"), head_dim, shape.rms_norm_eps)?,
                RmsNorm::load(vb.pp("k_norm"), head_dim, shape.rms_norm_eps)?,
            ))
        } else {
            None
        };
        Ok(Self {
            qkv_proj: fused_linear(
                &vb,
                &[
                    ("q_proj", heads * head_dim),
                    ("k_proj", kv_heads * head_dim),
                    ("v_proj", kv_heads * head_dim),
                ],
                hidden,
            )?,
            o_proj: linear(vb.pp("o_proj"), heads * head_dim, hidden)?,
            qk_norm,
            mask: shape.mask,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            span: tracing::trace_span!("attention"),
        })
    }

    /// `residual + attention(xs)`; `xs`: (tokens, hidden) packed, normalised.
    pub fn forward(
        &self,
        xs: &Tensor,
        residual: &Tensor,
        rotary: &BatchRotary<'_>,
        batch: &PackedBatch,
    ) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        let n = xs.dim(0)?;
        let (heads, kv_heads, head_dim) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qkv = self.qkv_proj.forward(xs)?;
        let qkv = match &self.qk_norm {
            Some((q_norm, k_norm)) => {
                // Each head's q and k rows normalised over head_dim, then back into the fused rows
                // that both attention paths read.
                let part = |from: usize, count: usize, norm: &RmsNorm| {
                    let x = qkv
                        .narrow(1, from * head_dim, count * head_dim)?
                        .contiguous()?;
                    norm.forward(&x.reshape((n, count, head_dim))?)?
                        .reshape((n, count * head_dim))
                };
                let q = part(0, heads, q_norm)?;
                let k = part(heads, kv_heads, k_norm)?;
                let v = qkv.narrow(1, (heads + kv_heads) * head_dim, kv_heads * head_dim)?;
                Tensor::cat(&[q, k, v], 1)?
            }
            None => qkv,
        };
        let scale = 1.0 / (head_dim as f64).sqrt();
        let out = match rotary {
            // CPU f32: RoPE and attention in one fused pass over the QKV rows.
            BatchRotary::CpuRows(rows) => qkv.apply_op1_no_bwd(&PackedSelfAttention {
                segments: batch.segment_list(),
                heads,
                kv_heads,
                head_dim,
                scale: scale as f32,
                rotary: Some(rows),
                bias: None,
                mask: self.mask,
            })?,
            BatchRotary::PerToken { cos, sin } => {
                let q = qkv.narrow(1, 0, heads * head_dim)?.contiguous()?;
                let k = qkv
                    .narrow(1, heads * head_dim, kv_heads * head_dim)?
                    .contiguous()?;
                let v = qkv
                    .narrow(1, (heads + kv_heads) * head_dim, kv_heads * head_dim)?
                    .reshape((n, kv_heads, head_dim))?;
                // Rotate-half RoPE (transformers' `apply_rotary_pos_emb`), one position per token,
                // in the (batch, tokens, heads, d) layout.
                let q = q.reshape((1, n, heads, head_dim))?;
                let k = k.reshape((1, n, kv_heads, head_dim))?;
                let q =
                    candle_nn::rotary_emb::rope_thd(&q, cos, sin)?.reshape((n, heads, head_dim))?;
                let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?
                    .reshape((n, kv_heads, head_dim))?;
                per_sequence_attention(&q, &k, &v, batch, scale, self.mask)?
                    .reshape((n, heads * head_dim))?
            }
        };
        self.o_proj.forward_residual(&out, residual)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`, gate and up as one fused projection.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up_proj: Linear,
    down_proj: Linear,
    intermediate: usize,
    span: tracing::Span,
}

impl Mlp {
    pub fn load(vb: VarBuilder, shape: &DecoderShape) -> candle_core::Result<Self> {
        let (hidden, inter) = (shape.hidden_size, shape.intermediate_size);
        Ok(Self {
            gate_up_proj: fused_linear(&vb, &[("gate_proj", inter), ("up_proj", inter)], hidden)?,
            down_proj: linear(vb.pp("down_proj"), inter, hidden)?,
            intermediate: inter,
            span: tracing::trace_span!("mlp"),
        })
    }

    /// `residual + mlp(xs)`.
    pub fn forward(&self, xs: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        let gate_up = self.gate_up_proj.forward(xs)?;
        let hidden = if cpu_kernels::run_on(&gate_up) {
            gate_up.apply_op1_no_bwd(&SwiGlu)?
        } else {
            let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, self.intermediate)?)?;
            (gate * gate_up.narrow(1, self.intermediate, self.intermediate)?)?
        };
        self.down_proj.forward_residual(&hidden, residual)
    }
}

/// Each token's rotary rows for one batch, in the form its attention path reads them.
pub enum BatchRotary<'a> {
    /// CPU f32: the fused kernel indexes the full tables by position itself.
    CpuRows(&'a RotaryRows),
    /// Elsewhere: (tokens, head_dim / 2) cos and sin, gathered by position.
    PerToken { cos: Tensor, sin: Tensor },
}

impl<'a> BatchRotary<'a> {
    /// The fused CPU attention reads the tables by position; elsewhere each token's rows are
    /// gathered once per batch and shared by every layer.
    pub fn for_batch(
        tables: &'a RotaryTables,
        xs: &Tensor,
        batch: &PackedBatch,
    ) -> candle_core::Result<Self> {
        Ok(if cpu_kernels::run_on(xs) {
            BatchRotary::CpuRows(&tables.rows)
        } else {
            let (cos, sin) = tables.at(&batch.positions)?;
            BatchRotary::PerToken { cos, sin }
        })
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
    pub fn load(vb: VarBuilder, shape: &DecoderShape) -> candle_core::Result<Self> {
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), shape)?,
            mlp: Mlp::load(vb.pp("mlp"), shape)?,
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                shape.hidden_size,
                shape.rms_norm_eps,
            )?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                shape.hidden_size,
                shape.rms_norm_eps,
            )?,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        rotary: &BatchRotary<'_>,
        batch: &PackedBatch,
    ) -> candle_core::Result<Tensor> {
        let xs = self
            .self_attn
            .forward(&self.input_layernorm.forward(xs)?, xs, rotary, batch)?;
        self.mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?, &xs)
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
