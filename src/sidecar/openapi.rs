//! The OpenAPI 3.1 document of the sidecar, served at `/openapi.json` and committed as
//! `schemas/openapi.json` (a test fails when they drift; regenerate with
//! `UPDATE_SCHEMAS=1 cargo test --test integration sidecar::probes_metrics_and_openapi`).
//!
//! Body schemas are generated from the Rust types (JSON Schema 2020-12, OpenAPI 3.1's dialect);
//! paths, statuses and prose are written here.

use schemars::generate::SchemaSettings;
use serde_json::{json, Value};

use crate::wire::ErrorReply;

use super::routes::cohere::{CohereRerankRequest, CohereRerankResponse};
use super::routes::health::HealthResponse;
use super::routes::models::ModelList;
use super::routes::nim::{NimRankingRequest, NimRankingResponse};
use super::routes::rerank::{RerankBody, RerankResponse};

const DESCRIPTION: &str = "HTTP front of the rerank worker pool (llama-nemotron-rerank-1b-v2 over NATS).\n\n\
Scores are raw logits (higher is more relevant, not 0-1) unless a route says otherwise.\n\n\
Errors are `{\"error\": {\"code\", \"message\"}}`. Malformed JSON, wrong types and missing fields are \
400 `invalid_request` (not 422), naming the field; the Content-Type is not checked. A body over the \
sidecar's limit, or a request over the NATS server's max_payload, is 413 `payload_too_large`. A full \
worker queue is 429 `overloaded` and an empty pool 503 `unavailable`, both with `Retry-After`; no \
reply within the request timeout is 504 `timeout`.\n\n\
The rerank routes take an optional `model`, one of the ids `GET /v1/models` lists (absent: the \
pool's default model); a model no worker serves is 404 `model_not_found`, naming those that are.\n\n\
When the sidecar runs with RERANK_API_KEY, every route but /live and /ready needs \
`Authorization: Bearer <key>` (401 `unauthorized` otherwise).";

/// The document (deterministic: the same build always yields the same JSON).
pub fn document() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    let rerank_body = generator.subschema_for::<RerankBody>().to_value();
    let rerank_response = generator.subschema_for::<RerankResponse>().to_value();
    let cohere_request = generator.subschema_for::<CohereRerankRequest>().to_value();
    let cohere_response = generator.subschema_for::<CohereRerankResponse>().to_value();
    let nim_request = generator.subschema_for::<NimRankingRequest>().to_value();
    let nim_response = generator.subschema_for::<NimRankingResponse>().to_value();
    let health = generator.subschema_for::<HealthResponse>().to_value();
    let model_list = generator.subschema_for::<ModelList>().to_value();
    let error = generator.subschema_for::<ErrorReply>().to_value();
    let schemas = Value::Object(generator.take_definitions(true));

    let json_body = |schema: &Value| json!({"required": true, "content": {"application/json": {"schema": schema}}});
    let ok = |description: &str, schema: &Value| json!({"description": description, "content": {"application/json": {"schema": schema}}});
    let err = |description: &str| json!({"description": description, "content": {"application/json": {"schema": error}}});
    let retry_after = json!({"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}});
    let with_retry_after = |description: &str| {
        let mut response = err(description);
        response["headers"] = retry_after.clone();
        response
    };
    let rerank_errors = json!({
        "400": err("invalid_request, too_many_documents or document_too_long"),
        "401": err("unauthorized: missing or wrong bearer token"),
        "404": err("model_not_found: no worker serves the requested model; the message lists those that are"),
        "413": err("payload_too_large: body over --max-body-bytes or request over NATS max_payload"),
        "429": with_retry_after("overloaded: the worker's queue is full"),
        "500": err("model_error"),
        "502": err("model_error: a worker's reply could not be decoded"),
        "503": with_retry_after("unavailable: no worker (no responders) or NATS is down"),
        "504": err("timeout or deadline_exceeded"),
    });
    let with_errors = |mut responses: Value| {
        if let (Some(target), Some(errors)) = (responses.as_object_mut(), rerank_errors.as_object())
        {
            for (status, response) in errors {
                target.insert(status.clone(), response.clone());
            }
        }
        responses
    };
    let text = |description: &str| json!({"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}});

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "rerank-service sidecar",
            "version": env!("CARGO_PKG_VERSION"),
            "description": DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "security": [{}, {"bearer": []}],
        "paths": {
            "/rerank": {"post": {
                "operationId": "rerank",
                "summary": "Rerank documents against a query (raw logits)",
                "requestBody": json_body(&rerank_body),
                "responses": with_errors(json!({"200": ok("Scores in input order and indices by relevance", &rerank_response)})),
            }},
            "/v1/rerank": {"post": {
                "operationId": "rerankCohere",
                "summary": "Cohere / Jina compatible rerank",
                "description": "relevance_score is the raw logit; send \"normalize\": true for sigmoid(logit) in 0-1. top_n absent or 0 returns all. return_documents defaults to false. model picks one of GET /v1/models (absent: the default model).",
                "requestBody": json_body(&cohere_request),
                "responses": with_errors(json!({"200": ok("Results sorted by relevance_score, best first", &cohere_response)})),
            }},
            "/v1/ranking": {"post": {
                "operationId": "rankingNim",
                "summary": "NVIDIA NIM compatible ranking",
                "description": "Rankings sorted by logit, best first. truncate defaults to END here (NIM: NONE).",
                "requestBody": json_body(&nim_request),
                "responses": with_errors(json!({"200": ok("Rankings sorted by logit, best first", &nim_response)})),
            }},
            "/v1/models": {"get": {
                "operationId": "listModels",
                "summary": "OpenAI-style list of the models the pool serves (from NATS service discovery)",
                "responses": {
                    "200": ok("The served models, the default first", &model_list),
                    "401": err("unauthorized"),
                    "503": with_retry_after("unavailable: NATS is down"),
                },
            }},
            "/health": {"get": {
                "operationId": "health",
                "summary": "Whether a worker with its model loaded answers (within a second)",
                "responses": {
                    "200": ok("healthy", &health),
                    "401": err("unauthorized"),
                    "503": ok("unhealthy, with the reason", &health),
                },
            }},
            "/live": {"get": {
                "operationId": "live",
                "summary": "Liveness: the process is up",
                "security": [],
                "responses": {"200": text("live")},
            }},
            "/ready": {"get": {
                "operationId": "ready",
                "summary": "Readiness: connected to NATS",
                "security": [],
                "responses": {"200": text("ready"), "503": text("not connected to NATS")},
            }},
            "/metrics": {"get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (requests by route and status, durations)",
                "responses": {"200": text("Prometheus text exposition"), "401": err("unauthorized")},
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1 document", "content": {"application/json": {}}}, "401": err("unauthorized")},
            }},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "RERANK_API_KEY, when the sidecar has one"}},
        },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn document_references_resolve() {
        let doc = super::document();
        let text = doc.to_string();
        for name in [
            "RerankBody",
            "CohereRerankRequest",
            "NimRankingResponse",
            "ErrorReply",
            "ErrorCode",
            "Truncate",
        ] {
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{name} missing"
            );
        }
        assert!(
            !text.contains("#/$defs"),
            "references must point into components"
        );
    }
}
