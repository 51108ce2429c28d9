//! The batcher: admits requests, queues their pairs, packs batches and feeds the device thread.
//!
//! Transport-neutral (no NATS, HTTP or wire types): the worker, `rerank score` and `rerank bench`
//! all go through [`Engine::score`]. Only the [`executor`] thread touches the device.
//!
//! ```text
//! score() ── tokenize (blocking pool, query once) ── PairQueue::try_push ──► batching task
//!    ▲                                                   (Overloaded if full)     │ next_batch (token budget)
//!    └──── oneshot ◄── PendingRequest::complete_pair ◄── executor thread ◄── mpsc(1)
//! ```

mod error;
mod executor;
mod host_memory;
mod metrics;
mod queue;
mod request;

pub use error::EngineError;
pub use host_memory::reuse_freed_pass_buffers;
pub use metrics::EngineMetrics;
pub use queue::{Batch, PairQueue, QueueFull, QueuedPair, QueuedSequence};
pub use request::PendingRequest;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::model::{
    EncodePairsError, PairEncoder, Reranker, SequenceRef, TokenizeWork, Truncation,
};
use executor::Executor;

/// Batching limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Token budget of one device batch: real tokens per packed forward pass (there is no
    /// padding; one pair longer than the budget still runs, alone).
    pub max_batch_tokens: usize,
    /// Pairs allowed to wait; beyond it requests are refused with `Overloaded`.
    pub max_queue_pairs: usize,
    /// Documents allowed in one request; under CHUNK, windows count against it too.
    pub max_documents: usize,
    /// Most windows per document a CHUNK request may ask for (`max_chunks_per_doc`).
    pub max_chunks_per_doc: usize,
    /// Fault injection for tests and drills: extra time spent on every forward pass (a slow or
    /// stuck device). Zero in production.
    pub fault_batch_delay: Duration,
    /// Tokens of the warm-up forward pass run before `Ready` (TEI warms up with a full batch so an
    /// out-of-memory shows at boot, not under load). 0 skips it.
    pub warmup_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 16_384,
            max_queue_pairs: 4_096,
            max_documents: 1_000,
            max_chunks_per_doc: 32,
            fault_batch_delay: Duration::ZERO,
            warmup_tokens: 512,
        }
    }
}

/// One request for the engine.
#[derive(Debug, Clone, Default)]
pub struct ScoreRequest {
    pub query: String,
    pub documents: Vec<String>,
    pub truncation: Truncation,
    /// After this instant the caller no longer wants the answer.
    pub deadline: Option<Instant>,
}

/// Where a request's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub tokenize: Duration,
    /// From admission until the first pair reached the device.
    pub queue: Duration,
    /// From the first pair on the device until the last score.
    pub inference: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct ScoreResponse {
    /// Raw logits in document order (for a chunked document, its best window's).
    pub scores: Vec<f32>,
    /// Range of each document's text, in Unicode code points, that produced its score (the best
    /// window's).
    pub spans: Vec<std::ops::Range<usize>>,
    /// Sequences the model read: one per document, or one per window under CHUNK.
    pub pairs: usize,
    /// Tokens the model read for this request (after truncation).
    pub tokens: usize,
    pub timings: Timings,
}

/// Cheap cloneable handle to the batcher and its device thread.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    tokenizer: Arc<dyn PairEncoder>,
    config: EngineConfig,
    queue: Mutex<PairQueue>,
    work_available: Notify,
    closing: AtomicBool,
    metrics: EngineMetrics,
    threads: Mutex<Option<(std::thread::JoinHandle<()>, tokio::task::JoinHandle<()>)>>,
}

