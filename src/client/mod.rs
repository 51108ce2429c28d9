//! `RerankClient`: rerank over NATS (straight to the worker pool), over a JetStream job queue
//! (durable; waits for a worker to start) or over HTTP (through the sidecar), with the resilience
//! of the seed service (`docs/seed-api.md`): per-attempt timeout, retries with exponential
//! backoff for what is safe to retry, and a fallback to the similarity order.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use rerank_service::client::RerankClient;
//! let nats = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let client = RerankClient::builder().nats(nats, "rerank.v1").build()?;
//! let result = client
//!     .rerank("AI tools for productivity", ["A task app", "An AI writing assistant"])
//!     .await?;
//! println!("{:?} {:?}", result.scores, result.ranked_indices);
//! # Ok(()) }
//! ```
//!
//! Imports `wire` and `telemetry` only; each transport lives in its own file.

mod error;
mod fallback;
mod http;
mod jetstream;
mod nats;

pub use error::{RerankError, RerankErrorKind};
pub use fallback::apply_ranking;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::Instrument;

use crate::wire::{self, RerankReply, RerankRequest, Span, Truncate};

/// Scores in input order and the document indices by descending score.
#[derive(Debug, Clone, PartialEq)]
pub struct RerankResult {
    /// Raw logits, one per document, in input order (higher is more relevant; not 0–1).
    pub scores: Vec<f32>,
    /// Document indices, most relevant first (cut to `top_k` when asked).
    pub ranked_indices: Vec<usize>,
    /// With `return_spans`: per document, the part of its text (in Unicode code points) that
    /// produced its score.
    pub spans: Option<Vec<Span>>,
}

/// Optional request fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RerankOptions {
    /// Keep only the best `top_k` indices in `ranked_indices` (scores stay complete).
    pub top_k: Option<usize>,
    /// How the worker treats pairs longer than its `max_length` (default: cut from the right;
    /// `Chunk` scores overlapping windows and keeps the best).
    pub truncate: Option<Truncate>,
    /// `Chunk` only: windows per document at most (the worker's default: 10).
    pub max_chunks_per_doc: Option<u32>,
    /// `Chunk` only: tokens shared by consecutive windows (the worker's default: 64).
    pub chunk_overlap: Option<u32>,
    /// Ask for [`RerankResult::spans`].
    pub return_spans: bool,
}

/// A worker that answered the service discovery, with what it advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// NATS service instance id.
    pub id: String,
    /// The model id it serves (what callers name in `model`).
    pub model: Option<String>,
    /// The model's architecture family (`llama_bidirec`...).
    pub family: Option<String>,
    /// Whether its model is the pool's default (answers requests that name no model).
    pub default_model: bool,
    /// Its model's own request subject ([`wire::model_subject`]).
    pub model_subject: Option<String>,
    /// `cpu`, `cuda:0`...
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub max_length: Option<usize>,
    pub model_loaded: bool,
    /// The request subject the worker serves.
    pub subject: Option<String>,
}

impl WorkerInfo {
    fn from_metadata(id: String, mut metadata: HashMap<String, String>) -> Self {
        Self {
            id,
            model: metadata.remove("model"),
            family: metadata.remove("family"),
            // Workers from before per-model subjects served the base subject only.
            default_model: metadata.get("default").is_none_or(|v| v == "true"),
            model_subject: metadata.remove("model_subject"),
            device: metadata.remove("device"),
            dtype: metadata.remove("dtype"),
            max_length: metadata.get("max_length").and_then(|v| v.parse().ok()),
            model_loaded: metadata.get("model_loaded").is_some_and(|v| v == "true"),
            subject: metadata.remove("subject"),
        }
    }
}

/// Counters of one client (and its clones), for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Calls of `rerank`/`send`.
    pub requests: u64,
    /// Attempts sent (requests + retries).
    pub attempts: u64,
    /// Calls that failed after their last attempt.
    pub failures: u64,
}

