//! The NATS worker: a queue-group subscriber that feeds the engine and answers every request.
//!
//! Lifecycle: connect → register the NATS service (discovery via `$SRV.PING/INFO/STATS`, with model
//! metadata) → subscribe in the queue group → ready. On the stop signal: not ready → leave discovery
//! → drain the subscription (UNSUB + PING, so everything the server already sent still arrives) →
//! answer every accepted request → flush → stop the engine.

mod handler;
mod metrics;

pub use handler::engine_error_reply;
pub use metrics::WorkerMetrics;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::service::ServiceExt;
use futures::StreamExt;
use tokio::task::JoinSet;

use crate::engine::Engine;
use crate::model::ModelInfo;
use crate::nats::{NatsConfig, NatsConnectError};
use crate::wire;
use handler::HandlerContext;

/// Longest wait for the last replies to reach the NATS server on the way out.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything `run` needs besides the engine.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub nats: NatsConfig,
    pub subject: String,
    pub queue_group: String,
    /// Requests decoded/tokenized/queued at once; beyond it `overloaded` is sent at once.
    pub max_inflight_requests: usize,
    /// Upper bound on the drain after the stop signal.
    pub drain_timeout: Duration,
    /// Log query and document text (off by default: it may be personal data).
    pub log_text: bool,
    pub model: ModelInfo,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Connect(#[from] NatsConnectError),
    #[error("cannot register the NATS service: {0}")]
    Service(String),
    #[error("cannot subscribe to {subject}: {message}")]
    Subscribe { subject: String, message: String },
}

/// Serves until `stop` resolves, then drains. `ready` mirrors readiness for the probe.
pub async fn run(
    config: WorkerConfig,
    engine: Engine,
    metrics: WorkerMetrics,
    ready: Arc<AtomicBool>,
    stop: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let client = config.nats.connect().await?;
    metrics.model_loaded.set(1);
    let mut metadata = HashMap::new();
    metadata.insert("model".to_string(), config.model.name.clone());
    metadata.insert("device".to_string(), config.model.device.clone());
    metadata.insert("dtype".to_string(), config.model.dtype.clone());
    metadata.insert(
        "max_length".to_string(),
        config.model.max_length.to_string(),
    );
    metadata.insert("model_loaded".to_string(), "true".to_string());
    metadata.insert("subject".to_string(), config.subject.clone());
    let service = client
        .service_builder()
        .description("Cross-encoder reranking; MessagePack v1 requests on the subject in metadata")
        .metadata(metadata)
        .start(wire::SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| WorkerError::Service(e.to_string()))?;
    let mut requests = client
        .queue_subscribe(config.subject.clone(), config.queue_group.clone())
        .await
        .map_err(|e| WorkerError::Subscribe {
            subject: config.subject.clone(),
            message: e.to_string(),
        })?;
    let ctx = Arc::new(HandlerContext {
        engine: engine.clone(),
        client: client.clone(),
        metrics: metrics.clone(),
        model_name: config.model.name.clone(),
        log_text: config.log_text,
        inflight: Arc::new(tokio::sync::Semaphore::new(
            config.max_inflight_requests.max(1),
        )),
    });
    let connection_watch = tokio::spawn(watch_connection(client.clone(), metrics.clone()));
    ready.store(true, Ordering::Release);
    metrics.ready.set(1);
    tracing::info!(subject = %config.subject, queue_group = %config.queue_group, "worker ready");

    let mut handlers = JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            message = requests.next() => match message {
                Some(message) => { handlers.spawn(handler::handle(ctx.clone(), message)); }
                None => break,
            },
            () = &mut stop => break,
            // Reap finished handlers so the set does not grow without bound.
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
        }
    }

    tracing::info!(in_flight = handlers.len(), "draining");
    ready.store(false, Ordering::Release);
    metrics.ready.set(0);
    if let Err(e) = service.stop().await {
        tracing::warn!(error = %e, "could not leave service discovery");
    }
    let drained = tokio::time::timeout(config.drain_timeout, async {
        if let Err(e) = requests.drain().await {
            tracing::warn!(error = %e, "subscription drain failed");
        }
        // Messages the server sent before the UNSUB still arrive; answer them too.
        while let Some(message) = requests.next().await {
            handlers.spawn(handler::handle(ctx.clone(), message));
        }
        while handlers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::error!(
            left = handlers.len(),
            "drain timed out; abandoning requests"
        );
        handlers.abort_all();
    }
    // Bounded: with NATS unreachable the flush waits for a reconnect that may never come, and
    // SIGTERM must still end the process (tests/chaos.rs).
    match tokio::time::timeout(FINAL_FLUSH_TIMEOUT, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "final flush failed"),
        Err(_) => tracing::warn!("final flush timed out (NATS unreachable); replies may be lost"),
    }
    connection_watch.abort();
    engine.shutdown().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Mirrors the NATS connection state into a gauge.
async fn watch_connection(client: async_nats::Client, metrics: WorkerMetrics) {
    loop {
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        metrics.nats_connected.set(i64::from(connected));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
