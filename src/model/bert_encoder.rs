//! The post-LayerNorm BERT encoder (BERT, XLM-RoBERTa) over a packed batch, and the tanh
//! classification head both families end in.
//!
//! Why not candle-transformers' `BertModel` / `XLMRobertaForSequenceClassification`: they take
//! padded `(batch, longest)` batches and allocate a new tensor for every op. Profiled on MiniLM-L6
//! (`bench/README.md`), only ~28 % of the time was gemm; the rest went to page faults and zeroing of
//! the padded attention scores (~50 MB a layer), scalar `erf`/`exp` and single-threaded element-wise
//! maps, at 0.3–0.5× PyTorch. Here, as in the decoder stack (`layers.rs`), a batch is one
//! `(total_tokens, hidden)` tensor of real tokens: every linear layer is one 2-D gemm, attention is
//! per sequence, and on the CPU in f32 ([`Kernels::CpuFused`]) the bias adds, GELU, residual adds
//! and LayerNorms run fused and in place on the matmuls' outputs (`cpu_kernels`). Elsewhere
//! ([`Kernels::Candle`]: CUDA, half precision) the same steps run as candle ops with the unfused
//! per-sequence attention; a test holds the two paths together.
//!
//! Reference: transformers 4.47.1 `models/bert/modeling_bert.py` (`BertEmbeddings`,
//! `BertSelfAttention` eager path, `BertSelfOutput`, `BertIntermediate`, `BertOutput`,
//! `BertPooler`) and `models/xlm_roberta/modeling_xlm_roberta.py` (the same layers; positions
//! counted from `padding_idx + 1`; `XLMRobertaClassificationHead`). Field names follow the
//! checkpoint's tensor names, so `vb.pp(..)` prefixes mirror it.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::Deserialize;

use super::attention::{per_sequence_attention, AttentionMask};
use super::cpu_kernels::{self, BiasActivation, PackedSelfAttention, ResidualLayerNorm};
use super::layers::{fused_linear, linear, Linear};
use super::packed::PackedBatch;

/// The `config.json` fields of a BERT-style encoder (transformers' `BertConfig` and
/// `XLMRobertaConfig` name them alike). Defaults are transformers' where both configs agree.
#[derive(Debug, Clone, Deserialize)]
pub struct EncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// XLM-RoBERTa counts positions from `pad_token_id + 1`; BERT does not read it.
    pub pad_token_id: Option<usize>,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
}

fn default_hidden_act() -> String {
    "gelu".to_string()
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_position_embedding_type() -> String {
    "absolute".to_string()
}

/// The feed-forward activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: `0.5·x·(1 + erf(x/√2))`.
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    Relu,
}

impl Activation {
    /// What [`Activation::from_config`] accepts.
    pub const SUPPORTED: &'static str = "gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu";

    pub fn from_config(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::GeluErf => xs.gelu_erf(),
            Activation::GeluTanh => xs.gelu(),
            Activation::Relu => xs.relu(),
        }
    }
}

/// The sizes of one encoder stack, checked by the family when it loads the config.
#[derive(Debug, Clone, Copy)]
pub struct EncoderShape {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate_size: usize,
    pub activation: Activation,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// Rows of the position table (`max_position_embeddings`), the first one position 0 reads,
    /// and how many positions are used (`max_length`).
    pub position_table_rows: usize,
    pub first_position: usize,
    pub max_positions: usize,
}

/// Which implementation of the element-wise steps and of attention a forward pass takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// CPU, f32: fused attention and in-place bias/activation/LayerNorm ops.
    CpuFused,
    /// Anything else: candle's ops and the unfused per-sequence attention.
    Candle,
}

impl Kernels {
    fn for_tensor(xs: &Tensor) -> Self {
        if cpu_kernels::run_on(xs) {
            Kernels::CpuFused
        } else {
            Kernels::Candle
        }
    }
}

/// A bias or LayerNorm parameter: the tensor for candle's ops and, on the CPU in f32, its values
/// for the fused kernels (a few hundred floats each).
#[derive(Debug, Clone)]
struct Param {
    tensor: Tensor,
    values: Vec<f32>,
}

