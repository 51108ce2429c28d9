//! Routing by `model`: which models the pool serves (from NATS service discovery) and the client
//! that reaches each.
//!
//! - No `model` (or an empty one): the pool's default model, through the sidecar's main client
//!   (`rerank.v1`, or the JetStream jobs subject `rerank.jobs.v1` with `--transport jetstream`).
//! - The default model's id, while a worker serves it: the main client, like no `model`.
//! - With `--transport jetstream`, a `model` whose jobs a consumer of the stream takes (its
//!   workers ran at least once; [`crate::jobs`]): a durable job on that model's jobs subject
//!   (`rerank.jobs.v1.model.<token>`), whether or not a worker runs now. So a model's pool scales
//!   to zero like the default's: its jobs wait in the stream (for their TTL at most) until a
//!   worker starts, and outlive a worker that dies.
//! - A `model` some worker serves otherwise (core intake): that model's subject
//!   ([`crate::wire::model_subject`]), over core request-reply.
//! - Any other `model`: 404 `model_not_found`, naming the models that are served or queued; 503
//!   `unavailable` when there are none at all (nothing to compare against). A job for a model no
//!   worker ever took is never published: it would wait for its TTL unanswered.
//!
//! The catalog is the `$SRV.INFO` replies gathered for [`SidecarConfig::models_wait`]
//! (`crate::sidecar::SidecarConfig`), and with JetStream the stream's consumers, kept for
//! [`SidecarConfig::models_ttl`]. A stale catalog
//! still routes the models it lists (and is refreshed in the background), so a request for a
//! known model never waits for discovery; a model missing from it triggers a refresh at most once
//! per [`MISS_REFRESH`], so unknown names cannot turn every request into a discovery round.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::client::{RerankClient, RerankError, WorkerInfo};
use crate::jobs::{subject_covers, JobConsumers, TakenJobs, DEFAULT_CONSUMER};
use crate::wire::ErrorCode;

use super::error::ApiError;

/// Shortest interval between two discovery rounds caused by an unknown model.
pub const MISS_REFRESH: Duration = Duration::from_secs(1);

/// One model the pool serves, merged over the workers that serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    pub id: String,
    /// Architecture family (config.json `model_type`), when the workers report it.
    pub family: Option<String>,
    /// Whether it answers requests that name no model.
    pub default: bool,
    /// Workers that answered discovery for it.
    pub workers: usize,
    /// Their devices (`cpu`, `cuda:0`...), sorted, without repeats.
    pub devices: Vec<String>,
    /// Unix seconds when this sidecar first saw it.
    pub first_seen: u64,
}

#[derive(Default)]
struct Catalog {
    fetched: Option<Instant>,
    models: Vec<ServedModel>,
    first_seen: HashMap<String, u64>,
    /// What the job stream's consumers take (JetStream transport).
    taken: Vec<TakenJobs>,
}

struct Inner {
    /// The main client: the default model (core `rerank.v1` or JetStream jobs).
    default: RerankClient,
    /// A core NATS client on the pool's base subject: discovery and the core-intake models.
    pool: RerankClient,
    /// The job stream's consumers, with the JetStream transport (`default` publishes jobs).
    jobs: Option<JobConsumers>,
    wait: Duration,
    ttl: Duration,
    catalog: Mutex<Catalog>,
    refreshing: AtomicBool,
}

/// The sidecar's model router; cheap to clone.
#[derive(Clone)]
pub struct Models {
    inner: Arc<Inner>,
}

