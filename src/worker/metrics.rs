//! Prometheus instruments of the worker's request handling.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::telemetry::metrics as names;

#[derive(Clone, Debug)]
pub struct WorkerMetrics {
    /// By `outcome` (`ok` | `error`) and `code` (`ok` or the error code).
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub inflight: IntGauge,
    pub model_loaded: IntGauge,
    pub ready: IntGauge,
    pub nats_connected: IntGauge,
    /// JetStream intake: jobs waiting in the stream for any worker (the consumer's lag).
    pub jobs_pending: IntGauge,
    /// JetStream intake: jobs delivered to a worker and not yet acked.
    pub jobs_ack_pending: IntGauge,
    pub jobs_redelivered: IntCounter,
    /// Jobs dropped unprocessed because their deadline passed.
    pub jobs_expired: IntCounter,
    /// Jobs terminated (poison, out of deliveries, expired).
    pub jobs_terminated: IntCounter,
    /// Replies published again because the connection changed between a reply and its ack.
    pub jobs_replied_again: IntCounter,
    /// Delivery to ack (the job's time on this worker).
    pub job_ack_seconds: Histogram,
}

impl WorkerMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    names::REQUESTS_TOTAL,
                    "Requests answered, by outcome and code",
                ),
                &["outcome", "code"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    names::REQUEST_DURATION_SECONDS,
                    "Time from receipt to reply",
                )
                .buckets(names::latency_buckets()),
                &["outcome"],
            )?,
            inflight: names::gauge(names::INFLIGHT_REQUESTS, "Requests being handled")?,
            model_loaded: names::gauge(names::MODEL_LOADED, "1 once the model is loaded and warm")?,
            ready: names::gauge(names::READY, "1 while the worker takes requests")?,
            nats_connected: names::gauge(names::NATS_CONNECTED, "1 while connected to NATS")?,
            jobs_pending: names::gauge(
                names::JOBS_PENDING,
                "Jobs waiting in the JetStream stream (the consumer's lag)",
            )?,
            jobs_ack_pending: names::gauge(
                names::JOBS_ACK_PENDING,
                "Jobs delivered to workers and not yet acked",
            )?,
            jobs_redelivered: names::counter(
                names::JOBS_REDELIVERED_TOTAL,
                "Jobs this worker received again after another delivery went unacked",
            )?,
            jobs_expired: names::counter(
                names::JOBS_EXPIRED_TOTAL,
                "Jobs dropped unprocessed because their deadline had passed",
            )?,
            jobs_terminated: names::counter(
                names::JOBS_TERMINATED_TOTAL,
                "Jobs terminated: undecodable, out of deliveries or expired",
            )?,
            jobs_replied_again: names::counter(
                names::JOBS_REPLIED_AGAIN_TOTAL,
                "Replies published again after a reconnect between a job's reply and its ack",
            )?,
            job_ack_seconds: names::seconds(
                names::JOB_ACK_SECONDS,
                "Time from a job's delivery to its ack",
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.inflight.clone()))?;
        registry.register(Box::new(m.model_loaded.clone()))?;
        registry.register(Box::new(m.ready.clone()))?;
        registry.register(Box::new(m.nats_connected.clone()))?;
        registry.register(Box::new(m.jobs_pending.clone()))?;
        registry.register(Box::new(m.jobs_ack_pending.clone()))?;
        registry.register(Box::new(m.jobs_redelivered.clone()))?;
        registry.register(Box::new(m.jobs_expired.clone()))?;
        registry.register(Box::new(m.jobs_terminated.clone()))?;
        registry.register(Box::new(m.jobs_replied_again.clone()))?;
        registry.register(Box::new(m.job_ack_seconds.clone()))?;
        Ok(m)
    }
}
