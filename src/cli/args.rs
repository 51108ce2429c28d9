//! Argument groups shared by several subcommands (flattened into each).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::engine::EngineConfig;
use crate::http_server;
use crate::model::{ChunkPolicy, Truncation, DEFAULT_MODEL_ID};

/// Which model to load and how to run it.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Local directory in Hugging Face layout (config.json, tokenizer.json, model.safetensors or a
    /// sharded index), or a Hub repo id fetched through hf-hub (honours HF_TOKEN, HF_HOME,
    /// HF_ENDPOINT, HF_HUB_OFFLINE).
    #[arg(long, env = "RERANK_MODEL", default_value = DEFAULT_MODEL_ID)]
    pub model: String,
    /// The model id the pool serves it as: the `model` callers name, the reply's `model`, the
    /// NATS subject (`rerank.v1.model.<escaped id>`) and discovery metadata. Default: --model as
    /// given (a Hub repo id, or the directory).
    #[arg(long, env = "RERANK_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Hub revision (branch, tag or commit) when --model is a repo id.
    #[arg(long, env = "RERANK_MODEL_REVISION", default_value = "main")]
    pub revision: String,
    /// Longest (query, document) sequence in tokens, BOS included; longer pairs are truncated or
    /// refused (--truncate). The model supports up to 8192; cost grows with it.
    #[arg(long, env = "RERANK_MAX_LENGTH", default_value_t = 512)]
    pub max_length: usize,
    /// Compute dtype: f32 (exact; CPU default), bf16 (GPU default), f16.
    #[arg(long, env = "RERANK_DTYPE")]
    pub dtype: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "RERANK_DEVICE", default_value = default_device())]
    pub device: String,
    /// Build the full-size 1B architecture with random weights instead of loading --model
    /// (benchmarks only; scores are meaningless). Needs --tokenizer.
    #[arg(long)]
    pub random_weights: bool,
    /// tokenizer.json to use instead of the model's own (required with --random-weights).
    #[arg(long, env = "RERANK_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Qwen3-Reranker only: the task instruction of its prompt (`<Instruct>: …`). Default: the
    /// model card's web-search instruction (`model::family::qwen3_prompt::DEFAULT_INSTRUCTION`).
    #[arg(long, env = "RERANK_INSTRUCTION")]
    pub instruction: Option<String>,
}

fn default_device() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else {
        "cpu"
    }
}

/// Batching limits of a worker.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// **Important**: tokens per device batch. Larger batches use the GPU better but take more
    /// memory and add latency; the warm-up runs one full batch so an out-of-memory shows at boot.
    #[arg(long, env = "RERANK_MAX_BATCH_TOKENS", default_value_t = 16_384)]
    pub max_batch_tokens: usize,
    /// Pairs allowed to wait for the device; past it requests get `overloaded` at once so the
    /// caller can try another worker instead of timing out.
    #[arg(long, env = "RERANK_MAX_QUEUE_PAIRS", default_value_t = 4_096)]
    pub max_queue_pairs: usize,
    /// Documents allowed in one request (`too_many_documents` beyond).
    #[arg(long, env = "RERANK_MAX_DOCUMENTS", default_value_t = 1_000)]
    pub max_documents: usize,
    /// Most windows per document a `truncate: CHUNK` request may ask for; each window is a pair
    /// of work (a request without `max_chunks_per_doc` gets 10).
    #[arg(long, env = "RERANK_MAX_CHUNKS_PER_DOC", default_value_t = 32)]
    pub max_chunks_per_doc: usize,
    /// Fault injection (drills and tests only): milliseconds added to every forward pass.
    #[arg(
        long,
        env = "RERANK_FAULT_BATCH_DELAY_MS",
        default_value_t = 0,
        hide = true
    )]
    pub fault_batch_delay_ms: u64,
    /// Tokens of the warm-up forward pass before reporting ready (default: one full batch on a
    /// GPU, 512 on the CPU).
    #[arg(long, env = "RERANK_WARMUP_TOKENS")]
    pub warmup_tokens: Option<usize>,
}

