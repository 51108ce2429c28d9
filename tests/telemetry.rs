//! Observability: one trace across the hops (exported over OTLP to an in-test receiver that decodes
//! the real protobuf), and Prometheus metrics that add up.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use rerank_service::wire::{self, RerankRequest};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

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
    let client = async_nats::connect(nats.url()).await.unwrap();

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
        Duration::from_secs(10),
        "request",
        client.request_with_headers(
            wire::SUBJECT_V1,
            headers,
            Bytes::from(wire::encode(&request)),
        ),
    )
    .await
    .unwrap();

    let names = [
        "worker.request",
        "worker.decode",
        "engine.tokenize",
        "engine.queue",
        "engine.batch",
        "worker.reply",
    ];
    let spans = receiver
        .wait_for(TRACE_ID, &names, Duration::from_secs(20))
        .await;
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
    for child in [
        "worker.decode",
        "engine.tokenize",
        "engine.queue",
        "engine.batch",
        "worker.reply",
    ] {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_metrics_add_up_and_count_failures_by_code() {
    let nats = NatsServer::start();
    let worker = WorkerProcess::start(&nats.url(), &["--max-documents", "5"]);
    let client = async_nats::connect(nats.url()).await.unwrap();
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
