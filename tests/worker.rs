//! The NATS worker against a real nats-server: round trips, errors, the queue group, overload,
//! SIGTERM drain and reconnects.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use rerank_service::wire::{self, ErrorCode, ReplyBody, RerankRequest, Truncate};

async fn connect(url: &str) -> async_nats::Client {
    connect_nats(url).await
}

async fn request_raw(client: &async_nats::Client, payload: Vec<u8>) -> async_nats::Message {
    within(
        PATIENCE,
        "request reply",
        client.request(wire::SUBJECT_V1, Bytes::from(payload)),
    )
    .await
    .expect("request")
}

async fn rerank(client: &async_nats::Client, request: &RerankRequest) -> ReplyBody {
    let message = request_raw(client, wire::encode(request)).await;
    wire::decode_reply(&message.payload).expect("reply decodes")
}

fn request(query: &str, documents: &[&str]) -> RerankRequest {
    RerankRequest {
        query: query.into(),
        documents: documents.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    }
}

fn score_cli(query: &str, documents: &[&str]) -> Vec<f32> {
    use std::io::Write;
    let mut child = std::process::Command::new(rerank_bin())
        .args(["score", "--model"])
        .arg(tiny_model_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("rerank score");
    let input = serde_json::json!({"query": query, "documents": documents});
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_equals_rerank_score() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &[]);
    let client = connect(&nats.url()).await;
    let docs = ["Paris is the capital of France.", "Bananas are yellow.", ""];
    let mut req = request("capital of France?", &docs);
    req.request_id = Some("abc-1".into());
    req.top_k = Some(2);
    let ReplyBody::Ok(reply) = rerank(&client, &req).await else {
        panic!("expected a reply")
    };
    let expected = score_cli("capital of France?", &docs);
    assert_close(&reply.scores, &expected, 1e-5, "worker vs rerank score");
    assert_eq!(reply.ranked_indices, wire::rank(&expected, Some(2)));
    assert_eq!(reply.request_id.as_deref(), Some("abc-1"));
    assert_eq!(reply.usage.pairs, 3);
    assert!(reply.usage.tokens > 3);
    assert!(reply.model.contains("tiny-model"));

    // An empty document list is a valid request with empty results.
    let ReplyBody::Ok(empty) = rerank(&client, &request("q", &[])).await else {
        panic!("expected a reply")
    };
    assert!(empty.scores.is_empty() && empty.ranked_indices.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_get_typed_errors_and_the_worker_keeps_serving() {
    let nats = NatsServer::start_with_config("max_payload: 8MB\n");
    let _worker = WorkerProcess::start(&nats.url(), &["--max-documents", "100"]);
    let client = connect(&nats.url()).await;

    #[derive(serde::Serialize)]
    struct WrongTypes {
        query: u32,
        documents: &'static str,
    }
    #[derive(serde::Serialize)]
    struct MissingDocuments {
        query: &'static str,
    }
    let invalid_utf8 = {
        // {"query": <invalid utf-8 str>, "documents": []}
        let mut b = vec![0x82, 0xa5];
        b.extend_from_slice(b"query");
        b.extend_from_slice(&[0xa2, 0xff, 0xfe]);
        b.push(0xa9);
        b.extend_from_slice(b"documents");
        b.push(0x90);
        b
    };
    let too_many = request("q", &vec!["d"; 10_000]);
    let five_mb = "word ".repeat(1_000_000);
    let mut too_long = request("q", &[five_mb.as_str()]);
    too_long.truncate = Some(Truncate::None);

    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "garbage bytes",
            b"\xc1\xc1not msgpack".to_vec(),
            ErrorCode::InvalidRequest,
        ),
        ("empty body", vec![], ErrorCode::InvalidRequest),
        (
            "wrong types",
            rmp_serde::to_vec_named(&WrongTypes {
                query: 1,
                documents: "x",
            })
            .unwrap(),
            ErrorCode::InvalidRequest,
        ),
        (
            "missing documents",
            rmp_serde::to_vec_named(&MissingDocuments { query: "q" }).unwrap(),
            ErrorCode::InvalidRequest,
        ),
        ("invalid utf-8", invalid_utf8, ErrorCode::InvalidRequest),
        (
            "10 000 documents",
            wire::encode(&too_many),
            ErrorCode::TooManyDocuments,
        ),
        (
            "5 MB document, truncate NONE",
            wire::encode(&too_long),
            ErrorCode::DocumentTooLong,
        ),
    ];
    for (name, payload, expected) in cases {
        let message = request_raw(&client, payload).await;
        let headers = message
            .headers
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no error headers"));
        assert_eq!(
            headers
                .get(wire::HEADER_SERVICE_ERROR_CODE)
                .map(|v| v.as_str().to_string()),
            Some(expected.status().to_string()),
            "{name}"
        );
        match wire::decode_reply(&message.payload).unwrap() {
            ReplyBody::Err(e) => assert_eq!(e.error.code, expected, "{name}: {}", e.error.message),
            ReplyBody::Ok(_) => panic!("{name}: expected an error"),
        }
    }
    // The 5 MB document with the default truncation is scored (cut at max_length).
    let ReplyBody::Ok(reply) = rerank(&client, &request("q", &[five_mb.as_str()])).await else {
        panic!("truncated long document should be scored")
    };
    assert_eq!(reply.usage.tokens, 512);
    // Still serving.
    assert!(matches!(
        rerank(&client, &request("q", &["d"])).await,
        ReplyBody::Ok(_)
    ));
}