impl EngineArgs {
    pub fn to_config(&self, on_gpu: bool) -> anyhow::Result<EngineConfig> {
        anyhow::ensure!(
            self.max_batch_tokens > 0,
            "--max-batch-tokens must be positive"
        );
        anyhow::ensure!(
            self.max_documents <= self.max_queue_pairs,
            "--max-documents ({}) must not exceed --max-queue-pairs ({}), or the largest requests could never be admitted",
            self.max_documents,
            self.max_queue_pairs
        );
        Ok(EngineConfig {
            max_batch_tokens: self.max_batch_tokens,
            max_queue_pairs: self.max_queue_pairs,
            max_documents: self.max_documents,
            max_chunks_per_doc: self.max_chunks_per_doc.max(1),
            fault_batch_delay: std::time::Duration::from_millis(self.fault_batch_delay_ms),
            warmup_tokens: self.warmup_tokens.unwrap_or(if on_gpu {
                self.max_batch_tokens
            } else {
                512
            }),
        })
    }
}

/// `--truncate END|NONE|CHUNK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
#[value(rename_all = "UPPER")]
pub enum TruncateArg {
    #[default]
    End,
    None,
    Chunk,
}

impl From<TruncateArg> for Truncation {
    fn from(t: TruncateArg) -> Self {
        match t {
            TruncateArg::End => Truncation::End,
            TruncateArg::None => Truncation::None,
            TruncateArg::Chunk => Truncation::Chunk(ChunkPolicy::default()),
        }
    }
}

/// NATS connection and authentication.
#[derive(Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "RERANK_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Request subject (the major wire version is part of it).
    #[arg(long, env = "RERANK_SUBJECT", default_value = crate::wire::SUBJECT_V1)]
    pub subject: String,
    /// Token authentication.
    #[arg(long, env = "RERANK_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// User for user/password authentication.
    #[arg(long, env = "RERANK_NATS_USER")]
    pub nats_user: Option<String>,
    /// Password for user/password authentication.
    #[arg(long, env = "RERANK_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NKey seed (`SU...`) for NKey authentication.
    #[arg(long, env = "RERANK_NATS_NKEY_SEED", hide_env_values = true)]
    pub nats_nkey_seed: Option<String>,
    /// `.creds` file (JWT + NKey seed) for decentralized authentication.
    #[arg(long, env = "RERANK_NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,
    /// CA certificate that signs the server's TLS certificate (enables TLS).
    #[arg(long, env = "RERANK_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    #[arg(long, env = "RERANK_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,
    /// Client key for mutual TLS.
    #[arg(long, env = "RERANK_NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
}

impl std::fmt::Debug for NatsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.to_config("rerank"), f)
    }
}

impl NatsArgs {
    pub fn to_config(&self, name: &str) -> crate::nats::NatsConfig {
        crate::nats::NatsConfig {
            token: self.nats_token.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            nkey_seed: self.nats_nkey_seed.clone(),
            creds_file: self.nats_creds_file.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            name: name.to_string(),
            ..crate::nats::NatsConfig::new(&self.nats_url)
        }
    }
}

/// Logging and trace export.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// `text` for people, `json` for log pipelines. Filter with RUST_LOG.
    #[arg(long, env = "RERANK_LOG_FORMAT", value_enum, default_value_t = crate::telemetry::LogFormat::Text)]
    pub log_format: crate::telemetry::LogFormat,
}

impl ModelArgs {
    /// The id the model is served as (--served-model-name, else --model).
    pub fn served_id(&self) -> &str {
        self.served_model_name
            .as_deref()
            .filter(|name| !name.is_empty())
            .unwrap_or(&self.model)
    }
}

