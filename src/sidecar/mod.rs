//! The HTTP sidecar: a thin translation layer from HTTP/JSON to the worker pool over NATS.
//!
//! Routes: `POST /rerank` and `GET /health` (the seed service's API, `docs/seed-api.md`), `POST /v1/rerank`
//! (Cohere/Jina shape), `POST /v1/ranking` (NVIDIA NIM shape), `GET /v1/models` (OpenAI-style
//! list of what the pool serves), `GET /live`, `GET /ready`, `GET /metrics`, `GET /openapi.json`.
//! Error statuses: see [`error`]. Requests are routed by their `model` field: see [`models`].
//!
//! Requests go through [`crate::client::RerankClient`] over NATS without retries (the HTTP caller
//! has its own), except one quick retry when no worker is subscribed, which covers rollouts.
//! With `--transport jetstream` the client's JetStream transport publishes each request as a
//! durable job instead (on the model's jobs subject, see [`models`]), which waits in the stream
//! while the model's workers are scaled to zero.
//! Imports `client`, `wire` and `telemetry`; never `async_nats` directly.

pub mod error;
pub mod extract;
mod middleware;
pub mod models;
pub mod openapi;
pub mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::client::{BuildError, RerankClient};
use crate::http_server::{self, BodyLimit, ServerLimits, Timeouts};
use crate::jobs::{JobConsumers, JobQueueError, JobStream};
use crate::nats::{NatsConfig, NatsConnectError};

pub use error::ApiError;
pub use middleware::HttpMetrics;
pub use models::{Models, ServedModel};

/// Everything `run` needs.
#[derive(Clone)]
pub struct SidecarConfig {
    pub listen: SocketAddr,
    pub nats: NatsConfig,
    /// Request subject of the worker pool.
    pub subject: String,
    /// JetStream transport: publish each request as a job to this stream (created if missing)
    /// and wait for its reply, even while no worker runs. `None`: core request-reply on `subject`.
    pub jetstream: Option<JobStream>,
    /// Per-request NATS timeout, also the deadline the workers see.
    pub request_timeout: Duration,
    /// Largest accepted HTTP body; `None`: [`body_limit_for`] the NATS server's `max_payload`.
    pub max_body_bytes: Option<usize>,
    /// Header, body and idle keep-alive timeouts of client connections.
    pub timeouts: Timeouts,
    /// Client connections served at once; past it new ones are closed at once.
    pub max_connections: usize,
    /// Request-body bytes buffered at once across all connections; past it, 503.
    pub body_budget_bytes: usize,
    /// Bearer token required on every route but `/live` and `/ready`.
    pub api_key: Option<String>,
    /// How long `/health` listens for workers' discovery replies.
    pub health_wait: Duration,
    /// How long the model catalog (`/v1/models`, routing by `model`) listens for `$SRV.INFO`
    /// replies.
    pub models_wait: Duration,
    /// How long a model catalog is used before it is gathered again.
    pub models_ttl: Duration,
    /// Pause before the single retry when no worker is subscribed.
    pub no_responders_backoff: Duration,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8001)),
            nats: NatsConfig::new("nats://127.0.0.1:4222"),
            subject: crate::wire::SUBJECT_V1.to_string(),
            jetstream: None,
            request_timeout: Duration::from_secs(60),
            max_body_bytes: None,
            timeouts: Timeouts::default(),
            max_connections: http_server::default_max_connections(),
            body_budget_bytes: http_server::DEFAULT_BODY_BUDGET_BYTES,
            api_key: None,
            health_wait: Duration::from_millis(250),
            models_wait: Duration::from_millis(250),
            models_ttl: Duration::from_secs(2),
            no_responders_backoff: Duration::from_millis(200),
        }
    }
}

