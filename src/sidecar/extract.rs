//! `ApiJson<T>`: the JSON body extractor whose every rejection is an [`ApiError`].
//!
//! Choices (documented in the OpenAPI description too):
//! - Malformed JSON, wrong types and missing fields are **400 `invalid_request`** (not axum's 422),
//!   with the path of the offending field (`documents[2]: invalid type: integer...`). One status for
//!   every "your body is wrong" keeps clients simple, and it is what Cohere, Jina and TEI answer.
//! - The `Content-Type` is not checked: `curl -d '{...}'` (form content type) works as well.
//! - A body is a JSON object. Unknown fields are ignored, but the routes flatten their length
//!   options into the body, so serde keeps unknown fields until the end of the object: nesting past
//!   serde_json's limit (128) is refused there as anywhere else.
//! - A body over `--max-body-bytes` is **413 `payload_too_large`**, cut off as it passes the limit
//!   (`crate::http_server` reads it; `Content-Length` over the limit was refused before reading).

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON request body, parsed with our error shape.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = crate::http_server::read_body(request.into_body()).await?;
        parse(&bytes).map(ApiJson)
    }
}

/// Parses a JSON body, naming the field that is wrong.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::invalid_request(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::invalid_request(format!("invalid JSON body at {path}: {inner}"))
        }
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ErrorCode;
    use axum::http::StatusCode;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Body {
        query: String,
        documents: Vec<String>,
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse::<Body>(br#"{"query": "q", "documents": ["a", 3]}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("documents[1]"), "{}", e.message);
        let e = parse::<Body>(br#"{"query": "q"}"#).unwrap_err();
        assert!(e.message.contains("documents"), "{}", e.message);
        let e = parse::<Body>(b"{not json").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(parse::<Body>(br#"{"query": "q", "documents": []} x"#).is_err());
        assert!(parse::<Body>(br#"{"query": "q", "documents": [], "extra": 1}"#).is_ok());
    }
}
