//! Every integration test, compiled and linked as ONE test binary.
//!
//! Each file under `tests/` is a module of this crate rather than its own test target
//! (`autotests = false` in Cargo.toml): one binary links the crate and its dependencies once
//! instead of nineteen times, which is most of what a clean `make test` spends outside the
//! dependency build, and libtest can run tests from different files side by side.
//!
//! Run one area with a name filter, e.g. `cargo test --test integration chaos::` or
//! `cargo test --test integration jetstream::cluster`.

// Shared helpers: real nats-server processes, the tiny model's fixtures, an in-process sidecar.
mod common;
mod stack;

// The model: numerics against Hugging Face, batching, long documents, the CLI, the hub.
mod batching;
mod chunking;
mod cli_score;
mod family_golden;
mod hub;
mod model_golden;

// The service: worker, sidecar, client, routing, discovery, auth, telemetry, the wire schema.
mod client;
mod discovery;
mod hostile;
mod models;
mod nats_auth;
mod sidecar;
mod slow_clients;
mod telemetry;
mod wire_schema;
mod worker;

// Resilience and load: JetStream, chaos schedules, the load generator.
mod chaos;
mod jetstream;
mod loadgen;
