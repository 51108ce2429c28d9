//! The JetStream intake end to end: a real nats-server with JetStream on a temporary store
//! directory (loopback only), real worker processes on the tiny model, the real sidecar and client.
//! Numbers follow issue 12's test list.

use crate::common;
use crate::stack;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use common::{golden, http_get, metric_sum, within, NatsCluster, NatsServer, WorkerProcess};
use futures::StreamExt;
use rerank_service::client::{RerankClient, RerankErrorKind};
use rerank_service::jobs::{JobStream, DEFAULT_CONSUMER, DEFAULT_JOBS_SUBJECT, DEFAULT_STREAM};
use rerank_service::wire::{self, ErrorCode, ReplyBody, RerankRequest};
use stack::{get, nats_connect, post, Sidecar};

/// Worker flags for these tests: a short ack_wait so a dead worker's jobs come back quickly.
const JS_WORKER: &[&str] = &["--intake", "jetstream", "--ack-wait", "2"];
/// Callers' deadline (and the jobs' TTL): generous, because a loaded 2-core box restarting
/// servers and workers beside other tests needed more than 60 s; passing runs never wait it out.
const LIMIT: Duration = Duration::from_secs(120);

fn start_worker(url: &str) -> WorkerProcess {
    WorkerProcess::start(url, JS_WORKER)
}

/// A worker started off the async runtime (its readiness wait blocks).
async fn start_worker_async(url: &str) -> WorkerProcess {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || start_worker(&url))
        .await
        .expect("worker start")
}

fn jetstream_client(nats: async_nats::Client, timeout: Duration) -> RerankClient {
    RerankClient::builder()
        .jetstream(nats, DEFAULT_JOBS_SUBJECT)
        .timeout(timeout)
        .retries(0)
        .build()
        .expect("client")
}

async fn ensure_stream(client: &async_nats::Client, stream: &JobStream) {
    within(
        Duration::from_secs(10),
        "create the job stream",
        stream.ensure_on(client, wire::SUBJECT_V1),
    )
    .await
    .expect("stream");
}

async fn stream_messages(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream(DEFAULT_STREAM).await.expect("stream");
    stream.info().await.expect("stream info").state.messages
}

