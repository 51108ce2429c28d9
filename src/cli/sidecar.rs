//! `rerank sidecar`: the HTTP API in front of the worker pool.

use clap::Args;

use super::args::{HttpArgs, HttpTimeoutArgs, IntakeKind, JobStreamArgs, LogArgs, NatsArgs};

#[derive(Debug, Args)]
pub struct SidecarArgs {
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub http_timeouts: HttpTimeoutArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// `core`: request-reply on --subject (fails at once with no worker); `jetstream`: publish
    /// durable jobs to --stream and wait for the reply (requests wait while the pool is at zero).
    #[arg(long, env = "RERANK_TRANSPORT", value_enum, default_value_t = IntakeKind::Core)]
    pub transport: IntakeKind,
    #[command(flatten)]
    pub jobs: JobStreamArgs,
}

pub async fn run(args: SidecarArgs) -> anyhow::Result<()> {
    let mut config = args.http.to_config(&args.nats, &args.http_timeouts)?;
    if args.transport == IntakeKind::Jetstream {
        config.jetstream = Some(args.jobs.to_stream());
    }
    tracing::info!(config = ?config, "starting sidecar");
    crate::sidecar::run(config, crate::shutdown::signal()).await?;
    Ok(())
}