impl std::fmt::Debug for SidecarConfig {
    // The API key never reaches logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarConfig")
            .field("listen", &self.listen)
            .field("nats", &self.nats)
            .field("subject", &self.subject)
            .field("jetstream", &self.jetstream)
            .field("request_timeout", &self.request_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("timeouts", &self.timeouts)
            .field("max_connections", &self.max_connections)
            .field("body_budget_bytes", &self.body_budget_bytes)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("health_wait", &self.health_wait)
            .field("models_wait", &self.models_wait)
            .field("models_ttl", &self.models_ttl)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Connect(#[from] NatsConnectError),
    #[error(transparent)]
    Client(#[from] BuildError),
    #[error(transparent)]
    JobQueue(#[from] JobQueueError),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

struct StateInner {
    client: RerankClient,
    models: Models,
    metrics: HttpMetrics,
    registry: prometheus::Registry,
    api_key: Option<String>,
    health_wait: Duration,
    limits: ServerLimits,
    openapi: serde_json::Value,
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

impl AppState {
    /// State around a core NATS client on the pool's base subject (health, readiness and the
    /// model catalog ask it; requests that name a model go to that model's subject).
    pub fn new(client: RerankClient, config: &SidecarConfig) -> Result<Self, SidecarError> {
        Self::with_pool(client.clone(), client, None, config)
    }

    /// State around `client` for the default model (any transport), `pool`, a core NATS client
    /// on the pool's base subject, for the model catalog and the models on the core intake, and
    /// with the JetStream transport the job stream's consumers (which models' jobs are taken).
    pub fn with_pool(
        client: RerankClient,
        pool: RerankClient,
        jobs: Option<JobConsumers>,
        config: &SidecarConfig,
    ) -> Result<Self, SidecarError> {
        let registry = prometheus::Registry::new();
        let metrics = HttpMetrics::register(&registry)?;
        let body_limit = match config.max_body_bytes {
            Some(bytes) => BodyLimit::Fixed(bytes),
            None => {
                let client = client.clone();
                BodyLimit::Dynamic(Arc::new(move || {
                    body_limit_for(client.max_payload().unwrap_or(NATS_DEFAULT_MAX_PAYLOAD))
                }))
            }
        };
        let limits = ServerLimits {
            timeouts: config.timeouts,
            max_connections: config.max_connections,
            body_limit,
            body_budget_bytes: config.body_budget_bytes,
        };
        let models = Models::new(
            client.clone(),
            pool,
            jobs,
            config.models_wait,
            config.models_ttl,
        );
        Ok(Self {
            inner: Arc::new(StateInner {
                client,
                models,
                metrics,
                registry,
                api_key: config.api_key.clone().filter(|k| !k.is_empty()),
                health_wait: config.health_wait,
                limits,
                openapi: openapi::document(),
            }),
        })
    }

    /// Connects to NATS and builds the sidecar's client: no retries but one for no responders.
    /// With the JetStream transport the job stream is created first if it is missing.
    pub async fn connect(config: &SidecarConfig) -> Result<Self, SidecarError> {
        let nats = config.nats.connect().await?;
        let settings = |builder: crate::client::RerankClientBuilder| {
            builder
                .timeout(config.request_timeout)
                .retries(0)
                .unavailable_retries(1)
                .backoff_base(config.no_responders_backoff)
                .build()
        };
        // Core request-reply on the base subject: discovery, the models on the core intake (and,
        // without JetStream, every model).
        let pool = settings(RerankClient::builder().nats(nats.clone(), config.subject.clone()))?;
        let (client, jobs) = match &config.jetstream {
            None => (pool.clone(), None),
            Some(jobs) => {
                jobs.ensure_on(&nats, &config.subject).await?;
                let consumers = jobs.consumers_on(&nats);
                let client =
                    settings(RerankClient::builder().jetstream(nats, jobs.subject.clone()))?;
                (client, Some(consumers))
            }
        };
        Self::with_pool(client, pool, jobs, config)
    }

    /// The model router.
    pub fn models(&self) -> &Models {
        &self.inner.models
    }

    pub fn client(&self) -> &RerankClient {
        &self.inner.client
    }

    /// The largest body accepted right now.
    pub fn max_body_bytes(&self) -> usize {
        self.inner.limits.body_limit.bytes()
    }
}

/// The NATS server's default `max_payload`, assumed until the server's INFO says otherwise.
pub const NATS_DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Room for the JSON envelope (field names, options, NIM's `{"text": ...}` per passage).
const JSON_ENVELOPE_BYTES: usize = 64 * 1024;

/// The default body limit: what can still fit `max_payload` once re-encoded as MessagePack. JSON
/// is the larger encoding: `\uXXXX` escapes (Python's `json.dumps` default) double CJK text and
/// more, so twice `max_payload` plus the envelope. Anything larger could only be refused after
/// being buffered and parsed.
pub fn body_limit_for(max_payload: usize) -> usize {
    max_payload
        .saturating_mul(2)
        .saturating_add(JSON_ENVELOPE_BYTES)
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/rerank", post(routes::rerank::rerank))
        .route("/v1/rerank", post(routes::cohere::rerank))
        .route("/v1/ranking", post(routes::nim::ranking))
        .route("/v1/models", get(routes::models::list))
        .route("/health", get(routes::health::health))
        .route("/live", get(routes::health::live))
        .route("/ready", get(routes::health::ready))
        .route("/metrics", get(routes::health::metrics))
        .route("/openapi.json", get(routes::health::openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Each new .layer() wraps the ones before: bodies are admitted (size, budget) only after
        // auth, and observe (span + metrics) is outermost so it also counts 401s. The body limit
        // itself is enforced by `http_server` as the body is read, not by axum.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn(middleware::admit_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::observe,
        ))
        .with_state(state)
}

async fn not_found(uri: Uri) -> Response {
    ApiError::not_found(uri.path()).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}

/// Serves on an already bound listener until `stop` resolves, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SidecarError> {
    let client = state.client().clone();
    let limits = state.inner.limits.clone();
    http_server::serve(listener, router(state), limits, stop)
        .await
        .map_err(SidecarError::Serve)?;
    client.close().await;
    Ok(())
}

/// Connects, listens on `config.listen` and serves until `stop` resolves.
pub async fn run(
    config: SidecarConfig,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SidecarError> {
    let state = AppState::connect(&config).await?;
    let listener = http_server::bind(config.listen).map_err(|source| SidecarError::Bind {
        addr: config.listen,
        source,
    })?;
    let addr = listener.local_addr().map_err(SidecarError::Serve)?;
    tracing::info!(
        %addr,
        subject = %config.subject,
        auth = config.api_key.is_some(),
        max_body_bytes = state.max_body_bytes(),
        max_connections = config.max_connections,
        "sidecar listening"
    );
    serve(listener, state, stop).await?;
    tracing::info!("sidecar stopped");
    Ok(())
}
