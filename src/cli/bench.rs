//! `rerank bench`: drive the real batcher (or a worker pool over NATS, or any service that speaks
//! the seed's `POST /rerank` over HTTP) with a seeded workload and report throughput, latency
//! percentiles, padding and batch shapes as one JSON object.
//!
//! Workloads mirror `bench/torch_baseline.py`: `seed` is the user's service shape (15 documents
//! of 60–268 tokens per request), `long` is 100 documents of ~512 tokens, `custom` takes the flags.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use serde::Serialize;

use prometheus::core::Metric;

use crate::client::{RerankClient, RerankClientBuilder};
use crate::engine::{Engine, EngineMetrics, ScoreRequest, Timings};
use crate::wire::{self, ReplyBody, RerankRequest};

use crate::model::{ChunkPolicy, Truncation, DEFAULT_CHUNK_OVERLAP};

use super::args::{EngineArgs, IntakeKind, JobStreamArgs, ModelArgs, NatsArgs, TruncateArg};
use super::load::start_engine;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// Call the engine in-process (no transport): the batcher and the device only.
    Engine,
    /// Send MessagePack requests over NATS to whatever workers serve --subject.
    Nats,
    /// `POST {--url}/rerank` in the seed's JSON shape (`docs/seed-api.md`): our sidecar, or any
    /// seed-style service such as `bench/torch_cpu_baseline.py serve`. The seed reply carries no
    /// token usage, so `real_tokens` is 0 and `pairs` counts the scores returned.
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// 15 documents of 60–268 tokens per request (the RAG chatbot's shape).
    Seed,
    /// 100 documents of ~512 tokens per request.
    Long,
    /// --documents, --min-tokens, --max-tokens.
    Custom,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = BenchMode::Engine)]
    pub mode: BenchMode,
    #[arg(long, value_enum, default_value_t = Workload::Seed)]
    pub workload: Workload,
    /// Concurrent callers, each sending its next request when the previous one is answered.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Requests in total (after the warm-up requests).
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Requests sent first and not measured.
    #[arg(long, default_value_t = 2)]
    pub warmup_requests: usize,
    #[arg(long, default_value_t = 15)]
    pub documents: usize,
    #[arg(long, default_value_t = 60)]
    pub min_tokens: usize,
    #[arg(long, default_value_t = 268)]
    pub max_tokens: usize,
    /// Seed of the document lengths and words.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Engine mode: how long documents are treated (CHUNK scores up to --max-chunks-per-doc
    /// windows of --chunk-overlap tokens' overlap per document).
    #[arg(long, value_enum, default_value_t = TruncateArg::End)]
    pub truncate: TruncateArg,
    #[arg(long, default_value_t = DEFAULT_CHUNK_OVERLAP)]
    pub chunk_overlap: usize,
    /// Per-request timeout in NATS and HTTP modes, seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// HTTP mode: the service's base URL (requests go to `{url}/rerank`).
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    pub url: String,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// NATS mode: `core` sends request-reply on --subject; `jetstream` publishes durable jobs on
    /// --jobs-subject (workers started with `--intake jetstream`).
    #[arg(long, value_enum, default_value_t = IntakeKind::Core)]
    pub intake: IntakeKind,
    #[command(flatten)]
    pub jobs: JobStreamArgs,
}

/// One JSON line of results.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub mode: String,
    pub workload: String,
    pub device: String,
    pub dtype: String,
    pub concurrency: usize,
    pub requests: usize,
    pub failed: usize,
    pub pairs: u64,
    pub real_tokens: u64,
    pub seconds: f64,
    pub requests_per_s: f64,
    pub pairs_per_s: f64,
    pub real_tokens_per_s: f64,
    pub latency_ms: Percentiles,
    /// Engine mode only: padded tokens / real tokens − 1.
    pub padding_overhead: Option<f64>,
    /// Engine mode only: mean pairs and padded tokens per forward pass, and how many passes.
    pub batches: Option<BatchShapes>,
    /// Engine mode only: where a request's time went, on average.
    pub time_split_ms: Option<TimeSplit>,
    /// Engine mode only: this process's page faults during the measured run and its peak RSS.
    pub host_memory: Option<HostMemory>,
}

/// What the host allocator cost (engine mode, `engine::reuse_freed_pass_buffers`): page faults
/// count fresh pages touched; the peak resident set is what keeping freed pages costs.
#[derive(Debug, Serialize)]
pub struct HostMemory {
    pub page_faults: i64,
    pub peak_rss_mib: f64,
}

