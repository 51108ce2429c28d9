//! A batch of token sequences packed into one `(total_tokens, …)` tensor, without padding.
//!
//! The forward pass runs every token-wise layer on the packed rows; this type carries what the
//! few sequence-aware steps need: where each sequence starts, its length, and each token's position
//! within its own sequence (RoPE).

use candle_core::{Device, Tensor};

#[derive(Debug)]
pub struct PackedBatch {
    /// (total_tokens,) u32: every sequence's ids, one after another.
    pub input_ids: Tensor,
    /// (total_tokens,) u32: each token's position inside its sequence, `0..len` per sequence.
    pub positions: Tensor,
    lengths: Vec<usize>,
    /// `(first row, length)` of each sequence.
    segments: Vec<(usize, usize)>,
}

impl PackedBatch {
    /// Packs `sequences` (each non-empty; the caller validates) onto `device`.
    pub fn new(sequences: &[&[u32]], device: &Device) -> candle_core::Result<Self> {
        let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        if lengths.is_empty() || lengths.contains(&0) {
            candle_core::bail!("a packed batch needs at least one sequence, each of one token");
        }
        let total: usize = lengths.iter().sum();
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut offsets = Vec::with_capacity(lengths.len());
        for seq in sequences {
            offsets.push(ids.len());
            ids.extend_from_slice(seq);
            positions.extend(0..seq.len() as u32);
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, total, device)?,
            positions: Tensor::from_vec(positions, total, device)?,
            segments: offsets.into_iter().zip(lengths.iter().copied()).collect(),
            lengths,
        })
    }

    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// `(first row, length)` of each sequence, in order.
    pub fn segments(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.segments.iter().copied()
    }

    /// The same as [`Self::segments`], as a slice.
    pub fn segment_list(&self) -> &[(usize, usize)] {
        &self.segments
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_without_padding_with_per_sequence_positions() {
        let batch = PackedBatch::new(&[&[7, 8, 9], &[5], &[1, 2]], &Device::Cpu).unwrap();
        assert_eq!(
            batch.input_ids.to_vec1::<u32>().unwrap(),
            vec![7, 8, 9, 5, 1, 2]
        );
        assert_eq!(
            batch.positions.to_vec1::<u32>().unwrap(),
            vec![0, 1, 2, 0, 0, 1]
        );
        assert_eq!(
            batch.segments().collect::<Vec<_>>(),
            vec![(0, 3), (3, 1), (4, 2)]
        );
    }

    #[test]
    fn refuses_empty_batches_and_sequences() {
        assert!(PackedBatch::new(&[], &Device::Cpu).is_err());
        assert!(PackedBatch::new(&[&[1], &[]], &Device::Cpu).is_err());
    }
}
