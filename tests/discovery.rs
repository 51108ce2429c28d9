//! NATS service discovery tells the truth: `$SRV.PING/INFO/STATS` (ADR-32 shapes, as
//! `nats micro info|stats` reads them) list the rerank endpoint, and STATS counts what the workers
//! actually answered, across two workers.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::{within, NatsServer, WorkerProcess};
use futures::StreamExt;
use rerank_service::wire::{self, ReplyBody, RerankRequest};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(30);

async fn connect(url: &str) -> async_nats::Client {
    within(Duration::from_secs(10), "connect", async_nats::connect(url))
        .await
        .expect("connect")
}

/// One request with an explicit timeout (never async-nats's default).
async fn request(client: &async_nats::Client, payload: Vec<u8>) -> ReplyBody {
    let message = within(
        LIMIT,
        "rerank request",
        client.send_request(
            wire::SUBJECT_V1,
            async_nats::Request::new()
                .payload(Bytes::from(payload))
                .timeout(Some(LIMIT)),
        ),
    )
    .await
    .expect("reply");
    wire::decode_reply(&message.payload).expect("decodable reply")
}

/// Publishes to a discovery subject with our own inbox and collects `expected` replies.
async fn ask_all(client: &async_nats::Client, subject: &str, expected: usize) -> Vec<Value> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply(subject.to_string(), inbox, Bytes::new())
        .await
        .expect("publish");
    let mut answers = Vec::new();
    while answers.len() < expected {
        let message = within(LIMIT, subject, replies.next())
            .await
            .expect("subscription open");
        answers.push(serde_json::from_slice::<Value>(&message.payload).expect("JSON answer"));
    }
    answers
}

fn endpoint(answer: &Value) -> &Value {
    let endpoints = answer["endpoints"].as_array().expect("endpoints array");
    assert_eq!(endpoints.len(), 1, "one endpoint: {answer}");
    &endpoints[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_from_two_workers_add_up_to_the_requests_sent() {
    let nats = NatsServer::start();
    let _a = WorkerProcess::start(&nats.url(), &[]);
    let _b = WorkerProcess::start(&nats.url(), &[]);
    let client = connect(&nats.url()).await;

    // Nothing answered yet: both report the endpoint with zero counts.
    for stats in ask_all(&client, "$SRV.STATS.rerank", 2).await {
        assert_eq!(endpoint(&stats)["num_requests"], 0, "{stats}");
    }

    const GOOD: usize = 11;
    let good = RerankRequest {
        query: "capital of France?".into(),
        documents: vec!["Paris".into(), "Bananas".into()],
        ..Default::default()
    };
    let calls = (0..GOOD).map(|_| request(&client, wire::encode(&good)));
    for reply in futures::future::join_all(calls).await {
        assert!(matches!(reply, ReplyBody::Ok(_)), "{reply:?}");
    }
    match request(&client, b"\xc1 not msgpack".to_vec()).await {
        ReplyBody::Err(e) => assert_eq!(e.error.code, wire::ErrorCode::InvalidRequest),
        ok => panic!("expected invalid_request, got {ok:?}"),
    }

    let stats = ask_all(&client, "$SRV.STATS.rerank", 2).await;
    let (mut requests, mut errors, mut last_errors) = (0, 0, Vec::new());
    for s in &stats {
        assert_eq!(s["type"], "io.nats.micro.v1.stats_response", "{s}");
        assert_eq!(s["name"], "rerank");
        assert!(
            s["started"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{s}"
        );
        let ep = endpoint(s);
        assert_eq!(ep["subject"], wire::SUBJECT_V1);
        assert_eq!(ep["queue_group"], wire::DEFAULT_QUEUE_GROUP);
        let n = ep["num_requests"].as_u64().expect("num_requests");
        let processing = ep["processing_time"].as_u64().expect("processing_time");
        let average = ep["average_processing_time"].as_u64().expect("average");
        if let Some(expected) = processing.checked_div(n) {
            assert!(processing > 0, "{s}");
            assert_eq!(average, expected, "{s}");
        }
        requests += n;
        errors += ep["num_errors"].as_u64().expect("num_errors");
        let last = ep["last_error"].as_str().expect("last_error string");
        if !last.is_empty() {
            last_errors.push(last.to_string());
        }
    }
    assert_eq!(requests, GOOD as u64 + 1, "{stats:?}");
    assert_eq!(errors, 1, "{stats:?}");
    assert_eq!(last_errors.len(), 1, "{last_errors:?}");
    assert!(last_errors[0].starts_with("400:"), "{last_errors:?}");

    // PING and INFO, from every instance, the name-less and the id-addressed subjects too.
    let pings = ask_all(&client, "$SRV.PING", 2).await;
    for ping in &pings {
        assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
        assert_eq!(ping["metadata"]["model_loaded"], "true");
    }
    assert_ne!(pings[0]["id"], pings[1]["id"], "instance ids are unique");
    for info in ask_all(&client, "$SRV.INFO.rerank", 2).await {
        assert_eq!(info["type"], "io.nats.micro.v1.info_response");
        assert_eq!(info["metadata"]["device"], "cpu");
        assert_eq!(info["metadata"]["subject"], wire::SUBJECT_V1);
        let ep = endpoint(&info);
        assert_eq!(ep["name"], "rerank");
        assert_eq!(ep["subject"], wire::SUBJECT_V1);
        assert_eq!(ep["queue_group"], wire::DEFAULT_QUEUE_GROUP);
    }
    let id = pings[0]["id"].as_str().expect("id");
    let one = ask_all(&client, &format!("$SRV.STATS.rerank.{id}"), 1).await;
    assert_eq!(one[0]["id"], id);
}
