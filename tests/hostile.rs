//! Hostile input (issue 8): a table of bad inputs over HTTP (through the in-process sidecar to a
//! real worker) and over NATS (raw bytes to the worker), each with the status and error code it
//! must get; afterwards the worker and the sidecars are still healthy and serving.
//!
//! Decisions the table pins down:
//! - NUL characters are ordinary text: `"a\u0000b"` in JSON and NUL bytes in MessagePack strings
//!   are scored. A raw (unescaped) control byte inside a JSON string is malformed JSON: 400.
//! - Duplicate keys are refused (400 `invalid_request`), over JSON and MessagePack alike: two
//!   parsers may keep different copies, so an ambiguous request is not guessed at.
//! - Unknown fields are accepted and ignored. Over HTTP however deeply nested (serde_json skips
//!   them without recursion); over NATS nesting deeper than `wire::MAX_DEPTH` (32) is
//!   `invalid_request` (rmp-serde recurses, and its own cap of 1024 overflowed the worker's stack).
//! - `top_k`: any u64 is accepted (u64::MAX keeps everything), 0 returns no indices (scores are
//!   always complete), negative numbers and floats (2^70) are `invalid_request`.
//! - The sidecar does not look at `Content-Type` (`curl -d` sends a form type): JSON sent as
//!   text/plain is accepted; a body that is not JSON (form data, multipart, MessagePack) is 400.
//! - Positional arrays (`["query", ["doc"]]`) are accepted as the struct in field order, as serde
//!   does for JSON and rmp-serde for MessagePack (documented in `wire`).

use crate::common;
use crate::stack;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use rerank_service::wire::{self, ErrorCode, ReplyBody};
use stack::*;

const TOKEN: &str = "hostile-test-token-7f3a9c";

// ---------------------------------------------------------------------------------------------
// MessagePack by hand (bombs and malformed shapes that no serializer would write).

fn mp_map(n: usize) -> Vec<u8> {
    match n {
        0..=15 => vec![0x80 | n as u8],
        16..=0xffff => [vec![0xde], (n as u16).to_be_bytes().to_vec()].concat(),
        _ => [vec![0xdf], (n as u32).to_be_bytes().to_vec()].concat(),
    }
}

fn mp_array(n: usize) -> Vec<u8> {
    match n {
        0..=15 => vec![0x90 | n as u8],
        16..=0xffff => [vec![0xdc], (n as u16).to_be_bytes().to_vec()].concat(),
        _ => [vec![0xdd], (n as u32).to_be_bytes().to_vec()].concat(),
    }
}

/// A str of raw bytes (which need not be UTF-8).
fn mp_str_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut out = match bytes.len() {
        0..=31 => vec![0xa0 | bytes.len() as u8],
        32..=0xff => vec![0xd9, bytes.len() as u8],
        256..=0xffff => [vec![0xda], (bytes.len() as u16).to_be_bytes().to_vec()].concat(),
        _ => [vec![0xdb], (bytes.len() as u32).to_be_bytes().to_vec()].concat(),
    };
    out.extend_from_slice(bytes);
    out
}

fn mp_str(s: &str) -> Vec<u8> {
    mp_str_bytes(s.as_bytes())
}

fn mp_u64(v: u64) -> Vec<u8> {
    [vec![0xcf], v.to_be_bytes().to_vec()].concat()
}

fn mp_i64(v: i64) -> Vec<u8> {
    [vec![0xd3], v.to_be_bytes().to_vec()].concat()
}

fn mp_f64(v: f64) -> Vec<u8> {
    [vec![0xcb], v.to_be_bytes().to_vec()].concat()
}

fn mp_docs(docs: &[&str]) -> Vec<u8> {
    let mut out = mp_array(docs.len());
    for d in docs {
        out.extend(mp_str(d));
    }
    out
}

/// A map from already-encoded values, in order; keys may repeat.
fn mp_request(fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = mp_map(fields.len());
    for (key, value) in fields {
        out.extend(mp_str(key));
        out.extend_from_slice(value);
    }
    out
}

/// `{"query": "q", "documents": ["a", "b"]}` plus `extra` fields.
fn mp_with(extra: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut fields = vec![("query", mp_str("q")), ("documents", mp_docs(&["a", "b"]))];
    fields.extend(extra.iter().cloned());
    mp_request(&fields)
}

/// `depth` nested one-element arrays (or maps) around a nil.
fn mp_bomb(depth: usize, maps: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(depth * 3 + 1);
    for _ in 0..depth {
        if maps {
            out.extend([0x81, 0xa1, b'a']);
        } else {
            out.push(0x91);
        }
    }
    out.push(0xc0);
    out
}

// ---------------------------------------------------------------------------------------------
// JSON helpers.

fn json_with(extra: &str) -> Vec<u8> {
    format!(r#"{{"query": "q", "documents": ["a", "b"]{extra}}}"#).into_bytes()
}

fn json_bomb(depth: usize, open: &str, close: &str) -> String {
    format!("{}1{}", open.repeat(depth), close.repeat(depth))
}

// ---------------------------------------------------------------------------------------------
// The HTTP table.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Open,
    Locked,
}

