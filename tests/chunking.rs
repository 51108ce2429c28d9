//! `truncate: CHUNK`: a long document is scored as overlapping windows of its own tokens, each
//! repeating the query, and keeps its best window's score and span (tiny model, f32 CPU).

use crate::common;
use crate::stack;

use std::ops::Range;

use bytes::Bytes;
use candle_core::{DType, Device};
use common::*;
use rerank_service::client::{RerankClient, RerankOptions};
use rerank_service::engine::{Engine, EngineConfig, EngineMetrics, ScoreRequest};
use rerank_service::model::{
    ChunkPolicy, CrossEncoder, EncodePairsError, EncodedPair, ModelConfig, ModelFiles,
    PairTokenizer, TokenizeWork, Truncation,
};
use rerank_service::wire::{self, ReplyBody, RerankRequest, Span, Truncate};
use serde_json::json;
use stack::*;

/// A window scored in a batch equals it scored alone (batch invariance, tests/batching.rs).
const TOL: f32 = 1e-5;
const MAX_LENGTH: usize = 64;
const QUERY: &str = "which river floods in spring?";

fn model() -> CrossEncoder {
    let files = ModelFiles::from_dir(&tiny_model_dir()).expect("tiny model files");
    let config = ModelConfig::from_file(&files.config).expect("tiny config.json");
    files
        .load_model(&config, DType::F32, &Device::Cpu, MAX_LENGTH)
        .expect("tiny model loads")
}

fn tokenizer(max_length: usize) -> PairTokenizer {
    PairTokenizer::new(plain_tokenizer().clone(), max_length).expect("tokenizer")
}

/// The engine on the tiny model at `MAX_LENGTH`, without warm-up.
async fn start_engine(max_batch_tokens: usize) -> Engine {
    Engine::start(
        Box::new(model()),
        Box::new(tokenizer(MAX_LENGTH)),
        EngineConfig {
            warmup_tokens: 0,
            max_batch_tokens,
            ..EngineConfig::default()
        },
        EngineMetrics::detached(),
    )
    .await
    .expect("engine")
}

/// Scores `documents` against `QUERY` through `engine`.
async fn score(
    engine: &Engine,
    documents: Vec<String>,
    truncation: Truncation,
) -> Result<rerank_service::engine::ScoreResponse, rerank_service::engine::EngineError> {
    within(
        PATIENCE,
        "engine request",
        engine.score(ScoreRequest {
            query: QUERY.into(),
            documents,
            truncation,
            deadline: None,
        }),
    )
    .await
}

fn chunk(overlap: usize, max_chunks: usize) -> Truncation {
    Truncation::Chunk(ChunkPolicy {
        overlap,
        max_chunks,
    })
}

fn windows(tokenizer: &PairTokenizer, document: &str, truncation: Truncation) -> Vec<EncodedPair> {
    tokenizer
        .encode_counting(QUERY, &[document], truncation, &mut TokenizeWork::default())
        .expect("encode")
}

/// English prose long enough for several 64-token windows, with the interesting part late.
fn long_document(sentences: usize) -> String {
    let filler = [
        "The committee met on Tuesday to discuss the budget for the coming year.",
        "Several members raised concerns about maintenance of the old bridge.",
        "Lunch was served at noon and the session resumed shortly after.",
        "A report on parking fees was tabled until the next meeting.",
    ];
    // Numbered, so no window's tokens repeat elsewhere in the document.
    let mut text: Vec<String> = (0..sentences)
        .map(|i| format!("Item {i}: {}", filler[i % filler.len()]))
        .collect();
    text.push("In spring the Red River floods the valley when snow melts upstream.".into());
    text.push("The meeting closed at five.".into());
    text.join(" ")
}

/// Whole-text tokenization of the document half: the tokens lying wholly inside ` passage:`,
/// and the document's own tokens after them.
fn split_document(document: &str) -> (Vec<u32>, Vec<u32>) {
    let whole = plain_tokenizer()
        .encode(format!(" passage:{document}"), false)
        .expect("encode");
    let head = whole
        .get_offsets()
        .iter()
        .take_while(|&&(_, end)| end <= " passage:".len())
        .count();
    let ids = whole.get_ids();
    (ids[..head].to_vec(), ids[head..].to_vec())
}

/// `[BOS] question:{QUERY} \n \n` and ` passage:` as the model reads them.
fn template() -> (Vec<u32>, Vec<u32>) {
    let passage = plain_tokenizer()
        .encode(" passage:", false)
        .expect("encode")
        .get_ids()
        .to_vec();
    let empty = tokenizer(MAX_LENGTH)
        .encode_pairs(QUERY, &[""], Truncation::End)
        .expect("encode")
        .remove(0);
    let query = empty[..empty.len() - passage.len()].to_vec();
    (query, passage)
}