/// (minor + major page faults so far, peak RSS in KiB) of this process.
fn process_usage() -> (i64, i64) {
    // SAFETY: getrusage writes one `rusage` into the zeroed struct we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    (usage.ru_minflt + usage.ru_majflt, usage.ru_maxrss)
}

/// Mean milliseconds per request in each stage (engine mode): tokenization (on the blocking pool,
/// overlapping other requests' compute), waiting for the device, and on the device.
#[derive(Debug, Serialize)]
pub struct TimeSplit {
    pub tokenize: f64,
    pub queue: f64,
    pub inference: f64,
}

impl TimeSplit {
    fn mean_of(timings: &[Timings]) -> Self {
        let n = timings.len().max(1) as f64;
        let mean = |f: fn(&Timings) -> Duration| {
            timings.iter().map(|t| f(t).as_secs_f64()).sum::<f64>() * 1e3 / n
        };
        Self {
            tokenize: mean(|t| t.tokenize),
            queue: mean(|t| t.queue),
            inference: mean(|t| t.inference),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Serialize)]
pub struct BatchShapes {
    pub forward_passes: u64,
    pub mean_pairs: f64,
    pub mean_padded_tokens: f64,
    /// Upper bucket bound -> forward passes with at most that many pairs.
    pub pairs_histogram: Vec<(f64, u64)>,
}

/// Common single-token English words (with their leading space in Llama-3 BPE), so a document of
/// n words is close to n tokens.
const WORDS: [&str; 24] = [
    "the", "of", "and", "to", "in", "is", "for", "that", "with", "on", "as", "by", "this", "from",
    "at", "are", "was", "be", "or", "an", "it", "not", "which", "have",
];

/// Tiny deterministic generator (SplitMix64): the workload must not depend on a crate's RNG.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi.saturating_sub(lo) as u64 + 1)) as usize
    }
}

/// The shape of a run's requests.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadSpec {
    pub documents: usize,
    pub min_tokens: usize,
    pub max_tokens: usize,
    pub seed: u64,
}

impl WorkloadSpec {
    /// The RAG chatbot's shape: 15 documents of 60–268 tokens.
    pub fn seed_shape(seed: u64) -> Self {
        Self {
            documents: 15,
            min_tokens: 60,
            max_tokens: 268,
            seed,
        }
    }
}

impl BenchArgs {
    fn workload_spec(&self) -> WorkloadSpec {
        match self.workload {
            Workload::Seed => WorkloadSpec::seed_shape(self.seed),
            Workload::Long => WorkloadSpec {
                documents: 100,
                min_tokens: 512,
                max_tokens: 512,
                seed: self.seed,
            },
            Workload::Custom => WorkloadSpec {
                documents: self.documents,
                min_tokens: self.min_tokens,
                max_tokens: self.max_tokens,
                seed: self.seed,
            },
        }
    }
}

/// The requests of one run, deterministic in the spec's seed.
pub fn workload_requests(spec: &WorkloadSpec, count: usize) -> Vec<(String, Vec<String>)> {
    let mut rng = SplitMix(spec.seed);
    (0..count)
        .map(|r| {
            let documents = (0..spec.documents)
                .map(|_| {
                    // The template and query take ~12 tokens of the pair's length.
                    let words = rng
                        .range(spec.min_tokens, spec.max_tokens)
                        .saturating_sub(12)
                        .max(1);
                    (0..words)
                        .map(|_| WORDS[(rng.next() % WORDS.len() as u64) as usize])
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            (format!("benchmark query number {r}"), documents)
        })
        .collect()
}

fn percentiles(mut samples: Vec<f64>) -> Percentiles {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i.min(samples.len() - 1)]
    };
    Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: at(1.0),
    }
}

/// What one request cost: (latency, pairs, tokens) or a failure.
type Outcome = Option<(Duration, u64, u64)>;

/// One in-flight benchmark request, whatever the transport.
type CallFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>;

async fn run_callers<F, Fut>(
    requests: Vec<(String, Vec<String>)>,
    concurrency: usize,
    call: F,
) -> (Vec<Outcome>, Duration)
where
    F: Fn(String, Vec<String>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send,
{
    let queue = Arc::new(std::sync::Mutex::new(requests.into_iter()));
    let call = Arc::new(call);
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let queue = Arc::clone(&queue);
        let call = Arc::clone(&call);
        callers.spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                let Some((query, documents)) = next else {
                    break;
                };
                outcomes.push(call(query, documents).await);
            }
            outcomes
        });
    }
    let mut outcomes = Vec::new();
    while let Some(done) = callers.join_next().await {
        outcomes.extend(done.unwrap_or_default());
    }
    (outcomes, started.elapsed())
}

