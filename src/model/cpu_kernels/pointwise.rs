//! Element-wise steps fused over whole rows, in parallel: SwiGLU for the decoders; for the
//! BERT-style encoders a linear layer's bias with its activation, or with the residual add and the
//! post-LayerNorm, written in place into the matmul's output.

use candle_core::{CpuStorage, CustomOp1, InplaceOp1, InplaceOp2, Layout, Shape};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::{assume_written, contiguous_f32, exp, uninit_output, LANES};
use crate::model::bert_encoder::Activation;

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
        let len = tokens * inner;
        let mut out = uninit_output(len);
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(inner)
            .zip(input.par_chunks(width))
            .for_each(|(dst, src)| {
                let (gate, up) = src.split_at(inner);
                swiglu(gate, up, dst);
            });
        // SAFETY: the rows tile the output and swiglu writes every element of its row.
        let out = unsafe { assume_written(out, len) };
        Ok((CpuStorage::F32(out), Shape::from((tokens, inner))))
    }
}

#[inline(always)]
fn swiglu_row(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        o.write(g / (1.0 + exp(-g)) * u);
    }
}

/// `activation(x + bias)` in place over `(tokens, width)`, with `bias` of `width` values: the
/// intermediate layer of a BERT-style encoder.
pub struct BiasActivation<'a> {
    pub bias: &'a [f32],
    pub activation: Activation,
}

impl InplaceOp1 for BiasActivation<'_> {
    fn name(&self) -> &'static str {
        "bias-activation"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let width = self.bias.len();
        let data = rows_mut(storage, layout, width, self.name())?;
        let bias = self.bias;
        match self.activation {
            Activation::GeluErf => data
                .par_chunks_mut(width)
                .for_each(|row| bias_gelu_erf(row, bias)),
            Activation::GeluTanh => data
                .par_chunks_mut(width)
                .for_each(|row| bias_gelu_tanh(row, bias)),
            Activation::Relu => data.par_chunks_mut(width).for_each(|row| {
                for (x, b) in row.iter_mut().zip(bias) {
                    *x = (*x + b).max(0.0);
                }
            }),
        }
        Ok(())
    }
}

/// `LayerNorm(x + bias + residual)` in place over `(tokens, width)`: the end of a BERT-style
/// attention or feed-forward block (dense, dropout (a no-op here), residual add, `LayerNorm`).
/// Mean and variance are computed in two passes over the row, as transformers' f32 LayerNorm.
pub struct ResidualLayerNorm<'a> {
    pub bias: &'a [f32],
    pub weight: &'a [f32],
    pub beta: &'a [f32],
    pub eps: f32,
}

impl InplaceOp2 for ResidualLayerNorm<'_> {
    fn name(&self) -> &'static str {
        "residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> candle_core::Result<()> {
        let width = self.bias.len();
        if self.weight.len() != width || self.beta.len() != width {
            candle_core::bail!("{}: parameters of different widths", self.name());
        }
        if residual_layout.shape() != dst_layout.shape() {
            candle_core::bail!(
                "{}: residual {:?} for output {:?}",
                self.name(),
                residual_layout.shape(),
                dst_layout.shape()
            );
        }
        let residual = contiguous_f32(residual, residual_layout, self.name())?;
        let data = rows_mut(dst, dst_layout, width, self.name())?;
        data.par_chunks_mut(width)
            .zip(residual.par_chunks(width))
            .for_each(|(row, residual)| {
                residual_layer_norm(row, residual, self.bias, self.weight, self.beta, self.eps)
            });
        Ok(())
    }
}

