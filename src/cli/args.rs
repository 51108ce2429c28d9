//! Argument groups shared by several subcommands (flattened into each).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::engine::EngineConfig;
use crate::model::{Truncation, DEFAULT_MODEL_ID};

/// Which model to load and how to run it.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Local directory in Hugging Face layout (config.json, tokenizer.json, model.safetensors or a
    /// sharded index), or a Hub repo id fetched through hf-hub (honours HF_TOKEN, HF_HOME,
    /// HF_ENDPOINT, HF_HUB_OFFLINE).
    #[arg(long, env = "RERANK_MODEL", default_value = DEFAULT_MODEL_ID)]
    pub model: String,
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
            fault_batch_delay: std::time::Duration::from_millis(self.fault_batch_delay_ms),
            warmup_tokens: self.warmup_tokens.unwrap_or(if on_gpu {
                self.max_batch_tokens
            } else {
                512
            }),
        })
    }
}

/// `--truncate END|NONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
#[value(rename_all = "UPPER")]
pub enum TruncateArg {
    #[default]
    End,
    None,
}

impl From<TruncateArg> for Truncation {
    fn from(t: TruncateArg) -> Self {
        match t {
            TruncateArg::End => Truncation::End,
            TruncateArg::None => Truncation::None,
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

/// How a worker process serves the pool (besides the model and the engine).
#[derive(Debug, Clone, Args)]
pub struct WorkerRunArgs {
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
    /// Largest request body in bytes (413 beyond). Requests must also fit the NATS server's
    /// max_payload (1 MiB by default), which is checked before sending.
    #[arg(long, env = "RERANK_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
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
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HttpArgs {
    pub fn to_config(&self, nats: &NatsArgs) -> anyhow::Result<crate::sidecar::SidecarConfig> {
        anyhow::ensure!(
            self.request_timeout > 0,
            "--request-timeout must be positive"
        );
        anyhow::ensure!(self.max_body_bytes > 0, "--max-body-bytes must be positive");
        Ok(crate::sidecar::SidecarConfig {
            listen: self.listen,
            nats: nats.to_config(&format!("rerank-sidecar-{}", std::process::id())),
            subject: nats.subject.clone(),
            request_timeout: std::time::Duration::from_secs(self.request_timeout),
            max_body_bytes: self.max_body_bytes,
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            ..crate::sidecar::SidecarConfig::default()
        })
    }
}