/// A caller that retries what is safe to retry (no responders, timeouts, overloaded), as the
/// client library does.
/// Sends until a non-retryable answer comes; returns it and the attempts made. Each attempt carries
/// its own deadline, so an attempt the caller gave up on is dropped by the worker, not computed: a
/// slow machine sees more attempts, never a pile of stale work.
async fn rerank_with_retries(
    client: &async_nats::Client,
    request: &RerankRequest,
) -> (ReplyBody, u32) {
    const ATTEMPT: Duration = Duration::from_secs(30);
    for attempt in 1..=20 {
        let deadline = std::time::SystemTime::now() + ATTEMPT;
        let deadline_ms = deadline
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let request = RerankRequest {
            deadline_ms: Some(deadline_ms),
            ..request.clone()
        };
        let sent = client
            .send_request(
                wire::SUBJECT_V1,
                async_nats::Request::new()
                    .payload(Bytes::from(wire::encode(&request)))
                    .timeout(Some(ATTEMPT)),
            )
            .await;
        if let Ok(message) = sent {
            match wire::decode_reply(&message.payload).expect("decodes") {
                ReplyBody::Err(e)
                    if e.error.code.is_retryable()
                        || e.error.code == ErrorCode::DeadlineExceeded => {}
                reply => return (reply, attempt),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("request not answered after 20 attempts")
}

fn long_documents(n: usize, words: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("document {i} ") + &"lorem ipsum dolor sit amet ".repeat(words / 5))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_group_shares_work_and_sigkill_loses_nothing_for_a_retrying_caller() {
    let nats = NatsServer::start();
    let first = WorkerProcess::start(&nats.url(), &[]);
    let mut second = WorkerProcess::start(&nats.url(), &[]);
    let client = connect(&nats.url()).await;
    let docs = long_documents(8, 60);
    let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let req = request("lorem?", &docs);

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let client = client.clone();
        let req = req.clone();
        tasks.spawn(async move { (i, rerank_with_retries(&client, &req).await) });
    }
    // Kill one member while requests are in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    second.child.kill().expect("SIGKILL");
    let (mut answered, mut attempts) = (0, 0);
    while let Some(result) = within(10 * PATIENCE, "all requests", tasks.join_next()).await {
        let (i, (reply, tries)) = result.expect("task");
        assert!(
            matches!(reply, ReplyBody::Ok(_)),
            "request {i} failed: {reply:?}"
        );
        answered += 1;
        attempts += tries;
    }
    assert_eq!(answered, 60);
    let (_, metrics) = http_get(first.health_port, "/metrics").expect("metrics");
    let served_by_first = metric_sum(&metrics, "rerank_requests_total");
    // The survivor took work, and never more than it was sent.
    assert!(
        served_by_first > 0.0 && served_by_first <= f64::from(attempts),
        "served {served_by_first} of {attempts} attempts"
    );
    let _ = second.wait_exit(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_queue_group_members_take_work() {
    let nats = NatsServer::start();
    let workers = [
        WorkerProcess::start(&nats.url(), &[]),
        WorkerProcess::start(&nats.url(), &[]),
    ];
    let client = connect(&nats.url()).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let client = client.clone();
        tasks.spawn(async move { rerank(&client, &request("q", &["a", "b"])).await });
    }
    while let Some(r) = within(Duration::from_secs(60), "requests", tasks.join_next()).await {
        assert!(matches!(r.unwrap(), ReplyBody::Ok(_)));
    }
    for worker in &workers {
        let (_, metrics) = http_get(worker.health_port, "/metrics").expect("metrics");
        let served = metric_sum(&metrics, "rerank_requests_total");
        assert!(
            served >= 1.0,
            "a queue-group member took no work:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_answers_every_accepted_request_and_exits_zero() {
    let nats = NatsServer::start();
    let mut worker = WorkerProcess::start(&nats.url(), &[]);
    let client = connect(&nats.url()).await;
    let docs = long_documents(24, 120);
    let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let req = request("lorem?", &docs);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let client = client.clone();
        let req = req.clone();
        tasks.spawn(async move { rerank(&client, &req).await });
    }
    // Let the requests reach the worker, then ask it to stop while they are queued.
    within(PATIENCE, "work queued", async {
        loop {
            let (_, m) = http_get(worker.health_port, "/metrics").unwrap_or_default();
            if metric_sum(&m, "rerank_inflight_requests") >= 8.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    worker.signal("TERM");
    while let Some(r) = within(
        Duration::from_secs(120),
        "drained replies",
        tasks.join_next(),
    )
    .await
    {
        assert!(
            matches!(r.unwrap(), ReplyBody::Ok(_)),
            "an accepted request was not answered"
        );
    }
    assert_eq!(worker.wait_exit(Duration::from_secs(30)), Some(0));
    // Nobody serves the subject any more: no responders, not a hang.
    let after = client
        .request(wire::SUBJECT_V1, Bytes::from(wire::encode(&req)))
        .await;
    assert!(matches!(
        after.map_err(|e| e.kind()),
        Err(async_nats::RequestErrorKind::NoResponders)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_refused_fast_and_accepted_requests_complete() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(
        &nats.url(),
        &[
            "--max-queue-pairs",
            "4",
            "--max-documents",
            "4",
            "--max-inflight-requests",
            "8",
        ],
    );
    let client = connect(&nats.url()).await;
    let docs = long_documents(4, 200);
    let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let req = request("q", &docs);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..48 {
        let client = client.clone();
        let req = req.clone();
        tasks.spawn(async move { rerank(&client, &req).await });
    }
    let (mut ok, mut overloaded) = (0, 0);
    while let Some(r) = within(Duration::from_secs(60), "replies", tasks.join_next()).await {
        match r.unwrap() {
            ReplyBody::Ok(reply) => {
                assert_eq!(reply.scores.len(), 4);
                ok += 1
            }
            ReplyBody::Err(e) if e.error.code == ErrorCode::Overloaded => overloaded += 1,
            ReplyBody::Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!(ok + overloaded, 48);
    assert!(ok >= 1, "nothing was accepted");
    assert!(overloaded >= 1, "a tiny queue never refused anything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_reconnects_after_a_nats_restart() {
    let mut nats = NatsServer::start();
    let worker = WorkerProcess::start(&nats.url(), &[]);
    nats.restart();
    let client = connect(&nats.url()).await;
    let reply = within(
        PATIENCE,
        "served after restart",
        rerank_with_retries(&client, &request("q", &["a"])),
    )
    .await
    .0;
    assert!(matches!(reply, ReplyBody::Ok(_)));
    assert_eq!(http_get_status(worker.health_port, "/live"), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadline_is_refused_before_compute() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &[]);
    let client = connect(&nats.url()).await;
    let mut req = request("q", &["a"]);
    req.deadline_ms = Some(1);
    match rerank(&client, &req).await {
        ReplyBody::Err(e) => assert_eq!(e.error.code, ErrorCode::DeadlineExceeded),
        ok => panic!("expected deadline_exceeded, got {ok:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_discovery_reports_model_metadata() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &[]);
    let client = connect(&nats.url()).await;
    let info = within(
        PATIENCE,
        "$SRV.INFO",
        client.request("$SRV.INFO.rerank", Bytes::new()),
    )
    .await
    .expect("info reply");
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["name"], "rerank");
    assert_eq!(info["metadata"]["device"], "cpu");
    assert_eq!(info["metadata"]["dtype"], "f32");
    assert_eq!(info["metadata"]["model_loaded"], "true");
    assert_eq!(info["metadata"]["max_length"], "512");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_model_step_respects_deadlines_and_skips_abandoned_work() {
    let nats = NatsServer::start();
    let worker = WorkerProcess::start(&nats.url(), &["--fault-batch-delay-ms", "1500"]);
    let client = connect(&nats.url()).await;
    let metric = |name: &str| {
        let (_, m) = http_get(worker.health_port, "/metrics").expect("metrics");
        metric_sum(&m, name)
    };
    let before = metric("rerank_pairs_total");
    // A occupies the (slow) device; B and C queue behind it with deadlines that pass meanwhile.
    let occupy = {
        let client = client.clone();
        tokio::spawn(async move { rerank(&client, &request("a", &["x", "y"])).await })
    };
    // Wait until A has been tokenized and admitted and has left the queue for the device.
    let started = std::time::Instant::now();
    while !(metric("rerank_inflight_requests") >= 1.0
        && metric("rerank_tokenize_seconds_count") >= 1.0
        && metric("rerank_queue_pairs") == 0.0)
    {
        assert!(started.elapsed() < PATIENCE, "A never reached the device");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut late = request("b", &["p", "q", "r"]);
    late.deadline_ms = Some(now_ms + 300);
    let mut late_tasks = Vec::new();
    for _ in 0..2 {
        let client = client.clone();
        let late = late.clone();
        late_tasks.push(tokio::spawn(async move { rerank(&client, &late).await }));
    }
    for task in late_tasks {
        match within(PATIENCE, "late reply", task).await.unwrap() {
            ReplyBody::Err(e) => assert_eq!(e.error.code, ErrorCode::DeadlineExceeded),
            ok => panic!("expected deadline_exceeded, got {ok:?}"),
        }
    }
    assert!(matches!(
        within(PATIENCE, "occupying reply", occupy).await.unwrap(),
        ReplyBody::Ok(_)
    ));
    // Only A's two pairs reached the device; the abandoned requests cost nothing.
    assert_eq!(metric("rerank_pairs_total") - before, 2.0);
}