impl Models {
    /// `default` serves requests without a model; `pool` (core NATS on the base subject) finds
    /// the models and reaches those on the core intake; `jobs` (with the JetStream transport, whose
    /// `default` client then publishes jobs) says which models' jobs a worker pool takes.
    pub fn new(
        default: RerankClient,
        pool: RerankClient,
        jobs: Option<JobConsumers>,
        wait: Duration,
        ttl: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                default,
                pool,
                jobs,
                wait,
                ttl,
                catalog: Mutex::new(Catalog::default()),
                refreshing: AtomicBool::new(false),
            }),
        }
    }

    /// The main client (the default model).
    pub fn default_client(&self) -> &RerankClient {
        &self.inner.default
    }

    /// What the pool serves, default first, then by id (discovery at most every `ttl`).
    pub async fn list(&self) -> Result<Vec<ServedModel>, RerankError> {
        let fresh = {
            let catalog = self.lock();
            catalog
                .fetched
                .filter(|at| at.elapsed() < self.inner.ttl)
                .map(|_| catalog.models.clone())
        };
        match fresh {
            Some(models) => Ok(models),
            None => self.refresh().await,
        }
    }

    /// The client for a request's `model` (see the module docs).
    pub async fn client_for(&self, model: Option<&str>) -> Result<RerankClient, ApiError> {
        let Some(model) = model.filter(|m| !m.is_empty()) else {
            return Ok(self.inner.default.clone());
        };
        let (found, fetched) = {
            let catalog = self.lock();
            (self.route(&catalog, model), catalog.fetched)
        };
        let stale = fetched.is_none_or(|at| at.elapsed() >= self.inner.ttl);
        if let Some(client) = found {
            if stale {
                self.refresh_in_background();
            }
            return Ok(client);
        }
        if fetched.is_none_or(|at| at.elapsed() >= MISS_REFRESH) {
            self.refresh().await?;
        }
        let catalog = self.lock();
        match self.route(&catalog, model) {
            Some(client) => Ok(client),
            None => Err(not_served(model, &catalog.models, &catalog.taken)),
        }
    }

    /// The client that reaches `model` if the catalog knows it (see the module docs).
    fn route(&self, catalog: &Catalog, model: &str) -> Option<RerankClient> {
        let served = catalog.models.iter().find(|m| m.id == model);
        if served.is_some_and(|m| m.default) {
            return Some(self.inner.default.clone());
        }
        if let Some(jobs) = &self.inner.jobs {
            let subject = jobs.stream().subject_for(model);
            let queued = catalog
                .taken
                .iter()
                .any(|t| t.subjects.iter().any(|s| subject_covers(s, &subject)));
            if queued {
                return Some(self.inner.default.with_model(model));
            }
        }
        served.map(|_| self.inner.pool.with_model(model))
    }

    /// Gathers `$SRV.INFO` (and the job stream's consumers) now and replaces the catalog.
    async fn refresh(&self) -> Result<Vec<ServedModel>, RerankError> {
        let taken = async {
            match &self.inner.jobs {
                None => Some(Vec::new()),
                Some(jobs) => jobs
                    .list()
                    .await
                    .inspect_err(|e| tracing::warn!(error = %e, "cannot list the job stream's consumers; keeping the last list"))
                    .ok(),
            }
        };
        let (workers, taken) = tokio::join!(self.inner.pool.pool_workers(self.inner.wait), taken);
        let workers = workers?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut catalog = self.lock();
        if let Some(taken) = taken {
            catalog.taken = taken;
        }
        let mut models = merge(&workers);
        add_queued(&mut models, &catalog.taken);
        for model in &mut models {
            model.first_seen = *catalog.first_seen.entry(model.id.clone()).or_insert(now);
        }
        catalog.models = models.clone();
        catalog.fetched = Some(Instant::now());
        Ok(models)
    }

    fn refresh_in_background(&self) {
        if self.inner.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let models = self.clone();
        tokio::spawn(async move {
            if let Err(e) = models.refresh().await {
                tracing::debug!(error = %e, "model catalog refresh failed");
            }
            models.inner.refreshing.store(false, Ordering::Release);
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.inner
            .catalog
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One entry per model id, over the workers that loaded their model; default first, then by id.
pub fn merge(workers: &[WorkerInfo]) -> Vec<ServedModel> {
    let mut by_id: HashMap<&str, (ServedModel, BTreeSet<String>)> = HashMap::new();
    for worker in workers.iter().filter(|w| w.model_loaded) {
        let Some(id) = worker.model.as_deref() else {
            continue;
        };
        let (model, devices) = by_id.entry(id).or_insert_with(|| {
            (
                ServedModel {
                    id: id.to_string(),
                    family: None,
                    default: false,
                    workers: 0,
                    devices: Vec::new(),
                    first_seen: 0,
                },
                BTreeSet::new(),
            )
        });
        model.workers += 1;
        model.default |= worker.default_model;
        if model.family.is_none() {
            model.family = worker.family.clone();
        }
        if let Some(device) = &worker.device {
            devices.insert(device.clone());
        }
    }
    let mut models: Vec<ServedModel> = by_id
        .into_values()
        .map(|(mut model, devices)| {
            model.devices = devices.into_iter().collect();
            model
        })
        .collect();
    sort_default_first(&mut models);
    models
}

/// Adds the models whose pool takes jobs from the stream but runs no worker now (scaled to zero),
/// named by their consumers' metadata: 0 workers, no devices, family unknown; the default model's
/// pool is the one on [`DEFAULT_CONSUMER`]. The list stays default first, then by id.
fn add_queued(models: &mut Vec<ServedModel>, taken: &[TakenJobs]) {
    for queue in taken {
        let Some(id) = queue.model.as_deref() else {
            continue;
        };
        if models.iter().any(|m| m.id == id) {
            continue;
        }
        models.push(ServedModel {
            id: id.to_string(),
            family: None,
            default: queue.consumer == DEFAULT_CONSUMER,
            workers: 0,
            devices: Vec::new(),
            first_seen: 0,
        });
    }
    sort_default_first(models);
}

/// The order `GET /v1/models` lists: the default model first, then by id.
fn sort_default_first(models: &mut [ServedModel]) {
    models.sort_by(|a, b| b.default.cmp(&a.default).then_with(|| a.id.cmp(&b.id)));
}

/// Longest part of an unknown `model` echoed in the error (the field is the caller's, of any size).
const ECHOED_MODEL_CHARS: usize = 128;

/// 404 `model_not_found` naming what is served (or queued: a pool scaled to zero), or 503 when
/// there is nothing to compare against.
fn not_served(model: &str, served: &[ServedModel], taken: &[TakenJobs]) -> ApiError {
    let model = match model.char_indices().nth(ECHOED_MODEL_CHARS) {
        Some((cut, _)) => format!("{}…", &model[..cut]),
        None => model.to_string(),
    };
    let known: BTreeSet<&str> = served
        .iter()
        .map(|m| m.id.as_str())
        .chain(taken.iter().filter_map(|t| t.model.as_deref()))
        .collect();
    if known.is_empty() {
        return ApiError::new(
            ErrorCode::Unavailable,
            format!("no worker answered service discovery, so model `{model}` cannot be reached"),
        );
    }
    // Served first, in the catalog's order, then the ones only queued.
    let mut names: Vec<String> = served.iter().map(|m| format!("`{}`", m.id)).collect();
    for queued in known
        .iter()
        .filter(|id| !served.iter().any(|m| m.id == **id))
    {
        names.push(format!("`{queued}`"));
    }
    ApiError::new(
        ErrorCode::ModelNotFound,
        format!(
            "model `{model}` is not served here; the pool serves {}",
            names.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(model: &str, default: bool, device: &str) -> WorkerInfo {
        WorkerInfo {
            id: format!("{model}-{device}"),
            model: Some(model.into()),
            family: Some("llama_bidirec".into()),
            default_model: default,
            model_subject: None,
            device: Some(device.into()),
            dtype: None,
            max_length: None,
            model_loaded: true,
            subject: None,
        }
    }

    #[test]
    fn workers_merge_per_model_default_first() {
        let mut loading = worker("c", false, "cpu");
        loading.model_loaded = false;
        let models = merge(&[
            worker("b", false, "cpu"),
            worker("a", true, "cuda:0"),
            worker("b", false, "cuda:1"),
            worker("b", false, "cpu"),
            loading,
        ]);
        let ids: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(models[0].default && !models[1].default);
        assert_eq!(models[1].workers, 3);
        assert_eq!(models[1].devices, ["cpu", "cuda:1"]);
    }

    #[test]
    fn an_unknown_model_names_the_served_ones() {
        let served = merge(&[worker("a", true, "cpu"), worker("b", false, "cpu")]);
        let error = not_served("x", &served, &[]);
        assert_eq!(error.code, ErrorCode::ModelNotFound);
        assert_eq!(error.status.as_u16(), 404);
        assert!(
            error.message.contains("`a`") && error.message.contains("`b`"),
            "{}",
            error.message
        );
        assert_eq!(not_served("x", &[], &[]).code, ErrorCode::Unavailable);
        // A pool scaled to zero is still named (from its consumer's metadata).
        let queued = TakenJobs {
            consumer: "rerank-workers-c".into(),
            model: Some("c".into()),
            subjects: vec!["rerank.jobs.v1.model.c".into()],
        };
        let error = not_served("x", &[], std::slice::from_ref(&queued));
        assert_eq!(error.code, ErrorCode::ModelNotFound);
        assert!(error.message.contains("`c`"), "{}", error.message);
        let error = not_served("x", &served, &[queued]);
        assert!(
            error.message.ends_with("`a`, `b`, `c`"),
            "{}",
            error.message
        );
        let long = not_served(&"é".repeat(1 << 20), &served, &[]);
        assert!(long.message.len() < 1024, "{}", long.message.len());
    }

    /// Pools scaled to zero are listed from their consumers (0 workers), after the served
    /// models unless theirs is the default consumer; a consumer without a model is skipped.
    #[test]
    fn queued_models_are_listed_with_no_workers() {
        let queue = |consumer: &str, model: Option<&str>| TakenJobs {
            consumer: consumer.into(),
            model: model.map(Into::into),
            subjects: Vec::new(),
        };
        let mut models = merge(&[worker("b", false, "cpu")]);
        add_queued(
            &mut models,
            &[
                queue("rerank-workers-c", Some("c")),
                queue("rerank-workers-b", Some("b")),
                queue(DEFAULT_CONSUMER, Some("a")),
                queue("old", None),
            ],
        );
        let listed: Vec<(&str, bool, usize)> = models
            .iter()
            .map(|m| (m.id.as_str(), m.default, m.workers))
            .collect();
        assert_eq!(listed, [("a", true, 0), ("b", false, 1), ("c", false, 0)]);
    }
}
