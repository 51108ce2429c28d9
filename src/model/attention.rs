//! Variable-length bidirectional attention over a packed batch, unfused: each token attends to
//! every token of its own sequence and to nothing else, so no mask and no padding is ever built.
//!
//! This is the path for CUDA and for half precision; on the CPU in f32 the fused kernel in
//! [`super::cpu_kernels`] does the same (and is tested against this one). Each sequence is computed
//! from its own rows only, so a pair's output does not depend on what else shares its batch.

use candle_core::{DType, Tensor};

use super::packed::PackedBatch;

/// The unfused path: for each sequence, scores (kv, rep·len, len) in f32, softmax, weighted values.
pub fn per_sequence_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: &PackedBatch,
    scale: f64,
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
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
            let probs =
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
            probs
                .matmul(&v)?
                .reshape((heads, len, head_dim))?
                .transpose(0, 1)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&outputs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A sequence of one token attends only to itself: its output is its own value row.
    #[test]
    fn a_single_token_sequence_returns_its_value() {
        let device = Device::Cpu;
        let batch = PackedBatch::new(&[&[0, 0, 0], &[0]], &device).unwrap();
        let q = Tensor::randn(0f32, 1.0, (4, 2, 4), &device).unwrap();
        let k = Tensor::randn(0f32, 1.0, (4, 1, 4), &device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (4, 1, 4), &device).unwrap();
        let out = per_sequence_attention(&q, &k, &v, &batch, 0.5).unwrap();
        let last = out.narrow(0, 3, 1).unwrap().to_vec3::<f32>().unwrap();
        let value = v.narrow(0, 3, 1).unwrap().to_vec3::<f32>().unwrap();
        for head in &last[0] {
            for (a, b) in head.iter().zip(&value[0][0]) {
                assert!((a - b).abs() < 1e-6);
            }
        }
    }
}
