//! Variable-length bidirectional attention over a packed batch: each token attends to every token
//! of its own sequence and to nothing else, so no mask and no padding is ever built.
//!
//! One function, two paths with the same contract:
//! - CPU, f32/f16: candle-nn's fused `flash_attn_varlen_cpu` (online softmax in f32, one query row
//!   per task on the rayon pool; never materialises the (heads, len, len) scores);
//! - elsewhere (CUDA, bf16): one unfused matmul–softmax–matmul per sequence, softmax in f32 as the
//!   eager reference does.
//!
//! Both compute each sequence from its own rows only, so a pair's output does not depend on what
//! else shares its batch.

use candle_core::{DType, Tensor};

use super::packed::PackedBatch;

/// `q`: (tokens, heads, d), `k`/`v`: (tokens, kv_heads, d), rotary already applied; grouped-query
/// heads in transformers' `repeat_kv` order. Returns (tokens, heads, d).
pub fn varlen_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: &PackedBatch,
    scale: f64,
) -> candle_core::Result<Tensor> {
    if q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F16) {
        candle_nn::attention::flash_attn_varlen_cpu(
            q,
            k,
            v,
            None,
            &batch.seqlens,
            &batch.seqlens,
            batch.max_len(),
            batch.max_len(),
            scale as f32,
            false,
            None,
            None,
        )
    } else {
        per_sequence_attention(q, k, v, batch, scale)
    }
}

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

    /// The fused CPU kernel against the unfused path on random data, lengths 1 to 37, GQA 3:1.
    #[test]
    fn fused_cpu_kernel_matches_unfused_path() {
        let device = Device::Cpu;
        let lengths = [1usize, 37, 5, 2, 16];
        let sequences: Vec<Vec<u32>> = lengths.iter().map(|&l| vec![0; l]).collect();
        let refs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
        let batch = PackedBatch::new(&refs, &device).unwrap();
        let n: usize = lengths.iter().sum();
        let q = Tensor::randn(0f32, 1.0, (n, 6, 8), &device).unwrap();
        let k = Tensor::randn(0f32, 1.0, (n, 2, 8), &device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (n, 2, 8), &device).unwrap();
        let fused = varlen_attention(&q, &k, &v, &batch, 0.35).unwrap();
        let unfused = per_sequence_attention(&q, &k, &v, &batch, 0.35).unwrap();
        assert_eq!(fused.dims(), &[n, 6, 8]);
        let worst = (fused - unfused)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(worst < 1e-5, "fused vs unfused: {worst}");
    }

    /// A sequence of one token attends only to itself: its output is its own value row.
    #[test]
    fn a_single_token_sequence_returns_its_value() {
        let device = Device::Cpu;
        let batch = PackedBatch::new(&[&[0, 0, 0], &[0]], &device).unwrap();
        let q = Tensor::randn(0f32, 1.0, (4, 2, 4), &device).unwrap();
        let k = Tensor::randn(0f32, 1.0, (4, 1, 4), &device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (4, 1, 4), &device).unwrap();
        for out in [
            varlen_attention(&q, &k, &v, &batch, 0.5).unwrap(),
            per_sequence_attention(&q, &k, &v, &batch, 0.5).unwrap(),
        ] {
            let last = out.narrow(0, 3, 1).unwrap().to_vec3::<f32>().unwrap();
            let value = v.narrow(0, 3, 1).unwrap().to_vec3::<f32>().unwrap();
            for head in &last[0] {
                for (a, b) in head.iter().zip(&value[0][0]) {
                    assert!((a - b).abs() < 1e-6);
                }
            }
        }
    }
}
