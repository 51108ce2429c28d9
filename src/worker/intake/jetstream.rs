//! The JetStream intake: jobs are pulled from the durable WorkQueue stream ([`crate::jobs`]),
//! through the durable consumer of this worker's model (which takes that model's jobs only).
//!
//! - **Pull only what fits:** a worker holds at most `max_pulled_jobs` jobs (pulled and not yet
//!   answered) and asks for exactly as many as it has room for, with a short `expires`; the rest
//!   stay in the stream for whichever worker frees up first (no 200-message default pulls).
//! - **Reply, then ack:** the caller's inbox travels in the `Rerank-Reply-To` header (JetStream
//!   keeps no reply subject). The worker publishes the reply, flushes, then acks: a worker that
//!   dies before the ack leaves the job to be delivered again after `ack_wait`, and another worker
//!   answers it (the caller keeps the first reply).
//!   A reconnect between the reply and the ack may have dropped the reply (async-nats discards
//!   what it had not written) while the ack went out on the new connection: the worker then
//!   replies again. A caller that reconnects while waiting asks again (client::jetstream).
//! - **Progress:** while a job computes, an in-progress ack every `ack_wait / 3` keeps it ours.
//! - **Bounded redelivery:** the consumer's last delivery (`max_deliver`) is not computed again:
//!   the caller gets `model_error` and the job is terminated, not left in the stream.
//! - **Poison:** an undecodable job is answered `invalid_request` and terminated at once.
//! - **Expiry:** a job whose deadline passed is terminated without computing (the stream already
//!   deletes those whose `Nats-TTL` passed while queued).
//! - **Overload:** a job the engine cannot queue now is handed back (`Nak` with a delay) instead of
//!   refused: another worker, or this one later, takes it.
//! - **Drain:** stop pulling, let the pull in flight end (≤ its `expires`), answer and ack every
//!   job pulled. No core subscription is drained, so async-nats's drain race does not apply, and a
//!   job lost anyway (a crash) is redelivered.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{consumer::PullConsumer, AckKind, Message};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::wire::{self, ErrorCode};

use super::super::handler::{self, Answer, HandlerContext};

/// How long one pull waits for jobs before asking again; bounds the extra time of a drain.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// How long an overloaded worker hands a job back for.
const NAK_DELAY: Duration = Duration::from_millis(500);
/// Replies sent again at most, when the connection keeps changing while a job is answered.
const REPLY_AGAIN_TRIES: u32 = 3;
/// Pause after a failed pull (NATS down, stream gone) before trying again.
const PULL_RETRY: Duration = Duration::from_millis(250);

/// Settings read from the consumer the worker pulls from.
#[derive(Debug, Clone, Copy)]
struct JobRules {
    ack_wait: Duration,
    max_deliver: i64,
}

/// A pulling JetStream intake.
pub struct JetStreamIntake {
    consumer: PullConsumer,
    permits: Arc<Semaphore>,
    max_pulled_jobs: usize,
    rules: JobRules,
    handlers: JoinSet<()>,
    lag_watch: tokio::task::JoinHandle<()>,
}

impl JetStreamIntake {
    pub async fn new(
        mut consumer: PullConsumer,
        max_pulled_jobs: usize,
        ctx: &Arc<HandlerContext>,
    ) -> Result<Self, String> {
        let info = consumer.info().await.map_err(|e| e.to_string())?;
        let rules = JobRules {
            ack_wait: info.config.ack_wait,
            max_deliver: info.config.max_deliver,
        };
        let lag_watch = tokio::spawn(watch_lag(consumer.clone(), ctx.clone()));
        let max_pulled_jobs = max_pulled_jobs.max(1);
        Ok(Self {
            consumer,
            permits: Arc::new(Semaphore::new(max_pulled_jobs)),
            max_pulled_jobs,
            rules,
            handlers: JoinSet::new(),
            lag_watch,
        })
    }

    /// Pulls and answers jobs until `stop` resolves; returns once the pull in flight has ended.
    pub async fn serve(
        &mut self,
        ctx: &Arc<HandlerContext>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut stopping = false;
        while !stopping {
            let first = tokio::select! {
                permit = self.permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = &mut stop => break,
                Some(_) = self.handlers.join_next(), if !self.handlers.is_empty() => continue,
            };
            let mut permits = vec![first];
            while permits.len() < self.max_pulled_jobs {
                match self.permits.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let batch = self
                .consumer
                .batch()
                .max_messages(permits.len())
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(error = %e, "pulling jobs failed; retrying");
                    drop(permits);
                    tokio::select! {
                        () = tokio::time::sleep(PULL_RETRY) => continue,
                        () = &mut stop => break,
                    }
                }
            };
            // Read this pull to its end even when stopping: what the server hands us is ours to
            // answer (or it would wait for ack_wait before another worker got it).
            loop {
                tokio::select! {
                    message = batch.next() => match message {
                        Some(Ok(job)) => {
                            let Some(permit) = permits.pop() else {
                                // More than asked for: cannot happen; hand it back.
                                let _ = job.ack_with(AckKind::Nak(None)).await;
                                continue;
                            };
                            self.handlers.spawn(handle_job(ctx.clone(), job, permit, self.rules));
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "pull ended with an error");
                            break;
                        }
                        None => break,
                    },
                    () = &mut stop, if !stopping => stopping = true,
                    Some(_) = self.handlers.join_next(), if !self.handlers.is_empty() => {}
                }
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.handlers.len()
    }

    /// Answers and acks every job pulled.
    pub async fn drain(&mut self) {
        while self.handlers.join_next().await.is_some() {}
        self.lag_watch.abort();
    }

