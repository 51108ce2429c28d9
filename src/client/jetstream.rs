//! The JetStream transport: each attempt is a durable job in the workers' stream
//! ([`crate::jobs`] defines it; this file needs only its subject: the jobs subject, or a model's
//! jobs subject, [`crate::wire::model_subject`] of it).
//!
//! Per attempt: subscribe to a fresh inbox, publish the job with that inbox in `Rerank-Reply-To`,
//! a `Nats-Msg-Id` (a publish retried after a lost ack is stored once), the deadline in the body
//! and as `Nats-TTL` (the stream deletes the job unprocessed when the caller has given up), wait
//! for the stream's ack (the job is durable from then on), then wait on the inbox until the
//! deadline and take the first reply (a job redelivered after a worker died may be answered twice).
//! The request waits in the stream while no worker runs: this is what lets the pool scale to zero.
//!
//! Losing the connection (a NATS server died or restarted) loses any reply sent while the inbox
//! had no interest, and the job may be acked by then. So a caller whose connection was replaced
//! while it waited publishes the job once more, with a fresh `Nats-Msg-Id`, after its inbox is
//! subscribed again; the first reply wins. This is part of one attempt, not a retry: callers with
//! `retries(0)` lose nothing to a server restart or to the loss of one node of a cluster.

use std::error::Error as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::context::{
    GetStreamByNameErrorKind, PublishErrorKind, RequestError, RequestErrorKind,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;

use crate::telemetry::propagation;
use crate::wire::{self, ErrorCode, RerankReply, RerankRequest};

use super::nats::{decode, headers_wire_len, NatsTransport};
use super::RerankError;

/// Pause before publishing again after a lost stream ack (the attempt's deadline bounds the tries).
const PUBLISH_PAUSE: Duration = Duration::from_millis(100);
/// How often a caller waiting for a reply checks whether its connection was replaced.
const RECONNECT_CHECK: Duration = Duration::from_millis(100);
/// What a full stream asks the caller to wait.
const FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A JetStream context and the jobs subject; discovery goes through the core transport.
#[derive(Clone, Debug)]
pub(crate) struct JetStreamTransport {
    pub js: async_nats::jetstream::Context,
    /// Same connection, `subject` = the jobs subject this client publishes to (the default
    /// model's, or one model's); worker discovery filters on it.
    pub core: NatsTransport,
}

impl JetStreamTransport {
    pub fn new(client: async_nats::Client, subject: String, service: String) -> Self {
        Self {
            js: async_nats::jetstream::new(client.clone()),
            core: NatsTransport {
                client,
                subject,
                service,
            },
        }
    }

    pub async fn send(
        &self,
        request: &RerankRequest,
        timeout: Duration,
    ) -> Result<RerankReply, RerankError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let client = &self.core.client;
        let subject = &self.core.subject;
        let payload = Bytes::from(wire::encode(request));
        let inbox = client.new_inbox();
        let job_id = inbox.rsplit('.').next().unwrap_or(&inbox).to_string();
        let mut headers = HeaderMap::new();
        propagation::inject_nats(&tracing::Span::current(), &mut headers);
        headers.insert(wire::HEADER_REPLY_TO, inbox.as_str());
        headers.insert("Nats-Msg-Id", job_id.as_str());
        // Whole seconds, rounded up (0 would mean "no TTL").
        let ttl = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        headers.insert("Nats-TTL", ttl.max(1).to_string().as_str());
        let size = payload.len() + headers_wire_len(&headers);
        if let Some(limit) = self.core.max_payload().filter(|&limit| size > limit) {
            return Err(RerankError::PayloadTooLarge { size, limit });
        }
        // Subscribe before publishing: a warm worker may answer before the ack arrives.
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| RerankError::Connection(e.to_string()))?;
        let connects = || client.statistics().connects.load(Ordering::Relaxed);
        let result = async {
            // Read before the job is published: a reconnect from here on may have lost a reply.
            let mut seen = connects();
            self.publish(subject, &payload, &headers, deadline, timeout, size)
                .await?;
            let mut check = tokio::time::interval(RECONNECT_CHECK);
            let mut asked = 1u32;
            let reply = |message: Option<async_nats::Message>| match message {
                Some(message) => decode(&message),
                None => Err(RerankError::Connection(
                    "the reply subscription ended".into(),
                )),
            };
            loop {
                tokio::select! {
                    // A reply that has arrived wins over the deadline.
                    biased;
                    message = replies.next() => break reply(message),
                    () = tokio::time::sleep_until(deadline) => break Err(RerankError::Timeout { timeout }),
                    _ = check.tick() => {
                        let now = connects();
                        if now == seen {
                            continue;
                        }
                        // The connection was replaced: a reply sent while the inbox had no
                        // interest is gone for good (core NATS), and the job may already be
                        // acked. Ask again as a new job (new Msg-Id) on the new connection, whose
                        // inbox subscription is restored first; the first reply wins.
                        seen = now;
                        asked += 1;
                        let again = reask_headers(&headers, &job_id, asked, deadline);
                        tracing::debug!(asked, "reconnected while waiting for a job's reply; publishing it again");
                        // Best effort, and the first job's reply may come meanwhile.
                        tokio::select! {
                            biased;
                            message = replies.next() => break reply(message),
                            asked_again = self.publish(subject, &payload, &again, deadline, timeout, size) => {
                                if let Err(e) = asked_again {
                                    tracing::debug!(error = %e, "could not publish the job again");
                                }
                            }
                        }
                    }
                }
            }
        }
        .await;
        let _ = replies.unsubscribe().await;
        result
    }

    /// Publishes the job until the stream acks it or the deadline passes (same `Nats-Msg-Id` on
    /// every try).
    async fn publish(
        &self,
        subject: &str,
        payload: &Bytes,
        headers: &HeaderMap,
        deadline: tokio::time::Instant,
        timeout: Duration,
        size: usize,
    ) -> Result<(), RerankError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let publish = async {
                self.js
                    .send_publish(
                        subject.to_string(),
                        PublishMessage::build()
                            .payload(payload.clone())
                            .headers(headers.clone()),
                    )
                    .await?
                    .await
            };
            let error = match tokio::time::timeout_at(deadline, publish).await {
                Err(_) => return Err(RerankError::Timeout { timeout }),
                Ok(Ok(_ack)) => return Ok(()),
                Ok(Err(error)) => error,
            };
            match error.kind() {
                // The ack was lost (a server died, the stream is electing a leader): publish
                // again until the deadline; the duplicate window stores the job once.
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                    tracing::debug!(error = %error, tries, "job publish not acked; publishing again");
                    tokio::select! {
                        () = tokio::time::sleep(PUBLISH_PAUSE) => continue,
                        () = tokio::time::sleep_until(deadline) => return Err(RerankError::Timeout { timeout }),
                    }
                }
                // "No responders": no stream captures the subject, or the one that does has no
                // leader right now (a cluster electing one after a server died). Only the first
                // ends the attempt; ask the meta leader which it is.
                PublishErrorKind::StreamNotFound if self.stream_exists(subject, deadline).await => {
                    tracing::debug!(tries, "the job stream has no leader right now; publishing again");
                    tokio::select! {
                        () = tokio::time::sleep(PUBLISH_PAUSE) => continue,
                        () = tokio::time::sleep_until(deadline) => return Err(RerankError::Timeout { timeout }),
                    }
                }
                PublishErrorKind::StreamNotFound => {
                    return Err(RerankError::Service {
                        code: ErrorCode::Unavailable,
                        message: format!(
                            "no JetStream stream captures {subject}: start a worker with --intake jetstream (or the sidecar) to create it"
                        ),
                        retry_after: None,
                    })
                }
                PublishErrorKind::MaxPayloadExceeded => {
                    return Err(RerankError::PayloadTooLarge {
                        size,
                        limit: self.core.client.max_payload(),
                    })
                }
                _ if stream_is_full(&error) => {
                    return Err(RerankError::Service {
                        code: ErrorCode::Overloaded,
                        message: "the job queue is full; retry later".into(),
                        retry_after: Some(FULL_RETRY_AFTER),
                    })
                }
                _ => return Err(RerankError::Connection(error.to_string())),
            }
        }
    }
}