#[derive(Default, Debug)]
struct Counters {
    requests: AtomicU64,
    attempts: AtomicU64,
    failures: AtomicU64,
}

#[derive(Clone, Debug)]
enum Transport {
    Nats(nats::NatsTransport),
    JetStream(Box<jetstream::JetStreamTransport>),
    Http(http::HttpTransport),
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no transport: call .nats(client, subject), .jetstream(client, jobs_subject) or .http(base_url)")]
    NoTransport,
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

/// Configures a [`RerankClient`]. Defaults follow the seed service (`docs/seed-api.md`): 3 retries, 1 s backoff base
/// (waits of 1, 2, 4 s), 60 s per attempt.
///
/// ```no_run
/// # fn demo(nats: async_nats::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use rerank_service::client::RerankClient;
/// let over_nats = RerankClient::builder()
///     .nats(nats, "rerank.v1")
///     .retries(3)
///     .backoff_base(Duration::from_millis(500))
///     .timeout(Duration::from_secs(10))
///     .build()?;
/// let over_http = RerankClient::builder()
///     .http("http://127.0.0.1:8001")
///     .bearer_token("secret")
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RerankClientBuilder {
    nats: Option<(async_nats::Client, String)>,
    /// Publish jobs to the JetStream stream instead of core request-reply.
    jetstream: bool,
    http: Option<String>,
    bearer_token: Option<String>,
    /// Send to this model's subject (NATS) or name it in the body (HTTP).
    model: Option<String>,
    service: String,
    retries: u32,
    unavailable_retries: Option<u32>,
    backoff_base: Duration,
    timeout: Duration,
}

impl Default for RerankClientBuilder {
    fn default() -> Self {
        Self {
            nats: None,
            jetstream: false,
            http: None,
            bearer_token: None,
            model: None,
            service: wire::SERVICE_NAME.to_string(),
            retries: 3,
            unavailable_retries: None,
            backoff_base: Duration::from_secs(1),
            timeout: Duration::from_secs(60),
        }
    }
}

impl RerankClientBuilder {
    /// Send over NATS on `subject` (e.g. [`wire::SUBJECT_V1`]) with this connection.
    pub fn nats(mut self, client: async_nats::Client, subject: impl Into<String>) -> Self {
        self.nats = Some((client, subject.into()));
        self.jetstream = false;
        self.http = None;
        self
    }

    /// Publish each attempt as a durable job on `jobs_subject` (e.g. `rerank.jobs.v1`), captured
    /// by the workers' JetStream stream, and wait for the reply on an inbox. The job waits in the
    /// stream while no worker runs, and is answered by another worker if one dies with it; the
    /// stream must exist (workers with `--intake jetstream` and the sidecar create it). With
    /// [`model`](Self::model) the jobs go to that model's jobs subject
    /// ([`wire::model_subject`]`(jobs_subject, model)`). A job for a model whose workers never
    /// ran (no consumer takes its subject) waits for its TTL: the sidecar checks for you.
    pub fn jetstream(
        mut self,
        client: async_nats::Client,
        jobs_subject: impl Into<String>,
    ) -> Self {
        self.nats = Some((client, jobs_subject.into()));
        self.jetstream = true;
        self.http = None;
        self
    }

    /// Send over HTTP to the sidecar at `base_url` (`http://host:8001`).
    pub fn http(mut self, base_url: impl Into<String>) -> Self {
        self.http = Some(base_url.into());
        self.nats = None;
        self.jetstream = false;
        self
    }

    /// `Authorization: Bearer <token>` for the HTTP transport (the sidecar's `RERANK_API_KEY`).
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer_token = Some(token.into());
        self
    }

