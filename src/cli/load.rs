//! Model loading shared by every subcommand that runs the model.

use anyhow::Context;

use crate::engine::{Engine, EngineConfig, EngineMetrics};
use crate::model::{self, ModelConfig, ModelFiles, ModelInfo, PairTokenizer};

use super::args::ModelArgs;

/// The architecture family of a model, as service discovery names it: config.json's
/// `model_type` (`llama_bidirec` today).
pub fn model_family(config: &ModelConfig) -> String {
    config.model_type.clone()
}

/// Resolves, loads and warms up the model, returning a ready engine, what it reports (named by
/// --served-model-name) and its [family](model_family).
pub async fn start_engine(
    args: &ModelArgs,
    config: EngineConfig,
    metrics: EngineMetrics,
) -> anyhow::Result<(Engine, ModelInfo, String)> {
    let device = model::parse_device(&args.device)?;
    let dtype = match &args.dtype {
        Some(d) => model::parse_dtype(d)?,
        None => model::default_dtype(&device),
    };
    let max_length = args.max_length;
    anyhow::ensure!(
        (1..=model::MAX_SUPPORTED_LENGTH).contains(&max_length),
        "--max-length {max_length} is out of range (1..={})",
        model::MAX_SUPPORTED_LENGTH
    );
    tracing::info!(model = %args.model, device = %args.device, dtype = model::dtype_name(dtype), "loading model");
    let (encoder, tokenizer, name, family) = if args.random_weights {
        let tokenizer_path = args
            .tokenizer
            .clone()
            .context("--random-weights needs --tokenizer <tokenizer.json>")?;
        let config = ModelConfig::nemotron_rerank_1b_v2();
        let encoder = model::random_model(&config, dtype, &device, max_length)?;
        let tokenizer = PairTokenizer::from_file(&tokenizer_path, max_length)?;
        let name = args
            .served_model_name
            .clone()
            .unwrap_or_else(|| "random-weights-1b".to_string());
        (encoder, tokenizer, name, model_family(&config))
    } else {
        let files = ModelFiles::resolve(&args.model, &args.revision).await?;
        let config = ModelConfig::from_file(&files.config)?;
        let family = model_family(&config);
        let tokenizer_path = args.tokenizer.clone().unwrap_or(files.tokenizer.clone());
        let tokenizer = PairTokenizer::from_file(&tokenizer_path, max_length)?;
        let encoder = tokio::task::spawn_blocking(move || {
            files.load_model(&config, dtype, &device, max_length)
        })
        .await??;
        (encoder, tokenizer, args.served_id().to_string(), family)
    };
    let info = ModelInfo {
        name,
        device: model::device_name(encoder.device()),
        dtype: model::dtype_name(dtype).to_string(),
        max_length,
    };
    tracing::info!(warmup_tokens = config.warmup_tokens, "warming up");
    let engine = Engine::start(encoder, tokenizer, config, metrics).await?;
    tracing::info!(model = %info.name, %family, device = %info.device, "model ready");
    Ok((engine, info, family))
}
