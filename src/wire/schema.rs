//! JSON Schema (2020-12) of the wire messages, generated from the Rust types.
//!
//! `schemas/*.schema.json` are these files committed; a test fails when they drift.

use schemars::schema_for;

use super::{ErrorReply, RerankReply, RerankRequest};

/// One generated schema and the file name it is committed under in `schemas/`.
pub struct SchemaFile {
    pub file_name: &'static str,
    pub schema: serde_json::Value,
}

/// The schemas of every wire message.
pub fn json_schemas() -> Vec<SchemaFile> {
    let to_value = |schema: schemars::Schema| schema.to_value();
    vec![
        SchemaFile {
            file_name: "rerank-request.v1.schema.json",
            schema: to_value(schema_for!(RerankRequest)),
        },
        SchemaFile {
            file_name: "rerank-reply.v1.schema.json",
            schema: to_value(schema_for!(RerankReply)),
        },
        SchemaFile {
            file_name: "rerank-error.v1.schema.json",
            schema: to_value(schema_for!(ErrorReply)),
        },
    ]
}