#[derive(Debug)]
enum HttpBody {
    Bytes(Vec<u8>),
    /// A body of this many bytes streamed by hand (Content-Length or chunked).
    Huge {
        bytes: usize,
        chunked: bool,
    },
}

#[derive(Debug)]
enum HttpExpect {
    /// 200 with this JSON array of this length (`scores`, `results`, `rankings`).
    Ok(&'static str, usize),
    /// The status and the `{"error": {"code"}}` body.
    Error(u16, &'static str),
    /// A status with a non-JSON body (the probes).
    Status(u16),
}

struct HttpCase {
    name: String,
    target: Target,
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    authorization: Option<Vec<u8>>,
    /// One more request header.
    header: Option<(&'static str, &'static str)>,
    body: HttpBody,
    expect: HttpExpect,
}

fn case(
    name: impl Into<String>,
    path: &'static str,
    body: Vec<u8>,
    expect: HttpExpect,
) -> HttpCase {
    HttpCase {
        name: name.into(),
        target: Target::Open,
        method: "POST",
        path,
        content_type: Some("application/json"),
        authorization: None,
        header: None,
        body: HttpBody::Bytes(body),
        expect,
    }
}

fn bad(name: impl Into<String>, path: &'static str, body: impl Into<Vec<u8>>) -> HttpCase {
    case(
        name,
        path,
        body.into(),
        HttpExpect::Error(400, "invalid_request"),
    )
}

fn rerank_bad(name: impl Into<String>, body: impl Into<Vec<u8>>) -> HttpCase {
    bad(name, "/rerank", body)
}

fn locked(
    name: &str,
    method: &'static str,
    path: &'static str,
    auth: Option<&[u8]>,
    expect: HttpExpect,
) -> HttpCase {
    HttpCase {
        name: name.into(),
        target: Target::Locked,
        method,
        path,
        content_type: Some("application/json"),
        authorization: auth.map(<[u8]>::to_vec),
        header: None,
        body: HttpBody::Bytes(if method == "POST" {
            json_with("")
        } else {
            Vec::new()
        }),
        expect,
    }
}

fn method(name: &str, method: &'static str, path: &'static str, expect: HttpExpect) -> HttpCase {
    HttpCase {
        method,
        body: HttpBody::Bytes(if method == "GET" {
            Vec::new()
        } else {
            json_with("")
        }),
        ..case(name, path, Vec::new(), expect)
    }
}

fn http_cases() -> Vec<HttpCase> {
    use HttpExpect::{Error, Ok, Status};
    let scores2 = || Ok("scores", 2);
    let mut cases = vec![
        // Malformed and truncated JSON.
        rerank_bad("empty body", b"".to_vec()),
        rerank_bad("JSON null", "null"),
        rerank_bad("empty array", "[]"),
        rerank_bad("array of wrong types", r#"[1, 2]"#),
        rerank_bad("bare string", r#""query""#),
        rerank_bad("bare number", "42"),
        rerank_bad("just an opening brace", "{"),
        rerank_bad("truncated mid-array", r#"{"query": "q", "documents": ["a", "#),
        rerank_bad("truncated mid-string", r#"{"query": "q", "documents": ["a"#),
        rerank_bad("trailing garbage", format!("{} x", String::from_utf8(json_with("")).unwrap())),
        rerank_bad("two objects", [json_with(""), json_with("")].concat()),
        rerank_bad("single quotes", "{'query': 'q', 'documents': ['a']}"),
        rerank_bad("trailing comma", r#"{"query": "q", "documents": ["a",]}"#),
        rerank_bad("comment", r#"{"query": "q", /* hi */ "documents": ["a"]}"#),
        rerank_bad("byte order mark", [&b"\xef\xbb\xbf"[..], &json_with("")].concat()),
        rerank_bad("NaN literal", r#"{"query": "q", "documents": ["a"], "top_k": NaN}"#),
        // Encoding.
        rerank_bad(
            "invalid UTF-8 in a document",
            [&br#"{"query": "q", "documents": [""#[..], b"\xff\xfe\xfd", br#""]}"#].concat(),
        ),
        rerank_bad("lone surrogate escape", r#"{"query": "\ud800", "documents": ["a"]}"#),
        rerank_bad(
            "raw NUL byte inside a string",
            [&br#"{"query": "a"#[..], b"\0", br#"b", "documents": ["a"]}"#].concat(),
        ),
        case(
            "escaped NUL characters in query and document",
            "/rerank",
            br#"{"query": "a\u0000b", "documents": ["\u0000", "x\u0000y"]}"#.to_vec(),
            scores2(),
        ),
        // Wrong types and missing fields.
        rerank_bad("query is a number", r#"{"query": 123, "documents": ["a"]}"#),
        rerank_bad("query is null", r#"{"query": null, "documents": ["a"]}"#),
        rerank_bad("query is an object", r#"{"query": {"text": "q"}, "documents": ["a"]}"#),
        rerank_bad("missing query", r#"{"documents": ["a"]}"#),
        rerank_bad("missing documents", r#"{"query": "q"}"#),
        rerank_bad("documents is a string", r#"{"query": "q", "documents": "a"}"#),
        rerank_bad("documents are numbers", r#"{"query": "q", "documents": [1, 2]}"#),
        rerank_bad("a document is null", r#"{"query": "q", "documents": ["a", null]}"#),
        rerank_bad("documents is an object", r#"{"query": "q", "documents": {"0": "a"}}"#),
        rerank_bad("truncate is lowercase", json_with(r#", "truncate": "end""#)),
        rerank_bad("truncate is unknown", json_with(r#", "truncate": "MIDDLE""#)),
        rerank_bad("truncate is a number", json_with(r#", "truncate": 1"#)),
        // Numbers.
        case(
            "top_k u64::MAX",
            "/rerank",
            json_with(&format!(r#", "top_k": {}"#, u64::MAX)),
            scores2(),
        ),
        rerank_bad("top_k u64::MAX + 1", json_with(r#", "top_k": 18446744073709551616"#)),
        rerank_bad("top_k 2^70 as a float", json_with(r#", "top_k": 1180591620717411303424.0"#)),
        rerank_bad("top_k 1e400", json_with(r#", "top_k": 1e400"#)),
        rerank_bad("top_k negative", json_with(r#", "top_k": -1"#)),
        rerank_bad("top_k i64::MIN", json_with(&format!(r#", "top_k": {}"#, i64::MIN))),
        rerank_bad("top_k fractional", json_with(r#", "top_k": 1.5"#)),
        rerank_bad("top_k as a string", json_with(r#", "top_k": "3""#)),
        rerank_bad("top_k true", json_with(r#", "top_k": true"#)),
        case("top_k zero", "/rerank", json_with(r#", "top_k": 0"#), scores2()),
        case("top_k null", "/rerank", json_with(r#", "top_k": null"#), scores2()),
        // Zero and empty values.
        case(
            "no documents",
            "/rerank",
            br#"{"query": "q", "documents": []}"#.to_vec(),
            Ok("scores", 0),
        ),
        case(
            "empty query and documents",
            "/rerank",
            br#"{"query": "", "documents": ["", ""]}"#.to_vec(),
            scores2(),
        ),
        // Unknown and duplicate keys.
        case(
            "unknown fields",
            "/rerank",
            json_with(r#", "modle": "x", "future": {"a": [1, 2, {"b": null}]}"#),
            scores2(),
        ),
        case(
            "a 1 MB unknown field name",
            "/rerank",
            json_with(&format!(r#", "{}": 1"#, "k".repeat(1 << 20))),
            scores2(),
        ),
        rerank_bad(
            "duplicate query key",
            r#"{"query": "a", "query": "b", "documents": ["a"]}"#,
        ),
        rerank_bad(
            "duplicate documents key",
            r#"{"query": "q", "documents": ["a"], "documents": ["b", "c"]}"#,
        ),
        // A JSON body is an object (the length options are flattened into it, which serde reads
        // from maps only); MessagePack's positional arrays stay accepted on the wire.
        rerank_bad("positional array", br#"["q", ["a", "b"]]"#.to_vec()),
        // Nested bombs (100 000 levels).
        rerank_bad(
            "100 000 nested arrays as the body",
            json_bomb(100_000, "[", "]"),
        ),
        rerank_bad(
            "100 000 nested arrays as a document",
            format!(r#"{{"query": "q", "documents": [{}]}}"#, json_bomb(100_000, "[", "]")),
        ),
        rerank_bad(
            "100 000 nested objects as the query",
            format!(r#"{{"query": {}, "documents": ["a"]}}"#, json_bomb(100_000, r#"{"a":"#, "}")),
        ),
        // Unknown fields are kept for the flattened length options, so serde_json's nesting limit
        // (128) applies to them too: refused, never a stack overflow.
        rerank_bad(
            "100 000 nested arrays in an unknown field",
            json_with(&format!(r#", "x": {}"#, json_bomb(100_000, "[", "]"))),
        ),
        rerank_bad(
            "100 000 nested objects in an unknown field",
            json_with(&format!(r#", "x": {}"#, json_bomb(100_000, r#"{"a":"#, "}"))),
        ),
        // Sizes.
        case(
            "100 000 documents",
            "/rerank",
            serde_json::to_vec(&serde_json::json!({"query": "q", "documents": vec!["d"; 100_000]}))
                .unwrap(),
            Error(400, "too_many_documents"),
        ),
        case(
            "a 10 MB string",
            "/rerank",
            serde_json::to_vec(&serde_json::json!({"query": "q", "documents": ["x".repeat(10 << 20)]}))
                .unwrap(),
            Error(413, "payload_too_large"),
        ),
        HttpCase {
            body: HttpBody::Huge {
                bytes: 100_000_000,
                chunked: false,
            },
            ..case("a 100 MB body (Content-Length)", "/rerank", vec![], Error(413, "payload_too_large"))
        },
        HttpCase {
            body: HttpBody::Huge {
                bytes: 100_000_000,
                chunked: true,
            },
            ..case("a 100 MB body (chunked)", "/rerank", vec![], Error(413, "payload_too_large"))
        },
        // Content types: not checked, the body must be JSON.
        HttpCase {
            content_type: Some("text/plain"),
            ..case("valid JSON as text/plain", "/rerank", json_with(""), scores2())
        },
        HttpCase {
            content_type: None,
            ..case("valid JSON without a content type", "/rerank", json_with(""), scores2())
        },
        HttpCase {
            content_type: Some("application/x-www-form-urlencoded"),
            ..rerank_bad("form data", "query=q&documents=a&documents=b")
        },
        HttpCase {
            content_type: Some("multipart/form-data; boundary=XyZ"),
            ..rerank_bad(
                "multipart form",
                "--XyZ\r\nContent-Disposition: form-data; name=\"query\"\r\n\r\nq\r\n--XyZ--\r\n",
            )
        },
        HttpCase {
            content_type: Some(wire::CONTENT_TYPE),
            ..rerank_bad("MessagePack body", mp_with(&[]))
        },
        HttpCase {
            content_type: Some("application/json; charset=utf-16"),
            ..rerank_bad(
                "UTF-16 body",
                r#"{"query": "q", "documents": ["a"]}"#
                    .encode_utf16()
                    .flat_map(u16::to_le_bytes)
                    .collect::<Vec<u8>>(),
            )
        },
        // The Cohere and NIM shapes, wrong.
        bad("cohere: a document is a number", "/v1/rerank", r#"{"query": "q", "documents": [3]}"#),
        bad("cohere: documents is a string", "/v1/rerank", r#"{"query": "q", "documents": "a"}"#),
        bad(
            "cohere: document object without text",
            "/v1/rerank",
            r#"{"query": "q", "documents": [{"txt": "a"}]}"#,
        ),
        bad(
            "cohere: document text is a number",
            "/v1/rerank",
            r#"{"query": "q", "documents": [{"text": 5}]}"#,
        ),
        bad(
            "cohere: negative top_n",
            "/v1/rerank",
            r#"{"query": "q", "documents": ["a"], "top_n": -1}"#,
        ),
        bad(
            "cohere: return_documents is a string",
            "/v1/rerank",
            r#"{"query": "q", "documents": ["a"], "return_documents": "yes"}"#,
        ),
        bad("cohere: missing query", "/v1/rerank", r#"{"documents": ["a"]}"#),
        case(
            "cohere: top_n u64::MAX",
            "/v1/rerank",
            format!(r#"{{"query": "q", "documents": ["a", {{"text": "b"}}], "top_n": {}}}"#, u64::MAX)
                .into_bytes(),
            Ok("results", 2),
        ),
        bad("nim: query is a string", "/v1/ranking", r#"{"query": "q", "passages": [{"text": "a"}]}"#),
        bad(
            "nim: passages are strings",
            "/v1/ranking",
            r#"{"query": {"text": "q"}, "passages": ["a"]}"#,
        ),
        bad("nim: missing passages", "/v1/ranking", r#"{"query": {"text": "q"}}"#),
        bad(
            "nim: unknown truncate",
            "/v1/ranking",
            r#"{"query": {"text": "q"}, "passages": [{"text": "a"}], "truncate": "MIDDLE"}"#,
        ),
        bad("nim: the /rerank shape", "/v1/ranking", json_with("")),
        bad(
            "rerank: the NIM shape",
            "/rerank",
            r#"{"query": {"text": "q"}, "passages": [{"text": "a"}]}"#,
        ),
        // Methods and routes.
        method("GET /rerank", "GET", "/rerank", Error(405, "invalid_request")),
        method("PUT /v1/rerank", "PUT", "/v1/rerank", Error(405, "invalid_request")),
        method("PATCH /v1/ranking", "PATCH", "/v1/ranking", Error(405, "invalid_request")),
        method("DELETE /health", "DELETE", "/health", Error(405, "invalid_request")),
        method("POST /health", "POST", "/health", Error(405, "invalid_request")),
        method("GET /", "GET", "/", Error(404, "not_found")),
        method("GET /nope", "GET", "/nope", Error(404, "not_found")),
        method("POST /rerank/", "POST", "/rerank/", Error(404, "not_found")),
        method("POST /RERANK", "POST", "/RERANK", Error(404, "not_found")),
        method("POST /v2/rerank", "POST", "/v2/rerank", Error(404, "not_found")),
        method(
            "POST /rerank?top_k=1 (query string ignored)",
            "POST",
            "/rerank?top_k=1",
            scores2(),
        ),
        // Bearer tokens on a sidecar with RERANK_API_KEY.
        locked("no token", "POST", "/rerank", None, Error(401, "unauthorized")),
        locked("wrong token", "POST", "/rerank", Some(&b"Bearer nope"[..]), Error(401, "unauthorized")),
        locked(
            "token prefix",
            "POST",
            "/rerank",
            Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]).as_bytes()),
            Error(401, "unauthorized"),
        ),
        locked(
            "token with a suffix",
            "POST",
            "/rerank",
            Some(format!("Bearer {TOKEN}x").as_bytes()),
            Error(401, "unauthorized"),
        ),
        locked(
            "token in Basic",
            "POST",
            "/rerank",
            Some(format!("Basic {TOKEN}").as_bytes()),
            Error(401, "unauthorized"),
        ),
        locked(
            "token without a scheme",
            "POST",
            "/rerank",
            Some(TOKEN.as_bytes()),
            Error(401, "unauthorized"),
        ),
        locked("empty bearer", "POST", "/rerank", Some(&b"Bearer "[..]), Error(401, "unauthorized")),
        locked(
            "non-ASCII token",
            "POST",
            "/rerank",
            Some(&b"Bearer \xff\xfe"[..]),
            Error(401, "unauthorized"),
        ),
        locked(
            "lowercase scheme, right token",
            "POST",
            "/rerank",
            Some(format!("bearer {TOKEN}").as_bytes()),
            Ok("scores", 2),
        ),
        locked("no token on /metrics", "GET", "/metrics", None, Error(401, "unauthorized")),
        locked("no token on /health", "GET", "/health", None, Error(401, "unauthorized")),
        locked("no token on an unknown route", "GET", "/nope", None, Error(401, "unauthorized")),
        locked("no token on /live (public)", "GET", "/live", None, Status(200)),
        HttpCase {
            body: HttpBody::Huge {
                bytes: 100_000_000,
                chunked: false,
            },
            ..locked("100 MB body without a token", "POST", "/rerank", None, Error(401, "unauthorized"))
        },
    ];
    // A malformed trace context must not matter.
    cases.push(HttpCase {
        header: Some(("traceparent", "00-zz-not-a-trace-ff")),
        ..case("garbage traceparent", "/rerank", json_with(""), scores2())
    });
    cases
}

/// Streams a `bytes`-long body by hand and stops at the answer: (status, body, body bytes written
/// when the answer had fully arrived).
fn post_huge(
    addr: SocketAddr,
    path: &str,
    bytes: usize,
    chunked: bool,
    authorization: Option<&[u8]>,
) -> (u16, String, usize) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut head =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n")
            .into_bytes();
    if chunked {
        head.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    } else {
        head.extend_from_slice(format!("Content-Length: {bytes}\r\n").as_bytes());
    }
    if let Some(value) = authorization {
        head.extend_from_slice(b"Authorization: ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).expect("request head");

    let written = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let (written, stop) = (written.clone(), stop.clone());
        std::thread::spawn(move || {
            let prefix = br#"{"query": "q", "documents": [""#;
            let chunk = vec![b'x'; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                let sent = written.load(Ordering::Relaxed);
                if sent >= bytes {
                    if chunked {
                        let _ = stream.write_all(b"0\r\n\r\n");
                    }
                    return;
                }
                let mut piece = chunk[..chunk.len().min(bytes - sent)].to_vec();
                if sent == 0 {
                    piece[..prefix.len()].copy_from_slice(prefix);
                }
                let framed = if chunked {
                    [
                        format!("{:x}\r\n", piece.len()).into_bytes(),
                        piece.clone(),
                        b"\r\n".to_vec(),
                    ]
                    .concat()
                } else {
                    piece.clone()
                };
                if stream.write_all(&framed).is_err() {
                    return;
                }
                written.fetch_add(piece.len(), Ordering::Relaxed);
            }
        })
    };

    // Read the answer: head, then Content-Length bytes of body.
    let mut response = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let complete = |response: &[u8]| -> Option<(u16, String)> {
        let text = String::from_utf8_lossy(response);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        (body.len() >= length).then(|| (status, body[..length].to_string()))
    };
    let answer = loop {
        if let Some(answer) = complete(&response) {
            break answer;
        }
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => {
                break complete(&response).unwrap_or_else(|| {
                    panic!(
                        "no complete answer; got {:?}",
                        String::from_utf8_lossy(&response)
                    )
                })
            }
            Ok(n) => response.extend_from_slice(&buffer[..n]),
        }
    };
    let at_answer = written.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    writer.join().expect("writer thread");
    (answer.0, answer.1, at_answer)
}

async fn send_http(case: &HttpCase, open: &Sidecar, locked: &Sidecar) -> (u16, String) {
    let sidecar = match case.target {
        Target::Open => open,
        Target::Locked => locked,
    };
    match &case.body {
        HttpBody::Huge { bytes, chunked } => {
            let (addr, path, bytes, chunked) = (sidecar.addr, case.path, *bytes, *chunked);
            let authorization = case.authorization.clone();
            let (status, body, written) = within(
                Duration::from_secs(120),
                &case.name,
                tokio::task::spawn_blocking(move || {
                    post_huge(addr, path, bytes, chunked, authorization.as_deref())
                }),
            )
            .await
            .expect("huge body task");
            // Answered without reading it all: the sender was still far from the end.
            assert!(
                written < bytes / 2,
                "{}: the answer came after {written} of {bytes} bytes",
                case.name
            );
            println!(
                "hostile: {}: {status} after {:.1} MB of {:.0} MB sent",
                case.name,
                written as f64 / 1e6,
                bytes as f64 / 1e6
            );
            (status, body)
        }
        HttpBody::Bytes(body) => {
            let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
            let mut request = http()
                .request(method, sidecar.url(case.path))
                .body(body.clone());
            if let Some(content_type) = case.content_type {
                request = request.header(reqwest::header::CONTENT_TYPE, content_type);
            }
            if let Some(value) = &case.authorization {
                request = request.header(
                    reqwest::header::AUTHORIZATION,
                    reqwest::header::HeaderValue::from_bytes(value).expect("header value"),
                );
            }
            if let Some((name, value)) = case.header {
                request = request.header(name, value);
            }
            let response = match within(PATIENCE, &case.name, request.send()).await {
                Ok(response) => response,
                // A body over the limit is refused from its Content-Length, before it is read;
                // the server then closes, and a client still writing may see the reset before
                // the 413. Either way nothing of the body was taken.
                Err(e) if e.is_request() && matches!(case.expect, HttpExpect::Error(413, _)) => {
                    println!(
                        "hostile: {}: connection closed before the body was read",
                        case.name
                    );
                    return (413, PAYLOAD_TOO_LARGE_BODY.to_string());
                }
                Err(e) => panic!("{}: {e}", case.name),
            };
            let status = response.status().as_u16();
            let text = within(Duration::from_secs(60), &case.name, response.text())
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            (status, text)
        }
    }
}

/// What the sidecar answers for a body over its limit (the test stands in for an answer the client
/// could not read because the server closed first).
const PAYLOAD_TOO_LARGE_BODY: &str =
    r#"{"error":{"code":"payload_too_large","message":"refused before the body was read"}}"#;

fn check_http(case: &HttpCase, status: u16, text: String) {
    let name = &case.name;
    let answer = Answer {
        status,
        headers: reqwest::header::HeaderMap::new(),
        text,
    };
    match case.expect {
        HttpExpect::Ok(key, len) => {
            assert_eq!(status, 200, "{name}: {}", answer.text);
            let body = answer.json();
            assert_eq!(
                body[key].as_array().map(Vec::len),
                Some(len),
                "{name}: {body}"
            );
        }
        HttpExpect::Error(expected, code) => {
            assert_eq!(status, expected, "{name}: {}", answer.text);
            assert_eq!(answer.error_code(), code, "{name}: {}", answer.text);
        }
        HttpExpect::Status(expected) => assert_eq!(status, expected, "{name}: {}", answer.text),
    }
}

// ---------------------------------------------------------------------------------------------
// The NATS table.

#[derive(Debug)]
enum NatsExpect {
    /// A reply with this many scores (and at most this many ranked indices, when given).
    Ok(usize, Option<usize>),
    Error(ErrorCode),
}

struct NatsCase {
    name: &'static str,
    payload: Vec<u8>,
    expect: NatsExpect,
}

fn nats_cases() -> Vec<NatsCase> {
    use NatsExpect::{Error, Ok};
    let valid = mp_with(&[]);
    let big = "word ".repeat(2 << 20); // 10 MiB
    let long = "word ".repeat(200_000); // 1 MB
    let row = |name, payload, expect| NatsCase {
        name,
        payload,
        expect,
    };
    vec![
        row("empty payload", vec![], Error(ErrorCode::InvalidRequest)),
        row(
            "garbage",
            b"\xc1\xc1\xc1 not msgpack".to_vec(),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "truncated in the middle",
            valid[..valid.len() / 2].to_vec(),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "map header promising more pairs",
            [mp_map(3), mp_str("query"), mp_str("q")].concat(),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "JSON instead of MessagePack",
            json_with(""),
            Error(ErrorCode::InvalidRequest),
        ),
        row("nil", vec![0xc0], Error(ErrorCode::InvalidRequest)),
        row("an integer", vec![0x2a], Error(ErrorCode::InvalidRequest)),
        row("empty map", mp_map(0), Error(ErrorCode::InvalidRequest)),
        row("empty array", mp_array(0), Error(ErrorCode::InvalidRequest)),
        row(
            "positional array",
            [mp_array(2), mp_str("q"), mp_docs(&["a", "b"])].concat(),
            Ok(2, None),
        ),
        row(
            "query is an integer",
            mp_request(&[("query", mp_u64(1)), ("documents", mp_docs(&["a"]))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "query is nil",
            mp_request(&[("query", vec![0xc0]), ("documents", mp_docs(&["a"]))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "query is an ext value",
            mp_request(&[
                ("query", vec![0xd4, 0x01, 0x00]),
                ("documents", mp_docs(&["a"])),
            ]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "documents is a string",
            mp_request(&[("query", mp_str("q")), ("documents", mp_str("a"))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "a document is an integer",
            mp_request(&[
                ("query", mp_str("q")),
                ("documents", [mp_array(1), mp_u64(7)].concat()),
            ]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "a document is nil",
            mp_request(&[
                ("query", mp_str("q")),
                ("documents", [mp_array(1), vec![0xc0]].concat()),
            ]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "documents is a map",
            mp_request(&[
                ("query", mp_str("q")),
                ("documents", [mp_map(1), mp_str("0"), mp_str("a")].concat()),
            ]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "invalid UTF-8 in the query",
            mp_request(&[
                ("query", mp_str_bytes(b"\xff\xfe")),
                ("documents", mp_docs(&["a"])),
            ]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "invalid UTF-8 in a document",
            mp_request(&[
                ("query", mp_str("q")),
                (
                    "documents",
                    [mp_array(1), mp_str_bytes(b"a\xc3\x28")].concat(),
                ),
            ]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "NUL bytes in query and documents",
            mp_request(&[
                ("query", mp_str("a\0b")),
                ("documents", mp_docs(&["\0", "x\0\0y"])),
            ]),
            Ok(2, None),
        ),
        row(
            "top_k u64::MAX",
            mp_with(&[("top_k", mp_u64(u64::MAX))]),
            Ok(2, Some(2)),
        ),
        row(
            "top_k 2^70 as a float",
            mp_with(&[("top_k", mp_f64(2f64.powi(70)))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "top_k NaN",
            mp_with(&[("top_k", mp_f64(f64::NAN))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "top_k negative",
            mp_with(&[("top_k", mp_i64(-1))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "top_k as a string",
            mp_with(&[("top_k", mp_str("3"))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "top_k zero",
            mp_with(&[("top_k", mp_u64(0))]),
            Ok(2, Some(0)),
        ),
        row(
            "truncate unknown",
            mp_with(&[("truncate", mp_str("MIDDLE"))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "truncate lowercase",
            mp_with(&[("truncate", mp_str("end"))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "deadline_ms zero (long past)",
            mp_with(&[("deadline_ms", mp_u64(0))]),
            Error(ErrorCode::DeadlineExceeded),
        ),
        row(
            "deadline_ms u64::MAX (never)",
            mp_with(&[("deadline_ms", mp_u64(u64::MAX))]),
            Ok(2, None),
        ),
        row(
            "deadline_ms negative",
            mp_with(&[("deadline_ms", mp_i64(-5))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "request_id is a number",
            mp_with(&[("request_id", mp_u64(5))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "unknown fields",
            mp_with(&[
                ("model", mp_str("x")),
                ("future", [mp_map(1), mp_str("a"), mp_docs(&["b"])].concat()),
            ]),
            Ok(2, None),
        ),
        row(
            "duplicate query key",
            mp_request(&[
                ("query", mp_str("a")),
                ("query", mp_str("b")),
                ("documents", mp_docs(&["a"])),
            ]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "duplicate documents key",
            mp_request(&[
                ("query", mp_str("q")),
                ("documents", mp_docs(&["a"])),
                ("documents", mp_docs(&["b", "c"])),
            ]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "100 000 nested arrays as a document",
            mp_request(&[
                ("query", mp_str("q")),
                ("documents", [mp_array(1), mp_bomb(100_000, false)].concat()),
            ]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "20 nested arrays in an unknown field (under the cap)",
            mp_with(&[("x", mp_bomb(20, false))]),
            Ok(2, None),
        ),
        row(
            "100 000 nested arrays in an unknown field",
            mp_with(&[("x", mp_bomb(100_000, false))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "100 000 nested maps in an unknown field",
            mp_with(&[("x", mp_bomb(100_000, true))]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "100 000 nested arrays as the body",
            mp_bomb(100_000, false),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "array header claiming 4 billion documents",
            mp_request(&[
                ("query", mp_str("q")),
                ("documents", mp_array(u32::MAX as usize)),
            ]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "string header claiming 4 GiB",
            mp_request(&[
                (
                    "query",
                    [vec![0xdb], u32::MAX.to_be_bytes().to_vec(), b"q".to_vec()].concat(),
                ),
                ("documents", mp_docs(&["a"])),
            ]),
            Error(ErrorCode::InvalidRequest),
        ),
        row(
            "100 000 documents",
            mp_request(&[
                ("query", mp_str("q")),
                ("documents", mp_docs(&vec!["d"; 100_000])),
            ]),
            Error(ErrorCode::TooManyDocuments),
        ),
        row(
            "a 1 MB document, truncate NONE",
            mp_request(&[
                ("query", mp_str("q")),
                ("documents", mp_docs(&[long.as_str()])),
                ("truncate", mp_str("NONE")),
            ]),
            Error(ErrorCode::DocumentTooLong),
        ),
        row(
            "a 10 MB query (cut at max_length)",
            mp_request(&[("query", mp_str(&big)), ("documents", mp_docs(&["a", "b"]))]),
            Ok(2, None),
        ),
        row(
            "no documents",
            mp_request(&[("query", mp_str("q")), ("documents", mp_array(0))]),
            Ok(0, None),
        ),
        row(
            "binary query (bin 8, valid UTF-8)",
            mp_request(&[
                ("query", [vec![0xc4, 1], b"q".to_vec()].concat()),
                ("documents", mp_docs(&["a"])),
            ]),
            Ok(1, None),
        ),
    ]
}

async fn check_nats(client: &async_nats::Client, case: &NatsCase) {
    let name = case.name;
    let message = within(
        Duration::from_secs(90),
        name,
        client.send_request(
            wire::SUBJECT_V1,
            async_nats::Request::new()
                .payload(Bytes::from(case.payload.clone()))
                .timeout(Some(Duration::from_secs(60))),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: no reply: {e}"));
    let header_code = message
        .headers
        .as_ref()
        .and_then(|h| h.get(wire::HEADER_SERVICE_ERROR_CODE))
        .map(|v| v.as_str().to_string());
    let body = wire::decode_reply(&message.payload)
        .unwrap_or_else(|e| panic!("{name}: undecodable reply: {e}"));
    match (&case.expect, body) {
        (NatsExpect::Ok(scores, ranked), ReplyBody::Ok(reply)) => {
            assert_eq!(header_code, None, "{name}");
            assert_eq!(reply.scores.len(), *scores, "{name}");
            assert_eq!(
                reply.ranked_indices.len(),
                ranked.unwrap_or(*scores),
                "{name}"
            );
        }
        (NatsExpect::Error(code), ReplyBody::Err(e)) => {
            assert_eq!(e.error.code, *code, "{name}: {}", e.error.message);
            assert!(!e.error.message.is_empty(), "{name}");
            assert_eq!(
                header_code,
                Some(code.status().to_string()),
                "{name}: Nats-Service-Error-Code"
            );
        }
        (expected, got) => panic!("{name}: expected {expected:?}, got {got:?}"),
    }
}

fn assert_alive(worker: &mut WorkerProcess, after: &str) {
    if let Ok(Some(status)) = worker.child.try_wait() {
        panic!("the worker exited ({status}) after: {after}");
    }
}

/// Runs one case's checks; a failed assertion is recorded under the case's name instead of
/// stopping the table, so one run reports every failing case.
async fn record(
    failures: &mut Vec<String>,
    name: &str,
    check: impl std::future::Future<Output = ()>,
) {
    use futures::FutureExt;
    if let Err(panic) = std::panic::AssertUnwindSafe(check).catch_unwind().await {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        failures.push(format!("{name}: {message}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_typed_errors_and_the_service_stays_healthy() {
    // 16 MB payloads so the 10 MB inputs reach the worker over NATS.
    let nats = NatsServer::start_with_config("max_payload: 16MB\n");
    let mut worker = tokio::task::spawn_blocking({
        let url = nats.url();
        move || WorkerProcess::start(&url, &[])
    })
    .await
    .unwrap();
    // The NATS payloads are large, so the HTTP body limit is set rather than derived from them.
    let open = Sidecar::start_with(&nats.url(), |c| c.max_body_bytes = Some(8 << 20)).await;
    let locked = Sidecar::start_with(&nats.url(), |c| {
        c.api_key = Some(TOKEN.into());
        c.max_body_bytes = Some(8 << 20);
    })
    .await;
    let client = nats_connect(&nats.url()).await;

    // NATS: raw bytes to the worker.
    // Every case runs; failures are collected by name and reported together at the end.
    let mut failures = Vec::new();
    let nats_table = nats_cases();
    for case in &nats_table {
        record(&mut failures, case.name, check_nats(&client, case)).await;
        assert_alive(&mut worker, case.name);
    }
    // A request without a reply subject is dropped (nobody to answer), and harms nothing.
    within(
        PATIENCE,
        "publish without reply",
        client.publish(wire::SUBJECT_V1, Bytes::from(mp_bomb(100_000, true))),
    )
    .await
    .unwrap();
    // A malformed trace header is ignored.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", "00-not-a-trace-id-at-all");
    let traced = within(
        PATIENCE,
        "garbage traceparent over NATS",
        client.send_request(
            wire::SUBJECT_V1,
            async_nats::Request::new()
                .payload(Bytes::from(mp_with(&[])))
                .headers(headers),
        ),
    )
    .await
    .expect("reply");
    assert!(matches!(
        wire::decode_reply(&traced.payload),
        Result::Ok(ReplyBody::Ok(_))
    ));
    assert_alive(&mut worker, "publish without reply, garbage traceparent");
    let nats_tried = nats_table.len() + 2;

    // HTTP: through the sidecars to the same worker.
    let http_table = http_cases();
    for case in &http_table {
        let (status, text) = send_http(case, &open, &locked).await;
        record(&mut failures, &case.name, async {
            check_http(case, status, text)
        })
        .await;
        assert_alive(&mut worker, &case.name);
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile cases failed:\n{}",
        failures.len(),
        nats_table.len() + http_table.len(),
        failures.join("\n")
    );

    // Still healthy, still serving.
    assert_eq!(http_get_status(worker.health_port, "/ready"), Some(200));
    for (sidecar, token) in [(&open, None), (&locked, Some(TOKEN))] {
        let health = get(&sidecar.url("/health"), token).await;
        assert_eq!(health.status, 200, "{}", health.text);
        let answer = post(&sidecar.url("/rerank"), &seed_request(), token).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.json()["scores"].as_array().map(Vec::len), Some(3));
    }
    check_nats(
        &client,
        &NatsCase {
            name: "a normal request at the end",
            payload: mp_with(&[]),
            expect: NatsExpect::Ok(2, None),
        },
    )
    .await;
    assert_alive(&mut worker, "the whole table");
    println!(
        "hostile: {} hostile inputs tried ({} HTTP, {nats_tried} NATS), each answered as expected; worker and sidecars healthy afterwards",
        http_table.len() + nats_tried,
        http_table.len()
    );
}
