//! `XLMRobertaForSequenceClassification` (BAAI/bge-reranker-v2-m3, bge-reranker-base/large): the
//! BERT-style reranker of [`super::bert`] with RoBERTa's tensor names (`roberta.*`, head
//! `classifier.dense` → `classifier.out_proj`), every token type 0 (transformers' XLM-RoBERTa
//! tokenizers return none), and positions counted from `padding_idx + 1` as transformers'
//! `create_position_ids_from_input_ids` does for unpadded tokens.

use candle_core::{DType, Device};

use super::bert::{BertStyleReranker, Checkpoint};
use super::{read_config, Family};
use crate::model::bert_encoder::EncoderConfig;
use crate::model::{ModelError, ModelFiles};

const XLM_ROBERTA: Checkpoint = Checkpoint {
    family: Family::XlmRoberta,
    encoder: "roberta",
    head: ("classifier.dense", "classifier.out_proj"),
    token_types: false,
};

/// transformers' `XLMRobertaConfig` default `pad_token_id`.
const DEFAULT_PAD_TOKEN_ID: usize = 1;

/// Loads the checkpoint in `files` for sequences of at most `max_length` tokens.
pub fn load(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
    max_length: usize,
) -> Result<BertStyleReranker, ModelError> {
    let (config, _) = read_config::<EncoderConfig>(&files.config)?;
    let first_position = config.pad_token_id.unwrap_or(DEFAULT_PAD_TOKEN_ID) + 1;
    BertStyleReranker::load(
        files,
        &config,
        XLM_ROBERTA,
        first_position,
        dtype,
        device,
        max_length,
    )
}