    /// Rerank with the model the pool serves as `model` (its id, e.g.
    /// `cross-encoder/ms-marco-MiniLM-L-6-v2`) instead of the pool's default. Over NATS the
    /// requests go to [`wire::model_subject`]`(subject, model)` (so `.nats(..)` takes the pool's
    /// base subject, `rerank.v1`, and `.jetstream(..)` the jobs subject, `rerank.jobs.v1`); over
    /// HTTP the body names it.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// NATS service name used for worker discovery (default `rerank`).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service = name.into();
        self
    }

    /// Retries after the first attempt, for retryable failures only (default 3).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Retries when no worker is there at all (no responders); defaults to `retries`. A sidecar
    /// that leaves retrying to its HTTP caller still retries this once to ride out a rollout.
    pub fn unavailable_retries(mut self, retries: u32) -> Self {
        self.unavailable_retries = Some(retries);
        self
    }

    /// Wait before retry `n` (0-based) is `backoff_base · 2^n` (default 1 s).
    pub fn backoff_base(mut self, base: Duration) -> Self {
        self.backoff_base = base;
        self
    }

    /// Per-attempt timeout (default 60 s); also sent as the request's `deadline_ms`, so workers
    /// drop work whose caller has given up.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn build(self) -> Result<RerankClient, BuildError> {
        let transport = match (self.nats, self.http) {
            (Some((client, subject)), _) if self.jetstream => {
                let subject = match &self.model {
                    Some(model) => wire::model_subject(&subject, model),
                    None => subject,
                };
                Transport::JetStream(Box::new(jetstream::JetStreamTransport::new(
                    client,
                    subject,
                    self.service,
                )))
            }
            (Some((client, subject)), _) => Transport::Nats(nats::NatsTransport {
                client,
                subject: match &self.model {
                    Some(model) => wire::model_subject(&subject, model),
                    None => subject,
                },
                service: self.service,
            }),
            (None, Some(base)) => Transport::Http(
                http::HttpTransport::new(&base, self.bearer_token, self.model)
                    .map_err(|e| BuildError::Http(e.to_string()))?,
            ),
            (None, None) => return Err(BuildError::NoTransport),
        };
        Ok(RerankClient {
            inner: Arc::new(Inner {
                transport,
                retries: self.retries,
                unavailable_retries: self.unavailable_retries.unwrap_or(self.retries),
                backoff_base: self.backoff_base,
                timeout: self.timeout,
                counters: Counters::default(),
            }),
        })
    }
}

#[derive(Debug)]
struct Inner {
    transport: Transport,
    retries: u32,
    unavailable_retries: u32,
    backoff_base: Duration,
    timeout: Duration,
    counters: Counters,
}

/// A cheap-to-clone handle that reranks over NATS or HTTP. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct RerankClient {
    inner: Arc<Inner>,
}

impl RerankClient {
    pub fn builder() -> RerankClientBuilder {
        RerankClientBuilder::default()
    }

    /// Scores every document against `query`.
    ///
    /// ```no_run
    /// # async fn demo(client: rerank_service::client::RerankClient) -> Result<(), rerank_service::client::RerankError> {
    /// let result = client.rerank("capital of France?", vec!["Paris", "Bananas"]).await?;
    /// assert_eq!(result.ranked_indices.len(), 2);
    /// # Ok(()) }
    /// ```
    pub async fn rerank<D: Into<String>>(
        &self,
        query: impl Into<String>,
        documents: impl IntoIterator<Item = D>,
    ) -> Result<RerankResult, RerankError> {
        self.rerank_with(query, documents, RerankOptions::default())
            .await
    }

