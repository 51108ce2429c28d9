//! `rerank score`: one request from stdin, one JSON answer on stdout.

use std::io::Read;

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::engine::{EngineConfig, EngineMetrics, ScoreRequest};
use crate::model::DEFAULT_MAX_CHUNKS_PER_DOC;
use crate::wire;

use super::args::{ModelArgs, TruncateArg};
use super::load::start_engine;

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// END cuts long pairs from the right; NONE fails naming the document; CHUNK scores up to 10
    /// overlapping windows of a long document and keeps the best.
    #[arg(long, value_enum, default_value_t = TruncateArg::End)]
    pub truncate: TruncateArg,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    query: String,
    documents: Vec<String>,
}

#[derive(Serialize)]
struct Output {
    scores: Vec<f32>,
    ranked_indices: Vec<u32>,
}

pub async fn run(args: ScoreArgs) -> anyhow::Result<()> {
    let mut raw = Vec::new();
    std::io::stdin()
        .read_to_end(&mut raw)
        .context("cannot read stdin")?;
    let text = String::from_utf8(raw).context("stdin is not valid UTF-8")?;
    let expected =
        "stdin must be one JSON object {\"query\": string, \"documents\": [string, ...]}";
    let value: serde_json::Value = serde_json::from_str(&text).context(expected)?;
    // serde would also accept `["q", ["d"]]` for a struct; the contract is an object.
    anyhow::ensure!(value.is_object(), "{expected}");
    let input: Input = serde_json::from_value(value).context(expected)?;
    // Room for every window of every document under CHUNK.
    let pairs = input.documents.len().max(1) * DEFAULT_MAX_CHUNKS_PER_DOC;
    let config = EngineConfig {
        max_documents: pairs,
        max_queue_pairs: pairs,
        warmup_tokens: 0,
        ..EngineConfig::default()
    };
    let (engine, _, _) = start_engine(&args.model, config, EngineMetrics::detached()).await?;
    let response = engine
        .score(ScoreRequest {
            query: input.query,
            documents: input.documents,
            truncation: args.truncate.into(),
            deadline: None,
        })
        .await?;
    engine.shutdown().await;
    let output = Output {
        ranked_indices: wire::rank(&response.scores, None),
        scores: response.scores,
    };
    println!("{}", serde_json::to_string(&output)?);
    Ok(())
}
