//! `rerank queue`: create a model's JetStream job queue (the job stream and the model's durable
//! consumer, as its workers would) and exit. A pool that has never run a worker has no consumer,
//! so the sidecar would refuse its model (a job nobody takes would wait for its TTL unanswered);
//! running this first (the Helm chart does, in a hook Job per pool) lets a new pool start at zero
//! workers and scale up on its first jobs.

use clap::Args;
use serde_json::json;

use super::args::{JobQueueArgs, NatsArgs};

#[derive(Debug, Args)]
pub struct QueueArgs {
    /// The model's id as its workers serve it (their --served-model-name, else their --model).
    #[arg(long, env = "RERANK_QUEUE_MODEL")]
    pub model: String,
    /// Whether it is the pool's default model (its consumer then also takes the jobs that name
    /// no model), as its workers' --default-model.
    #[arg(long, env = "RERANK_DEFAULT_MODEL", default_value_t = true, action = clap::ArgAction::Set)]
    pub default_model: bool,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub queue: JobQueueArgs,
}

/// Prints `{"stream", "consumer", "subjects"}`: what the model's jobs are taken by.
pub async fn run(args: QueueArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.model.is_empty(), "--model must name the model");
    let consumer = args.queue.to_consumer()?;
    let jobs = args.queue.jobs.to_stream();
    let client = args.nats.to_config("rerank-queue").connect().await?;
    let js = async_nats::jetstream::new(client.clone());
    let stream = jobs.ensure(&js, &args.nats.subject).await?;
    let (_, taken) = consumer
        .ensure(&stream, &jobs, &args.model, args.default_model)
        .await?;
    tracing::info!(stream = %jobs.name, consumer = %taken.name, subjects = ?taken.filters, model = %args.model, "job queue ready");
    println!(
        "{}",
        json!({"stream": jobs.name, "consumer": taken.name, "subjects": taken.filters})
    );
    client.flush().await?;
    Ok(())
}
