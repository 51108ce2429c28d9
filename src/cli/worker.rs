//! `rerank worker`: load the model, subscribe to NATS, serve until SIGTERM, drain.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::engine::EngineMetrics;
use crate::probe::{self, ProbeState};
use crate::worker::{self, WorkerConfig, WorkerMetrics};

use super::args::{EngineArgs, LogArgs, ModelArgs, NatsArgs};
use super::load::start_engine;

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// Queue group shared by the pool: each request goes to one member.
    #[arg(long, env = "RERANK_QUEUE_GROUP", default_value = crate::wire::DEFAULT_QUEUE_GROUP)]
    pub queue_group: String,
    /// Address of the probe listener (`/live`, `/ready`, `/metrics`).
    #[arg(long, env = "RERANK_HEALTH_LISTEN", default_value = "0.0.0.0:8002")]
    pub health_listen: SocketAddr,
    /// Requests handled at once (decoding, tokenizing, queued); beyond it `overloaded` is
    /// answered at once so the caller can retry elsewhere.
    #[arg(long, env = "RERANK_MAX_INFLIGHT_REQUESTS", default_value_t = 256)]
    pub max_inflight_requests: usize,
    /// Longest wait, in seconds, for in-flight requests after SIGTERM.
    #[arg(long, env = "RERANK_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let worker_metrics = WorkerMetrics::register(&registry)?;
    let engine_metrics = EngineMetrics::register(&registry)?;
    let ready = Arc::new(AtomicBool::new(false));

    // The probe answers /live at once, so a long model load is not mistaken for a hang.
    let listener = tokio::net::TcpListener::bind(args.health_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.health_listen))?;
    tracing::info!(addr = %listener.local_addr()?, "probe listening");
    let probe_router = probe::router(ProbeState {
        ready: ready.clone(),
        registry,
    });
    let probe_server = tokio::spawn(async move { axum::serve(listener, probe_router).await });

    let stop = crate::shutdown::signal();
    let config = args
        .engine
        .to_config(!args.model.device.starts_with("cpu"))?;
    let (engine, info) = start_engine(&args.model, config, engine_metrics).await?;
    let config = WorkerConfig {
        nats: args
            .nats
            .to_config(&format!("rerank-worker-{}", std::process::id())),
        subject: args.nats.subject.clone(),
        queue_group: args.queue_group.clone(),
        max_inflight_requests: args.max_inflight_requests,
        drain_timeout: Duration::from_secs(args.drain_timeout),
        model: info,
    };
    worker::run(config, engine, worker_metrics, ready, stop).await?;
    probe_server.abort();
    Ok(())
}
