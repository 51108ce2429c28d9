//! Fused f32 CPU kernels for the packed forward pass, as candle custom ops.
//!
//! Why: a profile of the packed forward on this project's 2-core Xeon (`bench/README.md`) spent
//! only ~40 % of the time in the linear layers' gemms. The rest went to steps that candle runs one
//! element at a time on a single thread, each allocating a new tensor: candle-nn's
//! `flash_attn_varlen_cpu` (one query row per task, a scalar dot product per key), RoPE, SiLU and
//! the gate × up product. Here those steps run as two ops over the whole batch, in parallel on the
//! rayon pool candle's own matmuls use:
//! - [`PackedSelfAttention`]: RoPE on Q and K, then per (sequence, KV head) two gemms
//!   (`Q·Kᵀ`, `P·V`) on the packed rows, in place, with a row softmax in between (over the whole
//!   row, or under [`AttentionMask::Causal`] over the keys up to the query, the rest set to 0);
//! - [`SwiGlu`]: `silu(gate) * up` over the fused gate/up projection.
//!
//! Exactness: the same formulas in f32 as the reference (rotate-half RoPE, softmax in f32,
//! `x * sigmoid(x)`); the golden tests hold at 1e-4. Batch invariance: every task reads only its own
//! sequence and calls gemm with that sequence's sizes, single-threaded, so a pair's result does not
//! depend on what else is in the batch.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use super::attention::AttentionMask;

/// Rotary tables as plain rows, `(positions, head_dim / 2)` each, in f32.
#[derive(Debug, Clone)]
pub struct RotaryRows {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

/// Self-attention with RoPE over a packed batch, read from the fused QKV projection; each query
/// sees its own sequence's keys as `mask` says.
///
/// Input: `(tokens, (heads + 2·kv_heads)·head_dim)`, each row `[q heads | k heads | v heads]`.
/// Output: `(tokens, heads·head_dim)`. Token `i` of a sequence has position `i`.
pub struct PackedSelfAttention<'a> {
    /// `(first row, length)` of each sequence.
    pub segments: &'a [(usize, usize)],
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub rotary: &'a RotaryRows,
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
        if self.rotary.half * 2 != d {
            candle_core::bail!("packed attention: rotary tables are for another head size");
        }
        // The segments must tile the rows in order: that is what makes the tasks' writes disjoint.
        let mut next_row = 0;
        for &(start, len) in self.segments {
            if start != next_row || len * self.rotary.half > self.rotary.cos.len() {
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
        let mut out = vec![0f32; tokens * out_width];
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
            self.rotate(row(i, heads + group), i, &mut keys[i * d..][..d]);
        }
        let mut queries = vec![0f32; rep * len * d];
        for r in 0..rep {
            for i in 0..len {
                let dst = &mut queries[(r * len + i) * d..][..d];
                self.rotate(row(i, group * rep + r), i, dst);
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

        // out = P V: (rep·len, len) × (len, d); V read straight from the packed rows.
        let mut block = vec![0f32; m * d];
        let values = qkv[(start * width + (heads + kv_heads + group) * d)..].as_ptr();
        // SAFETY: V row j of this sequence and group starts at values + j·width and has d elements,
        // all inside `qkv` (checked against the layout by the caller); block and scores as above.
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
                width as isize,
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

    /// Rotate-half RoPE (transformers' `apply_rotary_pos_emb`) at `position`.
    fn rotate(&self, x: &[f32], position: usize, out: &mut [f32]) {
        let half = self.rotary.half;
        let cos = &self.rotary.cos[position * half..][..half];
        let sin = &self.rotary.sin[position * half..][..half];
        let (x1, x2) = x.split_at(half);
        let (o1, o2) = out.split_at_mut(half);
        for j in 0..half {
            o1[j] = x1[j] * cos[j] - x2[j] * sin[j];
            o2[j] = x2[j] * cos[j] + x1[j] * sin[j];
        }
    }
}

/// `silu(gate) * up` over the fused gate/up projection: `(tokens, 2·I)` → `(tokens, I)`, each input
/// row `[gate | up]`.
pub struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(storage, layout, self.name())?;
        let (tokens, width) = layout.shape().dims2()?;
        if width % 2 != 0 {
            candle_core::bail!("swiglu: odd row width {width}");
        }
        let inner = width / 2;
        let mut out = vec![0f32; tokens * inner];
        out.par_chunks_mut(inner)
            .zip(input.par_chunks(width))
            .for_each(|(dst, src)| {
                let (gate, up) = src.split_at(inner);
                swiglu(gate, up, dst);
            });
        Ok((CpuStorage::F32(out), Shape::from((tokens, inner))))
    }
}

#[inline(always)]
fn swiglu_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

/// Numerically stable softmax of one row, in place.
#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    // Eight independent lanes, so the reductions vectorize (float addition is not reassociated).
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
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
    let mut sums = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
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

/// `swiglu_row` and `softmax_row` compiled for AVX2 (8 lanes instead of SSE2's 4) when the CPU
/// has it, else for the baseline. The bodies are `#[inline(always)]` so each copy is compiled with
/// its own target features.
macro_rules! dispatch_avx2 {
    ($(fn $name:ident($($arg:ident: $ty:ty),*) => $body:ident;)*) => {$(
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn with_avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU was just checked to support AVX2.
                    unsafe { with_avx2($($arg),*) };
                    return;
                }
            }
            $body($($arg),*)
        }
    )*};
}

