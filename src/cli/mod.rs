//! The `rerank` command line: clap types and one module per subcommand.

pub mod args;
pub mod load;
pub mod score;

use clap::{Parser, Subcommand};

/// Cross-encoder reranking (llama-nemotron-rerank-1b-v2) over NATS, with an HTTP sidecar.
#[derive(Debug, Parser)]
#[command(name = "rerank", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Score one request read from stdin as JSON and print the scores.
    Score(score::ScoreArgs),
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Score(args) => score::run(args).await,
        }
    }
}