    /// Gives up on what is left (drain timeout): those jobs are delivered again after ack_wait.
    pub fn abandon(&mut self) {
        self.handlers.abort_all();
        self.lag_watch.abort();
    }
}

/// Mirrors the consumer's lag (pending and ack-pending jobs) into gauges.
async fn watch_lag(mut consumer: PullConsumer, ctx: Arc<HandlerContext>) {
    loop {
        if let Ok(info) = consumer.info().await {
            let m = &ctx.metrics;
            m.jobs_pending
                .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
            m.jobs_ack_pending
                .set(i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What happens to a job once it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    Term,
}

/// One job: check it, compute it (with progress acks), reply, flush, then ack.
async fn handle_job(
    ctx: Arc<HandlerContext>,
    job: Message,
    _permit: OwnedSemaphorePermit,
    rules: JobRules,
) {
    let received = Instant::now();
    let span = handler::request_span(&job.subject, job.headers.as_ref());
    let reply_to = job
        .headers
        .as_ref()
        .and_then(|h| h.get(wire::HEADER_REPLY_TO))
        .map(|v| async_nats::Subject::from(v.as_str()));
    let delivered = job.info().map(|i| i.delivered).unwrap_or(1);
    if delivered > 1 {
        ctx.metrics.jobs_redelivered.inc();
    }

    let last_delivery = rules.max_deliver > 1 && delivered >= rules.max_deliver;
    let answer = if last_delivery {
        Answer::error(
            ErrorCode::ModelError,
            format!(
                "the job was delivered {delivered} times without being answered (workers stopped while computing it); not trying again"
            ),
        )
    } else {
        let compute = handler::answer(&ctx, &job.payload, &span);
        tokio::pin!(compute);
        let period = (rules.ack_wait / 3).max(Duration::from_millis(100));
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                answer = &mut compute => break answer,
                _ = progress.tick() => {
                    if let Err(e) = job.ack_with(AckKind::Progress).await {
                        tracing::debug!(parent: &span, error = %e, "progress ack failed");
                    }
                }
            }
        }
    };

    let settle = match answer.code {
        // Not this worker's to refuse: another one (or this one, later) takes it.
        Some(ErrorCode::Overloaded | ErrorCode::Unavailable) => {
            if let Err(e) = job.ack_with(AckKind::Nak(Some(NAK_DELAY))).await {
                tracing::debug!(parent: &span, error = %e, "nak failed");
            }
            return;
        }
        Some(ErrorCode::DeadlineExceeded) => {
            ctx.metrics.jobs_expired.inc();
            Settle::Term
        }
        // Poison: it would fail the same way on every delivery.
        Some(ErrorCode::InvalidRequest) => Settle::Term,
        // Out of deliveries (answered above without computing).
        Some(ErrorCode::ModelError) if last_delivery => Settle::Term,
        _ => Settle::Ack,
    };
    // The connection the reply goes out on. async-nats drops what it had not yet written when the
    // connection breaks, then sends later commands (the ack) on the new one: a reply lost that way
    // with its ack delivered would be a job acked and never answered. Reply and ack on one
    // connection are safe (the server handles them in order; a dead server loses both, and the
    // job is redelivered), so a change of connection in between means: reply again.
    let connects = || ctx.client.statistics().connects.load(Ordering::Relaxed);
    let before = connects();
    let resend = reply_to.as_ref().map(|to| {
        (
            to.clone(),
            answer.headers.clone(),
            Bytes::from(answer.body.clone()),
        )
    });
    match reply_to {
        Some(reply_to) => {
            let sent = handler::reply(&ctx, reply_to, answer, received, &span).await;
            let flushed = match sent {
                Ok(()) => ctx.client.flush().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = flushed {
                // Not acked: the job is delivered again and answered then.
                tracing::warn!(parent: &span, error = %e, "could not publish the reply; the job will be redelivered");
                return;
            }
        }
        None => {
            tracing::warn!(parent: &span, "job without a {} header: nobody to answer", wire::HEADER_REPLY_TO)
        }
    }
    let acked = match settle {
        Settle::Ack => job.ack().await,
        Settle::Term => {
            ctx.metrics.jobs_terminated.inc();
            job.ack_with(AckKind::Term).await
        }
    };
    let acked = match acked {
        Ok(()) => ctx.client.flush().await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match acked {
        Ok(()) => ctx
            .metrics
            .job_ack_seconds
            .observe(received.elapsed().as_secs_f64()),
        Err(e) => {
            tracing::warn!(parent: &span, error = %e, "ack failed; the job may be answered twice")
        }
    }
    reply_again_after_reconnect(&ctx, resend, before, connects, &span).await;
}

/// Publishes the reply again while the connection changed since `before` (bounded): the caller
/// keeps the first reply it gets, so a second one is harmless, and a lost one is not.
async fn reply_again_after_reconnect(
    ctx: &HandlerContext,
    resend: Option<(async_nats::Subject, async_nats::HeaderMap, Bytes)>,
    mut before: u64,
    connects: impl Fn() -> u64,
    span: &tracing::Span,
) {
    let Some((reply_to, headers, body)) = resend else {
        return;
    };
    for _ in 0..REPLY_AGAIN_TRIES {
        let now = connects();
        if now == before {
            return;
        }
        before = now;
        ctx.metrics.jobs_replied_again.inc();
        tracing::info!(parent: span, "reconnected while answering a job; replying again");
        let sent = ctx
            .client
            .publish_with_headers(reply_to.clone(), headers.clone(), body.clone())
            .await;
        if let Err(e) = sent {
            tracing::warn!(parent: span, error = %e, "could not reply again");
            return;
        }
        if let Err(e) = ctx.client.flush().await {
            tracing::warn!(parent: span, error = %e, "could not flush the reply sent again");
            return;
        }
    }
}