/// Polls `condition` every 50 ms until it holds (bounded; fails with `what`).
async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !condition().await {
        assert!(start.elapsed() < LIMIT, "not within {LIMIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn worker_metric(worker: &WorkerProcess, name: &str) -> f64 {
    http_get(worker.health_port, "/metrics")
        .map(|(_, body)| metric_sum(&body, name))
        .unwrap_or(0.0)
}

fn request(query: &str, documents: &[String]) -> RerankRequest {
    RerankRequest {
        query: query.into(),
        documents: documents.to_vec(),
        ..Default::default()
    }
}

/// Publishes a raw job with a reply inbox; returns the inbox subscription.
async fn publish_raw(client: &async_nats::Client, payload: Vec<u8>) -> async_nats::Subscriber {
    let inbox = client.new_inbox();
    let replies = client.subscribe(inbox.clone()).await.expect("subscribe");
    let js = jetstream::new(client.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(wire::HEADER_REPLY_TO, inbox.as_str());
    within(Duration::from_secs(10), "publish a raw job", async {
        js.publish_with_headers(DEFAULT_JOBS_SUBJECT, headers, Bytes::from(payload))
            .await
            .expect("publish")
            .await
            .expect("stream ack")
    })
    .await;
    replies
}

async fn first_reply(replies: &mut async_nats::Subscriber) -> ReplyBody {
    let message = within(LIMIT, "job reply", replies.next())
        .await
        .expect("reply");
    wire::decode_reply(&message.payload).expect("decodable reply")
}

/// 1. Cold start: 10 requests with zero workers; a worker started afterwards answers all 10 with
/// the golden scores, through the sidecar and through the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_start_answers_requests_sent_while_no_worker_ran() {
    let nats = NatsServer::start_jetstream();
    let sidecar = Sidecar::start_with(&nats.url(), |c| {
        c.jetstream = Some(JobStream::default());
        c.request_timeout = LIMIT;
    })
    .await;
    // Scaled to zero: the sidecar can serve, but no model is loaded.
    let health = stack::get(&sidecar.url("/health"), None).await;
    assert_eq!(health.status, 200, "{}", health.text);
    assert_eq!(health.json()["model_loaded"], false);

    let raw = nats_connect(&nats.url()).await;
    let client = jetstream_client(raw.clone(), LIMIT);
    let cases: Vec<_> = golden()
        .cases
        .into_iter()
        .filter(|c| c.max_length == 512 && !c.query.is_empty())
        .collect();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..10 {
        let case = cases[i % cases.len()].clone();
        if i % 2 == 0 {
            let url = sidecar.url("/rerank");
            calls.spawn(async move {
                let body = serde_json::json!({"query": case.query, "documents": case.documents});
                let answer = post(&url, &body, None).await;
                assert_eq!(answer.status, 200, "{}", answer.text);
                let scores: Vec<f32> =
                    serde_json::from_value(answer.json()["scores"].clone()).expect("scores");
                (case, scores)
            });
        } else {
            let client = client.clone();
            calls.spawn(async move {
                let result = client
                    .rerank(case.query.clone(), case.documents.clone())
                    .await
                    .expect("client rerank");
                (case, result.scores)
            });
        }
    }
    let js = &jetstream::new(raw.clone());
    wait_until("10 jobs queued", || async move {
        stream_messages(js).await == 10
    })
    .await;
    let worker = start_worker_async(&nats.url()).await;
    let mut answered = 0;
    while let Some(done) = within(LIMIT, "cold-start replies", calls.join_next()).await {
        let (case, scores) = done.expect("call task");
        common::assert_close(&scores, &case.scores, 1e-4, &case.name);
        answered += 1;
    }
    assert_eq!(answered, 10);
    assert_eq!(worker_metric(&worker, "rerank_requests_total"), 10.0);
    // With a worker up, /health reports the loaded model again.
    let health = stack::get(&sidecar.url("/health"), None).await;
    assert_eq!(health.json()["model_loaded"], true, "{}", health.text);
    sidecar.stop().await;
}

/// 4. Expiry: jobs whose TTL passed while no worker ran are deleted by the stream; jobs whose
/// deadline passed are terminated by the worker without computing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_jobs_are_never_computed() {
    let nats = NatsServer::start_jetstream();
    let raw = nats_connect(&nats.url()).await;
    ensure_stream(&raw, &JobStream::default()).await;
    let js = &jetstream::new(raw.clone());

    // Callers that give up after 1 s: their jobs carry Nats-TTL 1s.
    let client = jetstream_client(raw.clone(), Duration::from_secs(1));
    let docs = vec!["a document".to_string()];
    let calls = (0..4).map(|_| client.send(request("q", &docs)));
    for result in futures::future::join_all(calls).await {
        assert_eq!(
            result.expect_err("no worker").kind(),
            RerankErrorKind::Timeout
        );
    }
    // Jobs without a TTL whose deadline has passed (a publisher that sets no Nats-TTL).
    let mut stale = Vec::new();
    for _ in 0..3 {
        let mut job = request("q", &docs);
        job.deadline_ms = Some(1);
        stale.push(publish_raw(&raw, wire::encode(&job)).await);
    }
    wait_until("the TTL jobs are deleted by the stream", || async move {
        stream_messages(js).await == 3
    })
    .await;

    let worker = &start_worker_async(&nats.url()).await;
    for replies in &mut stale {
        match first_reply(replies).await {
            ReplyBody::Err(e) => assert_eq!(e.error.code, ErrorCode::DeadlineExceeded),
            ok => panic!("expected deadline_exceeded, got {ok:?}"),
        }
    }
    wait_until("expired jobs counted", || async move {
        worker_metric(worker, "rerank_jobs_expired_total") == 3.0
    })
    .await;
    assert_eq!(worker_metric(worker, "rerank_jobs_terminated_total"), 3.0);
    assert_eq!(
        worker_metric(worker, "rerank_pairs_total"),
        0.0,
        "nothing computed"
    );
    wait_until("the stream is empty", || async move {
        stream_messages(js).await == 0
    })
    .await;
}

