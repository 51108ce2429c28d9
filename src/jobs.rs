//! The durable job queue of the JetStream intake: one WorkQueue stream and one durable pull
//! consumer per model, defined once here and created (idempotently) by whoever comes first: a
//! worker, or (the stream only) a sidecar that accepts jobs while the pool is scaled to zero.
//!
//! What the stream guarantees (see README "Serverless workers"):
//! - WorkQueue retention and file storage: a job is stored until a worker acks or terminates it,
//!   and survives a nats-server restart;
//! - a duplicate window, so a publish retried with the same `Nats-Msg-Id` is stored once;
//! - per-message TTL (`Nats-TTL`, ADR-43): a job whose caller gave up is deleted unprocessed;
//! - limits on messages and bytes with `discard: new`, so a full stream refuses the publish (the
//!   caller sees `overloaded`) instead of dropping queued work.
//!
//! # Names
//! `J` is the jobs subject (`--jobs-subject`, default `rerank.jobs.v1`), `C` the consumer name
//! (`--consumer`, default `rerank-workers`), `<token>` the model id as one subject token
//! ([`wire::model_token`], the rule of [`wire::model_subject`]):
//!
//! | what | name |
//! |---|---|
//! | the stream (`--stream`, default `RERANK`) | captures `J` and `J.model.*` |
//! | a job for model M | published to `J.model.<token>` = [`wire::model_subject`]`(J, M)` |
//! | a job that names no model | published to `J` (the pool's default model; what callers before per-model jobs sent) |
//! | the default model's workers (`--default-model true`) | durable consumer `C`, filtering `J` and `J.model.<token>` |
//! | any other model's workers | durable consumer `C-<token>`, filtering `J.model.<token>` |
//!
//! Multiple filter subjects need nats-server 2.10 or later. A WorkQueue stream gives each job to
//! one consumer and refuses consumers whose filters overlap. `J` never overlaps a model subject
//! and distinct ids never share a token, so filters overlap only when one model is served both as
//! the default and not: a worker checks the stream's consumers before creating its own and stops
//! with [`JobQueueError::ConsumerOverlap`]. Two default models would share `C`: the second stops
//! with [`JobQueueError::ConsumerMismatch`].
//!
//! Upgrades from before per-model jobs are done in place: a stream capturing `J` only gets
//! `J.model.*` added (its jobs stay), and the consumer `C`, which then took every job unfiltered,
//! is narrowed to `J` by the first worker that starts, then widened to the default model's own
//! subject by that model's workers. Anything else that does not fit (not WorkQueue, no per-message
//! TTL, ack policy not explicit, a consumer taking other subjects) is refused with a typed error
//! that names what to delete.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::TryStreamExt;

use crate::wire;

/// Defaults, one place each.
pub const DEFAULT_STREAM: &str = "RERANK";
pub const DEFAULT_JOBS_SUBJECT: &str = "rerank.jobs.v1";
/// The default model's consumer, and the prefix of every other model's (`rerank-workers-<token>`).
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
/// Consumer metadata key naming the model whose jobs it takes (for operators and callers).
pub const METADATA_MODEL: &str = "rerank_model";

/// The stream: its name, the jobs subject, its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStream {
    pub name: String,
    /// `J`: jobs that name no model; the stream also captures `J.model.*` (see the module docs).
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

/// The durable consumers' shared settings; each model's name and filters come from
/// [`for_model`](Self::for_model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobConsumer {
    /// `C`: the default model's consumer, and the prefix of the others' (`C-<token>`).
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

