//! Errors of the model layer: loading files, parsing config.json, tokenizing, running candle.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running the cross-encoder.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model directory {0} does not exist (pass a local directory in Hugging Face layout or a Hub repo id like `org/name`)")]
    NotFound(PathBuf),
    #[error("{path} is missing from the model ({context})")]
    MissingFile {
        path: PathBuf,
        context: &'static str,
    },
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config.json at {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unsupported {field} `{value}` in config.json (supported: {supported})")]
    Unsupported {
        field: &'static str,
        value: String,
        supported: &'static str,
    },
    #[error("unsupported model: model_type `{model_type}`, architectures {architectures} (supported: {supported})")]
    UnsupportedFamily {
        model_type: String,
        architectures: String,
        supported: &'static str,
    },
    #[error("an instruction applies only to instruction-following models (qwen3), not to a {family} model")]
    InstructionUnsupported { family: &'static str },
    #[error("cannot load weights from {files}")]
    Weights {
        files: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("cannot load tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("cannot fetch `{repo}` (revision {revision}) from the Hugging Face Hub: {message}")]
    Hub {
        repo: String,
        revision: String,
        message: String,
    },
    #[error("max_length {value} is out of range (1..={max})")]
    MaxLength { value: usize, max: usize },
    #[error("device error: {0}")]
    Device(String),
    #[error("unsupported dtype `{0}` (supported: f32, bf16, f16)")]
    Dtype(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