/// How a worker process serves the pool (besides the model and the engine).
#[derive(Debug, Clone, Args)]
pub struct WorkerRunArgs {
    /// Whether this worker's model is the pool's default: it then also answers requests that
    /// name no model (subject --subject, `rerank.v1`), besides its own model subject. Run every
    /// other model of the pool with `--default-model false`.
    #[arg(long, env = "RERANK_DEFAULT_MODEL", default_value_t = true, action = clap::ArgAction::Set)]
    pub default_model: bool,
    /// Queue group shared by the pool: each request goes to one member.
    #[arg(long, env = "RERANK_QUEUE_GROUP", default_value = crate::wire::DEFAULT_QUEUE_GROUP)]
    pub queue_group: String,
    /// Address of the probe listener (`/live`, `/ready`, `/metrics`).
    #[arg(long, env = "RERANK_HEALTH_LISTEN", default_value = "0.0.0.0:8002")]
    pub health_listen: std::net::SocketAddr,
    /// Requests handled at once (decoding, tokenizing, queued); beyond it `overloaded` is
    /// answered at once so the caller can retry elsewhere.
    #[arg(long, env = "RERANK_MAX_INFLIGHT_REQUESTS", default_value_t = 256)]
    pub max_inflight_requests: usize,
    /// Longest wait, in seconds, for in-flight requests after SIGTERM.
    #[arg(long, env = "RERANK_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Log each request's query and documents (debugging only: they may be personal data, so
    /// they are never logged otherwise).
    #[arg(long, env = "RERANK_LOG_TEXT")]
    pub log_text: bool,
}

/// Timeouts of the HTTP listeners (the sidecar's API and the worker's probe), in seconds. Each
/// must let a slow mobile client through while dropping an attacker who holds sockets open.
#[derive(Debug, Clone, Args)]
pub struct HttpTimeoutArgs {
    /// Seconds a client has to send a whole request head once its first byte arrived.
    #[arg(long, env = "RERANK_HTTP_HEADER_TIMEOUT", default_value_t = http_server::DEFAULT_HEADER_TIMEOUT.as_secs())]
    pub http_header_timeout: u64,
    /// Seconds a client has to send a whole request body once its head arrived (408 after).
    #[arg(long, env = "RERANK_HTTP_BODY_TIMEOUT", default_value_t = http_server::DEFAULT_BODY_TIMEOUT.as_secs())]
    pub http_body_timeout: u64,
    /// Seconds a kept-alive connection may wait for its next request before it is closed.
    #[arg(long, env = "RERANK_HTTP_IDLE_TIMEOUT", default_value_t = http_server::DEFAULT_IDLE_TIMEOUT.as_secs())]
    pub http_idle_timeout: u64,
}

impl HttpTimeoutArgs {
    pub fn to_timeouts(&self) -> anyhow::Result<http_server::Timeouts> {
        anyhow::ensure!(
            self.http_header_timeout > 0
                && self.http_body_timeout > 0
                && self.http_idle_timeout > 0,
            "--http-header-timeout, --http-body-timeout and --http-idle-timeout must be positive"
        );
        Ok(http_server::Timeouts {
            header: std::time::Duration::from_secs(self.http_header_timeout),
            body: std::time::Duration::from_secs(self.http_body_timeout),
            idle: std::time::Duration::from_secs(self.http_idle_timeout),
        })
    }
}