impl Param {
    fn new(tensor: Tensor) -> candle_core::Result<Self> {
        let values = match Kernels::for_tensor(&tensor) {
            Kernels::CpuFused => tensor.to_vec1::<f32>()?,
            Kernels::Candle => Vec::new(),
        };
        Ok(Self { tensor, values })
    }

    fn load(vb: &VarBuilder, size: usize, name: &str, init: Init) -> candle_core::Result<Self> {
        Self::new(vb.get_with_hints(size, name, init)?)
    }

    fn bias(vb: &VarBuilder, size: usize) -> candle_core::Result<Self> {
        Self::load(vb, size, "bias", Init::Const(0.0))
    }
}

/// `LayerNorm` with its weight and bias.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Param,
    bias: Param,
    eps: f64,
}

impl LayerNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: Param::load(&vb, size, "weight", Init::Const(1.0))?,
            bias: Param::bias(&vb, size)?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(xs, &self.weight.tensor, &self.bias.tensor, self.eps as f32)
    }

    /// `LayerNorm(dense_out + bias + residual)`, in place on `dense_out` on the fused path.
    fn residual(
        &self,
        dense_out: Tensor,
        bias: &Param,
        residual: &Tensor,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        match kernels {
            Kernels::CpuFused => {
                dense_out.inplace_op2(
                    residual,
                    &ResidualLayerNorm {
                        bias: &bias.values,
                        weight: &self.weight.values,
                        beta: &self.bias.values,
                        eps: self.eps as f32,
                    },
                )?;
                Ok(dense_out)
            }
            Kernels::Candle => self.forward(&(dense_out.broadcast_add(&bias.tensor)? + residual)?),
        }
    }
}

/// A linear layer whose bias is applied by whatever step follows it (fused on the CPU).
#[derive(Debug, Clone)]
struct Dense {
    linear: Linear,
    bias: Param,
}

impl Dense {
    fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear: linear(vb.clone(), in_dim, out_dim)?,
            bias: Param::bias(&vb, out_dim)?,
        })
    }
}