/// Sends the warm-up requests, then the measured ones (only those are returned), through `call`.
async fn warm_then_measure<F>(
    warmup: Vec<(String, Vec<String>)>,
    measured: Vec<(String, Vec<String>)>,
    concurrency: usize,
    call: F,
) -> (Vec<Outcome>, Duration)
where
    F: Fn(String, Vec<String>) -> CallFuture + Clone + Send + Sync + 'static,
{
    run_callers(warmup, concurrency, call.clone()).await;
    run_callers(measured, concurrency, call).await
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let total = args.warmup_requests + args.requests;
    let mut requests = workload_requests(&args.workload_spec(), total);
    let measured = requests.split_off(args.warmup_requests.min(requests.len()));
    let warmup = requests;

    let report = match args.mode {
        BenchMode::Engine => {
            let metrics = EngineMetrics::detached();
            let config = args
                .engine
                .to_config(!args.model.device.starts_with("cpu"))?;
            let (engine, info, _) = start_engine(&args.model, config, metrics.clone()).await?;
            let truncation = match args.truncate {
                TruncateArg::Chunk => Truncation::Chunk(ChunkPolicy {
                    overlap: args.chunk_overlap,
                    max_chunks: args.engine.max_chunks_per_doc,
                }),
                other => other.into(),
            };
            let timings = TimingsSink::default();
            let call = engine_call(engine.clone(), truncation, Arc::clone(&timings));
            run_callers(warmup, args.concurrency, call.clone()).await;
            timings.lock().unwrap_or_else(|e| e.into_inner()).clear();
            // The warm-up requests ran through the same instruments: report only the measured run.
            let buckets_before = cumulative_buckets(&metrics.batch_size);
            let (passes_before, pairs_before, padded_before) = (
                metrics.batch_size.get_sample_count(),
                metrics.batch_size.get_sample_sum(),
                metrics.batch_padded_tokens.get_sample_sum(),
            );
            let (faults_before, _) = process_usage();
            let (outcomes, elapsed) = run_callers(measured, args.concurrency, call).await;
            let (faults_after, peak_rss_kib) = process_usage();
            let passes = metrics.batch_size.get_sample_count() - passes_before;
            let pairs = metrics.batch_size.get_sample_sum() - pairs_before;
            let padded = metrics.batch_padded_tokens.get_sample_sum() - padded_before;
            let pairs_histogram = cumulative_buckets(&metrics.batch_size)
                .into_iter()
                .zip(buckets_before)
                .map(|((bound, after), (_, before))| (bound, after - before))
                .collect();
            engine.shutdown().await;
            let mut report = summarize(&args, &info.device, &info.dtype, outcomes, elapsed);
            report.padding_overhead = Some(padded / (report.real_tokens.max(1) as f64) - 1.0);
            report.batches = Some(BatchShapes {
                forward_passes: passes,
                mean_pairs: pairs / passes.max(1) as f64,
                mean_padded_tokens: padded / passes.max(1) as f64,
                pairs_histogram,
            });
            report.time_split_ms = Some(TimeSplit::mean_of(
                &timings.lock().unwrap_or_else(|e| e.into_inner()),
            ));
            report.host_memory = Some(HostMemory {
                page_faults: faults_after - faults_before,
                peak_rss_mib: peak_rss_kib as f64 / 1024.0,
            });
            report
        }
        BenchMode::Http => {
            let call = client_call(
                RerankClient::builder().http(args.url.clone()),
                Duration::from_secs(args.timeout),
            )?;
            let (outcomes, elapsed) =
                warm_then_measure(warmup, measured, args.concurrency, call).await;
            summarize(&args, "remote", "remote", outcomes, elapsed)
        }
        BenchMode::Nats => {
            let client = args
                .nats
                .to_config("rerank-bench")
                .connect()
                .await
                .context("bench needs a NATS server with workers")?;
            let timeout = Duration::from_secs(args.timeout);
            let (outcomes, elapsed) = if args.intake == IntakeKind::Jetstream {
                let builder =
                    RerankClient::builder().jetstream(client, args.jobs.jobs_subject.clone());
                let call = client_call(builder, timeout)?;
                warm_then_measure(warmup, measured, args.concurrency, call).await
            } else {
                let call = nats_call(client, args.nats.subject.clone(), timeout);
                warm_then_measure(warmup, measured, args.concurrency, call).await
            };
            let mut report = summarize(&args, "remote", "remote", outcomes, elapsed);
            report.mode = format!("nats-{:?}", args.intake).to_lowercase();
            report
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// (upper bound, cumulative count) of every bucket of `histogram`.
fn cumulative_buckets(histogram: &prometheus::Histogram) -> Vec<(f64, u64)> {
    histogram
        .metric()
        .get_histogram()
        .get_bucket()
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count()))
        .collect()
}

/// Each engine call's [`Timings`], for the time split of the report.
type TimingsSink = Arc<std::sync::Mutex<Vec<Timings>>>;

fn engine_call(
    engine: Engine,
    truncation: Truncation,
    timings: TimingsSink,
) -> impl Fn(String, Vec<String>) -> CallFuture + Clone + Send + Sync + 'static {
    move |query, documents| {
        let engine = engine.clone();
        let timings = Arc::clone(&timings);
        Box::pin(async move {
            let started = Instant::now();
            let response = engine
                .score(ScoreRequest {
                    query,
                    documents,
                    truncation,
                    deadline: None,
                })
                .await
                .ok()?;
            timings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(response.timings);
            Some((
                started.elapsed(),
                response.pairs as u64,
                response.tokens as u64,
            ))
        })
    }
}

