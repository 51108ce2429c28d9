//! The durable job queue of the JetStream intake: one WorkQueue stream and one shared durable pull
//! consumer, defined once here and created (idempotently) by whoever comes first: a worker, or a
//! sidecar that accepts jobs while the pool is scaled to zero.
//!
//! What the stream guarantees (see README "Serverless workers"):
//! - WorkQueue retention and file storage: a job is stored until a worker acks or terminates it,
//!   and survives a nats-server restart;
//! - a duplicate window, so a publish retried with the same `Nats-Msg-Id` is stored once;
//! - per-message TTL (`Nats-TTL`, ADR-43): a job whose caller gave up is deleted unprocessed;
//! - limits on messages and bytes with `discard: new`, so a full stream refuses the publish (the
//!   caller sees `overloaded`) instead of dropping queued work.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

/// Defaults, one place each.
pub const DEFAULT_STREAM: &str = "RERANK";
pub const DEFAULT_JOBS_SUBJECT: &str = "rerank.jobs.v1";
pub const DEFAULT_CONSUMER: &str = "rerank-workers";
pub const DEFAULT_MAX_MESSAGES: i64 = 100_000;
pub const DEFAULT_MAX_BYTES: i64 = 1 << 30;
pub const DEFAULT_ACK_WAIT_SECS: u64 = 30;
pub const DEFAULT_MAX_DELIVER: i64 = 4;
/// Jobs one worker holds at once: 64 requests of the seed's shape (15 documents) are ~1,000
/// pairs, well inside the batcher's default queue of 4,096, and enough to keep its batches full
/// (at 32, 64 callers got ~65 % of core's throughput; at 64, ~95 %: `bench/intakes.sh`).
pub const DEFAULT_MAX_PULLED_JOBS: usize = 64;
/// How long a `Nats-Msg-Id` is remembered: longer than any publish retry.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The stream: its name, the subject it captures, its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStream {
    pub name: String,
    pub subject: String,
    pub max_messages: i64,
    pub max_bytes: i64,
    /// 1 on a single server, 3 on a cluster.
    pub replicas: usize,
}

impl Default for JobStream {
    fn default() -> Self {
        Self {
            name: DEFAULT_STREAM.into(),
            subject: DEFAULT_JOBS_SUBJECT.into(),
            max_messages: DEFAULT_MAX_MESSAGES,
            max_bytes: DEFAULT_MAX_BYTES,
            replicas: 1,
        }
    }
}

/// The shared durable consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobConsumer {
    pub name: String,
    /// Without an ack (or a progress ack) for this long, a job is delivered again.
    pub ack_wait: Duration,
    /// Deliveries of one job; the last one only answers the caller with an error.
    pub max_deliver: i64,
}

