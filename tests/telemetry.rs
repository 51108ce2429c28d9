//! Observability: one trace across the hops (exported over OTLP to an in-test receiver that decodes
//! the real protobuf), and Prometheus metrics that add up.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use rerank_service::wire::{self, RerankRequest};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The worker's spans for one request, in order; all children of `worker.request` but the first.
const WORKER_CHAIN: [&str; 6] = [
    "worker.request",
    "worker.decode",
    "engine.tokenize",
    "engine.queue",
    "engine.batch",
    "worker.reply",
];

fn otel_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_continues_the_callers_trace_through_every_stage() {
    let receiver = OtlpReceiver::start().await;
    let nats = NatsServer::start();
    let env = otel_env(&receiver.endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _worker = WorkerProcess::start_with_env(&nats.url(), &[], &env);
    let client = connect_nats(&nats.url()).await;

    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-01").as_str(),
    );
    let request = RerankRequest {
        query: "q".into(),
        documents: vec!["a".into(), "b".into(), "c".into()],
        ..Default::default()
    };
    within(
        PATIENCE,
        "request",
        client.request_with_headers(
            wire::SUBJECT_V1,
            headers,
            Bytes::from(wire::encode(&request)),
        ),
    )
    .await
    .unwrap();

    let spans = receiver.wait_for(TRACE_ID, &WORKER_CHAIN, PATIENCE).await;
    let by_name = |n: &str| spans.iter().find(|s| s.name == n).unwrap().clone();
    let root = by_name("worker.request");
    assert_eq!(
        root.parent_span_id, CALLER_SPAN,
        "worker.request must continue the caller's span"
    );
    assert!(
        root.service.contains("rerank-worker"),
        "service name: {}",
        root.service
    );
    for child in &WORKER_CHAIN[1..] {
        assert_eq!(
            by_name(child).parent_span_id,
            root.span_id,
            "{child} is not a child of worker.request"
        );
    }
    let batch = by_name("engine.batch");
    let attr = |k: &str| {
        batch
            .attributes
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert!(
        attr("batch.size").is_some_and(|v| v.contains('3')),
        "{:?}",
        batch.attributes
    );
    assert!(attr("batch.tokens").is_some(), "{:?}", batch.attributes);
    // The request's own span says where its time went.
    for stage in [
        "rerank.tokenize_ms",
        "rerank.queue_ms",
        "rerank.inference_ms",
    ] {
        assert!(
            root.attributes.iter().any(|(key, _)| key == stage),
            "{stage} missing: {:?}",
            root.attributes
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_metrics_add_up_and_count_failures_by_code() {
    let nats = NatsServer::start();
    let worker = WorkerProcess::start(&nats.url(), &["--max-documents", "5"]);
    let client = connect_nats(&nats.url()).await;
    let ok = RerankRequest {
        query: "q".into(),
        documents: vec!["a".into(), "bb".into()],
        ..Default::default()
    };
    let too_many = RerankRequest {
        documents: vec!["x".into(); 6],
        ..ok.clone()
    };
    let (n_ok, n_invalid, n_too_many) = (7, 3, 2);
    for _ in 0..n_ok {
        client
            .request(wire::SUBJECT_V1, Bytes::from(wire::encode(&ok)))
            .await
            .unwrap();
    }
    for _ in 0..n_invalid {
        client
            .request(wire::SUBJECT_V1, Bytes::from_static(b"\x00garbage"))
            .await
            .unwrap();
    }
    for _ in 0..n_too_many {
        client
            .request(wire::SUBJECT_V1, Bytes::from(wire::encode(&too_many)))
            .await
            .unwrap();
    }
    let (status, body) = http_get(worker.health_port, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    let samples = parse_prometheus(&body);
    let total = (n_ok + n_invalid + n_too_many) as f64;
    assert_eq!(sample_sum(&samples, "rerank_requests_total", &[]), total);
    assert_eq!(
        sample_sum(&samples, "rerank_requests_total", &["outcome=\"ok\""]),
        n_ok as f64
    );
    assert_eq!(
        sample_sum(
            &samples,
            "rerank_requests_total",
            &["code=\"invalid_request\""]
        ),
        n_invalid as f64
    );
    assert_eq!(
        sample_sum(
            &samples,
            "rerank_requests_total",
            &["code=\"too_many_documents\""]
        ),
        n_too_many as f64
    );
    assert_eq!(
        sample_sum(&samples, "rerank_request_duration_seconds_count", &[]),
        total
    );
    // Every scored pair is counted once, in batches that add up.
    let pairs = (n_ok * 2) as f64;
    assert_eq!(sample_sum(&samples, "rerank_pairs_total", &[]), pairs);
    // The warm-up pass is not a request and is not counted.
    assert_eq!(
        sample_sum(&samples, "rerank_batch_size_pairs_sum", &[]),
        pairs
    );
    assert_eq!(sample_sum(&samples, "rerank_queue_pairs", &[]), 0.0);
    assert_eq!(sample_sum(&samples, "rerank_ready", &[]), 1.0);
    assert_eq!(sample_sum(&samples, "rerank_model_loaded", &[]), 1.0);
    assert_eq!(
        sample_sum(&samples, "rerank_tokenize_seconds_count", &[]),
        n_ok as f64
    );
}

/// A `rerank sidecar` child process; killed on drop.
struct SidecarProcess {
    child: std::process::Child,
    port: u16,
}

impl SidecarProcess {
    fn start(nats_url: &str, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let child = std::process::Command::new(rerank_bin())
            .args(["sidecar", "--nats-url", nats_url])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start rerank sidecar");
        let sidecar = Self { child, port };
        let start = std::time::Instant::now();
        while http_get_status(port, "/ready") != Some(200) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "sidecar not ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sidecar
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_http_through_nats_to_the_device() {
    let receiver = OtlpReceiver::start().await;
    let nats = NatsServer::start();
    let env = otel_env(&receiver.endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _worker = WorkerProcess::start_with_env(&nats.url(), &[], &env);
    let sidecar = SidecarProcess::start(&nats.url(), &env);

    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let incoming_span = "b7ad6b7169203331";
    let response = within(
        PATIENCE,
        "POST /rerank",
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}/rerank", sidecar.port))
            .header("traceparent", format!("00-{trace_id}-{incoming_span}-01"))
            .json(&serde_json::json!({"query": "q", "documents": ["a", "b"]}))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);

    let chain: Vec<&str> = ["sidecar.request", "client.request"]
        .into_iter()
        .chain(WORKER_CHAIN)
        .collect();
    let spans = receiver.wait_for(trace_id, &chain, PATIENCE).await;
    let span = |n: &str| spans.iter().find(|s| s.name == n).unwrap().clone();
    let (http, client, worker) = (
        span("sidecar.request"),
        span("client.request"),
        span("worker.request"),
    );
    assert_eq!(
        http.parent_span_id, incoming_span,
        "the incoming traceparent is continued"
    );
    assert!(http.service.contains("rerank-sidecar"), "{}", http.service);
    assert!(
        worker.service.contains("rerank-worker"),
        "{}",
        worker.service
    );
    assert_eq!(
        client.parent_span_id, http.span_id,
        "client.request under sidecar.request"
    );
    // The worker continues the context the client injected into the NATS headers.
    let ancestors_of_worker: Vec<&str> = spans
        .iter()
        .filter(|s| s.span_id == worker.parent_span_id)
        .map(|s| s.name.as_str())
        .collect();
    assert!(
        worker.parent_span_id == client.span_id
            || spans
                .iter()
                .any(|s| s.span_id == worker.parent_span_id && s.parent_span_id == client.span_id),
        "worker.request's parent {ancestors_of_worker:?} is not under client.request"
    );
    assert_eq!(span("engine.batch").parent_span_id, worker.span_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_metrics_add_up_by_route_and_status() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &[]);
    let sidecar = SidecarProcess::start(&nats.url(), &[]);
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://127.0.0.1:{}{p}", sidecar.port);
    let (n_ok, n_bad) = (5, 3);
    for _ in 0..n_ok {
        let r = http
            .post(url("/rerank"))
            .json(&serde_json::json!({"query": "q", "documents": ["a"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for _ in 0..n_bad {
        let r = http
            .post(url("/rerank"))
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }
    let body = http
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = parse_prometheus(&body);
    let rerank = "route=\"/rerank\"";
    assert_eq!(
        sample_sum(
            &samples,
            "rerank_http_requests_total",
            &[rerank, "status=\"200\""]
        ),
        n_ok as f64
    );
    assert_eq!(
        sample_sum(
            &samples,
            "rerank_http_requests_total",
            &[rerank, "status=\"400\""]
        ),
        n_bad as f64
    );
    assert_eq!(
        sample_sum(
            &samples,
            "rerank_http_request_duration_seconds_count",
            &[rerank]
        ),
        (n_ok + n_bad) as f64
    );
}

/// Runs a worker at the most verbose log level, sends one request, and returns everything it logged.
async fn worker_log_for_one_request(extra_args: &[&str]) -> String {
    let nats = NatsServer::start_with(&["--auth", "tok-SECRET-0001"]);
    let health = free_port();
    let log_path = tempfile::NamedTempFile::new().unwrap();
    let mut child = std::process::Command::new(rerank_bin())
        .arg("worker")
        .arg("--model")
        .arg(tiny_model_dir())
        .args(["--nats-url", &nats.url(), "--nats-token", "tok-SECRET-0001"])
        .args(["--health-listen", &format!("127.0.0.1:{health}")])
        .args(["--log-format", "json"])
        .args(extra_args)
        .env("RUST_LOG", "trace")
        .stderr(log_path.reopen().unwrap())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while http_get_status(health, "/ready") != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "worker not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = async_nats::ConnectOptions::with_token("tok-SECRET-0001".into())
        .connect(nats.url())
        .await
        .unwrap();
    let request = RerankRequest {
        query: "QUERY-PRIVATE-7".into(),
        documents: vec!["DOCUMENT-PRIVATE-9".into()],
        ..Default::default()
    };
    client
        .request(wire::SUBJECT_V1, Bytes::from(wire::encode(&request)))
        .await
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::read_to_string(log_path.path()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_no_text_or_secrets_unless_asked() {
    let log = worker_log_for_one_request(&[]).await;
    assert!(log.contains("worker ready"), "the log was captured: {log}");
    for private in ["QUERY-PRIVATE-7", "DOCUMENT-PRIVATE-9", "tok-SECRET-0001"] {
        let leaks: Vec<&str> = log.lines().filter(|l| l.contains(private)).collect();
        assert!(
            leaks.is_empty(),
            "{private} leaked into the log: {leaks:#?}"
        );
    }
    // Every JSON line carries the span it was written in (with trace context for correlation).
    for line in log.lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<serde_json::Value>(line).expect("JSON log lines");
    }
    let debug_log = worker_log_for_one_request(&["--log-text"]).await;
    assert!(debug_log.contains("DOCUMENT-PRIVATE-9") && debug_log.contains("QUERY-PRIVATE-7"));
    assert!(
        !debug_log.contains("tok-SECRET-0001"),
        "secrets never leak, even with --log-text"
    );
}
