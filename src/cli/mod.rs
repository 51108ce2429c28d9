//! The `rerank` command line: clap types and one module per subcommand.

pub mod args;
pub mod bench;
pub mod download;
pub mod load;
pub mod loadgen;
pub mod queue;
pub mod score;
pub mod serve;
pub mod sidecar;
pub mod worker;

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
    /// Serve reranking requests from NATS on a GPU (or CPU) worker.
    Worker(worker::WorkerArgs),
    /// Download the model into the Hugging Face cache and exit.
    Download(download::DownloadArgs),
    /// Hold a steady load on a running pool through the real client and report failures,
    /// latency and worker memory (long chaos drills).
    Loadgen(loadgen::LoadgenArgs),
    /// Measure throughput and latency of the engine, or of a worker pool over NATS.
    Bench(bench::BenchArgs),
    /// Serve the HTTP API (/rerank, /v1/rerank, /v1/ranking, /health...) in front of the pool.
    Sidecar(sidecar::SidecarArgs),
    /// A worker and the sidecar in one process (starts a local nats-server when none is up).
    Serve(serve::ServeArgs),
    /// Create a model's JetStream job queue (stream and durable consumer) and exit, so its pool
    /// can start at zero workers.
    Queue(queue::QueueArgs),
}

impl Cli {
    /// Whether the subcommand may load and run a model in this process (and so wants the host
    /// memory policy of [`crate::engine::reuse_freed_pass_buffers`]).
    pub fn runs_model(&self) -> bool {
        matches!(
            self.command,
            Command::Score(_) | Command::Worker(_) | Command::Bench(_) | Command::Serve(_)
        )
    }

    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Score(args) => score::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Loadgen(args) => {
                let _guard = crate::telemetry::init(
                    "rerank-loadgen",
                    crate::telemetry::LogFormat::Text,
                    false,
                )?;
                loadgen::run(args).await
            }
            Command::Queue(args) => {
                let _guard = crate::telemetry::init(
                    "rerank-queue",
                    crate::telemetry::LogFormat::Text,
                    false,
                )?;
                queue::run(args).await
            }
            Command::Download(args) => {
                let _guard = crate::telemetry::init(
                    "rerank-download",
                    crate::telemetry::LogFormat::Text,
                    false,
                )?;
                download::run(args).await
            }
            Command::Worker(args) => {
                let _guard = crate::telemetry::init(
                    "rerank-worker",
                    args.log.log_format,
                    args.worker.log_text,
                )?;
                worker::run(args).await
            }
            Command::Sidecar(args) => {
                let _guard = crate::telemetry::init("rerank-sidecar", args.log.log_format, false)?;
                sidecar::run(args).await
            }
            Command::Serve(args) => {
                let _guard =
                    crate::telemetry::init("rerank", args.log.log_format, args.worker.log_text)?;
                serve::run(args).await
            }
        }
    }
}
