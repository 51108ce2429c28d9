//! The HTTP sidecar against a real nats-server, real worker processes (tiny model), a real sidecar
//! on 127.0.0.1:0 and a real HTTP client: every route's success and error paths.

use crate::common;
use crate::stack;

use std::time::{Duration, Instant};

use common::*;
use rerank_service::wire::{self, RerankRequest};
use serde_json::{json, Value};
use stack::*;

/// Validates `instance` against `components.schemas.<name>` of the OpenAPI document.
fn assert_matches_schema(doc: &Value, name: &str, instance: &Value) {
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("#/components/schemas/{name}"),
        "components": doc["components"],
    });
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{name}: {errors:?}\n{instance}");
}

fn openapi() -> Value {
    rerank_service::sidecar::openapi::document()
}

/// Scores straight from the pool over NATS, for comparison.
async fn direct_scores(nats_url: &str, query: &str, documents: &[&str]) -> Vec<f32> {
    let client = nats_connect(nats_url).await;
    let request = RerankRequest {
        query: query.into(),
        documents: documents.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    };
    let message = within(
        PATIENCE,
        "direct request",
        client.request(wire::SUBJECT_V1, wire::encode(&request).into()),
    )
    .await
    .expect("direct request");
    match wire::decode_reply(&message.payload).expect("reply decodes") {
        wire::ReplyBody::Ok(reply) => reply.scores,
        wire::ReplyBody::Err(e) => panic!("direct request failed: {e:?}"),
    }
}

fn f32s(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect()
}

