//! Batch composition must not change a score: a pair scored alone equals the same pair inside packed
//! batches of very different lengths, in any order, split into batches by the engine's real-token
//! budget, and mixed with other requests running concurrently (CPU, f32, within 1e-5). Edge shapes
//! of the packed forward too: a one-token sequence, one 512-token sequence among short ones, and a
//! batch exactly at the token budget.

use crate::common;

use std::time::Duration;

use candle_core::{DType, Device};
use common::*;
use rerank_service::engine::{Engine, EngineConfig, EngineMetrics, ScoreRequest};
use rerank_service::model::{CrossEncoder, ModelConfig, ModelFiles, PairTokenizer, Truncation};

const TOL: f32 = 1e-5;
const MAX_LENGTH: usize = 512;

/// `assert_close`, printing the largest deviation so `--nocapture` shows the margin to `TOL`.
fn assert_same_scores(actual: &[f32], expected: &[f32], what: &str) {
    let worst = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0.0f32, f32::max);
    println!("{what}: max |batched - alone| = {worst:.1e}");
    assert_close(actual, expected, TOL, what);
}

fn load_model() -> CrossEncoder {
    let files = ModelFiles::from_dir(&tiny_model_dir()).expect("tiny model files");
    let config = ModelConfig::from_file(&files.config).expect("tiny config.json");
    files
        .load_model(&config, DType::F32, &Device::Cpu, MAX_LENGTH)
        .expect("tiny model loads")
}

fn tokenizer() -> PairTokenizer {
    PairTokenizer::from_file(&tiny_model_dir().join("tokenizer.json"), MAX_LENGTH)
        .expect("tokenizer.json")
}

/// Every golden sequence: lengths from 10 to 512 tokens.
fn golden_sequences() -> Vec<Vec<u32>> {
    golden()
        .cases
        .into_iter()
        .flat_map(|c| c.input_ids)
        .collect()
}

/// Every golden document (empty, emoji, multilingual, one truncated at 512 tokens).
fn golden_documents() -> Vec<String> {
    golden()
        .cases
        .into_iter()
        .flat_map(|c| c.documents)
        .collect()
}

fn alone(model: &CrossEncoder, sequences: &[Vec<u32>]) -> Vec<f32> {
    sequences
        .iter()
        .map(|s| model.score_batch(&[s.as_slice()]).expect("score alone")[0])
        .collect()
}

#[test]
fn score_batch_is_independent_of_batch_composition_and_order() {
    let model = load_model();
    // The golden sequences (one query per case) and every golden document under one query.
    let documents = golden_documents();
    let docs: Vec<&str> = documents.iter().map(String::as_str).collect();
    let mut sequences = golden_sequences();
    sequences.extend(
        tokenizer()
            .encode_pairs("why do rivers flood in spring?", &docs, Truncation::End)
            .expect("tokenize"),
    );
    let lengths: Vec<usize> = sequences.iter().map(Vec::len).collect();
    assert!(*lengths.iter().min().unwrap() <= 16 && *lengths.iter().max().unwrap() == MAX_LENGTH);
    let reference = alone(&model, &sequences);

    let n = sequences.len();
    let shortest = (0..n).min_by_key(|&i| lengths[i]).unwrap();
    let longest = (0..n).max_by_key(|&i| lengths[i]).unwrap();
    let orders: Vec<(&str, Vec<usize>)> = vec![
        ("all, input order", (0..n).collect()),
        ("all, reversed", (0..n).rev().collect()),
        (
            "all, interleaved",
            (0..n).step_by(2).chain((1..n).step_by(2)).collect(),
        ),
        ("shortest with longest", vec![shortest, longest]),
        ("longest with shortest", vec![longest, shortest]),
        (
            "duplicates among others",
            vec![shortest, longest, shortest, 3, shortest],
        ),
    ];
    for (what, order) in orders {
        let batch: Vec<&[u32]> = order.iter().map(|&i| sequences[i].as_slice()).collect();
        let scores = model.score_batch(&batch).expect("batch");
        let expected: Vec<f32> = order.iter().map(|&i| reference[i]).collect();
        assert_same_scores(&scores, &expected, what);
    }

    // Every pair next to the 512-token one, and next to a copy of itself: neither the neighbours'
    // lengths nor the batch's row count may matter.
    for (i, sequence) in sequences.iter().enumerate() {
        let padded = model
            .score_batch(&[sequence.as_slice(), sequences[longest].as_slice()])
            .expect("batch");
        let twice = model
            .score_batch(&[sequence.as_slice(), sequence.as_slice()])
            .expect("batch");
        let what = format!("pair {i} ({} tokens)", lengths[i]);
        assert_close(
            &padded[..1],
            &reference[i..=i],
            TOL,
            &format!("{what} next to 512 tokens"),
        );
        assert_eq!(twice[0], twice[1], "{what}: two identical rows differ");
        assert_close(
            &twice[..1],
            &reference[i..=i],
            TOL,
            &format!("{what} twice"),
        );
    }
}