impl Default for JobConsumer {
    fn default() -> Self {
        Self {
            name: DEFAULT_CONSUMER.into(),
            ack_wait: Duration::from_secs(DEFAULT_ACK_WAIT_SECS),
            max_deliver: DEFAULT_MAX_DELIVER,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobQueueError {
    #[error("the jobs subject {subject} overlaps the core request subject {core}; pick one that does not (a core request to a stream-captured subject gets the stream's ack as its reply)")]
    Overlap { subject: String, core: String },
    #[error("cannot create or read the JetStream stream {name}: {message} (is JetStream enabled on the NATS server?)")]
    Stream { name: String, message: String },
    #[error("the existing JetStream stream {name} cannot serve as the job queue: {why}; delete it or pick another --stream")]
    StreamMismatch { name: String, why: String },
    #[error("cannot create or read the consumer {name} of stream {stream}: {message}")]
    Consumer {
        stream: String,
        name: String,
        message: String,
    },
    #[error("the existing consumer {name} of stream {stream} cannot serve the workers: {why}; delete it or pick another --consumer")]
    ConsumerMismatch {
        stream: String,
        name: String,
        why: String,
    },
}

/// Whether two NATS subjects (with `*`/`>` wildcards) can match a common subject.
pub fn subjects_overlap(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('.'), b.split('.'));
    loop {
        match (a.next(), b.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == y || x == "*" || y == "*" => continue,
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl JobStream {
    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: vec![self.subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::New,
            duplicate_window: DUPLICATE_WINDOW,
            allow_message_ttl: true,
            max_messages: self.max_messages,
            max_bytes: self.max_bytes,
            num_replicas: self.replicas.max(1),
            ..Default::default()
        }
    }

    /// Creates the stream if it is missing; refuses one that exists with settings the job queue
    /// cannot work with (not WorkQueue, not capturing the subject, no per-message TTL).
    pub async fn ensure(
        &self,
        js: &jetstream::Context,
        core_subject: &str,
    ) -> Result<stream::Stream, JobQueueError> {
        if subjects_overlap(&self.subject, core_subject) {
            return Err(JobQueueError::Overlap {
                subject: self.subject.clone(),
                core: core_subject.to_string(),
            });
        }
        let mut stream =
            js.get_or_create_stream(self.config())
                .await
                .map_err(|e| JobQueueError::Stream {
                    name: self.name.clone(),
                    message: e.to_string(),
                })?;
        let info = stream.info().await.map_err(|e| JobQueueError::Stream {
            name: self.name.clone(),
            message: e.to_string(),
        })?;
        let config = &info.config;
        let mismatch = |why: String| JobQueueError::StreamMismatch {
            name: self.name.clone(),
            why,
        };
        if config.retention != stream::RetentionPolicy::WorkQueue {
            return Err(mismatch(format!(
                "its retention is {:?}, not WorkQueue",
                config.retention
            )));
        }
        if !config
            .subjects
            .iter()
            .any(|s| subjects_overlap(s, &self.subject))
        {
            return Err(mismatch(format!(
                "it captures {:?}, not {}",
                config.subjects, self.subject
            )));
        }
        if !config.allow_message_ttl {
            return Err(mismatch("it does not allow per-message TTL".into()));
        }
        Ok(stream)
    }
}

impl JobStream {
    /// [`ensure`](Self::ensure) on a plain connection (for callers that hold no JetStream context).
    pub async fn ensure_on(
        &self,
        client: &async_nats::Client,
        core_subject: &str,
    ) -> Result<(), JobQueueError> {
        self.ensure(&jetstream::new(client.clone()), core_subject)
            .await
            .map(drop)
    }
}

impl JobConsumer {
    /// Creates the durable pull consumer if it is missing; refuses one that exists with settings
    /// the workers cannot work with. Returns it with its actual settings.
    pub async fn ensure(
        &self,
        stream: &stream::Stream,
        stream_name: &str,
    ) -> Result<consumer::PullConsumer, JobQueueError> {
        let config = consumer::pull::Config {
            durable_name: Some(self.name.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            // Each worker asks for what it can take; many small pulls may wait at once.
            max_waiting: 512,
            ..Default::default()
        };
        let failed = |e: String| JobQueueError::Consumer {
            stream: stream_name.to_string(),
            name: self.name.clone(),
            message: e,
        };
        let mut consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(&self.name, config)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let info = consumer.info().await.map_err(|e| failed(e.to_string()))?;
        let mismatch = |why: String| JobQueueError::ConsumerMismatch {
            stream: stream_name.to_string(),
            name: self.name.clone(),
            why,
        };
        if info.config.ack_policy != consumer::AckPolicy::Explicit {
            return Err(mismatch(format!(
                "its ack policy is {:?}, not Explicit",
                info.config.ack_policy
            )));
        }
        if info.config.max_deliver <= 1 && info.config.max_deliver != -1 {
            return Err(mismatch(
                "max_deliver must allow at least 2 deliveries".into(),
            ));
        }
        Ok(consumer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_subjects_are_found() {
        assert!(subjects_overlap("rerank.v1", "rerank.v1"));
        assert!(subjects_overlap("rerank.*", "rerank.v1"));
        assert!(subjects_overlap("rerank.>", "rerank.jobs.v1"));
        assert!(!subjects_overlap("rerank.jobs.v1", "rerank.v1"));
        assert!(!subjects_overlap("rerank.jobs", "rerank.jobs.v1"));
    }
}
