//! `rerank download`: fetch the model into the Hugging Face cache and exit (for an init container
//! or a pre-download Job, so workers can start with `HF_HUB_OFFLINE=1`).

use clap::Args;

use crate::model::{Family, ModelConfig, ModelFiles, DEFAULT_MODEL_ID};

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Hub repo id (or a local directory, which is only checked).
    #[arg(long, env = "RERANK_MODEL", default_value = DEFAULT_MODEL_ID)]
    pub model: String,
    #[arg(long, env = "RERANK_MODEL_REVISION", default_value = "main")]
    pub revision: String,
}

pub async fn run(args: DownloadArgs) -> anyhow::Result<()> {
    let files = ModelFiles::resolve(&args.model, &args.revision).await?;
    // Parse the config now so a wrong revision fails the Job, not the worker.
    if Family::detect(&files.config)? == Family::LlamaBidirec {
        ModelConfig::from_file(&files.config)?;
    }
    tracing::info!(config = %files.config.display(), shards = files.weights.len(), "model files present");
    println!(
        "{}",
        files
            .config
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}
