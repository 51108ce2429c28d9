//! `rerank sidecar`: the HTTP API in front of the worker pool.

use clap::Args;

use super::args::{HttpArgs, HttpTimeoutArgs, LogArgs, NatsArgs};

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
}

pub async fn run(args: SidecarArgs) -> anyhow::Result<()> {
    let config = args.http.to_config(&args.nats, &args.http_timeouts)?;
    tracing::info!(config = ?config, "starting sidecar");
    crate::sidecar::run(config, crate::shutdown::signal()).await?;
    Ok(())
}
