//! `rerank loadgen`: hold a steady load on a running pool for a set time, through the real client
//! (retries and backoff included), and report what a pipeline would have seen: requests, failures,
//! latency, throughput, and the workers' memory if their PIDs are given. The long-run companion of
//! `tests/chaos.rs` (kill workers or restart NATS while it runs).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use crate::client::RerankClient;

use super::args::NatsArgs;
use super::bench::{workload_requests, WorkloadSpec};

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
    /// Worker PIDs whose resident memory (VmRSS) is sampled at every report.
    #[arg(long, value_delimiter = ',')]
    pub watch_pids: Vec<u32>,
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
    rss_kib: Vec<(u32, Option<u64>)>,
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
    let report = |final_line: bool| {
        let mut sorted = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
        sorted.sort_by(f64::total_cmp);
        let elapsed = started.elapsed().as_secs_f64();
        let progress = Progress {
            elapsed_s: elapsed,
            requests: done.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
            requests_per_s: done.load(Ordering::Relaxed) as f64 / elapsed.max(1e-9),
            latency_ms_p50: percentile(&sorted, 0.5),
            latency_ms_p99: percentile(&sorted, 0.99),
            rss_kib: args.watch_pids.iter().map(|&p| (p, rss_kib(p))).collect(),
        };
        let line = serde_json::to_string(&progress).unwrap_or_default();
        if final_line {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    };
    while Instant::now() < deadline {
        let next = (Instant::now() + Duration::from_secs(args.report_every.max(1))).min(deadline);
        tokio::time::sleep_until(next.into()).await;
        if Instant::now() < deadline {
            report(false);
        }
    }
    stop.store(true, Ordering::Relaxed);
    while callers.join_next().await.is_some() {}
    report(true);
    anyhow::ensure!(
        failed.load(Ordering::Relaxed) == 0,
        "{} requests failed after retries",
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Callers walk the request list with a prime stride so they do not send the same request in step.
const STRIDE: usize = 7;
