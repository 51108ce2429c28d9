//! Linear layers on the CPU: `x · Wᵀ` by the same gemm call as candle's matmul, minus its zero
//! fill, and optionally with a residual added by the gemm itself.
//!
//! Why: candle allocates a matmul's output zero-filled, a memset of the whole output on the
//! engine's thread while the other cores wait. In the llama profile (`bench/README.md`) that
//! serial memset was ~5 % of a pass's wall time. Here the gemm writes every element of an output
//! that was never filled, and `residual + x · Wᵀ` (a decoder layer's two residual adds) is one gemm
//! that reads the residual where the sum is written, instead of a matmul, a fresh tensor and an add.
//!
//! Exactness and batch invariance are those of candle's matmul: the same gemm call with the same
//! sizes and strides, so the same kernels and the same bits. With the residual the gemm computes
//! `1·residual + 1·(x · Wᵀ)`; where it splits the inner dimension into blocks, each block's partial
//! sum is added to the output in turn, so the residual joins the sum before the last blocks instead
//! of after them: a different rounding order, within 1e-5 of the separate add (tested), and the
//! golden and batch-invariance tests hold.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use super::{assume_written, contiguous_f32, uninit_output};

/// `x · Wᵀ`: `x` (tokens, in) and `Wᵀ` (in, out), both contiguous f32 → (tokens, out).
pub struct MatMul;

/// `residual + x · Wᵀ`: `residual` (tokens, out), then [`MatMul`]'s two operands.
pub struct ResidualMatMul;

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "cpu-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let operands = Operands::new(self.name(), x, x_layout, w, w_layout)?;
        let len = operands.tokens * operands.output;
        let mut out = uninit_output(len);
        // SAFETY: `out` has capacity for tokens × out elements, row-major; the gemm writes every
        // one of them (read_dst false) before `assume_written`.
        unsafe {
            operands.gemm(out.as_mut_ptr(), false);
            Ok((CpuStorage::F32(assume_written(out, len)), operands.shape()))
        }
    }
}

impl CustomOp3 for ResidualMatMul {
    fn name(&self) -> &'static str {
        "cpu-residual-matmul"
    }

    fn cpu_fwd(
        &self,
        residual: &CpuStorage,
        residual_layout: &Layout,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let operands = Operands::new(self.name(), x, x_layout, w, w_layout)?;
        let residual = contiguous_f32(residual, residual_layout, self.name())?;
        if residual_layout.shape().dims() != operands.shape().dims() {
            candle_core::bail!(
                "{}: residual {:?} does not match the output {:?}",
                self.name(),
                residual_layout.shape(),
                operands.shape()
            );
        }
        // The residual is copied where the sum goes (in parallel: a serial copy would idle the
        // other cores just as the zero fill did), then the gemm adds x · Wᵀ to it.
        let len = residual.len();
        let mut out = uninit_output(len);
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(COPY_CHUNK)
            .zip(residual.par_chunks(COPY_CHUNK))
            .for_each(|(dst, src)| {
                // SAFETY: `dst` and `src` have the same length (same chunking of equal lengths)
                // and are distinct allocations.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast(), src.len())
                }
            });
        // SAFETY: the copy initialised all `len` elements; the gemm reads and overwrites them.
        unsafe {
            let mut out = assume_written(out, len);
            operands.gemm(out.as_mut_ptr(), true);
            Ok((CpuStorage::F32(out), operands.shape()))
        }
    }
}

/// Elements per parallel copy task (256 KB).
const COPY_CHUNK: usize = 1 << 16;

/// The checked operands of `x · Wᵀ`.
struct Operands<'a> {
    x: &'a [f32],
    w: &'a [f32],
    tokens: usize,
    input: usize,
    output: usize,
}