/// One `BertLayer`: self-attention, `LayerNorm(x + attention)`, the feed-forward block,
/// `LayerNorm(x + feed-forward)`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    /// `attention.self.{query,key,value}` side by side: one gemm.
    qkv: Linear,
    qkv_bias: Param,
    attention_output: Dense,
    attention_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: LayerNorm,
    heads: usize,
    head_dim: usize,
    activation: Activation,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, shape: &EncoderShape) -> candle_core::Result<Self> {
        let (hidden, inter) = (shape.hidden_size, shape.intermediate_size);
        let attention = vb.pp("attention");
        let own = attention.pp("self");
        let qkv_parts = [("query", hidden), ("key", hidden), ("value", hidden)];
        let qkv_biases = qkv_parts
            .iter()
            .map(|&(name, size)| own.pp(name).get_with_hints(size, "bias", Init::Const(0.0)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let qkv_bias = Param::new(Tensor::cat(&qkv_biases, 0)?)?;
        let eps = shape.layer_norm_eps;
        Ok(Self {
            qkv: fused_linear(&own, &qkv_parts, hidden)?,
            qkv_bias,
            attention_output: Dense::load(attention.pp("output.dense"), hidden, hidden)?,
            attention_norm: LayerNorm::load(attention.pp("output.LayerNorm"), hidden, eps)?,
            intermediate: Dense::load(vb.pp("intermediate.dense"), hidden, inter)?,
            output: Dense::load(vb.pp("output.dense"), inter, hidden)?,
            output_norm: LayerNorm::load(vb.pp("output.LayerNorm"), hidden, eps)?,
            heads: shape.heads,
            head_dim: hidden / shape.heads,
            activation: shape.activation,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        batch: &PackedBatch,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let context = self.attention(xs, batch, kernels)?;
        let attended = self.attention_norm.residual(
            self.attention_output.linear.forward(&context)?,
            &self.attention_output.bias,
            xs,
            kernels,
        )?;
        let inner = self.intermediate.linear.forward(&attended)?;
        let inner = match kernels {
            Kernels::CpuFused => {
                inner.inplace_op1(&BiasActivation {
                    bias: &self.intermediate.bias.values,
                    activation: self.activation,
                })?;
                inner
            }
            Kernels::Candle => self
                .activation
                .apply(&inner.broadcast_add(&self.intermediate.bias.tensor)?)?,
        };
        self.output_norm.residual(
            self.output.linear.forward(&inner)?,
            &self.output.bias,
            &attended,
            kernels,
        )
    }

    /// Multi-head self-attention within each sequence: (tokens, hidden) → (tokens, hidden),
    /// before the output projection.
    fn attention(
        &self,
        xs: &Tensor,
        batch: &PackedBatch,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let (heads, head_dim) = (self.heads, self.head_dim);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let qkv = self.qkv.forward(xs)?;
        match kernels {
            Kernels::CpuFused => qkv.apply_op1_no_bwd(&PackedSelfAttention {
                segments: batch.segment_list(),
                heads,
                kv_heads: heads,
                head_dim,
                scale: scale as f32,
                rotary: None,
                bias: Some(&self.qkv_bias.values),
                mask: AttentionMask::Bidirectional,
            }),
            Kernels::Candle => {
                let n = qkv.dim(0)?;
                let qkv = qkv.broadcast_add(&self.qkv_bias.tensor)?;
                let part = |i: usize| {
                    qkv.narrow(1, i * heads * head_dim, heads * head_dim)?
                        .reshape((n, heads, head_dim))
                };
                let (q, k, v) = (part(0)?, part(1)?, part(2)?);
                per_sequence_attention(&q, &k, &v, batch, scale, AttentionMask::Bidirectional)?
                    .reshape((n, heads * head_dim))
            }
        }
    }
}

/// The encoder: embeddings (word + position + token type, `LayerNorm`) and the layers.
#[derive(Debug, Clone)]
pub struct BertEncoder {
    word_embeddings: Tensor,
    /// The rows of `position_embeddings` the positions `0..max_positions` read.
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    kernels: Kernels,
}

impl BertEncoder {
    /// Loads the encoder under `vb` (`bert`, `roberta`); dtype and device come from the builder.
    pub fn load(vb: VarBuilder, shape: &EncoderShape) -> candle_core::Result<Self> {
        let hidden = shape.hidden_size;
        let embeddings = vb.pp("embeddings");
        let table = |name: &str, rows: usize| {
            embeddings.pp(name).get_with_hints(
                (rows, hidden),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )
        };
        let word_embeddings = table("word_embeddings", shape.vocab_size)?;
        let layers = (0..shape.layers)
            .map(|i| EncoderLayer::load(vb.pp("encoder.layer").pp(i), shape))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            kernels: Kernels::for_tensor(&word_embeddings),
            word_embeddings,
            position_embeddings: table("position_embeddings", shape.position_table_rows)?.narrow(
                0,
                shape.first_position,
                shape.max_positions,
            )?,
            token_type_embeddings: table("token_type_embeddings", shape.type_vocab_size)?,
            embedding_norm: LayerNorm::load(
                embeddings.pp("LayerNorm"),
                hidden,
                shape.layer_norm_eps,
            )?,
            layers,
        })
    }

    /// The last hidden states, (tokens, hidden) packed like `batch`; `token_types` (tokens,) u32.
    pub fn forward(
        &self,
        batch: &PackedBatch,
        token_types: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.forward_with(batch, token_types, self.kernels)
    }

    fn forward_with(
        &self,
        batch: &PackedBatch,
        token_types: &Tensor,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let words = self.word_embeddings.index_select(&batch.input_ids, 0)?;
        let positions = self.position_embeddings.index_select(&batch.positions, 0)?;
        let types = self.token_type_embeddings.index_select(token_types, 0)?;
        let mut xs = self
            .embedding_norm
            .forward(&((words + positions)? + types)?)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, batch, kernels)?;
        }
        Ok(xs)
    }
}

/// `out(tanh(dense(h)))` on each sequence's first token (`[CLS]`, `<s>`): BERT's pooler and
/// classifier, XLM-RoBERTa's classification head. One raw logit per sequence, in f32.
#[derive(Debug, Clone)]
pub struct TanhHead {
    dense: Dense,
    /// `out.weight` (1, hidden) and `out.bias` (1,), in f32.
    out_weight: Tensor,
    out_bias: Tensor,
}

