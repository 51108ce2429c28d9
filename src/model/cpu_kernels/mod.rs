//! Fused f32 CPU kernels for the packed forward passes, as candle custom ops.
//!
//! Why: a profile of the packed forward on this project's 2-core Xeon (`bench/README.md`) spent
//! only ~40 % of the time in the linear layers' gemms. The rest went to steps that candle runs one
//! element at a time on a single thread, each allocating a new tensor: candle-nn's
//! `flash_attn_varlen_cpu` (one query row per task, a scalar dot product per key), RoPE, SiLU, the
//! gate × up product and, in the BERT-style encoders, bias adds, GELU, residual adds and LayerNorm.
//! Here those steps run as a few ops over the whole batch, in parallel on the rayon pool candle's
//! own matmuls use:
//! - [`PackedSelfAttention`] ([`attention`]): optional bias and RoPE on Q and K, then per (sequence,
//!   KV head) two gemms (`Q·Kᵀ`, `P·V`) on the packed rows with a row softmax in between;
//! - [`SwiGlu`] ([`pointwise`]): `silu(gate) * up` over the fused gate/up projection;
//! - [`MatMul`] and [`ResidualMatMul`] ([`linear`]): the linear layers' gemm without candle's zero
//!   fill of the output, and with a decoder layer's residual add done by the gemm;
//! - [`BiasActivation`] and [`ResidualLayerNorm`] ([`pointwise`]): a linear layer's bias with its
//!   activation, or with the residual add and the post-LayerNorm of a BERT-style layer, in place
//!   on the matmul's output (no new tensor).
//!
//! Exactness: the same formulas in f32 as the reference (rotate-half RoPE, softmax in f32,
//! `x * sigmoid(x)`, erf-GELU, two-pass LayerNorm statistics); the golden tests hold at 1e-4. Batch
//! invariance: every task reads only its own sequence or row and calls gemm with that sequence's
//! sizes, single-threaded, so a pair's result does not depend on what else is in the batch.

use candle_core::{CpuStorage, Layout};

/// Independent accumulators in the kernels' reductions, so they vectorize (float addition is not
/// reassociated): one AVX-512 register, or two AVX2 ones.
const LANES: usize = 16;

/// Defines each `fn name(args)` as a call of the `#[inline(always)]` row function `body`, compiled
/// for AVX-512 (16 lanes) or AVX2 (8) when the CPU has them, else for the baseline (SSE2's 4): the
/// body is inlined into each copy, so each is compiled with its own target features.
macro_rules! dispatch_simd {
    ($(fn $name:ident($($arg:ident: $ty:ty),*) => $body:ident;)*) => {$(
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn with_avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn with_avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU was just checked to support AVX-512F.
                    unsafe { with_avx512($($arg),*) };
                    return;
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

mod attention;
mod linear;
mod pointwise;

pub use attention::{PackedSelfAttention, RotaryRows};
pub use linear::{MatMul, ResidualMatMul};
pub use pointwise::{BiasActivation, ResidualLayerNorm, SwiGlu};

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

/// Whether the kernels here take a step on `xs`: on the CPU, in f32. Elsewhere (CUDA, half
/// precision) the models run candle's ops and the unfused per-sequence attention.
pub fn run_on(xs: &candle_core::Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32
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

/// Room for a kernel's output of `len` f32, not zero-filled: candle's own outputs are, by a serial
/// memset on the engine's thread (~5 % of a llama pass's wall time, `bench/README.md`), and every
/// kernel here writes each element anyway. Write all `len` elements through the spare capacity
/// (raw pointers or `MaybeUninit`), then [`assume_written`].
fn uninit_output(len: usize) -> Vec<f32> {
    Vec::with_capacity(len)
}

/// The output of [`uninit_output`], once filled.
///
/// # Safety
/// All `len` elements of `out`'s spare capacity have been written.
unsafe fn assume_written(mut out: Vec<f32>, len: usize) -> Vec<f32> {
    debug_assert!(out.is_empty() && out.capacity() >= len);
    out.set_len(len);
    out
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

/// Largest absolute element difference of two tensors of the same shape (the kernels' tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
