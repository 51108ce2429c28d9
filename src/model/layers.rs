//! The Llama decoder stack with **bidirectional** attention.
//!
//! Reference: transformers 4.47.1 `models/llama/modeling_llama.py` (`LlamaAttention` eager path,
//! `LlamaMLP`, `LlamaRMSNorm`, `LlamaDecoderLayer`) as used by NVIDIA's `llama_bidirectional_model.py`,
//! which sets `is_causal = False` and replaces the causal mask by a padding-only key mask.
//! Field names equal the Hugging Face tensor names so `vb.pp(..)` prefixes mirror the checkpoint.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::config::ModelConfig;

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
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, k) = xs.dims3()?;
        xs.reshape((b * t, k))?
            .matmul(&self.weight_t)?
            .reshape((b, t, ()))
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

/// Multi-head attention with grouped KV heads; every query attends to every real key.
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

    /// `xs`: (b, t, hidden); `cos`/`sin`: (t, head_dim/2); `key_mask`: additive f32 (b, 1, 1, t).
    pub fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        key_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        let (b, t, _) = xs.dims3()?;
        let dtype = xs.dtype();

        // 1. Project and split heads: (b, t, h*d) -> (b, h, t, d).
        let split = |x: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            x.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(xs)?, self.num_heads)?;
        let k = split(self.k_proj.forward(xs)?, self.num_kv_heads)?;
        let v = split(self.v_proj.forward(xs)?, self.num_kv_heads)?;

        // 2. Rotary embeddings (rotate-half convention, as transformers' `apply_rotary_pos_emb`).
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;

        // 3. GQA without copying K/V: query heads are grouped per KV head (transformers
        //    `repeat_kv` order), so fold each group's heads into the row dimension:
        //    (b, h, t, d) -> (b, kv, rep*t, d).
        let rep = self.num_heads / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, rep * t, self.head_dim))?;

        // 4. Scores (b, kv, rep*t, t) + padding-only key mask (b, 1, 1, t); softmax in f32 as the
        //    eager path does (`softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)`).
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // K^T made contiguous for the same batch-invariance reason as in `Linear`.
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(key_mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;

        // 5. Weighted values, unfold the groups and merge heads:
        //    (b, kv, rep*t, d) -> (b, h, t, d) -> (b, t, h*d) -> o_proj.
        let out = probs
            .matmul(&v)?
            .reshape((b, self.num_heads, t, self.head_dim))?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
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
        key_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let attn =
            self.self_attn
                .forward(&self.input_layernorm.forward(xs)?, cos, sin, key_mask)?;
        let xs = (xs + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?)?;
        xs + mlp
    }
}

/// Additive key mask (b, 1, 1, t) in f32 from per-row real lengths: 0 for real keys, the f32
/// minimum for padding (transformers `_prepare_4d_attention_mask` uses `finfo(dtype).min`).
/// Padded *query* rows are left unmasked; pooling drops them.
pub fn key_padding_mask(
    lengths: &[usize],
    seq_len: usize,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let mut mask = Vec::with_capacity(lengths.len() * seq_len);
    for &len in lengths {
        mask.extend((0..seq_len).map(|i| if i < len { 0f32 } else { f32::MIN }));
    }
    Tensor::from_vec(mask, (lengths.len(), 1, 1, seq_len), device)
}

/// Mean over the real tokens of each row, in f32: (b, t, hidden) -> (b, hidden).
pub fn masked_mean(hidden: &Tensor, lengths: &[usize]) -> candle_core::Result<Tensor> {
    let (b, t, _) = hidden.dims3()?;
    let device = hidden.device();
    let mut keep = Vec::with_capacity(b * t);
    for &len in lengths {
        keep.extend((0..t).map(|i| if i < len { 1f32 } else { 0.0 }));
    }
    let keep = Tensor::from_vec(keep, (b, t, 1), device)?;
    let counts: Vec<f32> = lengths.iter().map(|&len| len.max(1) as f32).collect();
    let counts = Tensor::from_vec(counts, (b, 1), device)?;
    // Sum, then divide, as the reference `pool(..., "avg")` does.
    hidden
        .to_dtype(DType::F32)?
        .broadcast_mul(&keep)?
        .sum(D::Minus2)?
        .broadcast_div(&counts)
}