impl JetStreamTransport {
    /// Whether a stream captures `subject`, as far as can be told by `deadline`: only a definite
    /// "none" (or no JetStream at all) is false; a lookup that fails otherwise (no meta leader
    /// yet, a lost reply) counts as "it may", so the publish is tried again.
    async fn stream_exists(&self, subject: &str, deadline: tokio::time::Instant) -> bool {
        let lookup = tokio::time::timeout_at(deadline, self.js.stream_by_subject(subject)).await;
        match lookup {
            Ok(Ok(_)) | Err(_) => true,
            Ok(Err(e)) => {
                e.kind() != GetStreamByNameErrorKind::NotFound && !caused_by_no_responders(&e)
            }
        }
    }
}

/// Whether a JetStream API request in `error`'s chain had no responders (no JetStream on the
/// server).
fn caused_by_no_responders(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<RequestError>()
            .is_some_and(|e| e.kind() == RequestErrorKind::NoResponders)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The headers of a job asked again after a reconnect: a fresh `Nats-Msg-Id` (the first one may
/// have been answered and acked already, so the duplicate window would swallow it) and a
/// `Nats-TTL` for the time left.
fn reask_headers(
    headers: &HeaderMap,
    job_id: &str,
    asked: u32,
    deadline: tokio::time::Instant,
) -> HeaderMap {
    let mut again = headers.clone();
    again.insert("Nats-Msg-Id", format!("{job_id}-{asked}").as_str());
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let ttl = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    again.insert("Nats-TTL", ttl.max(1).to_string().as_str());
    again
}

/// Whether the stream refused the job for its message or byte limit (`discard: new`).
fn stream_is_full(error: &async_nats::jetstream::context::PublishError) -> bool {
    let Some(source) = error
        .source()
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
    else {
        return false;
    };
    let text = source.to_string().to_ascii_lowercase();
    text.contains("maximum messages")
        || text.contains("maximum bytes")
        || text.contains("resources exceeded")
}
