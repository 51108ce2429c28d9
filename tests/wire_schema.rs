//! The committed JSON Schemas match the Rust wire types, and the golden MessagePack examples
//! validate against them and decode to the expected values.
//!
//! After an intended change to `src/wire`, regenerate with `UPDATE_SCHEMAS=1 cargo test --test integration wire_schema::`.

use crate::common;

use rerank_service::wire::{
    self, ErrorCode, ErrorReply, RerankReply, RerankRequest, Truncate, Usage,
};

fn update() -> bool {
    std::env::var("UPDATE_SCHEMAS").is_ok_and(|v| v == "1")
}

#[test]
fn committed_schemas_match_the_rust_types() {
    let dir = common::repo_root().join("schemas");
    for file in wire::json_schemas() {
        let path = dir.join(file.file_name);
        let generated = serde_json::to_string_pretty(&file.schema).unwrap() + "\n";
        if update() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("{} missing: UPDATE_SCHEMAS=1", path.display()));
        assert_eq!(
            committed, generated,
            "{} drifted from src/wire; regenerate with UPDATE_SCHEMAS=1 cargo test --test integration wire_schema::",
            file.file_name
        );
        assert_eq!(
            file.schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{} is not JSON Schema 2020-12",
            file.file_name
        );
    }
}

fn examples() -> Vec<(&'static str, &'static str, serde_json::Value, Vec<u8>)> {
    let minimal = RerankRequest {
        query: "AI tools for productivity".into(),
        documents: vec![
            "A task management app built with React and Node.js".into(),
            "An AI-powered writing assistant that helps with emails".into(),
            "A weather widget for the desktop".into(),
        ],
        ..Default::default()
    };
    let full = RerankRequest {
        top_k: Some(2),
        truncate: Some(Truncate::None),
        request_id: Some("req-42".into()),
        deadline_ms: Some(1_900_000_000_000),
        ..minimal.clone()
    };
    let reply = RerankReply {
        scores: vec![0.45, 0.85, -0.12],
        ranked_indices: vec![1, 0, 2],
        model: "nvidia/llama-nemotron-rerank-1b-v2".into(),
        usage: Usage {
            pairs: 3,
            tokens: 57,
        },
        request_id: Some("req-42".into()),
        spans: None,
    };
    let error = ErrorReply::new(
        ErrorCode::DocumentTooLong,
        "document 7 has 9120 tokens with the query; max_length is 8192 and truncate is NONE",
    );
    vec![
        (
            "request-minimal.msgpack",
            "rerank-request.v1.schema.json",
            serde_json::to_value(&minimal).unwrap(),
            wire::encode(&minimal),
        ),
        (
            "request-full.msgpack",
            "rerank-request.v1.schema.json",
            serde_json::to_value(&full).unwrap(),
            wire::encode(&full),
        ),
        (
            "reply.msgpack",
            "rerank-reply.v1.schema.json",
            serde_json::to_value(&reply).unwrap(),
            wire::encode(&reply),
        ),
        (
            "error.msgpack",
            "rerank-error.v1.schema.json",
            serde_json::to_value(&error).unwrap(),
            wire::encode(&error),
        ),
    ]
}

/// MessagePack → JSON value, independently of our serde types.
fn msgpack_to_json(bytes: &[u8]) -> serde_json::Value {
    let value: rmpv::Value = rmpv::decode::read_value(&mut &bytes[..]).expect("valid msgpack");
    serde_json::to_value(&value).expect("msgpack value converts to JSON")
}

#[test]
fn golden_msgpack_examples_validate_and_decode() {
    let dir = common::repo_root().join("tests/fixtures/wire");
    for (file, schema_file, expected_json, encoded) in examples() {
        let path = dir.join(file);
        if update() {
            std::fs::write(&path, &encoded).unwrap();
        }
        let bytes = std::fs::read(&path).unwrap_or_else(|_| panic!("{file} missing"));
        assert_eq!(bytes, encoded, "{file}: the encoder's bytes changed");
        let schema: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(common::repo_root().join("schemas").join(schema_file))
                .unwrap(),
        )
        .unwrap();
        let validator = jsonschema::validator_for(&schema).expect("schema compiles");
        let as_json = msgpack_to_json(&bytes);
        let errors: Vec<String> = validator
            .iter_errors(&as_json)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{file} violates {schema_file}: {errors:?}"
        );
        // Floats go through f32, so compare after the same JSON round trip.
        assert_eq!(as_json, expected_json, "{file}");
    }
}

#[test]
fn schemas_reject_what_the_decoder_rejects() {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_root().join("schemas/rerank-request.v1.schema.json"))
            .unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let bad = [
        serde_json::json!({"documents": ["a"]}),
        serde_json::json!({"query": 1, "documents": ["a"]}),
        serde_json::json!({"query": "q", "documents": "a"}),
        serde_json::json!({"query": "q", "documents": ["a"], "top_k": -1}),
        serde_json::json!({"query": "q", "documents": ["a"], "truncate": "START"}),
    ];
    for value in bad {
        assert!(!validator.is_valid(&value), "schema accepted {value}");
        let bytes = rmp_serde::to_vec_named(&value).unwrap();
        assert!(
            wire::decode_request(&bytes).is_err(),
            "decoder accepted {value}"
        );
    }
    // Unknown fields are allowed by both (forward compatibility within v1).
    let extra = serde_json::json!({"query": "q", "documents": ["a"], "future": true});
    assert!(validator.is_valid(&extra));
    assert!(wire::decode_request(&rmp_serde::to_vec_named(&extra).unwrap()).is_ok());
}