#[test]
fn packed_edge_shapes_score_as_alone() {
    let model = load_model();
    let sequences = golden_sequences();
    let long = sequences
        .iter()
        .find(|s| s.len() == MAX_LENGTH)
        .expect("a 512-token golden sequence")
        .clone();
    let mut shorts: Vec<Vec<u32>> = sequences.iter().filter(|s| s.len() < 64).cloned().collect();
    shorts.truncate(6);
    assert!(shorts.len() >= 3, "golden has short sequences");
    // A sequence of one token (BOS alone): attends only to itself, pools over one row.
    let bos_only = vec![128_000u32];
    let one_token = alone(&model, std::slice::from_ref(&bos_only))[0];
    assert!(one_token.is_finite());

    let mut batch: Vec<Vec<u32>> = Vec::new();
    batch.push(shorts[0].clone());
    batch.push(bos_only.clone());
    batch.extend(shorts[1..].iter().cloned());
    batch.insert(2, long.clone());
    batch.push(bos_only.clone());
    let reference = alone(&model, &batch);
    assert_eq!(reference[1], one_token);
    let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
    let scores = model.score_batch(&refs).expect("packed batch");
    assert_same_scores(
        &scores,
        &reference,
        "one-token and 512-token sequences among short ones",
    );
    // Only one-token sequences: every row is its own sequence.
    let singles = model
        .score_batch(&[bos_only.as_slice(); 3])
        .expect("one-token batch");
    assert_same_scores(&singles, &[one_token; 3], "only one-token sequences");
}

async fn start_engine(max_batch_tokens: usize) -> (Engine, EngineMetrics) {
    let metrics = EngineMetrics::detached();
    let engine = within(
        Duration::from_secs(60),
        "engine start",
        Engine::start(
            Box::new(load_model()),
            Box::new(tokenizer()),
            EngineConfig {
                max_batch_tokens,
                warmup_tokens: 0,
                ..EngineConfig::default()
            },
            metrics.clone(),
        ),
    )
    .await
    .expect("engine starts");
    (engine, metrics)
}