/// The op's data as `(rows, width)` f32, contiguous.
fn rows_mut<'s>(
    storage: &'s mut CpuStorage,
    layout: &Layout,
    width: usize,
    op: &str,
) -> candle_core::Result<&'s mut [f32]> {
    let (_, columns) = layout.shape().dims2()?;
    if columns != width {
        candle_core::bail!("{op}: rows of {columns} values for parameters of {width}");
    }
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only");
    };
    match layout.contiguous_offsets() {
        Some((from, to)) => Ok(&mut data[from..to]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

#[inline(always)]
fn bias_gelu_erf_row(row: &mut [f32], bias: &[f32]) {
    for (x, b) in row.iter_mut().zip(bias) {
        let v = *x + b;
        *x = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// transformers' `gelu_new` / `gelu_pytorch_tanh`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`,
/// with `tanh(u) = 1 − 2 / (e^{2u} + 1)`.
#[inline(always)]
fn bias_gelu_tanh_row(row: &mut [f32], bias: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (x, b) in row.iter_mut().zip(bias) {
        let v = *x + b;
        let u = SQRT_2_OVER_PI * (v + 0.044_715 * v * v * v);
        let tanh = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
        *x = 0.5 * v * (1.0 + tanh);
    }
}

#[inline(always)]
fn residual_layer_norm_row(
    row: &mut [f32],
    residual: &[f32],
    bias: &[f32],
    weight: &[f32],
    beta: &[f32],
    eps: f32,
) {
    for ((x, r), b) in row.iter_mut().zip(residual).zip(bias) {
        *x += b + r;
    }
    let mean = lane_sum(row, |x| x) / row.len() as f32;
    let variance = lane_sum(row, |x| (x - mean) * (x - mean)) / row.len() as f32;
    let inv_std = 1.0 / (variance + eps).sqrt();
    for ((x, w), b) in row.iter_mut().zip(weight).zip(beta) {
        *x = (*x - mean) * inv_std * w + b;
    }
}

/// `Σ f(x)` over the row in [`LANES`] independent sums, so it vectorizes.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (sum, &x) in sums.iter_mut().zip(chunk) {
            *sum += f(x);
        }
    }
    chunks.remainder().iter().map(|&x| f(x)).sum::<f32>() + sums.iter().sum::<f32>()
}

dispatch_simd! {
    fn swiglu(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) => swiglu_row;
    fn bias_gelu_erf(row: &mut [f32], bias: &[f32]) => bias_gelu_erf_row;
    fn bias_gelu_tanh(row: &mut [f32], bias: &[f32]) => bias_gelu_tanh_row;
    fn residual_layer_norm(
        row: &mut [f32],
        residual: &[f32],
        bias: &[f32],
        weight: &[f32],
        beta: &[f32],
        eps: f32
    ) => residual_layer_norm_row;
}

/// erf in f32 as a rational function that vectorizes (no libm call): `x·P(x²)/Q(x²)` on
/// [−4, 4], ±1 outside, where f32 cannot tell erf from ±1. The coefficients are the minimax fit
/// Eigen's `generic_fast_erf_float` uses; absolute error < 1e-6 against candle's `erf` (tested).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10;
    let p = p * x2 + 2.770_681_4e-8;
    let p = p * x2 - 2.101_024e-6;
    let p = p * x2 - 5.692_506_4e-5;
    let p = p * x2 - 7.349_906_3e-4;
    let p = p * x2 - 2.954_6e-3;
    let p = p * x2 - 1.609_603_3e-2;
    let q = -1.456_607_2e-5;
    let q = q * x2 - 2.133_740_6e-4;
    let q = q * x2 - 1.682_827e-3;
    let q = q * x2 - 7.373_329e-3;
    let q = q * x2 - 1.426_474e-2;
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::super::max_abs_diff;
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn swiglu_is_silu_of_gate_times_up() {
        let device = Device::Cpu;
        let gate_up = Tensor::randn(0f32, 3.0, (7, 2 * 33), &device).unwrap();
        let fused = gate_up.apply_op1_no_bwd(&SwiGlu).unwrap();
        let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, 33).unwrap()).unwrap();
        let reference = (gate * gate_up.narrow(1, 33, 33).unwrap()).unwrap();
        assert!(max_abs_diff(&fused, &reference) < 1e-5);
        let odd = Tensor::zeros((3, 15), candle_core::DType::F32, &device).unwrap();
        assert!(odd.apply_op1_no_bwd(&SwiGlu).is_err());
    }

    #[test]
    fn erf_is_within_1e_6_of_candle() {
        let xs: Vec<f32> = (-60_000..=60_000).map(|i| i as f32 / 10_000.0).collect();
        let reference = Tensor::new(xs.as_slice(), &Device::Cpu)
            .unwrap()
            .erf()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let worst = xs
            .iter()
            .zip(&reference)
            .map(|(&x, &r)| (erf(x) - r).abs())
            .fold(0f32, f32::max);
        // ~4 ulp of 1.0, where erf's own f32 rounding steps are 6e-8 and 1.2e-7.
        assert!(worst < 1e-6, "absolute error {worst}");
    }

    /// The fused bias + activation against candle's ops.
    #[test]
    fn bias_activation_matches_candle() {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 3.0, (9, 40), &device).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 40, &device).unwrap();
        let bias_values = bias.to_vec1::<f32>().unwrap();
        let biased = xs.broadcast_add(&bias).unwrap();
        for (activation, reference) in [
            (Activation::GeluErf, biased.gelu_erf().unwrap()),
            (Activation::GeluTanh, biased.gelu().unwrap()),
            (Activation::Relu, biased.relu().unwrap()),
        ] {
            let fused = xs.copy().unwrap();
            fused
                .inplace_op1(&BiasActivation {
                    bias: &bias_values,
                    activation,
                })
                .unwrap();
            let worst = max_abs_diff(&fused, &reference);
            assert!(worst < 1e-5, "{activation:?}: {worst}");
        }
        let wrong = BiasActivation {
            bias: &bias_values[1..],
            activation: Activation::Relu,
        };
        assert!(xs.copy().unwrap().inplace_op1(&wrong).is_err());
    }

    /// The fused residual + LayerNorm against candle-nn's `layer_norm` of the sum.
    #[test]
    fn residual_layer_norm_matches_candle() {
        let device = Device::Cpu;
        let randn =
            |shape: (usize, usize), std: f32| Tensor::randn(0f32, std, shape, &device).unwrap();
        let (xs, residual) = (randn((11, 37), 2.0), randn((11, 37), 1.0));
        let [bias, weight, beta] =
            [0.5f32, 1.0, 0.3].map(|std| Tensor::randn(0f32, std, 37, &device).unwrap());
        let values = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        let (bias_v, weight_v, beta_v) = (values(&bias), values(&weight), values(&beta));
        let reference = candle_nn::ops::layer_norm(
            &(xs.broadcast_add(&bias).unwrap() + &residual).unwrap(),
            &weight,
            &beta,
            1e-12,
        )
        .unwrap();
        let fused = xs.copy().unwrap();
        let op = ResidualLayerNorm {
            bias: &bias_v,
            weight: &weight_v,
            beta: &beta_v,
            eps: 1e-12,
        };
        fused.inplace_op2(&residual, &op).unwrap();
        let worst = max_abs_diff(&fused, &reference);
        assert!(worst < 1e-5, "{worst}");
        // A residual of another shape is refused.
        assert!(fused.inplace_op2(&randn((10, 37), 1.0), &op).is_err());
    }
}
