//! Rotary position embeddings with Llama-3 frequency scaling.
//!
//! Mirrors transformers 4.47.1 `modeling_rope_utils._compute_default_rope_parameters` and
//! `_compute_llama3_parameters`: the inverse frequencies are computed in f32, long wavelengths are
//! divided by `factor`, and the band between the two wavelength thresholds is interpolated smoothly.

use candle_core::{DType, Device, Tensor};

use super::config::Llama3RopeScaling;
use super::cpu_kernels::RotaryRows;

/// Per-pair inverse frequencies, `head_dim / 2` of them.
pub fn inverse_frequencies(
    head_dim: usize,
    theta: f64,
    scaling: Option<Llama3RopeScaling>,
) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / (theta as f32).powf(i as f32 / head_dim as f32))
        .collect();
    let Some(s) = scaling else {
        return base;
    };
    let old_context = s.original_max_position_embeddings as f32;
    let low_freq_wavelen = old_context / s.low_freq_factor as f32;
    let high_freq_wavelen = old_context / s.high_freq_factor as f32;
    base.into_iter()
        .map(|inv_freq| {
            let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
            if wavelen < high_freq_wavelen {
                inv_freq
            } else if wavelen > low_freq_wavelen {
                inv_freq / s.factor as f32
            } else {
                let smooth = (old_context / wavelen - s.low_freq_factor as f32)
                    / (s.high_freq_factor - s.low_freq_factor) as f32;
                (1.0 - smooth) * inv_freq / s.factor as f32 + smooth * inv_freq
            }
        })
        .collect()
}

/// cos/sin tables for positions `0..max_positions`, shape `(max_positions, head_dim / 2)`.
///
/// Built in f32 (as transformers does) and cast once to the compute dtype.
#[derive(Debug, Clone)]
pub struct RotaryTables {
    pub cos: Tensor,
    pub sin: Tensor,
    /// The same tables in f32 on the host, for the fused CPU attention.
    pub rows: RotaryRows,
}

impl RotaryTables {
    pub fn new(
        inv_freqs: &[f32],
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let half = inv_freqs.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for position in 0..max_positions {
            for &f in inv_freqs {
                let angle = position as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let rows = RotaryRows { cos, sin, half };
        let cos = Tensor::from_slice(&rows.cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_slice(&rows.sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin, rows })
    }

    /// Rows of the tables for each token's position: `positions` (tokens,) u32 ->
    /// cos, sin of shape (tokens, head_dim / 2).
    pub fn at(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims().first().copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_matches_transformers_bands() {
        let s = Llama3RopeScaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = inverse_frequencies(64, 500_000.0, None);
        let scaled = inverse_frequencies(64, 500_000.0, Some(s));
        assert_eq!(plain.len(), 32);
        // High frequencies (short wavelengths) are untouched.
        assert_eq!(plain[0], scaled[0]);
        assert_eq!(plain[5], scaled[5]);
        // The lowest frequency has a wavelength far beyond 8192: divided by the factor.
        assert!((scaled[31] - plain[31] / 32.0).abs() < 1e-12);
        // Somewhere in between the frequency is interpolated, strictly between both ends.
        let mid = (0..32)
            .find(|&i| scaled[i] != plain[i] && (scaled[i] - plain[i] / 32.0).abs() > 1e-12)
            .expect("a smoothed band exists");
        assert!(scaled[mid] < plain[mid] && scaled[mid] > plain[mid] / 32.0);
    }

    #[test]
    fn tables_start_at_identity() {
        let t = RotaryTables::new(&[1.0, 0.5], 4, DType::F32, &Device::Cpu).unwrap();
        let cos = t.cos.to_vec2::<f32>().unwrap();
        assert_eq!(cos[0], vec![1.0, 1.0]);
        assert!((cos[2][0] - 2f32.cos()).abs() < 1e-7);
        let positions = Tensor::new(&[2u32, 0, 3], &Device::Cpu).unwrap();
        let (at_cos, at_sin) = t.at(&positions).unwrap();
        let at_cos = at_cos.to_vec2::<f32>().unwrap();
        assert_eq!(at_cos, vec![cos[2].clone(), cos[0].clone(), cos[3].clone()]);
        assert_eq!(at_sin.dims(), &[3, 2]);
    }
}
