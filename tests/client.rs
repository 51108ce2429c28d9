//! `RerankClient` against a real nats-server and real worker processes: results, retries across a
//! worker restart, no retry on invalid input, the per-attempt timeout, the similarity fallback,
//! and the HTTP transport through a real sidecar.

use crate::common;
use crate::stack;

use std::time::{Duration, Instant};

use common::*;
use rerank_service::client::{RerankClient, RerankErrorKind, RerankOptions};
use rerank_service::wire::{self, ErrorCode, Truncate};
use stack::*;

const QUERY: &str = "capital of France?";
const DOCUMENTS: [&str; 4] = [
    "Bananas are yellow.",
    "Paris is the capital of France.",
    "The weather is nice today.",
    "France's capital city is Paris.",
];

fn nats_client(nats: async_nats::Client) -> rerank_service::client::RerankClientBuilder {
    RerankClient::builder().nats(nats, wire::SUBJECT_V1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_transport_results_and_options() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &[]);
    let client = nats_client(nats_connect(&nats.url()).await)
        .build()
        .unwrap();

    let result = within(PATIENCE, "rerank", client.rerank(QUERY, DOCUMENTS))
        .await
        .unwrap();
    assert_eq!(result.scores.len(), 4);
    let expected: Vec<usize> = wire::rank(&result.scores, None)
        .into_iter()
        .map(|i| i as usize)
        .collect();
    assert_eq!(result.ranked_indices, expected);

    let options = RerankOptions {
        top_k: Some(2),
        truncate: Some(Truncate::None),
        ..RerankOptions::default()
    };
    let best = within(
        PATIENCE,
        "rerank_with",
        client.rerank_with(QUERY, DOCUMENTS, options),
    )
    .await
    .unwrap();
    assert_eq!(best.ranked_indices, expected[..2]);
    assert_close(
        &best.scores,
        &result.scores,
        1e-5,
        "same scores with options",
    );

    let workers = within(
        PATIENCE,
        "discovery",
        client.workers(Duration::from_millis(250)),
    )
    .await
    .unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].device.as_deref(), Some("cpu"));
    assert_eq!(workers[0].max_length, Some(512));
    assert_eq!(workers[0].subject.as_deref(), Some(wire::SUBJECT_V1));
    assert_eq!(client.stats().attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_succeeds_on_attempt_two_after_the_worker_restarts() {
    let nats = NatsServer::start();
    let mut worker = WorkerProcess::start(&nats.url(), &[]);
    // Backoff long enough for a worker restart between attempts 1 and 2: about 1 s on an idle
    // box, but well over 6 s on a loaded 2-core one while other tests run beside this one.
    let client = nats_client(nats_connect(&nats.url()).await)
        .retries(3)
        .backoff_base(Duration::from_secs(20))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let before = within(PATIENCE, "first call", client.rerank(QUERY, DOCUMENTS))
        .await
        .unwrap();

    worker.signal("KILL");
    worker.wait_exit(Duration::from_secs(5));
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.rerank(QUERY, DOCUMENTS).await }
    });
    // Attempt 1 fails (no responders); restart the worker while the client backs off.
    let start = Instant::now();
    while client.stats().attempts < 2 {
        assert!(start.elapsed() < PATIENCE, "attempt 1 was not made");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let restarted = tokio::task::spawn_blocking({
        let url = nats.url();
        move || WorkerProcess::start(&url, &[])
    });
    let _worker = within(Duration::from_secs(60), "worker restart", restarted)
        .await
        .unwrap();
    assert_eq!(
        client.stats().attempts,
        2,
        "the restart must fit in the first backoff"
    );
    let result = within(PATIENCE, "retried call", call)
        .await
        .unwrap()
        .unwrap();
    let stats = client.stats();
    assert_eq!(
        stats.attempts, 3,
        "first call (1) + failed attempt + successful attempt 2"
    );
    assert_eq!(stats.failures, 0);
    assert_close(
        &result.scores,
        &before.scores,
        1e-5,
        "same scores after the restart",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_is_not_retried() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &["--max-documents", "2"]);
    let observer = nats_connect(&nats.url()).await;
    let tap = Tap::start(&observer, wire::SUBJECT_V1).await;
    let client = nats_client(nats_connect(&nats.url()).await)
        .retries(3)
        .backoff_base(Duration::from_millis(10))
        .build()
        .unwrap();

    let error = within(PATIENCE, "too many", client.rerank(QUERY, DOCUMENTS))
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        RerankErrorKind::Rejected(ErrorCode::TooManyDocuments),
        "{error}"
    );
    assert!(!error.is_retryable());

    let long = "word ".repeat(2000);
    let options = RerankOptions {
        top_k: None,
        truncate: Some(Truncate::None),
        ..RerankOptions::default()
    };
    let error = within(
        PATIENCE,
        "too long",
        client.rerank_with(QUERY, [long], options),
    )
    .await
    .unwrap_err();
    assert_eq!(
        error.kind(),
        RerankErrorKind::Rejected(ErrorCode::DocumentTooLong),
        "{error}"
    );
    assert!(!error.is_retryable());

    let stats = client.stats();
    assert_eq!((stats.requests, stats.attempts, stats.failures), (2, 2, 2));
    assert_eq!(
        tap.wait_for(2).await,
        2,
        "one message per call reached NATS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_attempt_timeout_is_honoured_and_timeouts_are_retried() {
    let nats = NatsServer::start();
    let observer = nats_connect(&nats.url()).await;
    let tap = Tap::start(&observer, wire::SUBJECT_V1).await; // receives, never answers
    let client = nats_client(nats_connect(&nats.url()).await)
        .retries(2)
        .backoff_base(Duration::from_millis(20))
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = Instant::now();
    let error = within(PATIENCE, "timeouts", client.rerank(QUERY, DOCUMENTS))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(error.kind(), RerankErrorKind::Timeout, "{error}");
    // At least 3 attempts × 300 ms + 20 + 40 ms of backoff: every attempt waited its own timeout
    // (an upper bound would only measure the machine).
    assert!(elapsed >= Duration::from_millis(960), "{elapsed:?}");
    assert_eq!(client.stats().attempts, 3);
    assert_eq!(tap.wait_for(3).await, 3);
    // Each attempt carries its own deadline: arrival + timeout.
    for (arrived, request) in tap.seen.lock().unwrap().iter() {
        let arrived = arrived
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let deadline = request.deadline_ms.expect("deadline_ms");
        assert!(
            deadline > arrived && deadline <= arrived + 400,
            "deadline {deadline}, arrived {arrived}"
        );
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Project {
    title: String,
    description: String,
}

fn candidates() -> Vec<Project> {
    DOCUMENTS
        .iter()
        .enumerate()
        .map(|(i, d)| Project {
            title: format!("project {i}"),
            description: d.to_string(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_keeps_similarity_order_when_the_pool_is_down() {
    let nats = NatsServer::start();
    let client = nats_client(nats_connect(&nats.url()).await)
        .retries(1)
        .backoff_base(Duration::from_millis(10))
        .build()
        .unwrap();
    let text = |p: &Project| format!("{}: {}", p.title, p.description);

    // No worker: the first top_k in the original order, after the retries.
    let kept = within(
        PATIENCE,
        "fallback",
        client.rerank_top_k(QUERY, candidates(), 3, text),
    )
    .await;
    assert_eq!(kept, candidates()[..3]);
    assert_eq!(client.stats().attempts, 2);
    let error = within(
        PATIENCE,
        "error",
        client.try_rerank_top_k(QUERY, &candidates(), 3, text),
    )
    .await
    .unwrap_err();
    assert_eq!(error.kind(), RerankErrorKind::Unavailable);

    // With a worker: the reranked top_k.
    let _worker = WorkerProcess::start(&nats.url(), &[]);
    let texts: Vec<String> = candidates().iter().map(text).collect();
    let scores = within(PATIENCE, "scores", client.rerank(QUERY, texts))
        .await
        .unwrap()
        .scores;
    let expected: Vec<Project> = wire::rank(&scores, Some(3))
        .into_iter()
        .map(|i| candidates()[i as usize].clone())
        .collect();
    let kept = within(
        PATIENCE,
        "reranked",
        client.rerank_top_k(QUERY, candidates(), 3, text),
    )
    .await;
    assert_eq!(kept, expected);
    assert_ne!(
        kept,
        candidates()[..3],
        "this query reorders the candidates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_transport_matches_nats_transport() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &[]);
    let sidecar = Sidecar::start_with(&nats.url(), |c| c.api_key = Some("token-1".into())).await;
    let over_nats = nats_client(nats_connect(&nats.url()).await)
        .build()
        .unwrap();
    let over_http = RerankClient::builder()
        .http(sidecar.base_url())
        .bearer_token("token-1")
        .build()
        .unwrap();

    let a = within(PATIENCE, "nats", over_nats.rerank(QUERY, DOCUMENTS))
        .await
        .unwrap();
    let b = within(PATIENCE, "http", over_http.rerank(QUERY, DOCUMENTS))
        .await
        .unwrap();
    assert_close(&b.scores, &a.scores, 1e-5, "HTTP vs NATS");
    assert_eq!(a.ranked_indices, b.ranked_indices);
    let options = RerankOptions {
        top_k: Some(1),
        truncate: Some(Truncate::End),
        ..RerankOptions::default()
    };
    let b1 = within(
        PATIENCE,
        "http top_k",
        over_http.rerank_with(QUERY, DOCUMENTS, options),
    )
    .await
    .unwrap();
    assert_eq!(b1.ranked_indices, a.ranked_indices[..1]);

    // Typed errors come back through the sidecar and are not retried.
    let many = RerankClient::builder()
        .http(sidecar.base_url())
        .bearer_token("token-1")
        .backoff_base(Duration::from_millis(10))
        .build()
        .unwrap();
    let long = "word ".repeat(2000);
    let none = RerankOptions {
        top_k: None,
        truncate: Some(Truncate::None),
        ..RerankOptions::default()
    };
    let error = within(PATIENCE, "too long", many.rerank_with(QUERY, [long], none))
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        RerankErrorKind::Rejected(ErrorCode::DocumentTooLong),
        "{error}"
    );
    assert_eq!(many.stats().attempts, 1);

    // Wrong token: unauthorized, not retried.
    let anonymous = RerankClient::builder()
        .http(sidecar.base_url())
        .backoff_base(Duration::from_millis(10))
        .build()
        .unwrap();
    let error = within(PATIENCE, "no token", anonymous.rerank(QUERY, DOCUMENTS))
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        RerankErrorKind::Rejected(ErrorCode::Unauthorized),
        "{error}"
    );
    assert_eq!(anonymous.stats().attempts, 1);

    // Nobody listening: a connection error, retried.
    let nowhere = RerankClient::builder()
        .http(format!("http://127.0.0.1:{}", free_port()))
        .retries(2)
        .backoff_base(Duration::from_millis(10))
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let error = within(PATIENCE, "nowhere", nowhere.rerank(QUERY, DOCUMENTS))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), RerankErrorKind::Connection, "{error}");
    assert_eq!(nowhere.stats().attempts, 3);
    // Discovery needs NATS.
    assert!(within(
        PATIENCE,
        "workers over http",
        over_http.workers(Duration::from_millis(10))
    )
    .await
    .is_err());
}