/// 5. Poison: an undecodable job is terminated after one delivery, its caller gets
/// `invalid_request`, and the worker keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undecodable_job_is_terminated_at_once() {
    let nats = NatsServer::start_jetstream();
    let worker = start_worker_async(&nats.url()).await;
    let raw = nats_connect(&nats.url()).await;
    let js = &jetstream::new(raw.clone());

    let mut replies = publish_raw(&raw, b"\xc1 definitely not msgpack".to_vec()).await;
    match first_reply(&mut replies).await {
        ReplyBody::Err(e) => assert_eq!(e.error.code, ErrorCode::InvalidRequest),
        ok => panic!("expected invalid_request, got {ok:?}"),
    }
    wait_until("the poison job is gone", || async move {
        let mut stream = js.get_stream(DEFAULT_STREAM).await.expect("stream");
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(DEFAULT_CONSUMER)
            .await
            .expect("consumer");
        let info = consumer.info().await.expect("consumer info");
        let messages = stream.info().await.expect("info").state.messages;
        messages == 0 && info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
    assert_eq!(worker_metric(&worker, "rerank_jobs_terminated_total"), 1.0);
    assert_eq!(worker_metric(&worker, "rerank_jobs_redelivered_total"), 0.0);

    let client = jetstream_client(raw, LIMIT);
    let ok = client
        .rerank("q", ["still serving"])
        .await
        .expect("next job");
    assert_eq!(ok.scores.len(), 1);
}

/// 6. A full stream refuses the publish: `overloaded` from the client, 429 + Retry-After over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_stream_is_overloaded_at_publish() {
    let nats = NatsServer::start_jetstream();
    let raw = nats_connect(&nats.url()).await;
    let small = JobStream {
        max_messages: 3,
        ..JobStream::default()
    };
    ensure_stream(&raw, &small).await;
    let js = &jetstream::new(raw.clone());
    let client = jetstream_client(raw.clone(), LIMIT);
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let client = client.clone();
        waiting.push(tokio::spawn(async move { client.rerank("q", ["d"]).await }));
    }
    wait_until(
        "3 jobs queued",
        || async move { stream_messages(js).await == 3 },
    )
    .await;

    let refused = within(
        Duration::from_secs(20),
        "refused publish",
        client.rerank("q", ["d"]),
    )
    .await
    .expect_err("the stream is full");
    assert_eq!(refused.kind(), RerankErrorKind::Overloaded, "{refused}");

    let sidecar = Sidecar::start_with(&nats.url(), |c| c.jetstream = Some(small.clone())).await;
    let answer = post(&sidecar.url("/rerank"), &stack::seed_request(), None).await;
    assert_eq!(answer.status, 429, "{}", answer.text);
    assert_eq!(answer.error_code(), "overloaded");
    assert!(answer.header("retry-after").is_some());

    // The queued ones are still answered once a worker comes.
    let _worker = start_worker_async(&nats.url()).await;
    for call in waiting {
        let result = within(LIMIT, "queued job", call).await.expect("task");
        assert_eq!(result.expect("answered").scores.len(), 1);
    }
    sidecar.stop().await;
}

/// Callers that do not retry, each sending `per_caller` requests one after the other; returns
/// (answered, failures).
fn callers(
    client: &RerankClient,
    count: usize,
    per_caller: usize,
) -> tokio::task::JoinSet<(usize, Vec<String>)> {
    let mut set = tokio::task::JoinSet::new();
    for caller in 0..count {
        let client = client.clone();
        set.spawn(async move {
            let mut failures = Vec::new();
            let mut answered = 0;
            for i in 0..per_caller {
                let docs = vec![format!("document {caller}-{i}"), "another one".to_string()];
                match client.rerank(format!("query {caller}"), docs).await {
                    Ok(r) if r.scores.len() == 2 => answered += 1,
                    Ok(r) => failures.push(format!("{} scores", r.scores.len())),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (answered, failures)
        });
    }
    set
}

async fn collect(mut set: tokio::task::JoinSet<(usize, Vec<String>)>) -> (usize, Vec<String>) {
    let (mut answered, mut failures) = (0, Vec::new());
    while let Some(done) = within(LIMIT * 3, "callers finish", set.join_next()).await {
        let (a, f) = done.expect("caller task");
        answered += a;
        failures.extend(f);
    }
    (answered, failures)
}

/// 2. Kill: two workers, 48 callers that do not retry, one worker SIGKILLed mid-run: every
/// request is answered (its jobs are redelivered to the survivor).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_run_loses_nothing() {
    let nats = NatsServer::start_jetstream();
    let survivor = start_worker_async(&nats.url()).await;
    let mut victim = start_worker_async(&nats.url()).await;
    let client = jetstream_client(nats_connect(&nats.url()).await, LIMIT);
    const CALLERS: usize = 48;
    const EACH: usize = 4;
    let running = callers(&client, CALLERS, EACH);
    let victim_ref = &victim;
    wait_until("the victim is busy", || async move {
        worker_metric(victim_ref, "rerank_requests_total") >= 5.0
    })
    .await;
    victim.signal("KILL");
    let _ = victim.wait_exit(Duration::from_secs(10));
    let (answered, failures) = collect(running).await;
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(answered, CALLERS * EACH);
    let redelivered = worker_metric(&survivor, "rerank_jobs_redelivered_total");
    println!("kill: {answered} answered, {redelivered} redelivered to the survivor");
}

/// 3. Drain: SIGTERM under load, ten times: every job answered, exit 0 each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_loses_nothing_ten_times() {
    let nats = NatsServer::start_jetstream();
    let _steady = start_worker_async(&nats.url()).await;
    let client = jetstream_client(nats_connect(&nats.url()).await, LIMIT);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for caller in 0..16 {
        let (client, stop) = (client.clone(), stop.clone());
        load.spawn(async move {
            let (mut answered, mut failures) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.rerank(format!("q{caller}"), ["a", "b"]).await {
                    Ok(r) if r.scores.len() == 2 => answered += 1,
                    Ok(r) => failures.push(format!("{} scores", r.scores.len())),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (answered, failures)
        });
    }
    for round in 0..10 {
        let mut worker = start_worker_async(&nats.url()).await;
        let w = &worker;
        wait_until("the draining worker has work", || async move {
            worker_metric(w, "rerank_requests_total") >= 3.0
        })
        .await;
        worker.signal("TERM");
        let code = tokio::task::spawn_blocking(move || worker.wait_exit(Duration::from_secs(30)))
            .await
            .expect("wait");
        assert_eq!(code, Some(0), "round {round}: exit code");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, failures) = collect(load).await;
    assert!(
        failures.is_empty(),
        "{} lost: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(answered > 0);
}

/// 7. Server restart: jobs queued while no worker runs survive a nats-server restart on the same
/// store, and a worker started afterwards answers callers that are still waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_jobs_survive_a_server_restart() {
    let mut nats = NatsServer::start_jetstream();
    let raw = nats_connect(&nats.url()).await;
    ensure_stream(&raw, &JobStream::default()).await;
    let client = jetstream_client(raw.clone(), LIMIT);
    let running = callers(&client, 5, 1);
    let js = &jetstream::new(raw.clone());
    wait_until(
        "5 jobs queued",
        || async move { stream_messages(js).await == 5 },
    )
    .await;
    tokio::task::block_in_place(|| nats.restart());
    let c = &client;
    wait_until("the client reconnects", || async move { c.is_connected() }).await;
    // At least the 5 jobs: a caller that saw the reconnect publishes its job again (under a new
    // `Nats-Msg-Id`, first reply wins), so there may be up to 10, and the wait must not depend on
    // whether it did so yet.
    wait_until("the jobs are still there", || async move {
        match js.get_stream(DEFAULT_STREAM).await {
            Ok(mut s) => s
                .info()
                .await
                .map(|i| i.state.messages >= 5)
                .unwrap_or(false),
            Err(_) => false,
        }
    })
    .await;
    let _worker = start_worker_async(&nats.url()).await;
    let (answered, failures) = collect(running).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(answered, 5);
}

/// No stream capturing the jobs subject (or no JetStream at all) is `unavailable`, not a wait for
/// the caller's timeout: only a stream that exists but has no leader yet (test 8) is waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_is_unavailable() {
    for nats in [NatsServer::start_jetstream(), NatsServer::start()] {
        let client = jetstream_client(nats_connect(&nats.url()).await, LIMIT);
        let error = within(LIMIT * 2, "no stream", client.rerank("q", ["d"]))
            .await
            .expect_err("no stream");
        assert_eq!(error.kind(), RerankErrorKind::Unavailable, "{error}");
    }
}

