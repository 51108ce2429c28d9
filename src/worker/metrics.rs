//! Prometheus instruments of the worker's request handling.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

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
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.inflight.clone()))?;
        registry.register(Box::new(m.model_loaded.clone()))?;
        registry.register(Box::new(m.ready.clone()))?;
        registry.register(Box::new(m.nats_connected.clone()))?;
        Ok(m)
    }
}