/// Checks that every window is the query, then the document's own start (first window) or
/// ` passage:` (later ones), then a slice of the document's tokens; returns the slices.
fn token_ranges(pairs: &[EncodedPair], document: &str) -> Vec<Range<usize>> {
    let (query, passage) = template();
    let (head, content) = split_document(document);
    let mut from = 0;
    pairs
        .iter()
        .enumerate()
        .map(|(i, pair)| {
            let prefix = [&query[..], if i == 0 { &head } else { &passage }].concat();
            assert!(
                pair.ids.starts_with(&prefix),
                "window {i} starts with the template"
            );
            let body = &pair.ids[prefix.len()..];
            let start = (from..content.len())
                .find(|&s| content[s..].starts_with(body))
                .unwrap_or_else(|| panic!("window {i} is not a slice of the document"));
            from = start + 1;
            start..start + body.len()
        })
        .collect()
}

/// Tokens of the query and ` passage:`: what a window spends before the document.
fn prefix_len() -> usize {
    let (query, passage) = template();
    query.len() + passage.len()
}

#[test]
fn windows_cover_the_document_with_the_stated_overlap() {
    let tokenizer = tokenizer(MAX_LENGTH);
    let document = long_document(12);
    let (_, content) = split_document(&document);
    for overlap in [0usize, 8, 16] {
        let pairs = windows(&tokenizer, &document, chunk(overlap, 100));
        assert!(pairs.len() > 3, "{} windows", pairs.len());
        let ranges = token_ranges(&pairs, &document);
        assert_eq!(ranges[0].start, 0, "the first window starts the document");
        assert_eq!(
            ranges.last().map(|r| r.end),
            Some(content.len()),
            "the last window ends it"
        );
        for (pair, next) in ranges.iter().zip(&ranges[1..]) {
            let shared = pair.end.saturating_sub(next.start);
            assert!(
                next.start > pair.start && shared >= overlap && shared <= 2 * overlap + 1,
                "overlap {overlap}: windows {pair:?} then {next:?}"
            );
        }
        for pair in &pairs {
            assert!(pair.ids.len() <= MAX_LENGTH, "{}", pair.ids.len());
            assert_eq!(pair.doc_index, 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_documents_score_is_its_best_windows_and_its_span_reproduces_it() {
    let model = model();
    let tokenizer = tokenizer(MAX_LENGTH);
    let documents = vec![
        long_document(10),
        "short and sweet".to_string(),
        long_document(3),
    ];
    let pairs = tokenizer
        .encode_counting(
            QUERY,
            &documents.iter().map(String::as_str).collect::<Vec<_>>(),
            chunk(16, 10),
            &mut TokenizeWork::default(),
        )
        .expect("encode");
    let alone: Vec<f32> = pairs
        .iter()
        .map(|p| model.score_batch(&[p.ids.as_slice()]).expect("score")[0])
        .collect();
    let best = |doc: usize| {
        pairs
            .iter()
            .zip(&alone)
            .filter(|(p, _)| p.doc_index == doc)
            .map(|(_, s)| *s)
            .fold(f32::NEG_INFINITY, f32::max)
    };

    drop(model);
    let engine = start_engine(256).await;
    let response = score(&engine, documents.clone(), chunk(16, 10))
        .await
        .expect("scored");
    assert_eq!(response.pairs, pairs.len(), "every window counts as a pair");
    for doc in 0..documents.len() {
        assert!(
            (response.scores[doc] - best(doc)).abs() <= TOL,
            "document {doc}: {} vs best window {}",
            response.scores[doc],
            best(doc)
        );
    }
    // The short document is one ordinary pair, scored and spanned as END would.
    let plain = score(&engine, vec![documents[1].clone()], Truncation::End)
        .await
        .expect("scored");
    assert_eq!(plain.scores[0], response.scores[1]);
    assert_eq!(response.spans[1], 0..documents[1].chars().count());

    // Each best window's span, sent back as a document, gives that window's score again.
    for (doc, text) in documents.iter().enumerate() {
        let span = response.spans[doc].clone();
        let passage: String = text.chars().skip(span.start).take(span.len()).collect();
        assert!(!passage.is_empty() && passage.len() <= text.len());
        let again = score(&engine, vec![passage.clone()], Truncation::None)
            .await
            .unwrap_or_else(|e| panic!("document {doc}: the span {passage:?} must fit: {e}"));
        assert!(
            (again.scores[0] - response.scores[doc]).abs() <= TOL,
            "document {doc}: span {span:?} scores {} alone, {} as the best window",
            again.scores[0],
            response.scores[doc]
        );
    }
    engine.shutdown().await;
}

#[test]
fn edges_exact_fit_one_over_empty_and_a_query_that_leaves_no_room() {
    let document = long_document(6);
    let (head, content) = split_document(&document);
    let tokenizer_for = tokenizer;
    let (query, _) = template();
    // Exactly at the limit: one ordinary pair; one token over: two windows.
    let pair_tokens = query.len() + head.len() + content.len();
    let exact = tokenizer_for(pair_tokens);
    let pairs = windows(&exact, &document, chunk(8, 10));
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].span, 0..document.len());
    assert_eq!(
        pairs[0].ids,
        exact
            .encode_pairs(QUERY, &[&document], Truncation::None)
            .expect("fits")[0]
    );
    let over = tokenizer_for(pair_tokens - 1);
    assert_eq!(windows(&over, &document, chunk(8, 10)).len(), 2);
    // Empty: one pair.
    assert_eq!(windows(&exact, "", chunk(8, 10)).len(), 1);
    // A query that fills max_length: a clear error, not a silent empty window.
    let short = tokenizer_for(prefix_len() + 1);
    match short.encode_counting(
        &"long query ".repeat(10),
        &[&document],
        chunk(8, 10),
        &mut TokenizeWork::default(),
    ) {
        Err(EncodePairsError::QueryTooLong(e)) => {
            assert!(e.to_string().contains("no room"), "{e}")
        }
        other => panic!("expected QueryTooLong, got {other:?}"),
    }
    // Past max_chunks the rest of the document is not read.
    let capped = windows(&tokenizer(MAX_LENGTH), &long_document(40), chunk(8, 3));
    assert_eq!(capped.len(), 3);
}

#[test]
fn emoji_and_cjk_at_window_edges_stay_exact_slices_of_the_document() {
    let tokenizer = tokenizer(MAX_LENGTH);
    for document in [
        (0..20)
            .map(|i| format!("河流{i}在春天泛滥🌊因为上游积雪融化🏔️。"))
            .collect::<String>(),
        (0..60).map(|i| format!("🍕{i}😀🎉")).collect(),
        (0..10)
            .map(|i| format!("日本語のテキスト{i}と emoji 🎌 mixed with English words "))
            .collect(),
    ] {
        let (_, content) = split_document(&document);
        let pairs = windows(&tokenizer, &document, chunk(8, 100));
        assert!(pairs.len() > 1);
        let ranges = token_ranges(&pairs, &document);
        assert_eq!(ranges.last().map(|r| r.end), Some(content.len()));
        for pair in &pairs {
            let text = &document[pair.span.clone()];
            assert!(
                !text.is_empty(),
                "spans are on char boundaries and non-empty"
            );
        }
    }
}

/// CHUNK's tokenization is bounded by max_length × max_chunks, never by the document's size.
#[test]
fn chunking_a_5_mb_document_costs_what_its_windows_need() {
    let tokenizer = tokenizer(512);
    let document = "word ".repeat(1_000_000);
    let mut work = TokenizeWork::default();
    let pairs = tokenizer
        .encode_counting(QUERY, &[document.as_str()], chunk(64, 10), &mut work)
        .expect("encode");
    assert_eq!(pairs.len(), 10);
    assert!(
        work.bytes <= 10 * 513 * 128,
        "tokenized {} bytes of 5 MB",
        work.bytes
    );
}

/// Scores and spans (code points) of `documents` under `truncation`, in-process: the reference
/// every transport must reproduce.
async fn reference(documents: &[String], truncation: Truncation) -> (Vec<f32>, Vec<Span>) {
    let engine = start_engine(EngineConfig::default().max_batch_tokens).await;
    let response = score(&engine, documents.to_vec(), truncation)
        .await
        .expect("scored");
    engine.shutdown().await;
    let spans = response
        .spans
        .iter()
        .map(|s| Span {
            start: s.start as u64,
            end: s.end as u64,
        })
        .collect();
    (response.scores, spans)
}

fn spans_of(value: &serde_json::Value) -> Span {
    serde_json::from_value(value.clone()).expect("a span {start, end}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_works_over_nats_http_and_the_client() {
    let nats = NatsServer::start();
    let _worker = WorkerProcess::start(&nats.url(), &["--max-length", &MAX_LENGTH.to_string()]);
    let sidecar = Sidecar::start(&nats.url()).await;
    let documents = vec![long_document(10), "short and sweet".to_string()];
    let (expected, expected_spans) = reference(&documents, chunk(64, 10)).await;
    let windows = tokenizer(MAX_LENGTH)
        .encode_counting(
            QUERY,
            &documents.iter().map(String::as_str).collect::<Vec<_>>(),
            chunk(64, 10),
            &mut TokenizeWork::default(),
        )
        .expect("encode")
        .len();
    assert!(windows > 3);

    // Wire v1 over NATS.
    let client = connect_nats(&nats.url()).await;
    let request = RerankRequest {
        query: QUERY.into(),
        documents: documents.clone(),
        truncate: Some(Truncate::Chunk),
        return_spans: Some(true),
        ..RerankRequest::default()
    };
    let message = within(
        PATIENCE,
        "NATS request",
        client.request(wire::SUBJECT_V1, Bytes::from(wire::encode(&request))),
    )
    .await
    .expect("reply");
    let ReplyBody::Ok(reply) = wire::decode_reply(&message.payload).expect("decodes") else {
        panic!("CHUNK over NATS failed")
    };
    assert_close(&reply.scores, &expected, TOL, "NATS");
    assert_eq!(reply.spans.as_deref(), Some(&expected_spans[..]));
    assert_eq!(reply.usage.pairs, windows as u64, "windows count as pairs");
    assert_eq!(reply.ranked_indices.len(), 2);
    // Without return_spans, v1 replies stay as they were.
    let plain = RerankRequest {
        return_spans: None,
        ..request.clone()
    };
    let message = within(
        PATIENCE,
        "NATS request",
        client.request(wire::SUBJECT_V1, Bytes::from(wire::encode(&plain))),
    )
    .await
    .expect("reply");
    let ReplyBody::Ok(reply) = wire::decode_reply(&message.payload).expect("decodes") else {
        panic!("CHUNK over NATS failed")
    };
    assert_eq!(reply.spans, None);

    // HTTP: the seed route, Cohere/Jina and NIM.
    let answer = post(
        &sidecar.url("/rerank"),
        &json!({"query": QUERY, "documents": documents, "truncate": "CHUNK", "return_spans": true}),
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    let scores: Vec<f32> = serde_json::from_value(body["scores"].clone()).expect("scores");
    assert_close(&scores, &expected, TOL, "/rerank");
    assert_eq!(spans_of(&body["spans"][0]), expected_spans[0]);

    let answer = post(
        &sidecar.url("/v1/rerank"),
        &json!({"query": QUERY, "documents": documents, "truncate": "CHUNK",
                "max_chunks_per_doc": 2, "return_spans": true}),
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    let (two_windows, _) = reference(&documents, chunk(64, 2)).await;
    for result in body["results"].as_array().expect("results") {
        let index = result["index"].as_u64().expect("index") as usize;
        let score = result["relevance_score"].as_f64().expect("score") as f32;
        assert!((score - two_windows[index]).abs() <= TOL, "{result}");
        assert!(result["span"]["end"].as_u64().is_some(), "{result}");
    }

    let answer = post(
        &sidecar.url("/v1/ranking"),
        &json!({"query": {"text": QUERY}, "passages": documents.iter().map(|d| json!({"text": d})).collect::<Vec<_>>(),
                "truncate": "CHUNK", "return_spans": true}),
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    let best = &body["rankings"][0];
    let index = best["index"].as_u64().expect("index") as usize;
    assert!((best["logit"].as_f64().expect("logit") as f32 - expected[index]).abs() <= TOL);
    assert_eq!(spans_of(&best["span"]), expected_spans[index]);

    // Bad chunking options are refused, naming the field.
    for bad in [
        json!({"query": QUERY, "documents": documents, "truncate": "CHUNK", "max_chunks_per_doc": 0}),
        json!({"query": QUERY, "documents": documents, "truncate": "CHUNK", "max_chunks_per_doc": 100_000}),
        json!({"query": QUERY, "documents": documents, "max_chunks_per_doc": 3}),
    ] {
        let answer = post(&sidecar.url("/rerank"), &bad, None).await;
        assert_eq!(answer.status, 400, "{bad}: {}", answer.text);
        assert_eq!(answer.error_code(), "invalid_request");
        assert!(
            answer.text.contains("max_chunks_per_doc"),
            "{}",
            answer.text
        );
    }

    // The client library over NATS.
    let rerank = RerankClient::builder()
        .nats(connect_nats(&nats.url()).await, wire::SUBJECT_V1)
        .build()
        .expect("client");
    let result = within(
        PATIENCE,
        "client call",
        rerank.rerank_with(
            QUERY,
            documents.clone(),
            RerankOptions {
                truncate: Some(Truncate::Chunk),
                return_spans: true,
                ..RerankOptions::default()
            },
        ),
    )
    .await
    .expect("client call");
    assert_close(&result.scores, &expected, TOL, "client");
    assert_eq!(result.spans.as_deref(), Some(&expected_spans[..]));
}