/// A stream that exists with settings the job queue cannot use stops the worker with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_stream_is_refused_at_start() {
    let nats = NatsServer::start_jetstream();
    let raw = nats_connect(&nats.url()).await;
    let js = jetstream::new(raw);
    js.create_stream(jetstream::stream::Config {
        name: DEFAULT_STREAM.into(),
        subjects: vec![DEFAULT_JOBS_SUBJECT.into()],
        ..Default::default()
    })
    .await
    .expect("limits stream");
    let output = tokio::task::spawn_blocking({
        let url = nats.url();
        move || {
            std::process::Command::new(common::rerank_bin())
                .arg("worker")
                .arg("--model")
                .arg(common::tiny_model_dir())
                .args(["--nats-url", &url, "--health-listen", "127.0.0.1:0"])
                .args(JS_WORKER)
                .env("RUST_LOG", "warn")
                .output()
                .expect("run worker")
        }
    })
    .await
    .expect("join");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot serve as the job queue"), "{stderr}");
}

/// A connection with the service's own options (every URL of a cluster, fast reconnect).
async fn connect_service(urls: &str) -> async_nats::Client {
    within(
        LIMIT,
        "connect to nats",
        rerank_service::nats::NatsConfig::new(urls).connect(),
    )
    .await
    .expect("connect")
}

