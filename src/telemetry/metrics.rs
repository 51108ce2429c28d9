//! Metric names, help texts and buckets, defined once (`rerank_<what>_<unit>`).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Opts};

// Engine (worker).
pub const QUEUE_PAIRS: &str = "rerank_queue_pairs";
pub const QUEUE_WAIT_SECONDS: &str = "rerank_queue_wait_seconds";
pub const TOKENIZE_SECONDS: &str = "rerank_tokenize_seconds";
pub const INFERENCE_SECONDS: &str = "rerank_inference_seconds";
pub const BATCH_SIZE: &str = "rerank_batch_size_pairs";
pub const BATCH_TOKENS: &str = "rerank_batch_tokens";
pub const BATCH_PADDED_TOKENS: &str = "rerank_batch_padded_tokens";
pub const PAIRS_TOTAL: &str = "rerank_pairs_total";
pub const TOKENS_TOTAL: &str = "rerank_tokens_total";
pub const TOKENIZED_BYTES_TOTAL: &str = "rerank_tokenized_bytes_total";

// Worker request handling.
pub const REQUESTS_TOTAL: &str = "rerank_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "rerank_request_duration_seconds";
pub const INFLIGHT_REQUESTS: &str = "rerank_inflight_requests";
pub const MODEL_LOADED: &str = "rerank_model_loaded";
pub const READY: &str = "rerank_ready";
pub const NATS_CONNECTED: &str = "rerank_nats_connected";

// Worker, JetStream intake.
pub const JOBS_PENDING: &str = "rerank_jobs_pending";
pub const JOBS_ACK_PENDING: &str = "rerank_jobs_ack_pending";
pub const JOBS_REDELIVERED_TOTAL: &str = "rerank_jobs_redelivered_total";
pub const JOBS_EXPIRED_TOTAL: &str = "rerank_jobs_expired_total";
pub const JOBS_TERMINATED_TOTAL: &str = "rerank_jobs_terminated_total";
pub const JOBS_REPLIED_AGAIN_TOTAL: &str = "rerank_jobs_replied_again_total";
pub const JOB_ACK_SECONDS: &str = "rerank_job_ack_seconds";

// Sidecar.
pub const HTTP_REQUESTS_TOTAL: &str = "rerank_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "rerank_http_request_duration_seconds";

/// Latency buckets: 1 ms to ~65 s, doubling.
pub fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 17).unwrap_or_default()
}
pub const BATCH_SIZE_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];
pub const TOKEN_BUCKETS: [f64; 12] = [
    64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0, 131072.0,
];

pub fn seconds(name: &str, help: &str) -> prometheus::Result<Histogram> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))
}
pub fn counts(name: &str, help: &str, buckets: &[f64]) -> prometheus::Result<Histogram> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
}
pub fn gauge(name: &str, help: &str) -> prometheus::Result<IntGauge> {
    IntGauge::with_opts(Opts::new(name, help))
}
pub fn counter(name: &str, help: &str) -> prometheus::Result<IntCounter> {
    IntCounter::with_opts(Opts::new(name, help))
}