/// One model's durable consumer: its name and the jobs subjects it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConsumer {
    pub name: String,
    pub filters: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobQueueError {
    #[error("the jobs subject {subject:?} cannot be used: {why}")]
    JobsSubject { subject: String, why: String },
    #[error("the jobs subject {subject} overlaps the core request subject {core}; pick a --jobs-subject that does not (a core request to a stream-captured subject gets the stream's ack as its reply)")]
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
    #[error("the consumer {name} of stream {stream} would take the jobs on {subject}, which the consumer {other} already takes (a WorkQueue stream gives each job to one consumer): is model `{model}` served both as the default model and not? Give all its workers the same --default-model, or delete the consumer {other} if no worker uses it any more")]
    ConsumerOverlap {
        stream: String,
        name: String,
        other: String,
        subject: String,
        model: String,
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

/// Whether every subject `subject` matches (wildcards allowed) is matched by `pattern`.
pub fn subject_covers(pattern: &str, subject: &str) -> bool {
    let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some(_), Some(">")) => return false,
            (Some("*"), Some(_)) => continue,
            (Some(x), Some(y)) if x == y => continue,
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl JobStream {
    /// The subjects the stream captures: `J` and `J.model.*`.
    pub fn subjects(&self) -> Vec<String> {
        vec![self.subject.clone(), wire::model_subjects(&self.subject)]
    }

    /// Where a job for `model` is published: `J.model.<token>`.
    pub fn subject_for(&self, model: &str) -> String {
        wire::model_subject(&self.subject, model)
    }

    /// Checks the names without asking the server: `J` is a literal subject, and neither it nor
    /// `J.model.*` overlaps the core subjects (`core_subject` and its model subjects).
    pub fn check(&self, core_subject: &str) -> Result<(), JobQueueError> {
        let bad = |why: &str| JobQueueError::JobsSubject {
            subject: self.subject.clone(),
            why: why.into(),
        };
        if self.subject.is_empty() || self.subject.split('.').any(str::is_empty) {
            return Err(bad("it has an empty token"));
        }
        if self
            .subject
            .split('.')
            .any(|t| t == "*" || t == ">" || t.chars().any(char::is_whitespace))
        {
            return Err(bad(
                "it has a wildcard or whitespace (it must be one literal subject; the model subjects are derived from it)",
            ));
        }
        let core = [core_subject.to_string(), wire::model_subjects(core_subject)];
        for jobs in self.subjects() {
            if let Some(core) = core.iter().find(|c| subjects_overlap(&jobs, c)) {
                return Err(JobQueueError::Overlap {
                    subject: jobs,
                    core: core.clone(),
                });
            }
        }
        Ok(())
    }

    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: self.subjects(),
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

    /// Creates the stream if it is missing; adds `J.model.*` to one that captures `J` only (made
    /// before per-model jobs); refuses one that exists with settings the job queue cannot work
    /// with (not WorkQueue, not capturing `J`, no per-message TTL).
    pub async fn ensure(
        &self,
        js: &jetstream::Context,
        core_subject: &str,
    ) -> Result<stream::Stream, JobQueueError> {
        self.check(core_subject)?;
        let failed = |e: String| JobQueueError::Stream {
            name: self.name.clone(),
            message: e,
        };
        let mut stream = js
            .get_or_create_stream(self.config())
            .await
            .map_err(|e| failed(e.to_string()))?;
        let info = stream.info().await.map_err(|e| failed(e.to_string()))?;
        let mut config = info.config.clone();
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
        if !config.allow_message_ttl {
            return Err(mismatch("it does not allow per-message TTL".into()));
        }
        let captured = |subject: &str| config.subjects.iter().any(|c| subject_covers(c, subject));
        if !captured(&self.subject) {
            return Err(mismatch(format!(
                "it captures {:?}, not {}",
                config.subjects, self.subject
            )));
        }
        let missing: Vec<String> = self
            .subjects()
            .into_iter()
            .filter(|s| !captured(s))
            .collect();
        if !missing.is_empty() {
            tracing::info!(stream = %self.name, ?missing, "the job stream predates per-model jobs; adding their subjects");
            config.subjects.extend(missing.iter().cloned());
            js.update_stream(config).await.map_err(|e| {
                mismatch(format!(
                    "it captures only {:?} and adding {missing:?} failed ({e})",
                    info.config.subjects
                ))
            })?;
        }
        Ok(stream)
    }

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

    /// A read-only view of the stream's consumers, for callers that route by model.
    pub fn consumers_on(&self, client: &async_nats::Client) -> JobConsumers {
        JobConsumers {
            js: jetstream::new(client.clone()),
            stream: self.clone(),
        }
    }
}

/// The subjects a consumer takes, from its configuration; empty: every subject of the stream.
fn filters_of(config: &consumer::Config) -> Vec<String> {
    if config.filter_subject.is_empty() {
        config.filter_subjects.clone()
    } else {
        vec![config.filter_subject.clone()]
    }
}

impl JobConsumer {
    /// The consumer of `model`'s workers and what it takes (the naming table in the module docs).
    pub fn for_model(&self, stream: &JobStream, model: &str, default: bool) -> ModelConsumer {
        if default {
            ModelConsumer {
                name: self.name.clone(),
                filters: vec![stream.subject.clone(), stream.subject_for(model)],
            }
        } else {
            ModelConsumer {
                name: format!("{}-{}", self.name, wire::model_token(model)),
                filters: vec![stream.subject_for(model)],
            }
        }
    }

    /// Creates `model`'s durable pull consumer if it is missing (after checking that no other
    /// consumer takes its subjects), upgrades the default one made before per-model jobs, and
    /// refuses one that exists with settings the workers cannot work with. Returns it with its
    /// actual settings.
    pub async fn ensure(
        &self,
        stream: &stream::Stream,
        jobs: &JobStream,
        model: &str,
        default: bool,
    ) -> Result<(consumer::PullConsumer, ModelConsumer), JobQueueError> {
        let wanted = self.for_model(jobs, model, default);
        let failed = |e: String| JobQueueError::Consumer {
            stream: jobs.name.clone(),
            name: wanted.name.clone(),
            message: e,
        };
        let mismatch = |why: String| JobQueueError::ConsumerMismatch {
            stream: jobs.name.clone(),
            name: wanted.name.clone(),
            why,
        };
        let mut existing: HashMap<String, Vec<String>> = stream
            .consumers()
            .map_ok(|info| (info.name.clone(), filters_of(&info.config)))
            .try_collect()
            .await
            .map_err(|e| failed(format!("cannot list the stream's consumers: {e}")))?;

        // The default consumer of a stream made before per-model jobs takes everything, which
        // only ever was `J`: narrow it, so that the other models' consumers may exist beside it.
        if existing.get(&self.name).is_some_and(Vec::is_empty) {
            let legacy = vec![jobs.subject.clone()];
            tracing::info!(consumer = %self.name, "the default consumer predates per-model jobs; narrowing it to {}", jobs.subject);
            set_filters(stream, &self.name, &legacy, None)
                .await
                .map_err(|e| {
                    failed(format!(
                        "cannot narrow {} to {}: {e}",
                        self.name, jobs.subject
                    ))
                })?;
            existing.insert(self.name.clone(), legacy);
        }

        for (other, filters) in existing.iter().filter(|(n, _)| **n != wanted.name) {
            let clash = wanted.filters.iter().find(|ours| {
                filters.is_empty() || filters.iter().any(|f| subjects_overlap(f, ours))
            });
            if let Some(subject) = clash {
                return Err(JobQueueError::ConsumerOverlap {
                    stream: jobs.name.clone(),
                    name: wanted.name.clone(),
                    other: other.clone(),
                    subject: subject.clone(),
                    model: model.to_string(),
                });
            }
        }

        let same = |filters: &[String]| {
            filters.iter().collect::<BTreeSet<_>>()
                == wanted.filters.iter().collect::<BTreeSet<_>>()
        };
        match existing.get(&wanted.name) {
            Some(filters) if same(filters) => {}
            // The default consumer at `J` only (narrowed above, or by a worker of another model):
            // its model's subject is added.
            Some(filters) if default && filters.as_slice() == std::slice::from_ref(&jobs.subject) => {
                set_filters(stream, &wanted.name, &wanted.filters, Some(model))
                    .await
                    .map_err(|e| failed(format!("cannot add {}: {e}", jobs.subject_for(model))))?;
            }
            Some(filters) => {
                return Err(mismatch(format!(
                    "it takes the jobs on {filters:?}, not {:?} (the workers of another model use it{})",
                    wanted.filters,
                    if default { ": are two models marked --default-model?" } else { "" }
                )))
            }
            None => {}
        }
        let config = consumer::pull::Config {
            durable_name: Some(wanted.name.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            filter_subjects: wanted.filters.clone(),
            // Each worker asks for what it can take; many small pulls may wait at once.
            max_waiting: 512,
            metadata: HashMap::from([(METADATA_MODEL.to_string(), model.to_string())]),
            ..Default::default()
        };
        let mut consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(&wanted.name, config)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let info = consumer.info().await.map_err(|e| failed(e.to_string()))?;
        // Another worker may have created it meanwhile, with other filters.
        let filters = filters_of(&info.config);
        if !same(&filters) {
            return Err(mismatch(format!(
                "it takes the jobs on {filters:?}, not {:?}",
                wanted.filters
            )));
        }
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
        Ok((consumer, wanted))
    }
}

/// Sets an existing consumer's filter subjects (nats-server ≥ 2.10 allows it), keeping the rest
/// of its configuration.
async fn set_filters(
    stream: &stream::Stream,
    name: &str,
    filters: &[String],
    model: Option<&str>,
) -> Result<(), String> {
    let info = stream
        .consumer_info(name)
        .await
        .map_err(|e| e.to_string())?;
    let mut config = info.config;
    config.filter_subject = String::new();
    config.filter_subjects = filters.to_vec();
    if let Some(model) = model {
        config
            .metadata
            .insert(METADATA_MODEL.to_string(), model.to_string());
    }
    stream
        .update_consumer(config)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The jobs one consumer of the stream takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenJobs {
    pub consumer: String,
    /// The model it was made for (its metadata), when it says.
    pub model: Option<String>,
    /// Its filter subjects.
    pub subjects: Vec<String>,
}

/// A read-only view of the stream's consumers: a job published to a subject no consumer takes
/// would wait for its TTL unanswered, so callers that route by model publish only where some
/// worker pool (running or scaled to zero) takes the jobs.
#[derive(Debug, Clone)]
pub struct JobConsumers {
    js: jetstream::Context,
    stream: JobStream,
}

impl JobConsumers {
    /// The stream's jobs subjects (`J`, and [`JobStream::subject_for`] a model).
    pub fn stream(&self) -> &JobStream {
        &self.stream
    }

    /// Every consumer of the stream and what it takes. An unfiltered consumer predates per-model
    /// jobs and counts as taking `J` only (what it was made for).
    pub async fn list(&self) -> Result<Vec<TakenJobs>, JobQueueError> {
        let failed = |e: String| JobQueueError::Stream {
            name: self.stream.name.clone(),
            message: e,
        };
        let stream = self
            .js
            .get_stream(&self.stream.name)
            .await
            .map_err(|e| failed(e.to_string()))?;
        stream
            .consumers()
            .map_ok(|info| {
                let mut subjects = filters_of(&info.config);
                if subjects.is_empty() {
                    subjects.push(self.stream.subject.clone());
                }
                TakenJobs {
                    consumer: info.name.clone(),
                    model: info.config.metadata.get(METADATA_MODEL).cloned(),
                    subjects,
                }
            })
            .try_collect()
            .await
            .map_err(|e| failed(e.to_string()))
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

    #[test]
    fn covering_subjects_are_found() {
        assert!(subject_covers("rerank.jobs.v1", "rerank.jobs.v1"));
        assert!(subject_covers(
            "rerank.jobs.v1.model.*",
            "rerank.jobs.v1.model.*"
        ));
        assert!(subject_covers("rerank.jobs.>", "rerank.jobs.v1.model.*"));
        assert!(subject_covers("rerank.*.v1", "rerank.jobs.v1"));
        assert!(!subject_covers("rerank.jobs.v1", "rerank.jobs.v1.model.*"));
        assert!(!subject_covers(
            "rerank.jobs.v1.model.a",
            "rerank.jobs.v1.model.*"
        ));
        assert!(!subject_covers("rerank.jobs.*", "rerank.jobs.>"));
    }

    /// The names the Helm chart relies on.
    #[test]
    fn models_get_their_own_subject_and_consumer() {
        let stream = JobStream::default();
        assert_eq!(
            stream.subjects(),
            ["rerank.jobs.v1", "rerank.jobs.v1.model.*"]
        );
        let consumer = JobConsumer::default();
        assert_eq!(
            consumer.for_model(&stream, "org/alpha-1.0", true),
            ModelConsumer {
                name: "rerank-workers".into(),
                filters: vec![
                    "rerank.jobs.v1".into(),
                    "rerank.jobs.v1.model.org_2Falpha-1_2E0".into()
                ],
            }
        );
        assert_eq!(
            consumer.for_model(&stream, "beta_model", false),
            ModelConsumer {
                name: "rerank-workers-beta_5Fmodel".into(),
                filters: vec!["rerank.jobs.v1.model.beta_5Fmodel".into()],
            }
        );
    }

    /// Filters of distinct models never overlap, and the default's `J` overlaps none of them.
    #[test]
    fn consumer_filters_of_distinct_models_do_not_overlap() {
        let (stream, consumer) = (JobStream::default(), JobConsumer::default());
        let ids = [
            "a",
            "a.",
            "a_2E",
            "org/alpha-1.0",
            "beta_model",
            "",
            "*",
            ">",
        ];
        let mut all: Vec<(String, String)> = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            for filter in consumer.for_model(&stream, id, i == 0).filters {
                all.push((id.to_string(), filter));
            }
        }
        for (i, (id_a, a)) in all.iter().enumerate() {
            for (id_b, b) in &all[i + 1..] {
                assert!(!subjects_overlap(a, b), "{id_a} {a} / {id_b} {b}");
            }
        }
    }

    #[test]
    fn bad_jobs_subjects_are_refused_by_name() {
        let with = |subject: &str| JobStream {
            subject: subject.into(),
            ..JobStream::default()
        };
        assert!(with("rerank.jobs.v1").check("rerank.v1").is_ok());
        for bad in [
            "rerank.jobs.*",
            "rerank.>",
            "",
            "rerank..jobs",
            "rerank jobs",
        ] {
            assert!(
                matches!(
                    with(bad).check("rerank.v1"),
                    Err(JobQueueError::JobsSubject { .. })
                ),
                "{bad}"
            );
        }
        // `J` on a core model subject, and `J.model.*` on the core subject.
        for (jobs, core) in [
            ("rerank.v1.model.x", "rerank.v1"),
            ("a", "a.model.x"),
            ("rerank.v1", "rerank.v1"),
        ] {
            assert!(
                matches!(with(jobs).check(core), Err(JobQueueError::Overlap { .. })),
                "{jobs} / {core}"
            );
        }
    }
}
