//! The NATS worker against a real nats-server: round trips, errors, the queue group, overload,
//! SIGTERM drain and reconnects.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use rerank_service::wire::{self, ErrorCode, ReplyBody, RerankRequest, Truncate};

async fn connect(url: &str) -> async_nats::Client {
    within(Duration::from_secs(10), "connect to nats", async_nats::connect(url))
        .await
        .expect("connect")
}

async fn request_raw(client: &async_nats::Client, payload: Vec<u8>) -> async_nats::Message {
    within(
        Duration::from_secs(30),
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
        ("garbage bytes", b"\xc1\xc1not msgpack".to_vec(), ErrorCode::InvalidRequest),
        ("empty body", vec![], ErrorCode::InvalidRequest),
        ("wrong types", rmp_serde::to_vec_named(&WrongTypes { query: 1, documents: "x" }).unwrap(), ErrorCode::InvalidRequest),
        ("missing documents", rmp_serde::to_vec_named(&MissingDocuments { query: "q" }).unwrap(), ErrorCode::InvalidRequest),
        ("invalid utf-8", invalid_utf8, ErrorCode::InvalidRequest),
        ("10 000 documents", wire::encode(&too_many), ErrorCode::TooManyDocuments),
        ("5 MB document, truncate NONE", wire::encode(&too_long), ErrorCode::DocumentTooLong),
    ];
    for (name, payload, expected) in cases {
        let message = request_raw(&client, payload).await;
        let headers = message.headers.as_ref().unwrap_or_else(|| panic!("{name}: no error headers"));
        assert_eq!(
            headers.get(wire::HEADER_SERVICE_ERROR_CODE).map(|v| v.as_str().to_string()),
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
    assert!(matches!(rerank(&client, &request("q", &["d"])).await, ReplyBody::Ok(_)));
}
