//! The NATS worker: takes requests from an intake, feeds the engine and answers every request.
//!
//! Lifecycle: connect → (JetStream intake: create or check the stream and the consumer) → answer
//! service discovery (`$SRV.PING/INFO/STATS`, [`discovery`]) → subscribe or start pulling → ready.
//! On the stop signal: not ready → leave discovery → drain the intake (see [`intake`]) → answer
//! every accepted request → flush → stop the engine.

mod discovery;
mod handler;
pub mod intake;
mod metrics;

pub use discovery::{EndpointInfo, ServiceIdentity, ServiceStats, StatsSnapshot};
pub use handler::engine_error_reply;
pub use metrics::WorkerMetrics;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::engine::Engine;
use crate::jobs::{JobConsumer, JobQueueError, JobStream};
use crate::model::ModelInfo;
use crate::nats::{NatsConfig, NatsConnectError};
use crate::wire;
use discovery::Discovery;
use handler::HandlerContext;
use intake::core::CoreIntake;
use intake::jetstream::JetStreamIntake;

/// Longest wait for the last replies to reach the NATS server on the way out.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where requests come from.
#[derive(Debug, Clone)]
pub enum Intake {
    /// Core request-reply on the worker's subject, in a queue group.
    Core { queue_group: String },
    /// Jobs pulled from a durable JetStream work queue.
    JetStream(JetStreamSettings),
}

/// The JetStream intake's stream, consumer and pull bound.
#[derive(Debug, Clone, Default)]
pub struct JetStreamSettings {
    pub stream: JobStream,
    /// The consumers' shared settings; the worker's own consumer is named after its model
    /// ([`JobConsumer::for_model`], the naming table in [`crate::jobs`]).
    pub consumer: JobConsumer,
    /// Jobs this worker holds at once (pulled, not yet answered); the rest wait in the stream.
    pub max_pulled_jobs: usize,
}

/// Everything `run` needs besides the engine.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub nats: NatsConfig,
    /// The pool's base subject (`rerank.v1`): the default model serves it, and every model serves
    /// [`wire::model_subject`]`(subject, model id)`. The jobs subject must not overlap it.
    pub subject: String,
    /// Whether this worker's model is the pool's default, answering requests that name no model
    /// (those on `subject`, or jobs on the jobs subject). One model per pool should be.
    pub default_model: bool,
    /// The model's architecture family (config.json `model_type`, e.g. `llama_bidirec`), as
    /// service discovery reports it.
    pub family: String,
    pub intake: Intake,
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
    #[error("cannot answer NATS service discovery: {0}")]
    Service(String),
    #[error("cannot subscribe to {subject}: {message}")]
    Subscribe { subject: String, message: String },
    #[error(transparent)]
    JobQueue(#[from] JobQueueError),
}

/// Checks the intake's names without connecting (the JetStream jobs subject against the core
/// `subject`), so a misconfigured worker stops before its model load, which may take minutes.
pub fn check_intake(intake: &Intake, subject: &str) -> Result<(), WorkerError> {
    match intake {
        Intake::Core { .. } => Ok(()),
        Intake::JetStream(settings) => Ok(settings.stream.check(subject)?),
    }
}

/// The core subjects a worker serves: its model's own subject, and the base subject when it is
/// the pool's default.
pub fn core_subjects(base: &str, model_id: &str, default_model: bool) -> Vec<String> {
    let mut subjects = vec![wire::model_subject(base, model_id)];
    if default_model {
        subjects.push(base.to_string());
    }
    subjects
}

/// A started intake.
enum Running {
    Core(CoreIntake),
    JetStream(Box<JetStreamIntake>),
}

