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
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cli;
pub mod client;
pub mod engine;
pub mod http_server;
pub mod jobs;
pub mod model;
pub mod nats;
pub mod probe;
pub mod shutdown;
pub mod sidecar;
pub mod telemetry;
pub mod wire;
pub mod worker;
