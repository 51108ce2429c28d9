//! `rerank worker`: load the model, subscribe to NATS, serve until SIGTERM, drain.

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::engine::EngineMetrics;
use crate::probe::{self, ProbeState};
use crate::worker::{self, WorkerConfig, WorkerMetrics};

use super::args::{
    EngineArgs, HttpTimeoutArgs, IntakeArgs, LogArgs, ModelArgs, NatsArgs, WorkerRunArgs,
};
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
    #[command(flatten)]
    pub worker: WorkerRunArgs,
    #[command(flatten)]
    pub intake: IntakeArgs,
    /// Timeouts of the probe listener.
    #[command(flatten)]
    pub http_timeouts: HttpTimeoutArgs,
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    run_worker(
        &args.model,
        &args.engine,
        &args.nats,
        &args.worker,
        &args.intake,
        &args.http_timeouts,
        crate::shutdown::signal(),
    )
    .await
}

/// The worker's whole life (probe, model load, NATS service, drain); shared with `rerank serve`.
pub async fn run_worker(
    model: &ModelArgs,
    engine: &EngineArgs,
    nats: &NatsArgs,
    options: &WorkerRunArgs,
    intake: &IntakeArgs,
    http_timeouts: &HttpTimeoutArgs,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let probe_timeouts = http_timeouts.to_timeouts()?;
    let registry = prometheus::Registry::new();
    let worker_metrics = WorkerMetrics::register(&registry)?;
    let engine_metrics = EngineMetrics::register(&registry)?;
    let ready = Arc::new(AtomicBool::new(false));

    // The probe answers /live at once, so a long model load is not mistaken for a hang.
    let listener = crate::http_server::bind(options.health_listen)
        .with_context(|| format!("cannot listen on {}", options.health_listen))?;
    tracing::info!(addr = %listener.local_addr()?, "probe listening");
    let probe_state = ProbeState {
        ready: ready.clone(),
        registry,
    };
    let probe_server = tokio::spawn(probe::serve(listener, probe_state, probe_timeouts));

    let intake = intake.to_intake(&options.queue_group)?;
    // Before the model load, which may take minutes.
    worker::check_intake(&intake, &nats.subject)?;
    let config = engine.to_config(!model.device.starts_with("cpu"))?;
    let (engine, info, family) = start_engine(model, config, engine_metrics).await?;
    let config = WorkerConfig {
        nats: crate::nats::NatsConfig {
            // Small: a busy worker must not hoard messages in its client buffer; the handler takes
            // each message at once and answers `overloaded` itself when it cannot queue the work.
            subscription_capacity: 128,
            ..nats.to_config(&format!("rerank-worker-{}", std::process::id()))
        },
        subject: nats.subject.clone(),
        default_model: options.default_model,
        family,
        intake,
        max_inflight_requests: options.max_inflight_requests,
        drain_timeout: Duration::from_secs(options.drain_timeout),
        log_text: options.log_text,
        model: info,
    };
    worker::run(config, engine, worker_metrics, ready, stop).await?;
    probe_server.abort();
    Ok(())
}
