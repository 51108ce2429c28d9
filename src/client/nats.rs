//! The NATS transport: one MessagePack request-reply per attempt, and worker discovery through the
//! NATS service API (`$SRV.PING.<service>`).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::StreamExt;

use crate::telemetry::propagation;
use crate::wire::{self, ErrorCode, ReplyBody, RerankReply, RerankRequest};

use super::{RerankError, WorkerInfo};

/// A NATS connection and the subject the worker pool listens on.
#[derive(Clone, Debug)]
pub(crate) struct NatsTransport {
    pub client: async_nats::Client,
    pub subject: String,
    /// NATS service name the workers register (`rerank`).
    pub service: String,
}

/// Serialized size of a header block, as async-nats computes it before sending
/// (`NATS/1.0\r\n`, each `name: value\r\n`, `\r\n`).
pub(crate) fn headers_wire_len(headers: &HeaderMap) -> usize {
    if headers.is_empty() {
        return 0;
    }
    let mut len = b"NATS/1.0\r\n\r\n".len();
    for (name, values) in headers.iter() {
        for value in values {
            len += AsRef::<str>::as_ref(name).len() + 2 + value.as_str().len() + 2;
        }
    }
    len
}

impl NatsTransport {
    pub fn max_payload(&self) -> Option<usize> {
        Some(self.client.max_payload()).filter(|&m| m > 0)
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// One attempt: encode, check the size, send with the trace context, decode.
    pub async fn send(
        &self,
        request: &RerankRequest,
        timeout: Duration,
    ) -> Result<RerankReply, RerankError> {
        let payload = wire::encode(request);
        let mut headers = HeaderMap::new();
        propagation::inject_nats(&tracing::Span::current(), &mut headers);
        let size = payload.len() + headers_wire_len(&headers);
        // Refuse here rather than let the server cut the connection (or async-nats refuse with a
        // less helpful message): the request could never be delivered.
        if let Some(limit) = self.max_payload().filter(|&limit| size > limit) {
            return Err(RerankError::PayloadTooLarge { size, limit });
        }
        let nats_request = async_nats::Request::new()
            .payload(Bytes::from(payload))
            .headers(headers)
            .timeout(Some(timeout));
        let message = self
            .client
            .send_request(self.subject.clone(), nats_request)
            .await
            .map_err(|e| match e.kind() {
                async_nats::client::RequestErrorKind::TimedOut => RerankError::Timeout { timeout },
                async_nats::client::RequestErrorKind::NoResponders => RerankError::NoResponders {
                    subject: self.subject.clone(),
                },
                async_nats::client::RequestErrorKind::MaxPayloadExceeded => {
                    RerankError::PayloadTooLarge {
                        size,
                        limit: self.client.max_payload(),
                    }
                }
                async_nats::client::RequestErrorKind::InvalidSubject => RerankError::Service {
                    code: ErrorCode::InvalidRequest,
                    message: format!("invalid NATS subject {:?}: {e}", self.subject),
                    retry_after: None,
                },
                async_nats::client::RequestErrorKind::Other => {
                    RerankError::Connection(e.to_string())
                }
            })?;
        decode(&message)
    }

    /// Asks every instance of the service for its PING response and collects those serving this
    /// transport's subject within `wait`; stops early once `enough` returns true for the list.
    pub async fn discover(
        &self,
        wait: Duration,
        enough: impl Fn(&[WorkerInfo]) -> bool,
    ) -> Result<Vec<WorkerInfo>, RerankError> {
        // Workers of other pools (another subject) may share the server and the service name.
        let serves_subject = |info: &WorkerInfo| {
            let subject = Some(self.subject.as_str());
            info.subject.is_none()
                || info.subject.as_deref() == subject
                || info.model_subject.as_deref() == subject
        };
        self.ask("PING", wait, serves_subject, enough).await
    }

    /// Every worker of the pool whose base subject is this transport's subject, whatever its
    /// model, from the `$SRV.INFO` replies that arrive within `wait`.
    pub async fn discover_pool(&self, wait: Duration) -> Result<Vec<WorkerInfo>, RerankError> {
        let model_prefix = format!("{}.{}.", self.subject, wire::MODEL_SUBJECT_INFIX);
        let in_pool = |info: &WorkerInfo| {
            info.subject.as_deref() == Some(self.subject.as_str())
                || info
                    .model_subject
                    .as_deref()
                    .is_some_and(|s| s.starts_with(&model_prefix))
        };
        self.ask("INFO", wait, in_pool, |_| false).await
    }

    /// Publishes `$SRV.<verb>.<service>` with an inbox of ours, so every instance answers, and
    /// collects the answers `keep` accepts until `wait` passes or `enough` says so.
    async fn ask(
        &self,
        verb: &str,
        wait: Duration,
        keep: impl Fn(&WorkerInfo) -> bool,
        enough: impl Fn(&[WorkerInfo]) -> bool,
    ) -> Result<Vec<WorkerInfo>, RerankError> {
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| RerankError::Connection(e.to_string()))?;
        // A plain request returns the first instance only; publishing to an inbox we own lets every
        // instance answer. With none subscribed the server sends a 503 status at once.
        self.client
            .publish_with_reply(format!("$SRV.{verb}.{}", self.service), inbox, Bytes::new())
            .await
            .map_err(|e| RerankError::Connection(e.to_string()))?;
        let mut workers = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await {
            if message.status == Some(StatusCode::NO_RESPONDERS) {
                break;
            }
            let Ok(ping) = serde_json::from_slice::<PingReply>(&message.payload) else {
                tracing::debug!(verb, "ignoring an undecodable service discovery reply");
                continue;
            };
            let info = WorkerInfo::from_metadata(ping.id, ping.metadata);
            if !keep(&info) {
                continue;
            }
            workers.push(info);
            if enough(&workers) {
                break;
            }
        }
        let _ = replies.unsubscribe().await;
        Ok(workers)
    }

    pub async fn close(&self) {
        if let Err(e) = self.client.drain().await {
            tracing::debug!(error = %e, "NATS drain on close failed");
        }
    }
}

#[derive(serde::Deserialize)]
struct PingReply {
    #[serde(default)]
    id: String,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

/// Turns a reply message into a reply or a typed error (ADR-32 headers plus the MessagePack body).
pub(crate) fn decode(message: &async_nats::Message) -> Result<RerankReply, RerankError> {
    let header_code = message
        .headers
        .as_ref()
        .and_then(|h| h.get(wire::HEADER_SERVICE_ERROR_CODE))
        .map(|v| v.as_str().to_string());
    match wire::decode_reply(&message.payload) {
        Ok(ReplyBody::Ok(reply)) if header_code.is_none() => Ok(reply),
        Ok(ReplyBody::Err(e)) => Err(RerankError::Service {
            code: e.error.code,
            message: e.error.message,
            retry_after: None,
        }),
        // An error header without our body (e.g. a plain service error): keep what it says.
        Ok(ReplyBody::Ok(_)) | Err(_) if header_code.is_some() => {
            let description = message
                .headers
                .as_ref()
                .and_then(|h| h.get(wire::HEADER_SERVICE_ERROR))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default();
            let code = header_code
                .as_deref()
                .and_then(|c| c.parse::<u16>().ok())
                .map_or(ErrorCode::ModelError, ErrorCode::for_status);
            Err(RerankError::Service {
                code,
                message: description,
                retry_after: None,
            })
        }
        Ok(ReplyBody::Ok(_)) | Err(_) => Err(RerankError::InvalidResponse(format!(
            "undecodable reply of {} bytes from the worker",
            message.payload.len()
        ))),
    }
}
