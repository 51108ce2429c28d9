//! The device thread: the only code that runs the model.
//!
//! A plain `std::thread` owning the model (a [`Reranker`] of any family, and so the device). It
//! receives batches over a channel (already formed under the real-token budget by the queue), runs
//! one forward pass per batch (packed without padding, or padded to the batch's longest pair for
//! ModernBERT: the model says which), then hands scores to each request's accumulator.
//! It never awaits and knows nothing of NATS or HTTP.

use std::time::Instant;

use tokio::sync::mpsc;

use crate::model::{Reranker, SequenceRef};

use super::metrics::EngineMetrics;
use super::queue::Batch;
use super::EngineError;

pub struct Executor {
    /// Any family's model; the executor does not know which.
    pub model: Box<dyn Reranker>,
    pub fault_batch_delay: std::time::Duration,
    pub metrics: EngineMetrics,
}

impl Executor {
    /// Runs until the batch channel closes (engine shutdown), finishing every batch it received.
    pub fn run(self, mut batches: mpsc::Receiver<Batch>) {
        while let Some(batch) = batches.blocking_recv() {
            self.run_batch(batch);
        }
        tracing::debug!("executor stopped");
    }

    fn run_batch(&self, mut batch: Batch) {
        let now = Instant::now();
        // The batch may have waited in the prefetch slot: drop what expired or was abandoned
        // meanwhile, so a caller who gave up costs no compute.
        batch.pairs.retain(|pair| {
            let dead = pair.request.is_dead(now);
            if dead {
                pair.request.abandon();
            }
            !dead
        });
        for pair in &batch.pairs {
            pair.request.scheduled(now);
        }
        if batch.pairs.is_empty() {
            return;
        }
        let pairs = &batch.pairs;
        let real: usize = pairs.iter().map(|p| p.ids.len()).sum();
        let parent = pairs.first().map(|p| p.request.span.clone());
        let span = tracing::info_span!(
            parent: parent.as_ref().and_then(|s| s.id()),
            "engine.batch",
            batch.size = pairs.len(),
            batch.tokens = real,
        );
        for pair in pairs.iter().skip(1) {
            span.follows_from(pair.request.span.id());
        }
        let _enter = span.enter();
        let started = Instant::now();
        if !self.fault_batch_delay.is_zero() {
            std::thread::sleep(self.fault_batch_delay);
        }
        let sequences: Vec<SequenceRef<'_>> = pairs
            .iter()
            .map(|p| SequenceRef {
                ids: &p.ids,
                second_segment: p.second_segment,
            })
            .collect();
        let result = self.model.score_sequences(&sequences);
        let computed = self.model.computed_tokens(&sequences);
        self.metrics
            .observe_batch(pairs.len(), real, computed, started.elapsed());
        match result {
            Ok(scores) => {
                for (pair, score) in pairs.iter().zip(scores) {
                    pair.request.complete_pair(pair.doc_index, score);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "batch failed");
                for pair in pairs {
                    pair.request.fail(EngineError::Model(e.to_string()));
                }
            }
        }
    }
}