impl Engine {
    /// Starts the device thread, warms the model up and returns once the engine is `Ready`.
    /// Any model family: the engine sees only its [`Reranker`] and [`PairEncoder`].
    pub async fn start(
        model: Box<dyn Reranker>,
        tokenizer: Box<dyn PairEncoder>,
        config: EngineConfig,
        metrics: EngineMetrics,
    ) -> Result<Self, EngineError> {
        // Bound channel to 1: the batching task prepares the next batch while the device runs the
        // current one, and no more (later arrivals can still join the batch after it).
        let (batch_tx, batch_rx) = mpsc::channel::<Batch>(1);
        let (warm_tx, warm_rx) = tokio::sync::oneshot::channel();
        let executor = Executor {
            model,
            fault_batch_delay: config.fault_batch_delay,
            metrics: metrics.clone(),
        };
        let warmup_tokens = config.warmup_tokens.min(config.max_batch_tokens);
        let thread = std::thread::Builder::new()
            .name("rerank-executor".into())
            .spawn(move || {
                let warm = executor.warm_up(warmup_tokens);
                let ok = warm.is_ok();
                let _ = warm_tx.send(warm);
                if ok {
                    executor.run(batch_rx);
                }
            })
            .map_err(|e| EngineError::Model(format!("cannot start the executor thread: {e}")))?;
        match warm_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(EngineError::Model(format!("warm-up failed: {e}"))),
            Err(_) => {
                return Err(EngineError::Model(
                    "the executor thread died during warm-up".into(),
                ))
            }
        }
        let inner = Arc::new(Inner {
            tokenizer: Arc::from(tokenizer),
            queue: Mutex::new(PairQueue::new(config.max_queue_pairs)),
            config,
            work_available: Notify::new(),
            closing: AtomicBool::new(false),
            metrics,
            threads: Mutex::new(None),
        });
        let batcher = tokio::spawn(batching_loop(Arc::clone(&inner), batch_tx));
        *inner.threads.lock().unwrap_or_else(|e| e.into_inner()) = Some((thread, batcher));
        Ok(Self { inner })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Scores every document of `request` against its query.
    pub async fn score(&self, request: ScoreRequest) -> Result<ScoreResponse, EngineError> {
        let inner = &self.inner;
        let count = request.documents.len();
        if count > inner.config.max_documents {
            return Err(EngineError::TooManyDocuments {
                count,
                max: inner.config.max_documents,
            });
        }
        if count == 0 {
            return Ok(ScoreResponse::default());
        }
        if inner.closing.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        if request.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(EngineError::DeadlineExceeded);
        }

        // 1. Tokenize off the async threads; the query half once for all documents.
        let started = Instant::now();
        let tokenizer = Arc::clone(&inner.tokenizer);
        let truncation = request.truncation;
        let tokenize_span = tracing::info_span!("engine.tokenize", rerank.documents = count);
        let (sequences, work) = tokio::task::spawn_blocking(move || {
            let _enter = tokenize_span.enter();
            let docs: Vec<&str> = request.documents.iter().map(String::as_str).collect();
            let mut work = TokenizeWork::default();
            let sequences = tokenizer
                .encode_pairs_counting(&request.query, &docs, truncation, &mut work)
                .map(|pairs| {
                    pairs
                        .into_iter()
                        .map(|pair| {
                            let span = docs
                                .get(pair.doc_index)
                                .map_or(0..0, |doc| char_span(doc, &pair.span));
                            (pair, span)
                        })
                        .collect::<Vec<_>>()
                });
            (sequences, work)
        })
        .await
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        inner.metrics.tokenized_bytes.inc_by(work.bytes);
        let sequences = sequences.map_err(|e| match e {
            EncodePairsError::TooLong(t) => EngineError::DocumentTooLong(t),
            EncodePairsError::QueryTooLong(q) => EngineError::QueryTooLong(q),
            EncodePairsError::Unsupported(u) => EngineError::Unsupported(u),
            EncodePairsError::Tokenizer(e) => EngineError::Tokenizer(e.to_string()),
        })?;
        let tokenize = started.elapsed();
        inner.metrics.tokenize.observe(tokenize.as_secs_f64());
        let tokens = sequences.iter().map(|(pair, _)| pair.ids.len()).sum();
        // Windows are pairs like any other: for the limits, the queue and the batcher.
        let pairs = sequences.len();
        if pairs > inner.config.max_documents {
            return Err(EngineError::TooManyWindows {
                documents: count,
                pairs,
                max: inner.config.max_documents,
            });
        }
        let mut owners = Vec::with_capacity(pairs);
        let mut spans = Vec::with_capacity(pairs);
        let mut ids = Vec::with_capacity(pairs);
        for (pair, span) in sequences {
            owners.push(pair.doc_index);
            spans.push(span);
            ids.push(QueuedSequence {
                ids: pair.ids,
                second_segment: pair.second_segment,
            });
        }

