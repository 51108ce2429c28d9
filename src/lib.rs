//! rerank-service: the reranking stage of retrieval-augmented generation, served from GPUs.
//!
//! Module map (dependencies only point downwards):
//! - [`cli`]: clap arguments and the `rerank` subcommands (the only place with `anyhow`).
//! - [`worker`]: NATS in → engine out (service endpoint, handler, drain).
//! - [`sidecar`]: HTTP in → client out (axum routes for our, Cohere/Jina and NIM APIs).
//! - [`client`]: `RerankClient` over NATS or HTTP with retries, backoff and the similarity fallback.
//! - [`engine`]: the batcher and the device thread; transport-neutral.
//! - [`model`]: the cross-encoder in candle, its config, weights and tokenizer.
//! - [`wire`]: MessagePack v1 message types and error codes; serde only.
//! - [`telemetry`]: tracing/OpenTelemetry setup, trace-context propagation, metric names.
//! - [`probe`]: the worker's `/live`, `/ready`, `/metrics` listener.
//! - [`http_server`]: the hardened HTTP/1.1 accept loop (timeouts, connection cap, body limits
//!   and budget) under both the sidecar and the probe.
//!
//! With `default-features = false` only [`client`], [`wire`], [`jobs`], [`nats`], [`shutdown`] and
//! trace propagation are built: what a pipeline that calls the service needs, without the model.
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

#[cfg(feature = "server")]
pub mod cli;
pub mod client;
#[cfg(feature = "server")]
pub mod engine;
#[cfg(feature = "server")]
pub mod http_server;
pub mod jobs;
#[cfg(feature = "server")]
pub mod model;
pub mod nats;
#[cfg(feature = "server")]
pub mod probe;
pub mod shutdown;
#[cfg(feature = "server")]
pub mod sidecar;
pub mod telemetry;
pub mod wire;
#[cfg(feature = "server")]
pub mod worker;
