//! One pool, two models: a real nats-server, two real worker processes serving the tiny model
//! under two model ids (one the default), one real sidecar. Requests are routed by `model` on
//! every route (the reply's `model` and each worker's discovery STATS prove which worker
//! answered), `/v1/models` lists both, an unknown model is 404 `model_not_found` naming both,
//! no model goes to the default, and the client's `.model(..)` reaches its model's subject.

use crate::common;
use crate::stack;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use rerank_service::client::{RerankClient, RerankErrorKind};
use rerank_service::wire;
use serde_json::{json, Value};
use stack::*;

/// The default model's id: a Hub-style id with a `/` and a `.`, both escaped in its subject.
const DEFAULT_MODEL: &str = "org/alpha-1.0";
/// The second model's id.
const OTHER_MODEL: &str = "beta_model";

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
        let message = within(PATIENCE, subject, replies.next())
            .await
            .expect("subscription open");
        answers.push(serde_json::from_slice::<Value>(&message.payload).expect("JSON answer"));
    }
    answers
}

/// `num_requests` of each worker's endpoint, by the model it serves.
async fn requests_by_model(client: &async_nats::Client) -> HashMap<String, u64> {
    ask_all(client, "$SRV.STATS.rerank", 2)
        .await
        .iter()
        .map(|s| {
            let model = s["metadata"]["model"].as_str().expect("model").to_string();
            let n = s["endpoints"][0]["num_requests"].as_u64().expect("count");
            (model, n)
        })
        .collect()
}