async fn score(engine: &Engine, query: &str, documents: &[String]) -> Vec<f32> {
    within(
        Duration::from_secs(120),
        "engine score",
        engine.score(ScoreRequest {
            query: query.to_string(),
            documents: documents.to_vec(),
            ..ScoreRequest::default()
        }),
    )
    .await
    .expect("scored")
    .scores
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_mini_batches_give_the_scores_of_each_pair_alone() {
    let query = "why do rivers flood in spring?";
    let documents = golden_documents();
    let docs: Vec<&str> = documents.iter().map(String::as_str).collect();
    let sequences = tokenizer()
        .encode_pairs(query, &docs, Truncation::End)
        .expect("tokenize");
    let reference = alone(&load_model(), &sequences);
    let total_tokens: usize = sequences.iter().map(Vec::len).sum();

    let budget = 600;
    let (engine, metrics) = start_engine(budget).await;
    let scores = score(&engine, query, &documents).await;
    assert_same_scores(&scores, &reference, "one request, several mini-batches");
    let forward_passes = metrics.batch_size.get_sample_count();
    assert!(
        forward_passes as usize >= total_tokens.div_ceil(budget),
        "{total_tokens} tokens under a {budget}-token budget ran in only {forward_passes} forward passes"
    );
    assert_eq!(
        metrics.batch_size.get_sample_sum() as usize,
        documents.len()
    );

    // The same documents in other orders: each score follows its document.
    let n = documents.len();
    for (what, order) in [
        ("reversed", (0..n).rev().collect::<Vec<_>>()),
        ("rotated", (0..n).map(|i| (i + n / 3) % n).collect()),
    ] {
        let permuted: Vec<String> = order.iter().map(|&i| documents[i].clone()).collect();
        let scores = score(&engine, query, &permuted).await;
        let expected: Vec<f32> = order.iter().map(|&i| reference[i]).collect();
        assert_same_scores(&scores, &expected, what);
    }
    engine.shutdown().await;
}

/// Pairs whose lengths add up to exactly the budget run in one forward pass with no padding; one
/// token more splits them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_at_the_token_budget_runs_in_one_packed_pass() {
    let query = "why do rivers flood in spring?";
    let documents: Vec<String> = golden_documents().into_iter().take(6).collect();
    let docs: Vec<&str> = documents.iter().map(String::as_str).collect();
    let sequences = tokenizer()
        .encode_pairs(query, &docs, Truncation::End)
        .expect("tokenize");
    let reference = alone(&load_model(), &sequences);
    let total: usize = sequences.iter().map(Vec::len).sum();

    for (budget, passes) in [(total, 1u64), (total - 1, 2)] {
        let (engine, metrics) = start_engine(budget).await;
        let scores = score(&engine, query, &documents).await;
        assert_same_scores(&scores, &reference, &format!("budget {budget} of {total}"));
        assert_eq!(
            metrics.batch_size.get_sample_count(),
            passes,
            "{total} tokens under a {budget}-token budget"
        );
        assert_eq!(
            metrics.batch_padded_tokens.get_sample_sum() as usize,
            total,
            "a packed pass computes exactly the real tokens"
        );
        engine.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_get_the_scores_of_sequential_ones() {
    let documents = golden_documents();
    let requests: Vec<(String, Vec<String>)> = golden()
        .cases
        .iter()
        .enumerate()
        .map(|(i, case)| {
            // Each request: its own query, its own documents plus a slice of the others'.
            let mut docs = case.documents.clone();
            docs.extend(documents.iter().skip(i * 3).take(4).cloned());
            (case.query.clone(), docs)
        })
        .collect();

    // A budget small enough that requests share and split batches.
    let (engine, metrics) = start_engine(256).await;
    let mut sequential = Vec::new();
    for (query, docs) in &requests {
        sequential.push(score(&engine, query, docs).await);
    }
    let passes_sequential = metrics.batch_size.get_sample_count();

    let concurrent = within(
        Duration::from_secs(180),
        "concurrent requests",
        futures::future::join_all(requests.iter().map(|(query, docs)| {
            let engine = engine.clone();
            let (query, docs) = (query.clone(), docs.clone());
            tokio::spawn(async move { score(&engine, &query, &docs).await })
        })),
    )
    .await;
    let passes_concurrent = metrics.batch_size.get_sample_count() - passes_sequential;
    println!(
        "{} requests: {passes_sequential} forward passes one at a time, {passes_concurrent} concurrently",
        requests.len()
    );
    for (i, (result, expected)) in concurrent.into_iter().zip(&sequential).enumerate() {
        let scores = result.expect("request task");
        assert_same_scores(&scores, expected, &format!("concurrent request {i}"));
    }
    engine.shutdown().await;
}