        // 2. Admission: all pairs or none; a full queue refuses at once.
        let admitted = Instant::now();
        let (pending, reply) =
            PendingRequest::new(pairs, request.deadline, tracing::Span::current());
        {
            let mut queue = inner.lock_queue();
            queue
                .try_push(pending, ids)
                .map_err(|full| EngineError::Overloaded {
                    queued: full.queued,
                    requested: pairs,
                    capacity: full.capacity,
                })?;
            inner.metrics.queue_pairs.set(queue.queued_pairs() as i64);
        }
        inner.work_available.notify_one();

        // 3. Wait for the last pair.
        let scored = reply.await.map_err(|_| EngineError::ShuttingDown)??;
        let done = Instant::now();
        let first = scored.first_scheduled.unwrap_or(done);
        let queue = first.saturating_duration_since(admitted);
        inner.metrics.queue_wait.observe(queue.as_secs_f64());
        let (scores, spans) = best_window_per_document(count, &owners, spans, &scored.scores);
        Ok(ScoreResponse {
            scores,
            spans,
            pairs,
            tokens,
            timings: Timings {
                tokenize,
                queue,
                inference: done.saturating_duration_since(first),
            },
        })
    }

    /// Stops admitting, finishes everything queued, stops the device thread.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.closing.store(true, Ordering::Release);
        inner.work_available.notify_one();
        let threads = inner
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((thread, batcher)) = threads {
            let _ = batcher.await;
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// A byte range of `text` (on char boundaries) in Unicode code points.
fn char_span(text: &str, bytes: &std::ops::Range<usize>) -> std::ops::Range<usize> {
    let (Some(before), Some(inside)) = (text.get(..bytes.start), text.get(bytes.clone())) else {
        return 0..0;
    };
    let start = before.chars().count();
    start..start + inside.chars().count()
}

/// A document's score is its best window's (the only window, unless chunked); ties keep the
/// earlier window.
fn best_window_per_document(
    documents: usize,
    owners: &[usize],
    spans: Vec<std::ops::Range<usize>>,
    pair_scores: &[f32],
) -> (Vec<f32>, Vec<std::ops::Range<usize>>) {
    let mut best: Vec<Option<(f32, std::ops::Range<usize>)>> = vec![None; documents];
    for ((&doc, span), &score) in owners.iter().zip(spans).zip(pair_scores) {
        if let Some(slot) = best.get_mut(doc) {
            if slot.as_ref().is_none_or(|(top, _)| score > *top) {
                *slot = Some((score, span));
            }
        }
    }
    best.into_iter()
        .map(|slot| slot.unwrap_or((f32::NAN, 0..0)))
        .unzip()
}

impl Inner {
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, PairQueue> {
        // The queue's invariants hold between method calls; a panic elsewhere cannot break them.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Forms batches under the token budget and hands them to the device thread.
async fn batching_loop(inner: Arc<Inner>, batches: mpsc::Sender<Batch>) {
    loop {
        let batch = {
            let mut queue = inner.lock_queue();
            let batch = queue.next_batch(inner.config.max_batch_tokens, Instant::now());
            inner.metrics.queue_pairs.set(queue.queued_pairs() as i64);
            batch
        };
        match batch {
            Some(batch) => {
                if batches.send(batch).await.is_err() {
                    tracing::error!("executor thread is gone; stopping the batcher");
                    return;
                }
            }
            None => {
                if inner.closing.load(Ordering::Acquire) {
                    return;
                }
                inner.work_available.notified().await;
            }
        }
    }
}

impl Executor {
    /// One forward pass of about `tokens` tokens, so kernels compile and buffers are allocated
    /// before the engine reports ready.
    fn warm_up(&self, tokens: usize) -> Result<(), String> {
        if tokens == 0 {
            return Ok(());
        }
        let row = tokens.min(self.model.max_positions()).max(1);
        let rows = (tokens / row).max(1);
        let sequence = vec![0u32; row];
        let batch: Vec<SequenceRef<'_>> =
            (0..rows).map(|_| SequenceRef::single(&sequence)).collect();
        self.model
            .score_sequences(&batch)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