fn nats_call(
    client: async_nats::Client,
    subject: String,
    timeout: Duration,
) -> impl Fn(String, Vec<String>) -> CallFuture + Clone + Send + Sync + 'static {
    move |query, documents| {
        let client = client.clone();
        let subject = subject.clone();
        Box::pin(async move {
            let body = wire::encode(&RerankRequest {
                query,
                documents,
                ..Default::default()
            });
            let started = Instant::now();
            let message = client
                .send_request(
                    subject,
                    async_nats::Request::new()
                        .payload(Bytes::from(body))
                        .timeout(Some(timeout)),
                )
                .await
                .ok()?;
            match wire::decode_reply(&message.payload).ok()? {
                ReplyBody::Ok(reply) => {
                    Some((started.elapsed(), reply.usage.pairs, reply.usage.tokens))
                }
                ReplyBody::Err(_) => None,
            }
        })
    }
}

/// One request per call through a [`RerankClient`] (JetStream jobs or HTTP; built without
/// retries, so a failure counts as one). Over HTTP the seed reply has no usage: the pairs are the
/// scores returned and the tokens 0.
fn client_call(
    transport: RerankClientBuilder,
    timeout: Duration,
) -> anyhow::Result<impl Fn(String, Vec<String>) -> CallFuture + Clone + Send + Sync + 'static> {
    let client = transport.timeout(timeout).retries(0).build()?;
    Ok(move |query, documents| {
        let client = client.clone();
        Box::pin(async move {
            let started = Instant::now();
            let reply = client
                .send(RerankRequest {
                    query,
                    documents,
                    ..Default::default()
                })
                .await
                .ok()?;
            let pairs = reply.usage.pairs.max(reply.scores.len() as u64);
            Some((started.elapsed(), pairs, reply.usage.tokens))
        }) as CallFuture
    })
}

fn summarize(
    args: &BenchArgs,
    device: &str,
    dtype: &str,
    outcomes: Vec<Outcome>,
    elapsed: Duration,
) -> BenchReport {
    let ok: Vec<(Duration, u64, u64)> = outcomes.iter().flatten().copied().collect();
    let failed = outcomes.len() - ok.len();
    let seconds = elapsed.as_secs_f64().max(1e-9);
    let pairs: u64 = ok.iter().map(|o| o.1).sum();
    let real_tokens: u64 = ok.iter().map(|o| o.2).sum();
    BenchReport {
        mode: format!("{:?}", args.mode).to_lowercase(),
        workload: format!("{:?}", args.workload).to_lowercase(),
        device: device.to_string(),
        dtype: dtype.to_string(),
        concurrency: args.concurrency,
        requests: outcomes.len(),
        failed,
        pairs,
        real_tokens,
        seconds,
        requests_per_s: ok.len() as f64 / seconds,
        pairs_per_s: pairs as f64 / seconds,
        real_tokens_per_s: real_tokens as f64 / seconds,
        latency_ms: percentiles(ok.iter().map(|o| o.0.as_secs_f64() * 1e3).collect()),
        padding_overhead: None,
        batches: None,
        time_split_ms: None,
        host_memory: None,
    }
}