    /// [`rerank`](Self::rerank) with `top_k`, `truncate` and the long-document options.
    ///
    /// ```no_run
    /// # async fn demo(client: rerank_service::client::RerankClient) -> Result<(), rerank_service::client::RerankError> {
    /// use rerank_service::client::RerankOptions;
    /// let options = RerankOptions { top_k: Some(1), ..Default::default() };
    /// let best = client.rerank_with("q", vec!["a", "b"], options).await?;
    /// assert_eq!(best.ranked_indices.len(), 1);
    /// # Ok(()) }
    /// ```
    pub async fn rerank_with<D: Into<String>>(
        &self,
        query: impl Into<String>,
        documents: impl IntoIterator<Item = D>,
        options: RerankOptions,
    ) -> Result<RerankResult, RerankError> {
        let request = RerankRequest {
            query: query.into(),
            documents: documents.into_iter().map(Into::into).collect(),
            top_k: options.top_k.map(|k| k as u64),
            truncate: options.truncate,
            max_chunks_per_doc: options.max_chunks_per_doc,
            chunk_overlap: options.chunk_overlap,
            return_spans: options.return_spans.then_some(true),
            ..RerankRequest::default()
        };
        let reply = self.send(request).await?;
        Ok(RerankResult {
            scores: reply.scores,
            ranked_indices: reply
                .ranked_indices
                .into_iter()
                .map(|i| i as usize)
                .collect(),
            spans: reply.spans,
        })
    }