dispatch_avx2! {
    fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) => swiglu_row;
    fn softmax_in_place(row: &mut [f32]) => softmax_row;
}

/// `e^x` in f32 without a libm call, so loops over it vectorize: Cody–Waite reduction
/// `x = k·ln 2 + r`, |r| ≤ ln2/2, Cephes' degree-6 polynomial for `e^r`, then `2^k` through the
/// exponent bits. Relative error ≲ 2 ulp on the clamped range; below −87.3 the result is the
/// smallest normal (~1e-38) instead of a subnormal or 0, which no softmax or sigmoid here can tell.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest without `round()` (a libm call before SSE4.1).
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.clamp(-87.336_55, 88.376_26);
    let shifted = x * LOG2_E + ROUND;
    let k = shifted - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // `shifted`'s low mantissa bits hold k as an integer: 2^k from integer ops alone (a float to
    // int cast would not vectorize: Rust's saturating `as` becomes one scalar compare per lane).
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    e_r * f32::from_bits(biased << 23)
}

fn contiguous_f32<'s>(
    storage: &'s CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'s [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only");
    };
    match layout.contiguous_offsets() {
        Some((from, to)) => Ok(&data[from..to]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The output buffer shared by the parallel tasks (each writes a disjoint region).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

impl SharedOut {
    /// # Safety
    /// `offset` must be inside the buffer, and no other task may touch the elements written.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

// SAFETY: see the disjointness argument where it is written through.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::per_sequence_attention;
    use crate::model::packed::PackedBatch;
    use crate::model::rope::RotaryTables;
    use candle_core::{DType, Device, Tensor};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

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
                rotary: &tables.rows,
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
                    rotary: &tables.rows,
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
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 / 10_000.0;
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
        }
        assert!(worst < 4.0 * f32::EPSILON, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn swiglu_is_silu_of_gate_times_up() {
        let device = Device::Cpu;
        let gate_up = Tensor::randn(0f32, 3.0, (7, 2 * 33), &device).unwrap();
        let fused = gate_up.apply_op1_no_bwd(&SwiGlu).unwrap();
        let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, 33).unwrap()).unwrap();
        let reference = (gate * gate_up.narrow(1, 33, 33).unwrap()).unwrap();
        assert!(max_abs_diff(&fused, &reference) < 1e-5);
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
            rotary: &tables.rows,
            mask: AttentionMask::Bidirectional,
        };
        assert!(qkv.apply_op1_no_bwd(&op(&[(0, 3)])).is_ok());
        // Segments that do not cover the batch, or a sequence longer than the tables.
        assert!(qkv.apply_op1_no_bwd(&op(&[(0, 2)])).is_err());
        let long = Tensor::zeros((5, 16), DType::F32, &device).unwrap();
        assert!(long.apply_op1_no_bwd(&op(&[(0, 5)])).is_err());
        // A row width that is not (heads + 2 kv) · d, and an odd SwiGLU width.
        let wrong = Tensor::zeros((3, 15), DType::F32, &device).unwrap();
        assert!(wrong.apply_op1_no_bwd(&op(&[(0, 3)])).is_err());
        assert!(wrong.apply_op1_no_bwd(&SwiGlu).is_err());
    }
}