/// NATS, one worker that takes at most 4 documents, and a sidecar in front of it.
async fn seed_stack() -> (NatsServer, WorkerProcess, Sidecar) {
    let nats = NatsServer::start();
    let worker = WorkerProcess::start(&nats.url(), &["--max-documents", "4"]);
    let sidecar = Sidecar::start(&nats.url()).await;
    (nats, worker, sidecar)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_example_returns_the_documented_shape_and_the_workers_scores() {
    let (nats, _worker, sidecar) = seed_stack().await;
    let answer = post(&sidecar.url("/rerank"), &seed_request(), None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["ranked_indices", "scores"], "{body}");
    let scores = f32s(&body["scores"]);
    assert_eq!(scores.len(), 3);
    let ranked: Vec<u32> = serde_json::from_value(body["ranked_indices"].clone()).unwrap();
    assert_eq!(ranked, wire::rank(&scores, None));
    assert_matches_schema(&openapi(), "RerankResponse", &body);
    let seed = seed_request();
    let docs: Vec<&str> = seed["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect::<Vec<_>>();
    let direct = direct_scores(&nats.url(), "AI tools for productivity", &docs).await;
    assert_close(&scores, &direct, 1e-5, "sidecar vs direct NATS");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_fields_form_content_type_and_empty_lists() {
    let (_nats, _worker, sidecar) = seed_stack().await;
    let ranked = {
        let body = post(&sidecar.url("/rerank"), &seed_request(), None)
            .await
            .json();
        wire::rank(&f32s(&body["scores"]), None)
    };

    // Optional fields pass through.
    let mut with_top_k = seed_request();
    with_top_k["top_k"] = json!(1);
    with_top_k["truncate"] = json!("NONE");
    let answer = post(&sidecar.url("/rerank"), &with_top_k, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["ranked_indices"], json!([ranked[0]]));
    assert_eq!(answer.json()["scores"].as_array().unwrap().len(), 3);

    // curl -d sends a form content type: accepted, the body is JSON all the same.
    let answer = post_raw(
        &sidecar.url("/rerank"),
        seed_request().to_string(),
        "application/x-www-form-urlencoded",
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    // Empty document list: a valid request with empty results.
    let answer = post(
        &sidecar.url("/rerank"),
        &json!({"query": "q", "documents": []}),
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json(), json!({"scores": [], "ranked_indices": []}));
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_json_errors_naming_the_field() {
    let (_nats, _worker, sidecar) = seed_stack().await;

    // Errors: our shape, the right status, the field named.
    let cases: Vec<(&str, reqwest::Body, u16, &str, &str)> = vec![
        (
            "malformed JSON",
            "{\"query\": ".into(),
            400,
            "invalid_request",
            "",
        ),
        ("not an object", "[1, 2]".into(), 400, "invalid_request", ""),
        (
            "wrong type",
            json!({"query": "q", "documents": ["a", 3]})
                .to_string()
                .into(),
            400,
            "invalid_request",
            "documents[1]",
        ),
        (
            "missing field",
            json!({"query": "q"}).to_string().into(),
            400,
            "invalid_request",
            "documents",
        ),
        (
            "negative top_k",
            json!({"query": "q", "documents": [], "top_k": -1})
                .to_string()
                .into(),
            400,
            "invalid_request",
            "top_k",
        ),
        (
            "bad truncate",
            json!({"query": "q", "documents": [], "truncate": "START"})
                .to_string()
                .into(),
            400,
            "invalid_request",
            "truncate",
        ),
        (
            "too many documents",
            json!({"query": "q", "documents": ["a", "b", "c", "d", "e"]})
                .to_string()
                .into(),
            400,
            "too_many_documents",
            "",
        ),
        (
            "document too long",
            json!({"query": "q", "documents": ["word ".repeat(2000)], "truncate": "NONE"})
                .to_string()
                .into(),
            400,
            "document_too_long",
            "",
        ),
    ];
    for (name, body, status, code, mentions) in cases {
        let answer = post_raw(&sidecar.url("/rerank"), body, "application/json").await;
        assert_eq!(answer.status, status, "{name}: {}", answer.text);
        assert_eq!(answer.error_code(), code, "{name}");
        let message = answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.contains(mentions), "{name}: {message}");
        assert_eq!(
            answer.header("content-type").as_deref(),
            Some("application/json"),
            "{name}"
        );
    }

    // Unknown route and wrong method: JSON too.
    let answer = get(&sidecar.url("/nope"), None).await;
    assert_eq!(
        (answer.status, answer.error_code().as_str()),
        (404, "not_found")
    );
    let answer = get(&sidecar.url("/rerank"), None).await;
    assert_eq!(
        (answer.status, answer.error_code().as_str()),
        (405, "invalid_request")
    );

    // Still serving after all that.
    assert_eq!(
        post(&sidecar.url("/rerank"), &seed_request(), None)
            .await
            .status,
        200
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cohere_jina_and_nim_shapes() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &[]);
    let sidecar = Sidecar::start(&nats.url()).await;
    let doc = openapi();
    let documents = [
        "Paris is the capital of France.",
        "Bananas are yellow.",
        "France's capital city is Paris.",
    ];
    let direct = direct_scores(&nats.url(), "capital of France?", &documents).await;
    let order = wire::rank(&direct, None);

    // Cohere/Jina: strings and {"text"} objects mixed, raw logits by default, sorted.
    // No `model`: the pool's default (an unknown one is 404, tests/models.rs).
    let request = json!({
        "query": "capital of France?",
        "documents": [documents[0], {"text": documents[1]}, documents[2]],
    });
    let answer = post(&sidecar.url("/v1/rerank"), &request, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    assert_matches_schema(&doc, "CohereRerankResponse", &body);
    assert!(
        body["model"].as_str().unwrap().contains("tiny-model"),
        "{body}"
    );
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 3);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (result, &index) in results.iter().zip(&order) {
        assert_eq!(result["index"], json!(index));
        let score = result["relevance_score"].as_f64().unwrap() as f32;
        assert!((score - direct[index as usize]).abs() < 1e-5, "{result}");
        assert!(result.get("document").is_none(), "{result}");
    }

    // top_n, return_documents, normalize (sigmoid).
    let request = json!({
        "query": "capital of France?",
        "documents": documents,
        "top_n": 2,
        "return_documents": true,
        "normalize": true,
    });
    let answer = post(&sidecar.url("/v1/rerank"), &request, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    assert_matches_schema(&doc, "CohereRerankResponse", &body);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (result, &index) in results.iter().zip(&order) {
        let expected = 1.0 / (1.0 + (-direct[index as usize]).exp());
        let score = result["relevance_score"].as_f64().unwrap() as f32;
        assert!(
            (score - expected).abs() < 1e-5 && (0.0..=1.0).contains(&score),
            "{result}"
        );
        assert_eq!(
            result["document"],
            json!({"text": documents[index as usize]})
        );
    }
    // top_n 0 means all (as vLLM).
    let answer = post(
        &sidecar.url("/v1/rerank"),
        &json!({"query": "q", "documents": ["a", "b"], "top_n": 0}),
        None,
    )
    .await;
    assert_eq!(answer.json()["results"].as_array().unwrap().len(), 2);

    // Cohere errors.
    for (name, request, code) in [
        (
            "number document",
            json!({"query": "q", "documents": [3]}),
            "invalid_request",
        ),
        (
            "object without text",
            json!({"query": "q", "documents": [{"body": "x"}]}),
            "invalid_request",
        ),
        (
            "missing query",
            json!({"documents": ["a"]}),
            "invalid_request",
        ),
        (
            "too long, NONE",
            json!({"query": "q", "documents": ["word ".repeat(2000)], "truncate": "NONE"}),
            "document_too_long",
        ),
    ] {
        let answer = post(&sidecar.url("/v1/rerank"), &request, None).await;
        assert_eq!(answer.status, 400, "{name}: {}", answer.text);
        assert_eq!(answer.error_code(), code, "{name}");
    }

    // NIM: query.text, passages[].text → rankings sorted by logit, plus usage.
    let request = json!({
        "query": {"text": "capital of France?"},
        "passages": documents.iter().map(|d| json!({"text": d})).collect::<Vec<_>>(),
        "truncate": "END",
    });
    let answer = post(&sidecar.url("/v1/ranking"), &request, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    assert_matches_schema(&doc, "NimRankingResponse", &body);
    let rankings = body["rankings"].as_array().unwrap();
    assert_eq!(rankings.len(), 3);
    let mut previous = f32::INFINITY;
    for (ranking, &index) in rankings.iter().zip(&order) {
        assert_eq!(ranking["index"], json!(index));
        let logit = ranking["logit"].as_f64().unwrap() as f32;
        assert!((logit - direct[index as usize]).abs() < 1e-5);
        assert!(logit <= previous, "not sorted: {body}");
        previous = logit;
    }
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 3);

    for (name, request, code) in [
        (
            "query as string",
            json!({"query": "q", "passages": [{"text": "a"}]}),
            "invalid_request",
        ),
        (
            "missing passages",
            json!({"query": {"text": "q"}}),
            "invalid_request",
        ),
        (
            "too long, NONE",
            json!({"query": {"text": "q"}, "passages": [{"text": "word ".repeat(2000)}], "truncate": "NONE"}),
            "document_too_long",
        ),
    ] {
        let answer = post(&sidecar.url("/v1/ranking"), &request, None).await;
        assert_eq!(answer.status, 400, "{name}: {}", answer.text);
        assert_eq!(answer.error_code(), code, "{name}");
    }
}

/// Polls `/health` until it answers `status` (bounded), returning the last answer.
async fn wait_health(sidecar: &Sidecar, status: u16, limit: Duration) -> Answer {
    let start = Instant::now();
    loop {
        let answer = get(&sidecar.url("/health"), None).await;
        if answer.status == status || start.elapsed() > limit {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_with_zero_one_two_workers_and_dead_ones() {
    let nats = NatsServer::start();
    let sidecar = Sidecar::start(&nats.url()).await;
    let doc = openapi();

    // Zero workers: 503 with the reason.
    let answer = get(&sidecar.url("/health"), None).await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    let body = answer.json();
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["model_loaded"], false);
    assert!(
        body["reason"].as_str().unwrap().contains("worker"),
        "{body}"
    );
    assert_matches_schema(&doc, "HealthResponse", &body);
    // ...and reranking is 503 unavailable with Retry-After.
    let answer = post(&sidecar.url("/rerank"), &seed_request(), None).await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    assert_eq!(answer.error_code(), "unavailable");
    assert_eq!(answer.header("retry-after").as_deref(), Some("1"));

    // One worker: exactly the seed's body.
    let mut first = WorkerProcess::start(&nats.url(), &[]);
    let answer = wait_health(&sidecar, 200, Duration::from_secs(5)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        answer.json(),
        json!({"status": "healthy", "model_loaded": true, "device": "cpu"})
    );
    let started = Instant::now();
    assert_eq!(get(&sidecar.url("/health"), None).await.status, 200);
    assert!(started.elapsed() < Duration::from_secs(1));

    // Two workers: healthy, and discovery sees both.
    let mut second = WorkerProcess::start(&nats.url(), &[]);
    assert_eq!(get(&sidecar.url("/health"), None).await.status, 200);
    let workers = within(
        PATIENCE,
        "discovery",
        sidecar.state.client().workers(Duration::from_millis(300)),
    )
    .await
    .expect("discovery");
    assert_eq!(workers.len(), 2, "{workers:?}");
    assert!(workers
        .iter()
        .all(|w| w.model_loaded && w.device.as_deref() == Some("cpu")));

    // One dies: still healthy. Both die: 503 within a few seconds, each answer within a second.
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5));
    let answer = wait_health(&sidecar, 200, Duration::from_secs(3)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    second.signal("KILL");
    second.wait_exit(Duration::from_secs(5));
    let answer = wait_health(&sidecar, 503, Duration::from_secs(5)).await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    assert_eq!(answer.json()["status"], "unhealthy");
    let started = Instant::now();
    assert_eq!(get(&sidecar.url("/health"), None).await.status, 503);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_metrics_and_openapi() {
    let mut nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &[]);
    let sidecar = Sidecar::start(&nats.url()).await;

    assert_eq!(get(&sidecar.url("/live"), None).await.status, 200);
    assert_eq!(get(&sidecar.url("/ready"), None).await.status, 200);

    // The served OpenAPI document is the committed one.
    let served = get(&sidecar.url("/openapi.json"), None).await;
    assert_eq!(served.status, 200);
    let served = served.json();
    let path = repo_root().join("schemas/openapi.json");
    if std::env::var_os("UPDATE_SCHEMAS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string_pretty(&served).unwrap() + "\n").unwrap();
    }
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(&path).expect("schemas/openapi.json (UPDATE_SCHEMAS=1 writes it)"),
    )
    .expect("committed OpenAPI parses");
    assert_eq!(
        served, committed,
        "schemas/openapi.json is stale: rerun with UPDATE_SCHEMAS=1"
    );
    assert_eq!(served["openapi"], "3.1.0");
    for route in [
        "/rerank",
        "/v1/rerank",
        "/v1/ranking",
        "/health",
        "/live",
        "/ready",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(served["paths"].get(route).is_some(), "{route} undocumented");
    }

    // Metrics: requests by route and status, durations.
    assert_eq!(
        post(&sidecar.url("/rerank"), &seed_request(), None)
            .await
            .status,
        200
    );
    assert_eq!(
        post(&sidecar.url("/rerank"), &json!({}), None).await.status,
        400
    );
    assert_eq!(get(&sidecar.url("/nope"), None).await.status, 404);
    let metrics = get(&sidecar.url("/metrics"), None).await;
    assert_eq!(metrics.status, 200);
    let has = |route: &str, status: &str| {
        metrics.text.lines().any(|l| {
            l.starts_with("rerank_http_requests_total{")
                && l.contains(&format!("route=\"{route}\""))
                && l.contains(&format!("status=\"{status}\""))
        })
    };
    assert!(
        has("/rerank", "200") && has("/rerank", "400") && has("unmatched", "404"),
        "{}",
        metrics.text
    );
    assert!(
        metrics
            .text
            .contains("rerank_http_request_duration_seconds_bucket{"),
        "{}",
        metrics.text
    );

    // NATS goes away: not ready, unhealthy at once, still live; back when NATS is back.
    nats.stop();
    let start = Instant::now();
    while get(&sidecar.url("/ready"), None).await.status != 503 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "/ready stayed 200 without NATS"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let answer = get(&sidecar.url("/health"), None).await;
    assert_eq!(answer.status, 503);
    assert!(answer.json()["reason"].as_str().unwrap().contains("NATS"));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(get(&sidecar.url("/live"), None).await.status, 200);
    nats.restart();
    let start = Instant::now();
    while get(&sidecar.url("/ready"), None).await.status != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "/ready did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_auth_on_and_off() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &[]);
    let open = Sidecar::start(&nats.url()).await;
    let locked = Sidecar::start_with(&nats.url(), |c| c.api_key = Some("s3cret-key".into())).await;

    // Off: everything answers without a token.
    assert_eq!(
        post(&open.url("/rerank"), &seed_request(), None)
            .await
            .status,
        200
    );
    assert_eq!(get(&open.url("/metrics"), None).await.status, 200);

    // On: probes stay open; everything else needs the token.
    assert_eq!(get(&locked.url("/live"), None).await.status, 200);
    assert_eq!(get(&locked.url("/ready"), None).await.status, 200);
    let missing = post(&locked.url("/rerank"), &seed_request(), None).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.error_code(), "unauthorized");
    assert!(missing
        .header("www-authenticate")
        .unwrap()
        .starts_with("Bearer"));
    let wrong = post(&locked.url("/rerank"), &seed_request(), Some("s3cret-kez")).await;
    assert_eq!(
        (wrong.status, wrong.error_code().as_str()),
        (401, "unauthorized")
    );
    let prefix = post(&locked.url("/rerank"), &seed_request(), Some("s3cret")).await;
    assert_eq!(prefix.status, 401);
    for path in ["/health", "/metrics", "/openapi.json", "/nope"] {
        let answer = get(&locked.url(path), None).await;
        assert_eq!(
            (answer.status, answer.error_code().as_str()),
            (401, "unauthorized"),
            "{path}"
        );
    }
    for path in ["/v1/rerank", "/v1/ranking"] {
        assert_eq!(
            post(&locked.url(path), &json!({}), None).await.status,
            401,
            "{path}"
        );
    }
    let ok = post(&locked.url("/rerank"), &seed_request(), Some("s3cret-key")).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(
        get(&locked.url("/health"), Some("s3cret-key")).await.status,
        200
    );
    assert_eq!(
        get(&locked.url("/metrics"), Some("s3cret-key"))
            .await
            .status,
        200
    );
    // The scheme is case-insensitive.
    let answer = within(
        PATIENCE,
        "lowercase bearer",
        http()
            .get(locked.url("/health"))
            .header("authorization", "bearer s3cret-key")
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_and_requests_over_max_payload_get_413() {
    let nats = NatsServer::start_with_config("max_payload: 32KB\n");
    let sidecar = Sidecar::start_with(&nats.url(), |c| {
        c.max_body_bytes = Some(64 * 1024);
        c.request_timeout = Duration::from_millis(300);
    })
    .await;
    let observer = nats_connect(&nats.url()).await;
    let tap = Tap::start(&observer, wire::SUBJECT_V1).await;
    assert_eq!(sidecar.state.client().max_payload(), Some(32 * 1024));

    // Over the HTTP body limit.
    let big = json!({"query": "q", "documents": ["x".repeat(100 * 1024)]});
    let answer = post(&sidecar.url("/rerank"), &big, None).await;
    assert_eq!(
        (answer.status, answer.error_code().as_str()),
        (413, "payload_too_large"),
        "{}",
        answer.text
    );
    assert!(answer.text.contains("max-body-bytes"), "{}", answer.text);

    // Within the body limit but over NATS max_payload: refused before sending.
    let medium = json!({"query": "q", "documents": ["x".repeat(40 * 1024)]});
    for path in ["/rerank", "/v1/rerank"] {
        let answer = post(&sidecar.url(path), &medium, None).await;
        assert_eq!(
            (answer.status, answer.error_code().as_str()),
            (413, "payload_too_large"),
            "{path}: {}",
            answer.text
        );
        assert!(answer.text.contains("max_payload"), "{}", answer.text);
    }
    // A small request does reach NATS (the tap sees it), proving the 413s were never sent.
    let answer = post(&sidecar.url("/rerank"), &seed_request(), None).await;
    assert_eq!(answer.status, 504, "the tap never answers: {}", answer.text);
    let start = Instant::now();
    while tap.count() == 0 && start.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tap.count(), 1, "only the small request may reach NATS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_worker_gives_504_without_retry() {
    let nats = NatsServer::start();
    let sidecar = Sidecar::start_with(&nats.url(), |c| {
        c.request_timeout = Duration::from_millis(300)
    })
    .await;
    let observer = nats_connect(&nats.url()).await;
    let tap = Tap::start(&observer, wire::SUBJECT_V1).await;
    let started = Instant::now();
    let answer = post(&sidecar.url("/rerank"), &seed_request(), None).await;
    let elapsed = started.elapsed();
    assert_eq!(
        (answer.status, answer.error_code().as_str()),
        (504, "timeout"),
        "{}",
        answer.text
    );
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert_eq!(tap.count(), 1, "the sidecar must not retry a timeout");
    // The worker was told when the caller gives up.
    let seen = tap.seen.lock().unwrap().clone();
    let deadline = seen[0].1.deadline_ms.expect("deadline_ms is set");
    let arrived = seen[0]
        .0
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        deadline > arrived && deadline <= arrived + 400,
        "deadline {deadline}, arrived {arrived}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooded_tiny_queue_gives_429_with_retry_after() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(
        &nats.url(),
        &[
            "--max-queue-pairs",
            "1",
            "--max-documents",
            "1",
            "--max-inflight-requests",
            "1",
        ],
    );
    let sidecar = Sidecar::start(&nats.url()).await;
    let document = "a long document about many things ".repeat(60);
    let body = json!({"query": "what is this about?", "documents": [document]});
    let url = sidecar.url("/rerank");
    let answers = within(
        Duration::from_secs(60),
        "flood",
        futures::future::join_all((0..48).map(|_| post(&url, &body, None))),
    )
    .await;
    let overloaded: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    let ok = answers.iter().filter(|a| a.status == 200).count();
    assert!(
        !overloaded.is_empty(),
        "no 429 among {} answers",
        answers.len()
    );
    assert!(ok >= 1, "nothing succeeded");
    assert_eq!(
        ok + overloaded.len(),
        answers.len(),
        "only 200 or 429 expected"
    );
    for answer in overloaded {
        assert_eq!(answer.error_code(), "overloaded");
        assert_eq!(answer.header("retry-after").as_deref(), Some("1"));
    }
}

/// Kills a child process on drop (test failure paths).
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_the_whole_stack_with_its_own_nats_server() {
    let (nats_port, http_port, probe_port) = (free_port(), free_port(), free_port());
    let path = std::env::join_paths(std::iter::once(nats_server_dir()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let child = std::process::Command::new(rerank_bin())
        .arg("serve")
        .arg("--model")
        .arg(tiny_model_dir())
        .args(["--nats-url", &format!("nats://127.0.0.1:{nats_port}")])
        .args(["--listen", &format!("127.0.0.1:{http_port}")])
        .args(["--health-listen", &format!("127.0.0.1:{probe_port}")])
        .env("PATH", path)
        .env("RUST_LOG", "warn,rerank_service=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("rerank serve");
    let mut serve = ChildGuard(child);
    let base = format!("http://127.0.0.1:{http_port}");

    // Healthy once the worker has loaded the model (bounded).
    let start = Instant::now();
    loop {
        if let Ok(Ok(r)) = tokio::time::timeout(
            Duration::from_secs(2),
            http().get(format!("{base}/health")).send(),
        )
        .await
        {
            if r.status() == 200 {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "rerank serve not healthy within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The seed's example returns the documented shape.
    let answer = post(&format!("{base}/rerank"), &seed_request(), None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    assert_eq!(body["scores"].as_array().unwrap().len(), 3);
    assert_eq!(body["ranked_indices"].as_array().unwrap().len(), 3);
    assert_eq!(
        get(&format!("{base}/health"), None).await.json()["status"],
        "healthy"
    );
    // It started nats-server on the URL's port.
    assert!(std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_ok());

    // SIGTERM: clean exit, and the nats-server it started is gone.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &serve.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    let code = loop {
        if let Some(status) = serve.0.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "rerank serve did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, Some(0));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err(),
        "nats-server left running"
    );
}

/// Measures the sidecar's added latency over a direct NATS request and its throughput with 64
/// concurrent HTTP clients. Run: `cargo test --test integration sidecar::measure -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement; prints numbers"]
async fn measure_sidecar_overhead_and_throughput() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &[]);
    let sidecar = Sidecar::start(&nats.url()).await;
    let direct = nats_connect(&nats.url()).await;
    let body = seed_request();
    let request = RerankRequest {
        query: body["query"].as_str().unwrap().into(),
        documents: serde_json::from_value(body["documents"].clone()).unwrap(),
        ..Default::default()
    };
    let http = http();
    let url = sidecar.url("/rerank");
    let payload = bytes::Bytes::from(wire::encode(&request));

    let one_http = || async {
        let response = http.post(&url).json(&body).send().await.expect("http");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    };
    let one_nats = || async {
        direct
            .request(wire::SUBJECT_V1, payload.clone())
            .await
            .expect("nats");
    };
    within(Duration::from_secs(60), "warm-up", async {
        for _ in 0..50 {
            one_http().await;
            one_nats().await;
        }
    })
    .await;

    // Interleaved, one at a time, so both paths see the same worker state.
    let n = 1000;
    let (mut via_nats, mut via_http) = (Vec::with_capacity(n), Vec::with_capacity(n));
    within(Duration::from_secs(300), "latency runs", async {
        for _ in 0..n {
            let t = Instant::now();
            one_nats().await;
            via_nats.push(t.elapsed());
            let t = Instant::now();
            one_http().await;
            via_http.push(t.elapsed());
        }
    })
    .await;
    via_nats.sort();
    via_http.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (n50, n99) = (percentile(&via_nats, 50.0), percentile(&via_nats, 99.0));
    let (h50, h99) = (percentile(&via_http, 50.0), percentile(&via_http, 99.0));
    println!("latency over {n} interleaved requests (seed example, 3 documents, tiny model, CPU):");
    println!(
        "  direct NATS : p50 {:.3} ms  p99 {:.3} ms",
        ms(n50),
        ms(n99)
    );
    println!(
        "  via sidecar : p50 {:.3} ms  p99 {:.3} ms",
        ms(h50),
        ms(h99)
    );
    println!(
        "  added       : p50 {:.3} ms  p99 {:.3} ms",
        ms(h50) - ms(n50),
        ms(h99) - ms(n99)
    );

    // Throughput with 64 concurrent HTTP clients for a fixed time (bounded).
    let throughput = |label: &'static str, url: String| {
        let http = http.clone();
        let body = body.clone();
        async move {
            let run_for = Duration::from_secs(8);
            let start = Instant::now();
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let (http, body, url) = (http.clone(), body.clone(), url.clone());
                    tokio::spawn(async move {
                        let (mut ok, mut other) = (0u64, 0u64);
                        while start.elapsed() < run_for {
                            match http.post(&url).json(&body).send().await {
                                Ok(r) if r.status() == 200 => {
                                    let _ = r.bytes().await;
                                    ok += 1
                                }
                                _ => other += 1,
                            }
                        }
                        (ok, other)
                    })
                })
                .collect();
            let mut totals = (0u64, 0u64);
            for task in tasks {
                let (ok, other) = task.await.expect("client task");
                totals.0 += ok;
                totals.1 += other;
            }
            let secs = start.elapsed().as_secs_f64();
            println!("{label}: {:.0} requests/s with 64 concurrent clients ({} ok, {} not ok, {secs:.1} s)", totals.0 as f64 / secs, totals.0, totals.1);
        }
    };
    within(
        Duration::from_secs(60),
        "throughput, tiny worker",
        throughput("sidecar + tiny-model worker", url.clone()),
    )
    .await;

    // The same through a second pool whose stand-in worker answers at once: the sidecar's own ceiling.
    let stub_subject = "rerank.v1.stub";
    let _stub = instant_responder(&direct, stub_subject).await;
    let stub_sidecar = Sidecar::start_with(&nats.url(), |c| c.subject = stub_subject.into()).await;
    within(
        Duration::from_secs(60),
        "throughput, instant stub",
        throughput("sidecar + instant stub worker", stub_sidecar.url("/rerank")),
    )
    .await;
}

/// `rerank bench --mode http` drives the sidecar through the seed API and counts what came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_http_mode_counts_the_pairs_of_the_seed_replies() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &[]);
    let sidecar = Sidecar::start(&nats.url()).await;
    let bench = tokio::process::Command::new(rerank_bin())
        .args(["bench", "--mode", "http", "--url", &sidecar.base_url()])
        .args(["--workload", "custom", "--documents", "3"])
        .args(["--min-tokens", "16", "--max-tokens", "24"])
        .args([
            "--requests",
            "2",
            "--warmup-requests",
            "1",
            "--concurrency",
            "2",
        ])
        .output();
    let output = within(PATIENCE, "rerank bench --mode http", bench)
        .await
        .expect("rerank bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).expect("one JSON report");
    assert_eq!(report["mode"], "http", "{report}");
    assert_eq!(report["requests"], 2, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["pairs"], 6, "{report}");
    // The seed reply carries no usage.
    assert_eq!(report["real_tokens"], 0, "{report}");
}
