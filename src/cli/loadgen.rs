//! `rerank loadgen`: hold a steady load on a running pool for a set time, through the real client
//! (retries and backoff included), and report what a pipeline would have seen: requests, failures,
//! latency, throughput, and the workers' memory if their PIDs are given. The long-run companion of
//! `tests/chaos.rs` (kill workers or restart NATS while it runs). With `--attack`, it measures the
//! legitimate callers' throughput before and during a slow-client or large-body attack on the
//! sidecar, in one run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use crate::client::RerankClient;

use super::args::NatsArgs;
use super::bench::{workload_requests, WorkloadSpec};

mod attack;

#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// Concurrent callers, each sending its next request as soon as the previous one is answered.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long to hold the load, in seconds.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Seconds between progress lines (JSON on stderr).
    #[arg(long, default_value_t = 10)]
    pub report_every: u64,
    /// Send over HTTP to this sidecar base URL instead of NATS.
    #[arg(long)]
    pub http: Option<String>,
    /// Client retries per request (the pipeline client's default is 3).
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// Base of the exponential backoff between retries, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub backoff_ms: u64,
    /// Per-attempt timeout, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// PIDs (workers, the sidecar) whose resident memory (VmRSS) is sampled; the peak is reported.
    #[arg(long, value_delimiter = ',')]
    pub watch_pids: Vec<u32>,
    /// Also attack the sidecar (`--http`) while measuring: the load runs `--duration` without
    /// the attack, then `--duration` with it, and the report compares the two.
    #[arg(long, value_enum)]
    pub attack: Option<attack::AttackKind>,
    /// Attacking connections held open at once.
    #[arg(long, default_value_t = 2_000)]
    pub attack_connections: usize,
    #[command(flatten)]
    pub nats: NatsArgs,
}

#[derive(Debug, Serialize)]
struct Progress {
    elapsed_s: f64,
    requests: u64,
    failed: u64,
    requests_per_s: f64,
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    /// The latest sample of each watched PID (`None` once it has exited).
    rss_kib: Vec<(u32, Option<u64>)>,
    /// The largest sample of each watched PID during the run.
    rss_kib_peak: Vec<(u32, Option<u64>)>,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * q).round() as usize]
}

pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let builder = RerankClient::builder()
        .retries(args.retries)
        .backoff_base(Duration::from_millis(args.backoff_ms))
        .timeout(Duration::from_secs(args.timeout));
    let builder = match &args.http {
        Some(url) => builder.http(url.clone()),
        None => {
            let nats = args
                .nats
                .to_config("rerank-loadgen")
                .connect()
                .await
                .context("loadgen needs a NATS server with workers")?;
            builder.nats(nats, args.nats.subject.clone())
        }
    };
    let client = builder.build()?;
    let requests = Arc::new(workload_requests(&WorkloadSpec::seed_shape(42), 256));
    let Some(kind) = args.attack else {
        let report = hold_load(&args, &client, &requests).await;
        println!("{}", serde_json::to_string(&report)?);
        return ensure_no_failures(&[&report]);
    };
    let Some(url) = &args.http else {
        anyhow::bail!("--attack needs --http: it attacks the sidecar's HTTP listener");
    };
    let target = attack::target(url)?;
    let baseline = hold_load(&args, &client, &requests).await;
    let attack = attack::Attack::start(target, kind, args.attack_connections);
    // Let the attack reach its strength before measuring under it.
    attack
        .wait_opened(args.attack_connections, Duration::from_secs(30))
        .await;
    let attacked = hold_load(&args, &client, &requests).await;
    let attack_report = attack.stop().await;
    let ratio = attacked.requests_per_s / baseline.requests_per_s.max(1e-9);
    let report = serde_json::json!({
        "baseline": &baseline,
        "under_attack": &attacked,
        "attack": attack_report,
        "throughput_ratio": ratio,
    });
    println!("{report}");
    ensure_no_failures(&[&baseline, &attacked])
}

fn ensure_no_failures(phases: &[&Progress]) -> anyhow::Result<()> {
    let failed: u64 = phases.iter().map(|p| p.failed).sum();
    anyhow::ensure!(failed == 0, "{failed} requests failed after retries");
    Ok(())
}

/// Holds the load for `--duration`, printing progress on stderr, and returns the final figures.
async fn hold_load(
    args: &LoadgenArgs,
    client: &RerankClient,
    requests: &Arc<Vec<(String, Vec<String>)>>,
) -> Progress {
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..args.concurrency.max(1) {
        let (client, requests, stop) = (client.clone(), requests.clone(), stop.clone());
        let (done, failed, latencies) = (done.clone(), failed.clone(), latencies.clone());
        callers.spawn(async move {
            let mut i = caller;
            while !stop.load(Ordering::Relaxed) {
                let (query, documents) = &requests[i % requests.len()];
                i += STRIDE;
                let sent = Instant::now();
                match client
                    .rerank(query.clone(), documents.iter().cloned())
                    .await
                {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        latencies
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(sent.elapsed().as_secs_f64() * 1e3);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "request failed after retries");
                    }
                }
            }
        });
    }
    let deadline = started + Duration::from_secs(args.duration);
    let mut peak_rss: Vec<(u32, Option<u64>)> =
        args.watch_pids.iter().map(|&p| (p, None)).collect();
    let report = |peak_rss: &mut Vec<(u32, Option<u64>)>| {
        let rss: Vec<(u32, Option<u64>)> =
            args.watch_pids.iter().map(|&p| (p, rss_kib(p))).collect();
        for ((_, peak), (_, now)) in peak_rss.iter_mut().zip(&rss) {
            if let Some(now) = *now {
                *peak = Some(peak.map_or(now, |p| p.max(now)));
            }
        }
        let mut sorted = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
        sorted.sort_by(f64::total_cmp);
        let elapsed = started.elapsed().as_secs_f64();
        Progress {
            elapsed_s: elapsed,
            requests: done.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
            requests_per_s: done.load(Ordering::Relaxed) as f64 / elapsed.max(1e-9),
            latency_ms_p50: percentile(&sorted, 0.5),
            latency_ms_p99: percentile(&sorted, 0.99),
            rss_kib: rss,
            rss_kib_peak: peak_rss.clone(),
        }
    };
    // RSS is sampled often (its peak matters under attack); progress lines every --report-every.
    let mut next_line = Instant::now() + Duration::from_secs(args.report_every.max(1));
    while Instant::now() < deadline {
        let next = (Instant::now() + RSS_SAMPLE_EVERY).min(deadline);
        tokio::time::sleep_until(next.into()).await;
        let progress = report(&mut peak_rss);
        if Instant::now() >= next_line && Instant::now() < deadline {
            eprintln!("{}", serde_json::to_string(&progress).unwrap_or_default());
            next_line += Duration::from_secs(args.report_every.max(1));
        }
    }
    stop.store(true, Ordering::Relaxed);
    while callers.join_next().await.is_some() {}
    report(&mut peak_rss)
}

const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// Callers walk the request list with a prime stride so they do not send the same request in step.
const STRIDE: usize = 7;