impl<'a> Operands<'a> {
    fn new(
        op: &str,
        x: &'a CpuStorage,
        x_layout: &Layout,
        w: &'a CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<Self> {
        let (x, w) = (
            contiguous_f32(x, x_layout, op)?,
            contiguous_f32(w, w_layout, op)?,
        );
        let (tokens, input) = x_layout.shape().dims2()?;
        let (w_input, output) = w_layout.shape().dims2()?;
        if w_input != input {
            candle_core::bail!("{op}: x has {input} columns, Wᵀ {w_input} rows");
        }
        Ok(Self {
            x,
            w,
            tokens,
            input,
            output,
        })
    }

    fn shape(&self) -> Shape {
        Shape::from((self.tokens, self.output))
    }

    /// `dst = x · Wᵀ`, or `dst += x · Wᵀ` with `accumulate`: candle's matmul call for 2-D
    /// row-major operands (same kernels, same parallelism).
    ///
    /// # Safety
    /// `dst` must point to tokens × output f32 (initialised when `accumulate`), not aliasing the
    /// operands.
    unsafe fn gemm(&self, dst: *mut f32, accumulate: bool) {
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        gemm::gemm(
            self.tokens,
            self.output,
            self.input,
            dst,
            1,
            self.output as isize,
            accumulate,
            self.x.as_ptr(),
            1,
            self.input as isize,
            self.w.as_ptr(),
            1,
            self.output as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::max_abs_diff;
    use super::*;
    use candle_core::{Device, Tensor};

    /// Sizes that take gemm's edge kernels (rows and columns not multiples of its tiles) and
    /// several K blocks (in = 1 100).
    fn operands(tokens: usize, input: usize, output: usize) -> (Tensor, Tensor) {
        let device = Device::Cpu;
        (
            Tensor::randn(0f32, 1.0, (tokens, input), &device).unwrap(),
            Tensor::randn(0f32, 0.05, (input, output), &device).unwrap(),
        )
    }

    #[test]
    fn matmul_is_candles_matmul_exactly() {
        for (tokens, input, output) in [(1, 7, 5), (37, 64, 96), (130, 1_100, 33)] {
            let (x, w) = operands(tokens, input, output);
            let ours = x.apply_op2_no_bwd(&w, &MatMul).unwrap();
            let candle = x.matmul(&w).unwrap();
            assert_eq!(ours.dims(), candle.dims());
            assert_eq!(
                max_abs_diff(&ours, &candle),
                0.0,
                "{tokens}x{input}x{output}"
            );
        }
    }

    #[test]
    fn residual_matmul_adds_the_residual() {
        for (tokens, input, output) in [(1, 7, 5), (37, 64, 96), (130, 1_100, 33)] {
            let (x, w) = operands(tokens, input, output);
            let residual = Tensor::randn(0f32, 10.0, (tokens, output), &Device::Cpu).unwrap();
            let ours = residual.apply_op3_no_bwd(&x, &w, &ResidualMatMul).unwrap();
            let reference = (&residual + x.matmul(&w).unwrap()).unwrap();
            // One rounding per K block of gemm's where the add used to be: ulps of |residual|.
            assert!(
                max_abs_diff(&ours, &reference) < 1e-5,
                "{tokens}x{input}x{output}"
            );
            // The residual itself is not written.
            assert!(max_abs_diff(&ours, &residual) > 1e-3);
        }
    }

    #[test]
    fn mismatched_operands_are_refused() {
        let (x, w) = operands(4, 8, 6);
        let wrong_w = Tensor::zeros((9, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(x.apply_op2_no_bwd(&wrong_w, &MatMul).is_err());
        let wrong_residual = Tensor::zeros((4, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(wrong_residual
            .apply_op3_no_bwd(&x, &w, &ResidualMatMul)
            .is_err());
        let square = Tensor::randn(0f32, 1.0, (6, 6), &Device::Cpu).unwrap();
        let strided = square.t().unwrap();
        assert!(square.apply_op2_no_bwd(&square, &MatMul).is_ok());
        assert!(strided.apply_op2_no_bwd(&square, &MatMul).is_err());
    }
}