/// 8. Cluster: three nats-server nodes on loopback, the job stream replicated on all three (R3,
/// created by the workers from `--stream-replicas 3`). Workers and callers get every node's URL.
/// Under load from callers that do not retry, the node leading the stream is SIGKILLed: the
/// stream and its consumer elect a new leader, clients connected to the dead node reconnect to
/// another, and every request is answered exactly once (each call returns one result, with the
/// scores of its own query), none lost.
///
/// Killing the leader is the hardest choice: in-flight publishes, pulls and acks all go through
/// it. Callers that were connected to it ask again after reconnecting (client::jetstream), and
/// workers that were reply again; the duplicates this makes are counted and ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_node_killed_under_load_loses_nothing() {
    const NODES: usize = 3;
    const CALLERS: usize = 24;
    let began = Instant::now();
    let mut cluster = NatsCluster::start(NODES);
    let urls = cluster.urls();
    let raw = connect_service(&urls).await;
    let js = &jetstream::new(raw.clone());
    // The cluster can place an R3 stream once its nodes have met and elected a meta leader
    // (asked with a short timeout: until then a request may go unanswered).
    let impatient = &jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(250))
        .build(raw.clone());
    wait_until("the JetStream cluster places an R3 stream", || async move {
        let probe = jetstream::stream::Config {
            name: "PROBE".into(),
            subjects: vec!["probe.ready".into()],
            num_replicas: NODES,
            ..Default::default()
        };
        match impatient.get_or_create_stream(probe).await {
            Ok(_) => impatient.delete_stream("PROBE").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;

    let args: Vec<&str> = JS_WORKER
        .iter()
        .copied()
        .chain(["--stream-replicas", "3"])
        .collect();
    // Both at once: each creates the stream unless the other already has.
    let starting: Vec<_> = (0..2)
        .map(|_| {
            let (urls, args) = (
                urls.clone(),
                args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            );
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                WorkerProcess::start(&urls, &args)
            })
        })
        .collect();
    let mut workers = Vec::new();
    for worker in starting {
        workers.push(worker.await.expect("worker start"));
    }
    let stream_info = || async move {
        let mut stream = js.get_stream(DEFAULT_STREAM).await.expect("stream");
        stream.info().await.expect("stream info").clone()
    };
    let info = stream_info().await;
    assert_eq!(info.config.num_replicas, NODES, "the workers created R3");
    let placement = info.cluster.expect("clustered stream");
    let leader = placement.leader.clone().expect("a stream leader");
    assert_eq!(placement.replicas.len(), NODES - 1, "{placement:?}");

    // Reference scores from a quiet cluster: an answer under load must match its own query's.
    let documents = ["Paris is the capital of France.", "Bananas are yellow."];
    let queries = ["capital of France?", "a yellow fruit", "rust", "energy"];
    let reference_client = jetstream_client(raw.clone(), LIMIT);
    let mut reference = Vec::new();
    for query in queries {
        let r = within(
            LIMIT,
            "reference",
            reference_client.rerank(query, documents),
        )
        .await
        .expect("reference scores");
        reference.push(r.scores);
    }
    let reference = Arc::new(reference);

    // Callers that do not retry, each sending its next request once the previous is answered,
    // until told to stop.
    #[derive(Default)]
    struct Tally {
        sent: AtomicUsize,
        answered: AtomicUsize,
        failures: std::sync::Mutex<Vec<String>>,
    }
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut connections = Vec::new();
    let mut load = tokio::task::JoinSet::new();
    for caller in 0..CALLERS {
        let connection = connect_service(&urls).await;
        connections.push(connection.clone());
        let client = jetstream_client(connection, LIMIT);
        let (reference, tally, stop) = (reference.clone(), tally.clone(), stop.clone());
        load.spawn(async move {
            let mut i = caller;
            while !stop.load(SeqCst) {
                let q = i % queries.len();
                i += 1;
                tally.sent.fetch_add(1, SeqCst);
                let failure = match client.rerank(queries[q], documents).await {
                    Ok(r)
                        if r.scores.len() == 2
                            && r.scores
                                .iter()
                                .zip(&reference[q])
                                .all(|(a, b)| (a - b).abs() <= 1e-3) =>
                    {
                        tally.answered.fetch_add(1, SeqCst);
                        continue;
                    }
                    Ok(r) => format!("query {q}: wrong scores {:?}", r.scores),
                    Err(e) => format!("query {q}: {e}"),
                };
                tally.failures.lock().unwrap().push(failure);
            }
        });
    }
    let answered = || tally.answered.load(SeqCst);
    wait_until("the load is under way", || async {
        answered() >= 2 * CALLERS
    })
    .await;
    let victim = cluster.node_named(&leader);
    let answered_before_kill = answered();
    let killed_at = Instant::now();
    let setup = killed_at - began;
    tokio::task::block_in_place(|| cluster.nodes[victim].stop()); // SIGKILL
                                                                  // Served again after the failover: every caller has had time to get past it.
    wait_until("answers after the kill", || async {
        answered() >= answered_before_kill + 4 * CALLERS
    })
    .await;
    let recovered_after = killed_at.elapsed();
    stop.store(true, SeqCst);
    while let Some(done) = within(LIMIT * 3, "callers finish", load.join_next()).await {
        done.expect("caller task");
    }
    let (sent, total) = (tally.sent.load(SeqCst), answered());
    let failures = std::mem::take(&mut *tally.failures.lock().unwrap());
    let new_leader = stream_info().await.cluster.and_then(|c| c.leader);
    let reconnected = connections
        .iter()
        .filter(|c| c.statistics().connects.load(SeqCst) > 1)
        .count();
    let sum = |name: &str| workers.iter().map(|w| worker_metric(w, name)).sum::<f64>();
    let replies = sum("rerank_requests_total");
    println!(
        "cluster: {NODES} nodes, R3; SIGKILLed stream leader {leader} after {answered_before_kill} answers (new leader {new_leader:?}, {} more answers within {} ms of the kill); requests {sent}, answered {total}, failed {}, lost {}; callers reconnected {reconnected} of {CALLERS}; worker replies {replies} (incl. {} reference), redelivered {}, replied again {}; killed {} ms after the start",
        4 * CALLERS,
        recovered_after.as_millis(),
        failures.len(),
        sent - total - failures.len(),
        queries.len(),
        sum("rerank_jobs_redelivered_total"),
        sum("rerank_jobs_replied_again_total"),
        setup.as_millis(),
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(total, sent, "every request answered exactly once");
    assert!(
        new_leader.is_some_and(|l| l != leader),
        "a new stream leader"
    );
}

/// The default model's id in the per-model tests (escaped in its subjects: `/` and `.`).
const ALPHA: &str = "org/alpha-1.0";
/// A second model, not the default.
const BETA: &str = "beta_model";
/// A model whose queue `rerank queue` makes before any worker of it runs.
const GAMMA: &str = "gamma";

/// Every consumer of the job stream: name → filter subjects.
async fn consumer_filters(
    js: &jetstream::Context,
) -> std::collections::BTreeMap<String, Vec<String>> {
    use futures::TryStreamExt;
    let stream = js.get_stream(DEFAULT_STREAM).await.expect("stream");
    stream
        .consumers()
        .map_ok(|info| {
            let mut filters = info.config.filter_subjects.clone();
            if !info.config.filter_subject.is_empty() {
                filters.push(info.config.filter_subject.clone());
            }
            filters.sort();
            (info.name.clone(), filters)
        })
        .try_collect()
        .await
        .expect("consumers")
}

fn assert_no_overlap(consumers: &std::collections::BTreeMap<String, Vec<String>>) {
    let all: Vec<(&String, &String)> = consumers
        .iter()
        .flat_map(|(name, filters)| filters.iter().map(move |f| (name, f)))
        .collect();
    for (i, (a_name, a)) in all.iter().enumerate() {
        assert!(!a.is_empty(), "{a_name} is unfiltered: {consumers:?}");
        for (b_name, b) in &all[i + 1..] {
            assert!(
                !rerank_service::jobs::subjects_overlap(a, b),
                "{a_name} ({a}) and {b_name} ({b}) overlap"
            );
        }
    }
}

/// `rerank queue` for `model` (not the default): what it printed.
fn rerank_queue(url: &str, model: &str) -> serde_json::Value {
    let out = std::process::Command::new(common::rerank_bin())
        .args([
            "queue",
            "--model",
            model,
            "--default-model",
            "false",
            "--nats-url",
            url,
        ])
        .output()
        .expect("rerank queue runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// A JetStream worker process for `model` (the default model, or not).
async fn start_model_worker(url: &str, model: &'static str, default: bool) -> WorkerProcess {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let default = if default { "true" } else { "false" };
        let mut args = JS_WORKER.to_vec();
        args.extend(["--served-model-name", model, "--default-model", default]);
        WorkerProcess::start(&url, &args)
    })
    .await
    .expect("worker start")
}

fn cohere(model: Option<&str>) -> serde_json::Value {
    let mut body =
        serde_json::json!({"query": "capital of France?", "documents": ["Paris", "Bananas"]});
    if let Some(model) = model {
        body["model"] = serde_json::json!(model);
    }
    body
}

/// One pool, two models, both on the JetStream intake behind one sidecar: each model's workers
/// have their own durable consumer (filters that do not overlap), requests are routed by `model`
/// to its jobs subject and reach that model's worker only; a model whose workers all stopped
/// (scaled to zero) still takes requests, which are answered once a worker for it starts; a model
/// no worker ever served is 404 at once, never a job left to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_models_each_have_a_durable_queue_and_scale_from_zero() {
    let nats = NatsServer::start_jetstream();
    let alpha = start_model_worker(&nats.url(), ALPHA, true).await;
    let mut beta = start_model_worker(&nats.url(), BETA, false).await;
    let raw = nats_connect(&nats.url()).await;
    let js = &jetstream::new(raw.clone());

    // The names the Helm chart relies on.
    let consumers = consumer_filters(js).await;
    let beta_consumer = format!("{DEFAULT_CONSUMER}-beta_5Fmodel");
    assert_eq!(
        consumers.get(DEFAULT_CONSUMER),
        Some(&vec![
            DEFAULT_JOBS_SUBJECT.to_string(),
            "rerank.jobs.v1.model.org_2Falpha-1_2E0".to_string()
        ]),
        "{consumers:?}"
    );
    assert_eq!(
        consumers.get(&beta_consumer),
        Some(&vec!["rerank.jobs.v1.model.beta_5Fmodel".to_string()]),
        "{consumers:?}"
    );
    assert_eq!(consumers.len(), 2, "{consumers:?}");
    assert_no_overlap(&consumers);
    let mut stream = js.get_stream(DEFAULT_STREAM).await.expect("stream");
    let subjects = stream.info().await.expect("info").config.subjects.clone();
    assert_eq!(subjects, [DEFAULT_JOBS_SUBJECT, "rerank.jobs.v1.model.*"]);

    let jetstream_sidecar = |nats: String| async move {
        Sidecar::start_with(&nats, |c| {
            c.jetstream = Some(JobStream::default());
            c.request_timeout = LIMIT;
            c.models_wait = Duration::from_secs(1);
        })
        .await
    };
    let sidecar = jetstream_sidecar(nats.url()).await;
    for (model, answered_by) in [
        (Some(BETA), BETA),
        (None, ALPHA),
        (Some(ALPHA), ALPHA),
        (Some(BETA), BETA),
    ] {
        let answer = post(&sidecar.url("/v1/rerank"), &cohere(model), None).await;
        assert_eq!(answer.status, 200, "{model:?}: {}", answer.text);
        assert_eq!(answer.json()["model"], answered_by, "{model:?}");
    }
    // The client over JetStream: `.model(..)` publishes to that model's jobs subject.
    let beta_client = RerankClient::builder()
        .jetstream(raw.clone(), DEFAULT_JOBS_SUBJECT)
        .model(BETA)
        .timeout(LIMIT)
        .retries(0)
        .build()
        .expect("client");
    let reply = within(
        LIMIT,
        "client job",
        beta_client.send(request("q", &["d".into()])),
    )
    .await
    .expect("reply");
    assert_eq!(reply.model, BETA);
    // Each worker computed exactly its own model's requests (neither has a core subscription:
    // everything came through its consumer).
    assert_eq!(worker_metric(&beta, "rerank_requests_total"), 3.0);
    assert_eq!(worker_metric(&alpha, "rerank_requests_total"), 2.0);
    // Never served: refused at once, naming what is.
    let unknown = post(&sidecar.url("/v1/rerank"), &cohere(Some("gamma")), None).await;
    assert_eq!(unknown.status, 404, "{}", unknown.text);
    assert_eq!(unknown.error_code(), "model_not_found");
    assert!(
        unknown.text.contains(ALPHA) && unknown.text.contains(BETA),
        "{}",
        unknown.text
    );
    sidecar.stop().await;

    // Scale beta to zero; a sidecar started now has never seen a beta worker, only its consumer.
    beta.signal("TERM");
    let code = tokio::task::spawn_blocking(move || beta.wait_exit(Duration::from_secs(30)))
        .await
        .expect("wait");
    assert_eq!(code, Some(0));
    let sidecar = jetstream_sidecar(nats.url()).await;
    // Listed all the same, from its consumer: no workers now.
    let list = get(&sidecar.url("/v1/models"), None).await;
    assert_eq!(list.status, 200, "{}", list.text);
    let listed: Vec<(String, u64)> = list.json()["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| {
            (
                m["id"].as_str().expect("id").to_string(),
                m["workers"].as_u64().expect("workers"),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [(ALPHA.to_string(), 1), (BETA.to_string(), 0)],
        "{}",
        list.text
    );
    let url = sidecar.url("/v1/rerank");
    let over_http = tokio::spawn(async move { post(&url, &cohere(Some(BETA)), None).await });
    let over_client = tokio::spawn(async move { beta_client.rerank("q", ["a", "b"]).await });
    wait_until("both beta jobs wait in the stream", || async move {
        stream_messages(js).await == 2
    })
    .await;
    let beta = start_model_worker(&nats.url(), BETA, false).await;
    let answer = within(LIMIT, "beta's job over HTTP", over_http)
        .await
        .expect("task");
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["model"], BETA);
    let result = within(LIMIT, "beta's job from the client", over_client)
        .await
        .expect("task")
        .expect("answered");
    assert_eq!(result.scores.len(), 2);
    assert_eq!(worker_metric(&beta, "rerank_requests_total"), 2.0);
    assert_eq!(worker_metric(&alpha, "rerank_requests_total"), 2.0);
    sidecar.stop().await;

    // A new pool that has never run a worker: `rerank queue` makes its consumer, after which its
    // model is listed (no workers), its request waits in the stream, and its first worker
    // answers it.
    let made = rerank_queue(&nats.url(), GAMMA);
    assert_eq!(
        made["consumer"],
        format!("{DEFAULT_CONSUMER}-gamma"),
        "{made}"
    );
    assert_eq!(
        made["subjects"],
        serde_json::json!(["rerank.jobs.v1.model.gamma"]),
        "{made}"
    );
    let sidecar = jetstream_sidecar(nats.url()).await;
    let list = get(&sidecar.url("/v1/models"), None).await;
    assert!(
        list.json()["data"]
            .as_array()
            .expect("data")
            .iter()
            .any(|m| m["id"] == GAMMA && m["workers"] == 0),
        "{}",
        list.text
    );
    let url = sidecar.url("/v1/rerank");
    let over_http = tokio::spawn(async move { post(&url, &cohere(Some(GAMMA)), None).await });
    wait_until("gamma's job waits in the stream", || async move {
        stream_messages(js).await == 1
    })
    .await;
    let gamma = start_model_worker(&nats.url(), GAMMA, false).await;
    let answer = within(LIMIT, "gamma's job", over_http).await.expect("task");
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["model"], GAMMA);
    assert_eq!(worker_metric(&gamma, "rerank_requests_total"), 1.0);
    // Run again (every helm upgrade does): the same queue, nothing changed.
    assert_eq!(rerank_queue(&nats.url(), GAMMA), made);
    assert_eq!(consumer_filters(js).await.len(), 3);
    sidecar.stop().await;
}

