//! Variable-length attention over a packed batch, unfused: each token attends to the tokens of its
//! own sequence (all of them, or those up to itself: [`AttentionMask`]) and to nothing else, so no
//! padding is ever built.
//!
//! This is the path for CUDA and for half precision; on the CPU in f32 the fused kernel in
//! [`super::cpu_kernels`] does the same (and is tested against this one). Each sequence is computed
//! from its own rows only, so a pair's output does not depend on what else shares its batch.

use candle_core::{DType, Device, Tensor};

use super::packed::PackedBatch;

/// Which keys of its own sequence a query sees: the one difference between the encoder-style
/// rerankers (`llama_bidirec`) and the decoder ones (Qwen3), honoured by both attention paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMask {
    /// Every token of the sequence.
    Bidirectional,
    /// The tokens up to and including itself (a causal language model).
    Causal,
}

/// The unfused path: for each sequence, scores (kv, rep·len, len) in f32, softmax, weighted values.
pub fn per_sequence_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: &PackedBatch,
    scale: f64,
    mask: AttentionMask,
) -> candle_core::Result<Tensor> {
    let (_, heads, head_dim) = q.dims3()?;
    let (_, kv_heads, _) = k.dims3()?;
    let rep = heads / kv_heads;
    let dtype = q.dtype();
    let outputs = batch
        .segments()
        .map(|(start, len)| {
            // (len, h, d) -> (h, len, d); GQA without copying K/V: fold each KV head's group of
            // query heads into the row dimension, (kv, rep·len, d).
            let heads_first = |x: &Tensor| x.narrow(0, start, len)?.transpose(0, 1)?.contiguous();
            let q = heads_first(q)?.reshape((kv_heads, rep * len, head_dim))?;
            let k = heads_first(k)?;
            let v = heads_first(v)?;
            // K^T made contiguous: gemm then takes the same kernel whatever the length.
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.to_dtype(DType::F32)?;
            let scores = match mask {
                AttentionMask::Bidirectional => scores,
                AttentionMask::Causal => {
                    scores.broadcast_add(&causal_bias(rep, len, q.device())?)?
                }
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
            probs
                .matmul(&v)?
                .reshape((heads, len, head_dim))?
                .transpose(0, 1)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&outputs, 0)
}

/// (rep·len, len) f32: 0 where query row `r·len + i` may see key `j` (`j <= i`), −∞ elsewhere.
fn causal_bias(rep: usize, len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let bias: Vec<f32> = (0..rep * len)
        .flat_map(|row| {
            let i = row % len;
            (0..len).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })
        })
        .collect();
    Tensor::from_vec(bias, (rep * len, len), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence of one token attends only to itself: its output is its own value row.
    #[test]
    fn a_single_token_sequence_returns_its_value() {
        let device = Device::Cpu;
        let batch = PackedBatch::new(&[&[0, 0, 0], &[0]], &device).unwrap();
        let q = Tensor::randn(0f32, 1.0, (4, 2, 4), &device).unwrap();
        let k = Tensor::randn(0f32, 1.0, (4, 1, 4), &device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (4, 1, 4), &device).unwrap();
        let out =
            per_sequence_attention(&q, &k, &v, &batch, 0.5, AttentionMask::Bidirectional).unwrap();
        let last = out.narrow(0, 3, 1).unwrap().to_vec3::<f32>().unwrap();
        let value = v.narrow(0, 3, 1).unwrap().to_vec3::<f32>().unwrap();
        for head in &last[0] {
            for (a, b) in head.iter().zip(&value[0][0]) {
                assert!((a - b).abs() < 1e-6);
            }
        }
    }
}