/// The sidecar's HTTP listener.
#[derive(Clone, Args)]
pub struct HttpArgs {
    /// Address the HTTP API listens on.
    #[arg(long, env = "RERANK_LISTEN", default_value = "0.0.0.0:8001")]
    pub listen: std::net::SocketAddr,
    /// Seconds to wait for a worker's reply (504 after); also sent as the request's deadline so
    /// workers drop work nobody waits for. Keep it below your HTTP caller's own timeout.
    #[arg(long, env = "RERANK_REQUEST_TIMEOUT", default_value_t = 60)]
    pub request_timeout: u64,
    /// Largest request body in bytes (413 beyond, before reading when Content-Length says so).
    /// Default: twice the NATS server's max_payload (learned at connect; 1 MiB by default) plus
    /// 64 KiB, the most JSON that can still fit max_payload as MessagePack.
    #[arg(long, env = "RERANK_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Client connections served at once; past it new connections are closed at once.
    /// Default: the open-files limit (ulimit -n) less 256 descriptors for everything else.
    #[arg(long, env = "RERANK_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// Request-body bytes buffered at once across all connections; past it new requests get
    /// 503 with Retry-After instead of growing the process until it is killed.
    #[arg(long, env = "RERANK_HTTP_BODY_BUDGET_BYTES", default_value_t = http_server::DEFAULT_BODY_BUDGET_BYTES)]
    pub http_body_budget_bytes: usize,
    /// Bearer token required on every route but /live and /ready (none: open).
    #[arg(long, env = "RERANK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl std::fmt::Debug for HttpArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpArgs")
            .field("listen", &self.listen)
            .field("request_timeout", &self.request_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("http_max_connections", &self.http_max_connections)
            .field("http_body_budget_bytes", &self.http_body_budget_bytes)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HttpArgs {
    pub fn to_config(
        &self,
        nats: &NatsArgs,
        timeouts: &HttpTimeoutArgs,
    ) -> anyhow::Result<crate::sidecar::SidecarConfig> {
        anyhow::ensure!(
            self.request_timeout > 0,
            "--request-timeout must be positive"
        );
        anyhow::ensure!(
            self.max_body_bytes != Some(0),
            "--max-body-bytes must be positive"
        );
        anyhow::ensure!(
            self.http_max_connections != Some(0),
            "--http-max-connections must be positive"
        );
        anyhow::ensure!(
            self.http_body_budget_bytes >= self.max_body_bytes.unwrap_or(0),
            "--http-body-budget-bytes must hold at least one body of --max-body-bytes"
        );
        Ok(crate::sidecar::SidecarConfig {
            listen: self.listen,
            nats: nats.to_config(&format!("rerank-sidecar-{}", std::process::id())),
            subject: nats.subject.clone(),
            request_timeout: std::time::Duration::from_secs(self.request_timeout),
            max_body_bytes: self.max_body_bytes,
            timeouts: timeouts.to_timeouts()?,
            max_connections: self
                .http_max_connections
                .unwrap_or_else(http_server::default_max_connections),
            body_budget_bytes: self.http_body_budget_bytes,
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            ..crate::sidecar::SidecarConfig::default()
        })
    }
}

/// The JetStream job queue: the stream's name, subject and limits (workers and sidecar alike).
#[derive(Debug, Clone, Args)]
pub struct JobStreamArgs {
    /// JetStream stream holding the jobs (created with WorkQueue retention if missing).
    #[arg(long, env = "RERANK_STREAM", default_value = crate::jobs::DEFAULT_STREAM)]
    pub stream: String,
    /// Subject of the jobs that name no model (the default model's); a model's jobs go to
    /// `<jobs-subject>.model.<token>`, and the stream captures both. Must not overlap the core
    /// --subject or its model subjects.
    #[arg(long, env = "RERANK_JOBS_SUBJECT", default_value = crate::jobs::DEFAULT_JOBS_SUBJECT)]
    pub jobs_subject: String,
    /// Jobs the stream holds at most; beyond it a publish is refused (`overloaded`, HTTP 429).
    #[arg(long, env = "RERANK_STREAM_MAX_MESSAGES", default_value_t = crate::jobs::DEFAULT_MAX_MESSAGES)]
    pub stream_max_messages: i64,
    /// Bytes the stream holds at most (same refusal beyond).
    #[arg(long, env = "RERANK_STREAM_MAX_BYTES", default_value_t = crate::jobs::DEFAULT_MAX_BYTES)]
    pub stream_max_bytes: i64,
    /// Stream replicas when the stream is created (3 on a NATS cluster).
    #[arg(long, env = "RERANK_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
}

impl JobStreamArgs {
    pub fn to_stream(&self) -> crate::jobs::JobStream {
        crate::jobs::JobStream {
            name: self.stream.clone(),
            subject: self.jobs_subject.clone(),
            max_messages: self.stream_max_messages,
            max_bytes: self.stream_max_bytes,
            replicas: self.stream_replicas,
        }
    }
}

/// Where a worker takes requests from (`--intake`), and the sidecar sends them (`--transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum IntakeKind {
    /// Core NATS request-reply in a queue group: lowest latency, needs a running worker.
    #[default]
    Core,
    /// A durable JetStream work queue: requests wait for a worker (scale to zero), survive a
    /// worker crash and a NATS restart.
    Jetstream,
}

/// A model's durable consumer on the job stream: what workers pull from and `rerank queue` creates.
#[derive(Debug, Clone, Args)]
pub struct JobQueueArgs {
    /// Durable pull consumer of the default model's workers (JetStream intake); every other
    /// model's workers share `<consumer>-<token>`, `<token>` being the model id as in its subject.
    #[arg(long, env = "RERANK_CONSUMER", default_value = crate::jobs::DEFAULT_CONSUMER)]
    pub consumer: String,
    /// Seconds a pulled job may go without an ack or progress ack before it is delivered again
    /// (used when the consumer is created).
    #[arg(long, env = "RERANK_ACK_WAIT", default_value_t = crate::jobs::DEFAULT_ACK_WAIT_SECS)]
    pub ack_wait: u64,
    /// Deliveries of one job; the last one answers the caller with an error instead of computing
    /// (used when the consumer is created).
    #[arg(long, env = "RERANK_MAX_DELIVER", default_value_t = crate::jobs::DEFAULT_MAX_DELIVER)]
    pub max_deliver: i64,
    #[command(flatten)]
    pub jobs: JobStreamArgs,
}

impl JobQueueArgs {
    pub fn to_consumer(&self) -> anyhow::Result<crate::jobs::JobConsumer> {
        anyhow::ensure!(self.ack_wait > 0, "--ack-wait must be positive");
        anyhow::ensure!(
            self.max_deliver == -1 || self.max_deliver >= 2,
            "--max-deliver must be at least 2 (or -1 for unlimited)"
        );
        Ok(crate::jobs::JobConsumer {
            name: self.consumer.clone(),
            ack_wait: std::time::Duration::from_secs(self.ack_wait),
            max_deliver: self.max_deliver,
        })
    }
}

/// How a worker takes requests.
#[derive(Debug, Clone, Args)]
pub struct IntakeArgs {
    /// `core` (request-reply on --subject) or `jetstream` (pull jobs from --stream).
    #[arg(long, env = "RERANK_INTAKE", value_enum, default_value_t = IntakeKind::Core)]
    pub intake: IntakeKind,
    /// Jobs this worker holds at once (pulled, not yet answered); the rest wait in the stream.
    #[arg(long, env = "RERANK_MAX_PULLED_JOBS", default_value_t = crate::jobs::DEFAULT_MAX_PULLED_JOBS)]
    pub max_pulled_jobs: usize,
    #[command(flatten)]
    pub queue: JobQueueArgs,
}

impl IntakeArgs {
    pub fn to_intake(&self, queue_group: &str) -> anyhow::Result<crate::worker::Intake> {
        Ok(match self.intake {
            IntakeKind::Core => crate::worker::Intake::Core {
                queue_group: queue_group.to_string(),
            },
            IntakeKind::Jetstream => {
                crate::worker::Intake::JetStream(crate::worker::JetStreamSettings {
                    stream: self.queue.jobs.to_stream(),
                    consumer: self.queue.to_consumer()?,
                    max_pulled_jobs: self.max_pulled_jobs.max(1),
                })
            }
        })
    }
}

/// `--log-format` values; the telemetry module itself knows nothing of clap.
impl clap::ValueEnum for crate::telemetry::LogFormat {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Text, Self::Json]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(match self {
            Self::Text => "text",
            Self::Json => "json",
        }))
    }
}