impl TanhHead {
    /// `dense` and `out` name the two linear layers (`bert.pooler.dense` and `classifier`, or
    /// `classifier.dense` and `classifier.out_proj`).
    pub fn load(
        vb: &VarBuilder,
        dense: &str,
        out: &str,
        hidden: usize,
    ) -> candle_core::Result<Self> {
        let out = vb.pp(out);
        Ok(Self {
            dense: Dense::load(vb.pp(dense), hidden, hidden)?,
            out_weight: out
                .get_with_hints(
                    (1, hidden),
                    "weight",
                    candle_nn::init::DEFAULT_KAIMING_NORMAL,
                )?
                .to_dtype(DType::F32)?,
            out_bias: out
                .get_with_hints(1, "bias", Init::Const(0.0))?
                .to_dtype(DType::F32)?,
        })
    }

    /// (sequences,) f32 logits from the packed hidden states.
    pub fn forward(&self, hidden: &Tensor, batch: &PackedBatch) -> candle_core::Result<Tensor> {
        let firsts: Vec<u32> = batch.segments().map(|(start, _)| start as u32).collect();
        let count = firsts.len();
        let firsts = Tensor::from_vec(firsts, count, hidden.device())?;
        let pooled = self
            .dense
            .linear
            .forward(&hidden.index_select(&firsts, 0)?)?
            .broadcast_add(&self.dense.bias.tensor)?
            .tanh()?
            .to_dtype(DType::F32)?;
        // A per-row dot product (not a (b, hidden) x (hidden, 1) matmul, whose gemm kernel depends
        // on the number of rows), so a pair's logit does not depend on its batch.
        pooled
            .broadcast_mul(&self.out_weight)?
            .sum(1)?
            .broadcast_add(&self.out_bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_kernels::max_abs_diff;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// The fused CPU path against candle's ops and the unfused attention (the path CUDA and half
    /// precision take), on random weights: every step of both is exercised, each sequence packed
    /// among others of other lengths.
    #[test]
    fn fused_and_candle_kernels_agree() {
        let device = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let shape = EncoderShape {
            vocab_size: 50,
            hidden_size: 32,
            layers: 2,
            heads: 4,
            intermediate_size: 48,
            activation: Activation::GeluErf,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_table_rows: 44,
            first_position: 2,
            max_positions: 40,
        };
        // The first load creates the variables; LayerNorm parameters and biases start at 1 and 0,
        // so make every one random before loading the encoder that is tested.
        BertEncoder::load(vb.pp("bert"), &shape).unwrap();
        for var in varmap.all_vars() {
            let dims = var.dims().to_vec();
            var.set(&Tensor::randn(0f32, 0.5, dims, &device).unwrap())
                .unwrap();
        }
        let encoder = BertEncoder::load(vb.pp("bert"), &shape).unwrap();
        let sequences: Vec<Vec<u32>> = [7usize, 1, 33, 12]
            .iter()
            .enumerate()
            .map(|(s, &len)| (0..len).map(|i| ((i * 7 + s * 3) % 50) as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
        let batch = PackedBatch::new(&refs, &device).unwrap();
        let n: usize = sequences.iter().map(Vec::len).sum();
        let types: Vec<u32> = (0..n).map(|i| (i % 3 == 0) as u32).collect();
        let types = Tensor::from_vec(types, n, &device).unwrap();
        assert_eq!(encoder.kernels, Kernels::CpuFused);
        for activation in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
            let mut encoder = encoder.clone();
            for layer in &mut encoder.layers {
                layer.activation = activation;
            }
            let fused = encoder
                .forward_with(&batch, &types, Kernels::CpuFused)
                .unwrap();
            let reference = encoder
                .forward_with(&batch, &types, Kernels::Candle)
                .unwrap();
            assert_eq!(fused.dims(), &[n, 32]);
            let worst = max_abs_diff(&fused, &reference);
            assert!(worst < 1e-4, "{activation:?}: {worst}");
        }
    }
}