/// The consumers' rules, straight against the server (no worker process): distinct models get
/// consumers whose filters do not overlap; a model served both as the default and not, or two
/// default models, is refused by name; and a stream and consumer made before per-model jobs are
/// upgraded in place, keeping the jobs they hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_filters_never_overlap_and_old_queues_are_upgraded() {
    use rerank_service::jobs::{JobConsumer, JobQueueError};
    let nats = NatsServer::start_jetstream();
    let raw = nats_connect(&nats.url()).await;
    let js = &jetstream::new(raw.clone());
    let (jobs, consumer) = (JobStream::default(), JobConsumer::default());

    // As created before per-model jobs: the stream captures `J` only, the consumer is unfiltered,
    // and one job waits.
    js.create_stream(jetstream::stream::Config {
        name: DEFAULT_STREAM.into(),
        subjects: vec![DEFAULT_JOBS_SUBJECT.into()],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        allow_message_ttl: true,
        ..Default::default()
    })
    .await
    .expect("old stream");
    js.get_stream(DEFAULT_STREAM)
        .await
        .expect("stream")
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(DEFAULT_CONSUMER.into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("old consumer");
    drop(publish_raw(&raw, wire::encode(&request("q", &["d".into()]))).await);

    let ensure = |model: &'static str, default: bool| {
        let (jobs, consumer) = (jobs.clone(), consumer.clone());
        async move {
            let stream = jobs.ensure(js, wire::SUBJECT_V1).await.expect("stream");
            consumer
                .ensure(&stream, &jobs, model, default)
                .await
                .map(|(_, taken)| taken)
        }
    };
    // Another model first: the stream gains `J.model.*`, the old consumer is narrowed to `J`.
    let beta = ensure(BETA, false).await.expect("beta's consumer");
    assert_eq!(beta.name, format!("{DEFAULT_CONSUMER}-beta_5Fmodel"));
    let consumers = consumer_filters(js).await;
    assert_eq!(consumers[DEFAULT_CONSUMER], [DEFAULT_JOBS_SUBJECT]);
    assert_no_overlap(&consumers);
    // The default model's workers add their own subject to it.
    let alpha = ensure(ALPHA, true).await.expect("alpha's consumer");
    assert_eq!(alpha.name, DEFAULT_CONSUMER);
    let consumers = consumer_filters(js).await;
    assert_eq!(consumers.len(), 2);
    assert_eq!(consumers[DEFAULT_CONSUMER].len(), 2, "{consumers:?}");
    assert_no_overlap(&consumers);
    // Idempotent.
    assert_eq!(ensure(ALPHA, true).await.expect("again"), alpha);
    assert_eq!(ensure(BETA, false).await.expect("again"), beta);
    // The old job is still there, for the default model's workers.
    assert_eq!(stream_messages(js).await, 1);

    // The same model both as the default and not: the filters would overlap.
    match ensure(ALPHA, false).await {
        Err(JobQueueError::ConsumerOverlap { other, model, .. }) => {
            assert_eq!(other, DEFAULT_CONSUMER);
            assert_eq!(model, ALPHA);
        }
        other => panic!("expected ConsumerOverlap, got {other:?}"),
    }
    match ensure(BETA, true).await {
        Err(e @ JobQueueError::ConsumerOverlap { .. }) => {
            assert!(e.to_string().contains("--default-model"), "{e}")
        }
        other => panic!("expected ConsumerOverlap, got {other:?}"),
    }
    // Two default models would share `rerank-workers`.
    match ensure("gamma", true).await {
        Err(e @ JobQueueError::ConsumerMismatch { .. }) => {
            assert!(e.to_string().contains("--default-model"), "{e}")
        }
        other => panic!("expected ConsumerMismatch, got {other:?}"),
    }
    // Nothing was changed by the refusals.
    let after = consumer_filters(js).await;
    assert_eq!(after, consumers);
}
