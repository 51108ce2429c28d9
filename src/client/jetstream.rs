//! The JetStream transport: each attempt is a durable job in the workers' stream
//! ([`crate::jobs`] defines it; this file needs only its subject).
//!
//! Per attempt: subscribe to a fresh inbox, publish the job with that inbox in `Rerank-Reply-To`,
//! a `Nats-Msg-Id` (a publish retried after a lost ack is stored once), the deadline in the body
//! and as `Nats-TTL` (the stream deletes the job unprocessed when the caller has given up), wait
//! for the stream's ack (the job is durable from then on), then wait on the inbox until the
//! deadline and take the first reply (a job redelivered after a worker died may be answered twice).
//! The request waits in the stream while no worker runs: this is what lets the pool scale to zero.

use std::error::Error as _;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;

use crate::telemetry::propagation;
use crate::wire::{self, ErrorCode, RerankReply, RerankRequest};

use super::nats::{decode, headers_wire_len, NatsTransport};
use super::RerankError;

/// Publishes retried after a lost stream ack, within one attempt.
const PUBLISH_TRIES: u32 = 3;
/// What a full stream asks the caller to wait.
const FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A JetStream context and the jobs subject; discovery goes through the core transport.
#[derive(Clone, Debug)]
pub(crate) struct JetStreamTransport {
    pub js: async_nats::jetstream::Context,
    /// Same connection, `subject` = the jobs subject (worker discovery filters on it).
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
        let result = async {
            self.publish(subject, &payload, &headers, deadline, timeout, size)
                .await?;
            match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(message)) => decode(&message),
                Ok(None) => Err(RerankError::Connection(
                    "the reply subscription ended".into(),
                )),
                Err(_) => Err(RerankError::Timeout { timeout }),
            }
        }
        .await;
        let _ = replies.unsubscribe().await;
        result
    }

    /// Publishes the job until the stream acks it (same `Nats-Msg-Id` on every try).
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
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
                    if tries < PUBLISH_TRIES =>
                {
                    tracing::debug!(error = %error, "job publish not acked; publishing again");
                    continue;
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
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                    return Err(RerankError::Connection(error.to_string()))
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
