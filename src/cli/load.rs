//! Model loading shared by every subcommand that runs the model.

use anyhow::Context;

use crate::engine::{Engine, EngineConfig, EngineMetrics};
use crate::model::{
    self, family, ModelConfig, ModelFiles, ModelInfo, PairEncoder, PairTokenizer, Reranker,
};

use super::args::ModelArgs;

/// Resolves, loads and warms up the model, returning a ready engine.
pub async fn start_engine(
    args: &ModelArgs,
    config: EngineConfig,
    metrics: EngineMetrics,
) -> anyhow::Result<(Engine, ModelInfo)> {
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
    let (encoder, tokenizer, name): (Box<dyn Reranker>, Box<dyn PairEncoder>, String) =
        if args.random_weights {
            let tokenizer_path = args
                .tokenizer
                .clone()
                .context("--random-weights needs --tokenizer <tokenizer.json>")?;
            let config = ModelConfig::nemotron_rerank_1b_v2();
            let encoder = model::random_model(&config, dtype, &device, max_length)?;
            let tokenizer = PairTokenizer::from_file(&tokenizer_path, max_length)?;
            (
                Box::new(encoder),
                Box::new(tokenizer),
                "random-weights-1b".to_string(),
            )
        } else {
            let files = ModelFiles::resolve(&args.model, &args.revision).await?;
            let tokenizer_path = args.tokenizer.clone();
            let loaded = tokio::task::spawn_blocking(move || {
                family::load(
                    &files,
                    tokenizer_path.as_deref(),
                    dtype,
                    &device,
                    max_length,
                )
            })
            .await??;
            tracing::info!(family = loaded.family.name(), "model family");
            (loaded.reranker, loaded.encoder, args.model.clone())
        };
    let info = ModelInfo {
        name,
        device: model::device_name(encoder.device()),
        dtype: model::dtype_name(dtype).to_string(),
        max_length,
    };
    tracing::info!(warmup_tokens = config.warmup_tokens, "warming up");
    let engine = Engine::start(encoder, tokenizer, config, metrics).await?;
    tracing::info!(model = %info.name, device = %info.device, "model ready");
    Ok((engine, info))
}
