//! Prometheus instruments of the engine (names and buckets live in `telemetry::metrics`).

use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge, Registry};

use crate::telemetry::metrics as names;

/// Cheap to clone; every clone updates the same series.
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    pub queue_pairs: IntGauge,
    pub queue_wait: Histogram,
    pub tokenize: Histogram,
    pub inference: Histogram,
    pub batch_size: Histogram,
    pub batch_tokens: Histogram,
    pub batch_padded_tokens: Histogram,
    pub pairs: IntCounter,
    pub tokens: IntCounter,
    /// Text bytes handed to the tokenizer: bounded by max_length per text, whatever its size.
    pub tokenized_bytes: IntCounter,
}

impl EngineMetrics {
    /// Registers the engine's series in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            queue_pairs: names::gauge(names::QUEUE_PAIRS, "Pairs waiting in the batch queue")?,
            queue_wait: names::seconds(
                names::QUEUE_WAIT_SECONDS,
                "Time a request waits before its first pair reaches the device",
            )?,
            tokenize: names::seconds(names::TOKENIZE_SECONDS, "Tokenization time per request")?,
            inference: names::seconds(
                names::INFERENCE_SECONDS,
                "Forward-pass time per mini-batch",
            )?,
            batch_size: names::counts(
                names::BATCH_SIZE,
                "Pairs per mini-batch",
                &names::BATCH_SIZE_BUCKETS,
            )?,
            batch_tokens: names::counts(
                names::BATCH_TOKENS,
                "Real tokens per mini-batch",
                &names::TOKEN_BUCKETS,
            )?,
            batch_padded_tokens: names::counts(
                names::BATCH_PADDED_TOKENS,
                "Padded tokens (rows x longest) per mini-batch",
                &names::TOKEN_BUCKETS,
            )?,
            pairs: names::counter(names::PAIRS_TOTAL, "Pairs scored")?,
            tokens: names::counter(names::TOKENS_TOTAL, "Tokens read by the model")?,
            tokenized_bytes: names::counter(
                names::TOKENIZED_BYTES_TOTAL,
                "Text bytes handed to the tokenizer",
            )?,
        };
        registry.register(Box::new(m.queue_pairs.clone()))?;
        registry.register(Box::new(m.queue_wait.clone()))?;
        registry.register(Box::new(m.tokenize.clone()))?;
        registry.register(Box::new(m.inference.clone()))?;
        registry.register(Box::new(m.batch_size.clone()))?;
        registry.register(Box::new(m.batch_tokens.clone()))?;
        registry.register(Box::new(m.batch_padded_tokens.clone()))?;
        registry.register(Box::new(m.pairs.clone()))?;
        registry.register(Box::new(m.tokens.clone()))?;
        registry.register(Box::new(m.tokenized_bytes.clone()))?;
        Ok(m)
    }

    /// Unregistered instruments, for engines nobody scrapes (bench, `rerank score`).
    pub fn detached() -> Self {
        Self::register(&Registry::new())
            .unwrap_or_else(|e| unreachable!("fresh registry cannot collide: {e}"))
    }

    pub fn observe_batch(&self, size: usize, tokens: usize, padded: usize, took: Duration) {
        self.inference.observe(took.as_secs_f64());
        self.batch_size.observe(size as f64);
        self.batch_tokens.observe(tokens as f64);
        self.batch_padded_tokens.observe(padded as f64);
        self.pairs.inc_by(size as u64);
        self.tokens.inc_by(tokens as u64);
    }
}