    /// Sends a wire request with retries and returns the whole reply (model name and usage are
    /// empty over HTTP). `deadline_ms` is set per attempt from the timeout.
    ///
    /// ```no_run
    /// # async fn demo(client: rerank_service::client::RerankClient) -> Result<(), rerank_service::client::RerankError> {
    /// use rerank_service::wire::RerankRequest;
    /// let reply = client
    ///     .send(RerankRequest { query: "q".into(), documents: vec!["d".into()], ..Default::default() })
    ///     .await?;
    /// println!("{} scored {} tokens", reply.model, reply.usage.tokens);
    /// # Ok(()) }
    /// ```
    pub async fn send(&self, mut request: RerankRequest) -> Result<RerankReply, RerankError> {
        let inner = &self.inner;
        inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "client.request",
            otel.kind = "client",
            rerank.documents = request.documents.len(),
            rerank.attempts = tracing::field::Empty,
        );
        let mut attempt: u32 = 0;
        let result = async {
            loop {
                inner.counters.attempts.fetch_add(1, Ordering::Relaxed);
                request.deadline_ms = Some(epoch_ms_after(inner.timeout));
                let outcome = match &inner.transport {
                    Transport::Nats(t) => t.send(&request, inner.timeout).await,
                    Transport::JetStream(t) => t.send(&request, inner.timeout).await,
                    Transport::Http(t) => t.send(&request, inner.timeout).await,
                }
                .and_then(|reply| validate(reply, request.documents.len()));
                let error = match outcome {
                    Ok(reply) => return Ok(reply),
                    Err(error) => error,
                };
                let budget = if error.kind() == RerankErrorKind::Unavailable {
                    inner.unavailable_retries
                } else {
                    inner.retries
                };
                if !error.is_retryable() || attempt >= budget {
                    return Err(error);
                }
                let wait = inner
                    .backoff_base
                    .saturating_mul(2u32.saturating_pow(attempt));
                tracing::warn!(attempt = attempt + 1, error = %error, wait_ms = wait.as_millis() as u64, "rerank attempt failed; retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        }
        .instrument(span.clone())
        .await;
        span.record("rerank.attempts", attempt + 1);
        if result.is_err() {
            inner.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// A client like this one (same connection, timeout and retries) for `model`: over NATS (and
    /// JetStream) it sends to [`wire::model_subject`]`(this client's subject, model)`, so call it
    /// on a client of the pool's base subject (the jobs subject); over HTTP it names `model` in
    /// the body.
    pub fn with_model(&self, model: &str) -> RerankClient {
        let inner = &self.inner;
        let transport = match &inner.transport {
            Transport::Nats(t) => Transport::Nats(nats::NatsTransport {
                subject: wire::model_subject(&t.subject, model),
                ..t.clone()
            }),
            Transport::JetStream(t) => {
                Transport::JetStream(Box::new(jetstream::JetStreamTransport {
                    js: t.js.clone(),
                    core: nats::NatsTransport {
                        subject: wire::model_subject(&t.core.subject, model),
                        ..t.core.clone()
                    },
                }))
            }
            Transport::Http(t) => Transport::Http(http::HttpTransport {
                model: Some(model.to_string()),
                ..t.clone()
            }),
        };
        RerankClient {
            inner: Arc::new(Inner {
                transport,
                retries: inner.retries,
                unavailable_retries: inner.unavailable_retries,
                backoff_base: inner.backoff_base,
                timeout: inner.timeout,
                counters: Counters::default(),
            }),
        }
    }

    /// Every worker of the pool, whatever model it serves, from the `$SRV.INFO` replies that
    /// arrive within `wait` (NATS transport on the pool's base subject).
    pub async fn pool_workers(&self, wait: Duration) -> Result<Vec<WorkerInfo>, RerankError> {
        self.nats()?.discover_pool(wait).await
    }

    /// Workers that answer the NATS service discovery within `wait` (NATS transport only).
    pub async fn workers(&self, wait: Duration) -> Result<Vec<WorkerInfo>, RerankError> {
        self.nats()?.discover(wait, |_| false).await
    }

    /// The first worker that answers discovery with its model loaded, waiting at most `wait`
    /// (returns at once when no worker is registered at all).
    pub async fn ready_worker(&self, wait: Duration) -> Result<Option<WorkerInfo>, RerankError> {
        let workers = self
            .nats()?
            .discover(wait, |found| found.iter().any(|w| w.model_loaded))
            .await?;
        Ok(workers.into_iter().find(|w| w.model_loaded))
    }

    /// Whether the NATS connection is up (always true over HTTP, which connects per request).
    pub fn is_connected(&self) -> bool {
        match &self.inner.transport {
            Transport::Nats(t) => t.is_connected(),
            Transport::JetStream(t) => t.core.is_connected(),
            Transport::Http(_) => true,
        }
    }

    /// The NATS server's `max_payload` (bytes), once connected; `None` over HTTP.
    pub fn max_payload(&self) -> Option<usize> {
        match &self.inner.transport {
            Transport::Nats(t) => t.max_payload(),
            Transport::JetStream(t) => t.core.max_payload(),
            Transport::Http(_) => None,
        }
    }

    /// Whether requests wait in a durable queue (the JetStream transport) rather than needing a
    /// worker right now: with no worker running they are accepted and answered once one starts.
    pub fn queues_jobs(&self) -> bool {
        matches!(self.inner.transport, Transport::JetStream(_))
    }

    /// The per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        ClientStats {
            requests: c.requests.load(Ordering::Relaxed),
            attempts: c.attempts.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
        }
    }

    /// Drains the NATS connection (pending replies still arrive); a no-op over HTTP.
    pub async fn close(&self) {
        match &self.inner.transport {
            Transport::Nats(t) => t.close().await,
            Transport::JetStream(t) => t.core.close().await,
            Transport::Http(_) => {}
        }
    }

    fn nats(&self) -> Result<&nats::NatsTransport, RerankError> {
        match &self.inner.transport {
            Transport::Nats(t) => Ok(t),
            Transport::JetStream(t) => Ok(&t.core),
            Transport::Http(_) => Err(RerankError::Unsupported(
                "worker discovery needs the NATS transport",
            )),
        }
    }
}

/// Checks that a reply matches its request (one score per document, indices in range).
fn validate(reply: RerankReply, documents: usize) -> Result<RerankReply, RerankError> {
    if reply.scores.len() != documents {
        return Err(RerankError::InvalidResponse(format!(
            "{} scores for {documents} documents",
            reply.scores.len()
        )));
    }
    if let Some(bad) = reply
        .ranked_indices
        .iter()
        .find(|&&i| i as usize >= documents)
    {
        return Err(RerankError::InvalidResponse(format!(
            "ranked index {bad} is out of range for {documents} documents"
        )));
    }
    Ok(reply)
}

/// Unix epoch milliseconds `after` from now.
fn epoch_ms_after(after: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now + after).as_millis().min(u128::from(u64::MAX)) as u64
}
