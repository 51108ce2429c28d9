//! `PairQueue`: pairs waiting for the device, grouped by request, oldest first.
//!
//! Plain synchronous state (no tokio, no candle) so packing is unit-tested directly. The batching
//! loop calls [`PairQueue::next_batch`]; admission calls [`PairQueue::try_push`], which refuses
//! instead of growing past `capacity` pairs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::request::PendingRequest;

/// One (query, document) pair, tokenized, waiting in the queue.
#[derive(Debug)]
pub struct QueuedPair {
    pub request: Arc<PendingRequest>,
    pub doc_index: usize,
    pub ids: Vec<u32>,
    /// First token of the second segment (token type 1); `ids.len()` for one segment.
    pub second_segment: usize,
}

/// The tokens of one pair as admitted: ids and where the second segment starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedSequence {
    pub ids: Vec<u32>,
    pub second_segment: usize,
}

impl From<Vec<u32>> for QueuedSequence {
    /// A one-segment sequence.
    fn from(ids: Vec<u32>) -> Self {
        Self {
            second_segment: ids.len(),
            ids,
        }
    }
}

/// Pairs taken together for the device; the executor splits them into length-sorted mini-batches.
#[derive(Debug, Default)]
pub struct Batch {
    pub pairs: Vec<QueuedPair>,
}

impl Batch {
    pub fn real_tokens(&self) -> usize {
        self.pairs.iter().map(|p| p.ids.len()).sum()
    }
}

/// Why `try_push` refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    pub queued: usize,
    pub capacity: usize,
}

/// One admitted request and its pairs not yet batched: (doc_index, tokens).
type QueuedRequest = (Arc<PendingRequest>, VecDeque<(usize, QueuedSequence)>);

#[derive(Debug)]
pub struct PairQueue {
    requests: VecDeque<QueuedRequest>,
    queued_pairs: usize,
    capacity: usize,
}

