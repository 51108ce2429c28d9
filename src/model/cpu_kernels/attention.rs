//! Self-attention over a packed batch, read straight from the fused QKV projection's rows.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use super::{assume_written, contiguous_f32, exp, uninit_output, SharedOut, LANES};
use crate::model::attention::AttentionMask;

/// Rotary tables as plain rows, `(positions, head_dim / 2)` each, in f32.
#[derive(Debug, Clone)]
pub struct RotaryRows {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

/// Self-attention over a packed batch, read from the fused QKV projection; each query sees its own
/// sequence's keys as `mask` says. The decoders rotate Q and K (RoPE, token `i` of a sequence at
/// position `i`); the BERT-style encoders add the projection's bias instead.
///
/// Input: `(tokens, (heads + 2·kv_heads)·head_dim)`, each row `[q heads | k heads | v heads]`.
/// Output: `(tokens, heads·head_dim)`.
pub struct PackedSelfAttention<'a> {
    /// `(first row, length)` of each sequence.
    pub segments: &'a [(usize, usize)],
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// RoPE on Q and K; `None`: no rotation (absolute position embeddings were added earlier).
    pub rotary: Option<&'a RotaryRows>,
    /// The QKV projection's bias, one value per input column, added before anything else.
    pub bias: Option<&'a [f32]>,
    pub mask: AttentionMask,
}

impl CustomOp1 for PackedSelfAttention<'_> {
    fn name(&self) -> &'static str {
        "packed-self-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(storage, layout, self.name())?;
        let (tokens, width) = layout.shape().dims2()?;
        let (heads, kv_heads, d) = (self.heads, self.kv_heads, self.head_dim);
        if width != (heads + 2 * kv_heads) * d || kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!(
                "packed attention: row width {width} does not fit {heads}/{kv_heads} heads of {d}"
            );
        }
        if self.rotary.is_some_and(|rotary| rotary.half * 2 != d) {
            candle_core::bail!("packed attention: rotary tables are for another head size");
        }
        if self.bias.is_some_and(|bias| bias.len() != width) {
            candle_core::bail!("packed attention: the bias does not have {width} values");
        }
        let positions = self
            .rotary
            .map_or(usize::MAX, |rotary| rotary.cos.len() / rotary.half);
        // The segments must tile the rows in order: that is what makes the tasks' writes disjoint.
        let mut next_row = 0;
        for &(start, len) in self.segments {
            if start != next_row || len > positions {
                candle_core::bail!(
                    "packed attention: segments do not tile the batch or exceed the tables"
                );
            }
            next_row += len;
        }
        if next_row != tokens {
            candle_core::bail!("packed attention: segments cover {next_row} of {tokens} rows");
        }
        let out_width = heads * d;
        let len = tokens * out_width;
        let mut out = uninit_output(len);
        let shared_out = SharedOut(out.as_mut_ptr());
        let tasks: Vec<(usize, usize, usize)> = self
            .segments
            .iter()
            .flat_map(|&(start, len)| (0..kv_heads).map(move |group| (start, len, group)))
            .collect();
        tasks.par_iter().for_each(|&(start, len, group)| {
            let block = self.attend(qkv, width, start, len, group);
            let rep = heads / kv_heads;
            for r in 0..rep {
                let head = group * rep + r;
                for i in 0..len {
                    let src = &block[(r * len + i) * d..][..d];
                    // SAFETY: each task writes only the rows of its own sequence and the columns of
                    // its own KV group's query heads; segments are disjoint and every (segment,
                    // group) pair is one task, so no two tasks touch the same element, and `out`
                    // outlives the parallel loop.
                    unsafe {
                        let dst = shared_out.at((start + i) * out_width + head * d);
                        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, d);
                    }
                }
            }
        });
        // SAFETY: the tasks cover every (sequence, KV group) pair, the segments tile the rows
        // (checked above) and each group's query heads cover its columns, so every element was
        // written.
        let out = unsafe { assume_written(out, len) };
        Ok((CpuStorage::F32(out), Shape::from((tokens, out_width))))
    }
}