fn cohere(model: Option<&str>) -> Value {
    let mut body = json!({"query": "capital of France?", "documents": ["Paris", "Bananas"]});
    if let Some(model) = model {
        body["model"] = json!(model);
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_models_are_routed_by_model_through_one_sidecar() {
    let nats = NatsServer::start();
    let _default = WorkerProcess::start(&nats.url(), &["--served-model-name", DEFAULT_MODEL]);
    let _other = WorkerProcess::start(
        &nats.url(),
        &[
            "--served-model-name",
            OTHER_MODEL,
            "--default-model",
            "false",
        ],
    );
    let conn = connect_nats(&nats.url()).await;

    // Discovery names each model, its family, whether it is the default, and its subject.
    let infos = ask_all(&conn, "$SRV.INFO.rerank", 2).await;
    let by_model: HashMap<&str, &Value> = infos
        .iter()
        .map(|i| (i["metadata"]["model"].as_str().expect("model"), i))
        .collect();
    for (model, default) in [(DEFAULT_MODEL, true), (OTHER_MODEL, false)] {
        let info = by_model[model];
        let subject = wire::model_subject(wire::SUBJECT_V1, model);
        assert_eq!(info["metadata"]["family"], "llama_bidirec", "{info}");
        assert_eq!(info["metadata"]["default"], default.to_string(), "{info}");
        assert_eq!(
            info["metadata"]["model_subject"],
            subject.as_str(),
            "{info}"
        );
        let endpoint_subject = if default {
            wire::SUBJECT_V1.to_string()
        } else {
            subject
        };
        assert_eq!(info["endpoints"][0]["subject"], endpoint_subject, "{info}");
    }
    assert_eq!(
        wire::model_subject(wire::SUBJECT_V1, DEFAULT_MODEL),
        "rerank.v1.model.org_2Falpha-1_2E0"
    );

    // Every discovery round waits out its whole window; a long one keeps this test independent
    // of the machine's speed, a long TTL makes the rounds few.
    let sidecar = Sidecar::start_with(&nats.url(), |c| {
        c.models_wait = Duration::from_secs(3);
        c.models_ttl = Duration::from_secs(600);
    })
    .await;

    let list = get(&sidecar.url("/v1/models"), None).await;
    assert_eq!(list.status, 200, "{}", list.text);
    let list = list.json();
    assert_eq!(list["object"], "list", "{list}");
    let data = list["data"].as_array().expect("data");
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().expect("id")).collect();
    assert_eq!(ids, [DEFAULT_MODEL, OTHER_MODEL], "default first: {list}");
    for (card, default) in data.iter().zip([true, false]) {
        assert_eq!(card["object"], "model", "{card}");
        assert_eq!(card["owned_by"], "rerank-service", "{card}");
        assert!(card["created"].as_u64().is_some_and(|t| t > 0), "{card}");
        assert_eq!(card["family"], "llama_bidirec", "{card}");
        assert_eq!(card["default"], default, "{card}");
        assert_eq!(card["workers"], 1, "{card}");
        assert_eq!(card["devices"], json!(["cpu"]), "{card}");
    }

    // Named: the other model, on all three routes.
    for _ in 0..3 {
        let answer = post(&sidecar.url("/v1/rerank"), &cohere(Some(OTHER_MODEL)), None).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.json()["model"], OTHER_MODEL);
    }
    let nim = json!({"model": OTHER_MODEL, "query": {"text": "q"}, "passages": [{"text": "p"}]});
    let answer = post(&sidecar.url("/v1/ranking"), &nim, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let seed = json!({"model": OTHER_MODEL, "query": "q", "documents": ["a", "b"]});
    let answer = post(&sidecar.url("/rerank"), &seed, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["scores"].as_array().map(Vec::len), Some(2));

    // No model, and the default's own id: the default model.
    let answer = post(&sidecar.url("/v1/rerank"), &cohere(None), None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["model"], DEFAULT_MODEL);
    let answer = post(
        &sidecar.url("/v1/rerank"),
        &cohere(Some(DEFAULT_MODEL)),
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["model"], DEFAULT_MODEL);
    let answer = post(&sidecar.url("/rerank"), &seed_request(), None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    // Unknown: 404 model_not_found naming both, on every route; nothing reaches a worker.
    let unknown = "rerank-english-v3.0";
    let nim_unknown =
        json!({"model": unknown, "query": {"text": "q"}, "passages": [{"text": "p"}]});
    let seed_unknown = json!({"model": unknown, "query": "q", "documents": ["a"]});
    for (route, body) in [
        ("/v1/rerank", cohere(Some(unknown))),
        ("/v1/ranking", nim_unknown),
        ("/rerank", seed_unknown),
    ] {
        let answer = post(&sidecar.url(route), &body, None).await;
        assert_eq!(answer.status, 404, "{route}: {}", answer.text);
        assert_eq!(answer.error_code(), "model_not_found", "{route}");
        let message = answer.json()["error"]["message"]
            .as_str()
            .expect("message")
            .to_string();
        for name in [unknown, DEFAULT_MODEL, OTHER_MODEL] {
            assert!(message.contains(name), "{route}: {message}");
        }
    }

    // The client, straight over NATS: `.model(..)` sends to that model's subject.
    let client = RerankClient::builder()
        .nats(conn.clone(), wire::SUBJECT_V1)
        .model(OTHER_MODEL)
        .timeout(PATIENCE)
        .retries(0)
        .build()
        .expect("client");
    let request = wire::RerankRequest {
        query: "q".into(),
        documents: vec!["d".into()],
        ..Default::default()
    };
    let reply = within(PATIENCE, "client request", client.send(request.clone()))
        .await
        .expect("reply");
    assert_eq!(reply.model, OTHER_MODEL);
    let nobody = RerankClient::builder()
        .nats(conn.clone(), wire::SUBJECT_V1)
        .model(unknown)
        .timeout(PATIENCE)
        .retries(0)
        .unavailable_retries(0)
        .build()
        .expect("client");
    let error = within(PATIENCE, "unknown model", nobody.send(request))
        .await
        .expect_err("no worker serves it");
    assert_eq!(error.kind(), RerankErrorKind::Unavailable, "{error}");
    // Over HTTP, `.model(..)` names the model in the body of the sidecar's `/rerank`.
    let over_http = RerankClient::builder()
        .http(sidecar.base_url())
        .model(OTHER_MODEL)
        .timeout(PATIENCE)
        .retries(0)
        .build()
        .expect("client");
    let result = within(PATIENCE, "HTTP client", over_http.rerank("q", ["a", "b"]))
        .await
        .expect("reply");
    assert_eq!(result.scores.len(), 2);

    // Each worker counted exactly the requests meant for its model: 3 + 1 + 1 + 2 (clients) for
    // the other model, 3 for the default.
    let counts = requests_by_model(&conn).await;
    assert_eq!(counts[OTHER_MODEL], 7, "{counts:?}");
    assert_eq!(counts[DEFAULT_MODEL], 3, "{counts:?}");
    sidecar.stop().await;
}

/// A jobs subject that is not one literal subject (the model subjects are derived from it) stops
/// the worker before its model load, naming the rule.
#[test]
fn the_jetstream_intake_refuses_a_wildcard_jobs_subject() {
    let output = std::process::Command::new(rerank_bin())
        .args(["worker", "--model"])
        .arg(tiny_model_dir())
        .args([
            "--served-model-name",
            OTHER_MODEL,
            "--default-model",
            "false",
        ])
        .args(["--intake", "jetstream", "--jobs-subject", "rerank.jobs.*"])
        .args(["--nats-url", "nats://127.0.0.1:1"])
        .args(["--health-listen", &format!("127.0.0.1:{}", free_port())])
        .env("RUST_LOG", "error")
        .output()
        .expect("run rerank worker");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("jobs subject") && stderr.contains("wildcard"),
        "the refusal names the rule: {stderr}"
    );
}
