//! Model loading shared by every subcommand that runs the model.

use anyhow::Context;

use crate::engine::{Engine, EngineConfig, EngineMetrics};
use crate::model::{
    self, family, family::Family, ModelConfig, ModelFiles, ModelInfo, PairEncoder, PairTokenizer,
    Reranker,
};

use super::args::ModelArgs;

/// Resolves, loads and warms up the model, returning a ready engine, what it reports (named by
/// --served-model-name) and its family's name (as service discovery reports it).
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
    let (encoder, tokenizer, name, family): (
        Box<dyn Reranker>,
        Box<dyn PairEncoder>,
        String,
        Family,
    ) = if args.random_weights {
        let tokenizer_path = args
            .tokenizer
            .clone()
            .context("--random-weights needs --tokenizer <tokenizer.json>")?;
        anyhow::ensure!(
            args.instruction.is_none(),
            "--instruction applies to qwen3 models, not to the --random-weights llama_bidirec model"
        );
        let config = ModelConfig::nemotron_rerank_1b_v2();
        let encoder = model::random_model(&config, dtype, &device, max_length)?;
        let tokenizer = PairTokenizer::from_file(&tokenizer_path, max_length)?;
        let name = args
            .served_model_name
            .clone()
            .unwrap_or_else(|| "random-weights-1b".to_string());
        (
            Box::new(encoder),
            Box::new(tokenizer),
            name,
            Family::LlamaBidirec,
        )
    } else {
        let files = ModelFiles::resolve(&args.model, &args.revision).await?;
        let tokenizer_path = args.tokenizer.clone();
        let options = family::LoadOptions {
            instruction: args.instruction.clone(),
        };
        let loaded = tokio::task::spawn_blocking(move || {
            family::load_with(
                &files,
                tokenizer_path.as_deref(),
                dtype,
                &device,
                max_length,
                &options,
            )
        })
        .await??;
        (
            loaded.reranker,
            loaded.encoder,
            args.served_id().to_string(),
            loaded.family,
        )
    };
    let family = family.name().to_string();
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