impl PairQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            requests: VecDeque::new(),
            queued_pairs: 0,
            capacity,
        }
    }

    pub fn queued_pairs(&self) -> usize {
        self.queued_pairs
    }

    pub fn is_empty(&self) -> bool {
        self.queued_pairs == 0
    }

    /// Enqueues all pairs of one request, or none of them.
    pub fn try_push(
        &mut self,
        request: Arc<PendingRequest>,
        sequences: Vec<QueuedSequence>,
    ) -> Result<(), QueueFull> {
        if self.queued_pairs + sequences.len() > self.capacity {
            return Err(QueueFull {
                queued: self.queued_pairs,
                capacity: self.capacity,
            });
        }
        self.queued_pairs += sequences.len();
        self.requests
            .push_back((request, sequences.into_iter().enumerate().collect()));
        Ok(())
    }

    /// Takes pairs whose summed length fits `max_batch_tokens`, oldest request first (always at
    /// least one pair, so a single long pair still runs). While other requests wait, one request
    /// takes at most half the budget in a first pass, so a request of many pairs (a long document's
    /// CHUNK windows, a thousand documents) shares the device with the requests behind it instead
    /// of stalling them; a second pass fills what is left, oldest first. Requests that were
    /// abandoned (caller gone) or whose deadline has passed are removed first and answered by
    /// `PendingRequest::abandon`.
    pub fn next_batch(&mut self, max_batch_tokens: usize, now: Instant) -> Option<Batch> {
        self.drop_dead(now);
        let mut batch = Batch::default();
        let mut tokens = 0usize;
        let share = if self.requests.len() > 1 {
            max_batch_tokens / 2
        } else {
            max_batch_tokens
        };
        for cap in [share, max_batch_tokens] {
            for (request, pairs) in &mut self.requests {
                let mut taken = 0usize;
                while let Some((_, sequence)) = pairs.front() {
                    let len = sequence.ids.len();
                    let fits = tokens + len <= max_batch_tokens && taken + len <= cap;
                    if !batch.pairs.is_empty() && !fits {
                        break;
                    }
                    let Some((doc_index, sequence)) = pairs.pop_front() else {
                        break;
                    };
                    tokens += len;
                    taken += len;
                    self.queued_pairs -= 1;
                    batch.pairs.push(QueuedPair {
                        request: Arc::clone(request),
                        doc_index,
                        ids: sequence.ids,
                        second_segment: sequence.second_segment,
                    });
                }
            }
        }
        self.requests.retain(|(_, pairs)| !pairs.is_empty());
        (!batch.pairs.is_empty()).then_some(batch)
    }

    fn drop_dead(&mut self, now: Instant) {
        let before = self.requests.len();
        let mut dropped = 0usize;
        self.requests.retain(|(request, pairs)| {
            if request.is_dead(now) {
                request.abandon();
                dropped += pairs.len();
                false
            } else {
                true
            }
        });
        if self.requests.len() != before {
            self.queued_pairs -= dropped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::PendingRequest;
    use std::time::Duration;

    fn request(n: usize, deadline: Option<Instant>) -> Arc<PendingRequest> {
        let (request, _rx) = PendingRequest::new(n, deadline, tracing::Span::none());
        // Keep the receiver alive for the test's duration.
        std::mem::forget(_rx);
        request
    }

    fn seqs(lengths: &[usize]) -> Vec<QueuedSequence> {
        lengths.iter().map(|&l| vec![1; l].into()).collect()
    }

    #[test]
    fn refuses_past_capacity_without_partial_push() {
        let mut q = PairQueue::new(3);
        q.try_push(request(2, None), seqs(&[1, 1])).unwrap();
        let full = q.try_push(request(2, None), seqs(&[1, 1])).unwrap_err();
        assert_eq!(
            full,
            QueueFull {
                queued: 2,
                capacity: 3
            }
        );
        assert_eq!(q.queued_pairs(), 2);
        q.try_push(request(1, None), seqs(&[1])).unwrap();
        assert_eq!(q.queued_pairs(), 3);
    }

    fn lengths(batch: &Batch) -> Vec<usize> {
        batch.pairs.iter().map(|p| p.ids.len()).collect()
    }

    #[test]
    fn packs_under_token_budget_sharing_it_between_waiting_requests() {
        let mut q = PairQueue::new(100);
        q.try_push(request(3, None), seqs(&[4, 4, 4])).unwrap();
        q.try_push(request(2, None), seqs(&[3, 3])).unwrap();
        let now = Instant::now();
        // Half the budget each first (4, then 3), then the rest oldest first (3 more fits: 10).
        let b = q.next_batch(10, now).unwrap();
        assert_eq!(lengths(&b), vec![4, 3, 3]);
        // Alone, a request may take the whole budget.
        let b = q.next_batch(10, now).unwrap();
        assert_eq!(lengths(&b), vec![4, 4]);
        assert_eq!(
            b.pairs.iter().map(|p| p.doc_index).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(q.next_batch(10, now).is_none());
        assert!(q.is_empty());
    }

    #[test]
    fn a_request_of_many_pairs_does_not_stall_the_next_one() {
        let mut q = PairQueue::new(100);
        // A long document as 50 CHUNK windows, then a small request.
        q.try_push(request(50, None), seqs(&[4; 50])).unwrap();
        q.try_push(request(2, None), seqs(&[3, 3])).unwrap();
        let now = Instant::now();
        let first = q.next_batch(40, now).unwrap();
        assert_eq!(first.real_tokens(), 38, "the budget is still filled");
        let small: Vec<usize> = first
            .pairs
            .iter()
            .filter(|p| p.ids.len() == 3)
            .map(|p| p.doc_index)
            .collect();
        assert_eq!(
            small,
            vec![0, 1],
            "the small request rides in the first batch"
        );
        let mut batches = 1;
        while q.next_batch(40, now).is_some() {
            batches += 1;
        }
        assert_eq!(batches, 6, "200 tokens of windows in batches of 40");
    }

    #[test]
    fn an_oversized_pair_still_runs_alone() {
        let mut q = PairQueue::new(10);
        q.try_push(request(2, None), seqs(&[50, 2])).unwrap();
        let b = q.next_batch(10, Instant::now()).unwrap();
        assert_eq!(b.pairs.len(), 1);
        assert_eq!(b.real_tokens(), 50);
    }

    #[test]
    fn expired_and_abandoned_requests_are_dropped_before_compute() {
        let mut q = PairQueue::new(10);
        let now = Instant::now();
        let (expired, mut expired_rx) = PendingRequest::new(2, Some(now), tracing::Span::none());
        q.try_push(expired, seqs(&[1, 1])).unwrap();
        let (gone, gone_rx) = PendingRequest::new(1, None, tracing::Span::none());
        drop(gone_rx);
        q.try_push(gone, seqs(&[1])).unwrap();
        q.try_push(request(1, None), seqs(&[1])).unwrap();
        let b = q.next_batch(10, now + Duration::from_millis(1)).unwrap();
        assert_eq!(b.pairs.len(), 1);
        assert!(q.is_empty());
        assert!(matches!(
            expired_rx.try_recv(),
            Ok(Err(crate::engine::EngineError::DeadlineExceeded))
        ));
    }
}
