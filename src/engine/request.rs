//! `PendingRequest`: one admitted request's accumulator, shared by its queued pairs.
//!
//! The executor writes each pair's score into its slot; the request is answered the moment its
//! last pair is scored, or at once when one of its mini-batches fails.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::oneshot;

use super::EngineError;

/// Scores of a finished request, in document order, plus when its first pair left the queue.
#[derive(Debug)]
pub struct Scored {
    pub scores: Vec<f32>,
    pub first_scheduled: Option<Instant>,
}

pub type ScoreResult = Result<Scored, EngineError>;

#[derive(Debug)]
pub struct PendingRequest {
    state: Mutex<State>,
    remaining: AtomicUsize,
    deadline: Option<Instant>,
    /// The caller's span, so batch work shows up in the request's trace.
    pub span: tracing::Span,
    /// `engine.queue`: open from admission until the first pair reaches the device.
    queue_span: Mutex<Option<tracing::Span>>,
}

#[derive(Debug)]
struct State {
    scores: Vec<f32>,
    first_scheduled: Option<Instant>,
    reply: Option<oneshot::Sender<ScoreResult>>,
}

impl PendingRequest {
    pub fn new(
        pairs: usize,
        deadline: Option<Instant>,
        span: tracing::Span,
    ) -> (std::sync::Arc<Self>, oneshot::Receiver<ScoreResult>) {
        let (tx, rx) = oneshot::channel();
        let request = Self {
            state: Mutex::new(State {
                scores: vec![f32::NAN; pairs],
                first_scheduled: None,
                reply: Some(tx),
            }),
            remaining: AtomicUsize::new(pairs),
            deadline,
            queue_span: Mutex::new(Some(
                tracing::info_span!(parent: &span, "engine.queue", rerank.pairs = pairs),
            )),
            span,
        };
        (std::sync::Arc::new(request), rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update; the data is plain floats.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Nobody will read the answer (caller gone), the deadline passed, or it is already answered.
    pub fn is_dead(&self, now: Instant) -> bool {
        let state = self.lock();
        match &state.reply {
            None => true,
            Some(tx) => tx.is_closed() || self.deadline.is_some_and(|d| now >= d),
        }
    }

    /// Answers a dead request with `DeadlineExceeded` (if anyone still listens).
    pub fn abandon(&self) {
        if let Some(tx) = self.lock().reply.take() {
            let _ = tx.send(Err(EngineError::DeadlineExceeded));
        }
    }

    /// Marks the request as having reached the device (ends its `engine.queue` span).
    pub fn scheduled(&self, at: Instant) {
        let mut state = self.lock();
        state.first_scheduled.get_or_insert(at);
        drop(state);
        self.queue_span
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// Records one pair's score; answers the request when it was the last.
    pub fn complete_pair(&self, doc_index: usize, score: f32) {
        let mut state = self.lock();
        if state.reply.is_none() {
            return;
        }
        if let Some(slot) = state.scores.get_mut(doc_index) {
            *slot = score;
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let scores = std::mem::take(&mut state.scores);
            let first_scheduled = state.first_scheduled;
            if let Some(tx) = state.reply.take() {
                let _ = tx.send(Ok(Scored {
                    scores,
                    first_scheduled,
                }));
            }
        }
    }

    /// Fails the whole request (first error wins).
    pub fn fail(&self, error: EngineError) {
        if let Some(tx) = self.lock().reply.take() {
            let _ = tx.send(Err(error));
        }
    }
}
