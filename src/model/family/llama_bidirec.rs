//! The default family, `llama_bidirec` (`nvidia/llama-nemotron-rerank-1b-v2`): the seams over our
//! own packed forward ([`CrossEncoder`], `cross_encoder.rs`) and prompt-template tokenizer
//! ([`PairTokenizer`], `tokenizer.rs`), unchanged. One segment per sequence: token types do not
//! exist in this model.

use candle_core::Device;

use super::{Family, PairEncoder, Reranker, SequenceRef};
use crate::model::{
    CrossEncoder, EncodePairsError, EncodedPair, PairTokenizer, TokenizeWork, Truncation,
};

impl Reranker for CrossEncoder {
    fn score_sequences(&self, sequences: &[SequenceRef<'_>]) -> candle_core::Result<Vec<f32>> {
        let ids: Vec<&[u32]> = sequences.iter().map(|s| s.ids).collect();
        self.score_batch(&ids)
    }
    fn max_positions(&self) -> usize {
        CrossEncoder::max_positions(self)
    }
    fn device(&self) -> &Device {
        CrossEncoder::device(self)
    }
    fn family(&self) -> Family {
        Family::LlamaBidirec
    }
}

impl PairEncoder for PairTokenizer {
    fn encode_pairs_counting(
        &self,
        query: &str,
        documents: &[&str],
        truncation: Truncation,
        work: &mut TokenizeWork,
    ) -> Result<Vec<EncodedPair>, EncodePairsError> {
        self.encode_counting(query, documents, truncation, work)
    }
    fn max_length(&self) -> usize {
        PairTokenizer::max_length(self)
    }
}
