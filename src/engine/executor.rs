//! The device thread: the only code that runs the model.
//!
//! A plain `std::thread` owning the [`CrossEncoder`] (and so the device). It receives batches over a
//! channel, sorts each batch's pairs by length and runs one forward pass per mini-batch under the
//! padded-token budget, then hands scores to each request's accumulator. It never awaits and knows
//! nothing of NATS or HTTP.

use std::time::Instant;

use tokio::sync::mpsc;

use crate::model::CrossEncoder;

use super::metrics::EngineMetrics;
use super::queue::{Batch, QueuedPair};
use super::EngineError;

/// Splits length-sorted pairs into mini-batches whose padded size (`rows × longest`) fits the
/// budget and whose padding stays under `max_padding` of the padded size (so a 60-token pair is not
/// padded to 268 tokens just because both came in the same request).
pub fn mini_batches(
    pairs: &[QueuedPair],
    max_batch_tokens: usize,
    max_padding: f64,
) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut real = 0usize;
    for (i, pair) in pairs.iter().enumerate() {
        // Sorted ascending, so pair i is the longest of [start, i].
        let len = pair.ids.len();
        let padded = (i + 1 - start) * len;
        let waste = (padded - (real + len)) as f64 / padded.max(1) as f64;
        if i > start && (padded > max_batch_tokens || waste > max_padding) {
            ranges.push(start..i);
            start = i;
            real = 0;
        }
        real += len;
    }
    if start < pairs.len() {
        ranges.push(start..pairs.len());
    }
    ranges
}

pub struct Executor {
    pub model: CrossEncoder,
    pub max_batch_tokens: usize,
    pub max_padding: f64,
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
        batch.pairs.sort_by_key(|p| p.ids.len());
        for range in mini_batches(&batch.pairs, self.max_batch_tokens, self.max_padding) {
            let pairs = &batch.pairs[range];
            let longest = pairs.last().map_or(0, |p| p.ids.len());
            let real: usize = pairs.iter().map(|p| p.ids.len()).sum();
            let parent = pairs.first().map(|p| p.request.span.clone());
            let span = tracing::info_span!(
                parent: parent.as_ref().and_then(|s| s.id()),
                "engine.batch",
                batch.size = pairs.len(),
                batch.tokens = real,
                batch.padded_tokens = pairs.len() * longest,
            );
            for pair in pairs.iter().skip(1) {
                span.follows_from(pair.request.span.id());
            }
            let _enter = span.enter();
            let started = Instant::now();
            if !self.fault_batch_delay.is_zero() {
                std::thread::sleep(self.fault_batch_delay);
            }
            let sequences: Vec<&[u32]> = pairs.iter().map(|p| p.ids.as_slice()).collect();
            let result = self.model.score_batch(&sequences);
            self.metrics
                .observe_batch(pairs.len(), real, pairs.len() * longest, started.elapsed());
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::PendingRequest;

    #[test]
    fn mini_batches_respect_padded_budget() {
        let (req, _rx) = PendingRequest::new(5, None, tracing::Span::none());
        let pairs: Vec<QueuedPair> = [2usize, 2, 3, 5, 9]
            .iter()
            .enumerate()
            .map(|(i, &l)| QueuedPair {
                request: req.clone(),
                doc_index: i,
                ids: vec![0; l],
            })
            .collect();
        let ranges = mini_batches(&pairs, 10, 1.0);
        // [2,2,3] pads to 9; adding 5 would pad to 20; [5] then [9].
        assert_eq!(ranges, vec![0..3, 3..4, 4..5]);
        assert_eq!(mini_batches(&pairs, 1000, 1.0), vec![0..5]);
        // With at most 20% padding: [2,2] (adding 3 would waste 2/9), [3,5] (wastes 2/10),
        // then [9] (adding it would waste 10/27).
        assert_eq!(mini_batches(&pairs, 1000, 0.2), vec![0..2, 2..4, 4..5]);
        assert!(mini_batches(&[], 10, 0.2).is_empty());
    }
}