/// Serves until `stop` resolves, then drains. `ready` mirrors readiness for the probe.
pub async fn run(
    config: WorkerConfig,
    engine: Engine,
    metrics: WorkerMetrics,
    ready: Arc<AtomicBool>,
    stop: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    check_intake(&config.intake, &config.subject)?;
    let client = config.nats.connect().await?;
    metrics.model_loaded.set(1);
    let subjects = core_subjects(&config.subject, &config.model.name, config.default_model);
    let model_subject = wire::model_subject(&config.subject, &config.model.name);

    // The endpoint's subject: the one a caller that names no model uses (the default's base
    // subject), else the model's own; `model_subject` is always in the metadata. The JetStream
    // intake's endpoint is its jobs subject (`J` for the default, else the model's), its "queue
    // group" the durable consumer.
    let core_subject = if config.default_model {
        config.subject.clone()
    } else {
        model_subject.clone()
    };
    // The JetStream queue first: a worker that cannot use it must not announce itself.
    let (consumer, endpoint_subject, queue_group, intake_name) = match &config.intake {
        Intake::Core { queue_group } => (None, core_subject, queue_group.clone(), "core"),
        Intake::JetStream(settings) => {
            let js = async_nats::jetstream::new(client.clone());
            let stream = settings.stream.ensure(&js, &config.subject).await?;
            let (consumer, taken) = settings
                .consumer
                .ensure(
                    &stream,
                    &settings.stream,
                    &config.model.name,
                    config.default_model,
                )
                .await?;
            let jobs_subject = if config.default_model {
                settings.stream.subject.clone()
            } else {
                settings.stream.subject_for(&config.model.name)
            };
            (Some(consumer), jobs_subject, taken.name, "jetstream")
        }
    };
    let mut metadata = HashMap::new();
    metadata.insert("model".to_string(), config.model.name.clone());
    metadata.insert("family".to_string(), config.family.clone());
    metadata.insert("default".to_string(), config.default_model.to_string());
    metadata.insert("model_subject".to_string(), model_subject.clone());
    metadata.insert("device".to_string(), config.model.device.clone());
    metadata.insert("dtype".to_string(), config.model.dtype.clone());
    metadata.insert(
        "max_length".to_string(),
        config.model.max_length.to_string(),
    );
    metadata.insert("model_loaded".to_string(), "true".to_string());
    metadata.insert("subject".to_string(), endpoint_subject.clone());
    metadata.insert("intake".to_string(), intake_name.to_string());
    let stats = ServiceStats::default();
    let identity = ServiceIdentity {
        name: wire::SERVICE_NAME.to_string(),
        id: instance_id(&client),
        version: env!("CARGO_PKG_VERSION").to_string(),
        description: format!(
            "Cross-encoder reranking with {} ({}); MessagePack v1 requests on {endpoint_subject} ({intake_name} intake)",
            config.model.name, config.family
        ),
        metadata,
    };
    let endpoint = EndpointInfo {
        name: wire::SERVICE_NAME.to_string(),
        subject: endpoint_subject.clone(),
        queue_group: queue_group.clone(),
        metadata: HashMap::from([
            ("intake".to_string(), intake_name.to_string()),
            ("model_subject".to_string(), model_subject.clone()),
        ]),
    };
    let discovery = Discovery::start(client.clone(), identity, endpoint, stats.clone())
        .await
        .map_err(|e| WorkerError::Service(e.to_string()))?;

    let ctx = Arc::new(HandlerContext {
        engine: engine.clone(),
        client: client.clone(),
        metrics: metrics.clone(),
        stats,
        model_name: config.model.name.clone(),
        log_text: config.log_text,
        inflight: Arc::new(tokio::sync::Semaphore::new(
            config.max_inflight_requests.max(1),
        )),
    });
    let mut running = match (&config.intake, consumer) {
        (Intake::JetStream(settings), Some(consumer)) => Running::JetStream(Box::new(
            JetStreamIntake::new(consumer, settings.max_pulled_jobs, &ctx)
                .await
                .map_err(|message| WorkerError::Subscribe {
                    subject: endpoint_subject.clone(),
                    message,
                })?,
        )),
        _ => Running::Core(
            CoreIntake::subscribe(&client, &subjects, &queue_group)
                .await
                .map_err(|e| WorkerError::Subscribe {
                    subject: subjects.join(", "),
                    message: e.to_string(),
                })?,
        ),
    };
    let connection_watch = tokio::spawn(watch_connection(client.clone(), metrics.clone()));
    ready.store(true, Ordering::Release);
    metrics.ready.set(1);
    tracing::info!(subject = %endpoint_subject, %model_subject, default_model = config.default_model, %queue_group, intake = intake_name, "worker ready");

    let in_flight = match &mut running {
        Running::Core(intake) => {
            intake.serve(&ctx, stop).await;
            intake.in_flight()
        }
        Running::JetStream(intake) => {
            intake.serve(&ctx, stop).await;
            intake.in_flight()
        }
    };

    tracing::info!(in_flight, "draining");
    ready.store(false, Ordering::Release);
    metrics.ready.set(0);
    discovery.stop();
    let drained = tokio::time::timeout(config.drain_timeout, async {
        match &mut running {
            Running::Core(intake) => intake.drain(&ctx).await,
            Running::JetStream(intake) => intake.drain().await,
        }
    })
    .await;
    if drained.is_err() {
        tracing::error!("drain timed out; abandoning requests");
        match &mut running {
            Running::Core(intake) => intake.abandon(),
            Running::JetStream(intake) => intake.abandon(),
        }
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

/// A unique service instance id (the random part of a fresh inbox name).
fn instance_id(client: &async_nats::Client) -> String {
    let inbox = client.new_inbox();
    inbox.rsplit('.').next().unwrap_or(&inbox).to_string()
}

/// Mirrors the NATS connection state into a gauge.
async fn watch_connection(client: async_nats::Client, metrics: WorkerMetrics) {
    loop {
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        metrics.nats_connected.set(i64::from(connected));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