impl PackedSelfAttention<'_> {
    /// One sequence, one KV head and its `rep` query heads: returns `(rep·len, d)` outputs, query
    /// head `r`'s rows at `r·len..`.
    fn attend(
        &self,
        qkv: &[f32],
        width: usize,
        start: usize,
        len: usize,
        group: usize,
    ) -> Vec<f32> {
        let (heads, kv_heads, d) = (self.heads, self.kv_heads, self.head_dim);
        let rep = heads / kv_heads;
        let row = |i: usize, head_slot: usize| &qkv[(start + i) * width + head_slot * d..][..d];

        let mut keys = vec![0f32; len * d];
        for i in 0..len {
            let slot = heads + group;
            self.prepare(row(i, slot), slot, i, &mut keys[i * d..][..d]);
        }
        let mut queries = vec![0f32; rep * len * d];
        for r in 0..rep {
            for i in 0..len {
                let slot = group * rep + r;
                self.prepare(
                    row(i, slot),
                    slot,
                    i,
                    &mut queries[(r * len + i) * d..][..d],
                );
            }
        }

        // scores = scale · Q Kᵀ: (rep·len, d) × (d, len); Kᵀ read in place (row stride 1).
        let m = rep * len;
        let mut scores = vec![0f32; m * len];
        // SAFETY: the pointers and strides describe the buffers above exactly: queries (m, d)
        // row-major, keys (len, d) row-major read transposed, scores (m, len) row-major.
        unsafe {
            gemm::gemm(
                m,
                len,
                d,
                scores.as_mut_ptr(),
                1,
                len as isize,
                false,
                queries.as_ptr(),
                1,
                d as isize,
                keys.as_ptr(),
                d as isize,
                1,
                0.0,
                self.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (row, scores_row) in scores.chunks_exact_mut(len).enumerate() {
            match self.mask {
                AttentionMask::Bidirectional => softmax_in_place(scores_row),
                AttentionMask::Causal => {
                    // Query i (row r·len + i) sees keys 0..=i; the others weigh exactly 0.
                    let (visible, future) = scores_row.split_at_mut(row % len + 1);
                    softmax_in_place(visible);
                    future.fill(0.0);
                }
            }
        }

        // out = P V: (rep·len, len) × (len, d); V read straight from the packed rows, or from a
        // copy with the bias added.
        let mut block = vec![0f32; m * d];
        let value_slot = heads + kv_heads + group;
        let biased_values: Vec<f32>;
        let (values, value_stride) = match self.bias {
            None => (qkv[start * width + value_slot * d..].as_ptr(), width),
            Some(bias) => {
                let bias = &bias[value_slot * d..][..d];
                let mut copy = vec![0f32; len * d];
                for (i, dst) in copy.chunks_exact_mut(d).enumerate() {
                    for ((o, v), b) in dst.iter_mut().zip(row(i, value_slot)).zip(bias) {
                        *o = v + b;
                    }
                }
                biased_values = copy;
                (biased_values.as_ptr(), d)
            }
        };
        // SAFETY: V row j of this sequence and group starts at values + j·value_stride and has d
        // elements, all inside `qkv` (checked against the layout by the caller) or inside
        // `biased_values` (len rows of d); block and scores as above.
        unsafe {
            gemm::gemm(
                m,
                d,
                len,
                block.as_mut_ptr(),
                1,
                d as isize,
                false,
                scores.as_ptr(),
                1,
                len as isize,
                values,
                1,
                value_stride as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        block
    }

    /// One head's q or k values (head slot `slot` of the row) with the bias added, then rotated
    /// by rotate-half RoPE (transformers' `apply_rotary_pos_emb`) at `position`.
    fn prepare(&self, x: &[f32], slot: usize, position: usize, out: &mut [f32]) {
        out.copy_from_slice(x);
        if let Some(bias) = self.bias {
            for (o, b) in out.iter_mut().zip(&bias[slot * self.head_dim..]) {
                *o += b;
            }
        }
        let Some(rotary) = self.rotary else {
            return;
        };
        let half = rotary.half;
        let cos = &rotary.cos[position * half..][..half];
        let sin = &rotary.sin[position * half..][..half];
        let (o1, o2) = out.split_at_mut(half);
        for j in 0..half {
            let (x1, x2) = (o1[j], o2[j]);
            o1[j] = x1 * cos[j] - x2 * sin[j];
            o2[j] = x2 * cos[j] + x1 * sin[j];
        }
    }
}

/// Numerically stable softmax of one row, in place.
#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(x);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (sum, x) in sums.iter_mut().zip(chunk) {
            *x = exp(*x - max);
            *sum += *x;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

dispatch_simd! {
    fn softmax_in_place(row: &mut [f32]) => softmax_row;
}

#[cfg(test)]
mod tests {
    use super::super::max_abs_diff;
    use super::*;
    use crate::model::attention::per_sequence_attention;
    use crate::model::packed::PackedBatch;
    use crate::model::rope::RotaryTables;
    use candle_core::{DType, Device, Tensor};

    /// The fused kernel (RoPE + attention from the QKV rows) against the unfused path (candle's
    /// `rope_thd`, matmul–softmax–matmul per sequence): lengths 1 to 37, GQA 3:1.
    #[test]
    fn fused_attention_matches_the_unfused_path() {
        fused_against_unfused(AttentionMask::Bidirectional);
    }

    /// The same with causal masks (the Qwen3 family), on both sides.
    #[test]
    fn fused_causal_attention_matches_the_unfused_path() {
        fused_against_unfused(AttentionMask::Causal);
    }

    /// Without RoPE and with the projection's bias (the BERT-style encoders): the fused kernel
    /// against bias-add then the unfused path, one KV head per query head.
    #[test]
    fn fused_attention_with_bias_and_no_rope_matches_the_unfused_path() {
        let device = Device::Cpu;
        let (heads, d) = (4, 8);
        let lengths = [3usize, 1, 29, 12];
        let sequences: Vec<Vec<u32>> = lengths.iter().map(|&l| vec![0; l]).collect();
        let refs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
        let batch = PackedBatch::new(&refs, &device).unwrap();
        let n: usize = lengths.iter().sum();
        let width = 3 * heads * d;
        let qkv = Tensor::randn(0f32, 1.0, (n, width), &device).unwrap();
        let bias = Tensor::randn(0f32, 1.0, width, &device).unwrap();
        let bias_values = bias.to_vec1::<f32>().unwrap();
        let op = |bias| PackedSelfAttention {
            segments: batch.segment_list(),
            heads,
            kv_heads: heads,
            head_dim: d,
            scale: 0.35,
            rotary: None,
            bias: Some(bias),
            mask: AttentionMask::Bidirectional,
        };
        let fused = qkv.apply_op1_no_bwd(&op(bias_values.as_slice())).unwrap();
        let biased = qkv.broadcast_add(&bias).unwrap();
        let part = |i: usize| {
            biased
                .narrow(1, i * heads * d, heads * d)
                .unwrap()
                .reshape((n, heads, d))
                .unwrap()
        };
        let unfused = per_sequence_attention(
            &part(0),
            &part(1),
            &part(2),
            &batch,
            0.35,
            AttentionMask::Bidirectional,
        )
        .unwrap()
        .reshape((n, heads * d))
        .unwrap();
        let worst = max_abs_diff(&fused, &unfused);
        assert!(worst < 1e-5, "fused vs unfused: {worst}");
        // A bias of the wrong width is refused.
        let op = op(&bias_values[1..]);
        assert!(qkv.apply_op1_no_bwd(&op).is_err());
    }

    /// Returns the fused output, after checking it against the unfused one.
    fn fused_against_unfused(mask: AttentionMask) -> (Tensor, Tensor) {
        let device = Device::Cpu;
        let (heads, kv_heads, d) = (6, 2, 8);
        let lengths = [1usize, 37, 5, 2, 16];
        let sequences: Vec<Vec<u32>> = lengths.iter().map(|&l| vec![0; l]).collect();
        let refs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
        let batch = PackedBatch::new(&refs, &device).unwrap();
        let n: usize = lengths.iter().sum();
        let tables = RotaryTables::new(&[1.0, 0.3, 0.05, 0.001], 64, DType::F32, &device).unwrap();
        let qkv = Tensor::randn(0f32, 1.0, (n, (heads + 2 * kv_heads) * d), &device).unwrap();

        let fused = qkv
            .apply_op1_no_bwd(&PackedSelfAttention {
                segments: batch.segment_list(),
                heads,
                kv_heads,
                head_dim: d,
                scale: 0.35,
                rotary: Some(&tables.rows),
                bias: None,
                mask,
            })
            .unwrap();

        let (cos, sin) = tables.at(&batch.positions).unwrap();
        let part = |from: usize, count: usize| qkv.narrow(1, from * d, count * d).unwrap();
        let rope = |x: Tensor, h: usize| {
            let x = x.contiguous().unwrap().reshape((1, n, h, d)).unwrap();
            candle_nn::rotary_emb::rope_thd(&x, &cos, &sin)
                .unwrap()
                .reshape((n, h, d))
                .unwrap()
        };
        let q = rope(part(0, heads), heads);
        let k = rope(part(heads, kv_heads), kv_heads);
        let v = part(heads + kv_heads, kv_heads)
            .reshape((n, kv_heads, d))
            .unwrap();
        let unfused = per_sequence_attention(&q, &k, &v, &batch, 0.35, mask)
            .unwrap()
            .reshape((n, heads * d))
            .unwrap();
        assert_eq!(fused.dims(), &[n, heads * d]);
        let worst = max_abs_diff(&fused, &unfused);
        assert!(worst < 1e-5, "fused vs unfused ({mask:?}): {worst}");
        (qkv, fused)
    }

    /// Causal: a query's output depends only on the keys up to it. Changing the last token of the
    /// 37-token sequence (rows 1..38) changes that row only; bidirectional, it changes them all.
    #[test]
    fn causal_attention_does_not_look_ahead() {
        for mask in [AttentionMask::Causal, AttentionMask::Bidirectional] {
            let (qkv, fused) = fused_against_unfused(mask);
            let tables =
                RotaryTables::new(&[1.0, 0.3, 0.05, 0.001], 64, DType::F32, &Device::Cpu).unwrap();
            let (n, width) = qkv.dims2().unwrap();
            let mut rows = qkv.to_vec2::<f32>().unwrap();
            for x in rows[37].iter_mut() {
                *x += 1.0;
            }
            let changed = Tensor::new(rows, &Device::Cpu).unwrap();
            assert_eq!(changed.dims(), &[n, width]);
            let segments = [(0, 1), (1, 37), (38, 5), (43, 2), (45, 16)];
            let out = changed
                .apply_op1_no_bwd(&PackedSelfAttention {
                    segments: &segments,
                    heads: 6,
                    kv_heads: 2,
                    head_dim: 8,
                    scale: 0.35,
                    rotary: Some(&tables.rows),
                    bias: None,
                    mask,
                })
                .unwrap();
            let before = max_abs_diff(
                &out.narrow(0, 1, 36).unwrap(),
                &fused.narrow(0, 1, 36).unwrap(),
            );
            let others = max_abs_diff(
                &out.narrow(0, 38, n - 38).unwrap(),
                &fused.narrow(0, 38, n - 38).unwrap(),
            );
            assert_eq!(others, 0.0, "{mask:?}: another sequence changed");
            match mask {
                AttentionMask::Causal => assert_eq!(before, 0.0, "a query saw a later key"),
                AttentionMask::Bidirectional => assert!(before > 1e-4, "{before}"),
            }
        }
    }

    #[test]
    fn refuses_shapes_that_do_not_fit() {
        let device = Device::Cpu;
        let tables = RotaryTables::new(&[1.0, 0.5], 4, DType::F32, &device).unwrap();
        let qkv = Tensor::zeros((3, 4 * 4), DType::F32, &device).unwrap();
        let op = |segments: &'static [(usize, usize)]| PackedSelfAttention {
            segments,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            scale: 1.0,
            rotary: Some(&tables.rows),
            bias: None,
            mask: AttentionMask::Bidirectional,
        };
        assert!(qkv.apply_op1_no_bwd(&op(&[(0, 3)])).is_ok());
        // Segments that do not cover the batch, or a sequence longer than the tables.
        assert!(qkv.apply_op1_no_bwd(&op(&[(0, 2)])).is_err());
        let long = Tensor::zeros((5, 16), DType::F32, &device).unwrap();
        assert!(long.apply_op1_no_bwd(&op(&[(0, 5)])).is_err());
        // A row width that is not (heads + 2 kv) · d.
        let wrong = Tensor::zeros((3, 15), DType::F32, &device).unwrap();
        assert!(wrong.apply_op1_no_bwd(&op(&[(0, 3)])).is_err());
    }
}
