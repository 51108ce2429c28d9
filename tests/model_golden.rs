//! The model against the Hugging Face reference (`tests/fixtures/golden.json`, transformers 4.47.1,
//! f32 on CPU): token ids, scores of `CrossEncoder::score_batch` on the golden ids, and scores through
//! the `Engine` on the texts, for every golden case. Plus the `Truncation::None` error and a check
//! that the fixture files are the ones the golden file was computed from.

use crate::common;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};
use common::*;
use rerank_service::engine::{Engine, EngineConfig, EngineMetrics, ScoreRequest};
use rerank_service::model::{
    CrossEncoder, EncodePairsError, ModelConfig, ModelFiles, PairTokenizer, TokenizeWork,
    Truncation,
};

/// Golden scores are an f32 reference run; ours must agree this closely.
const TOL: f32 = 1e-4;

/// Every case `make_golden.py` writes; a case silently dropped from golden.json fails here.
const EXPECTED_CASES: &[&str] = &[
    "protein",
    "multilingual",
    "emoji",
    "empty_document",
    "empty_query",
    "truncation",
    "mixed_lengths",
    "whitespace_and_symbols",
    "long",
];

fn load_model(max_positions: usize) -> CrossEncoder {
    let files = ModelFiles::from_dir(&tiny_model_dir()).expect("tiny model files");
    let config = ModelConfig::from_file(&files.config).expect("tiny config.json");
    files
        .load_model(&config, DType::F32, &Device::Cpu, max_positions)
        .expect("tiny model loads in f32 on the CPU")
}

fn tokenizer(max_length: usize) -> PairTokenizer {
    PairTokenizer::new(plain_tokenizer().clone(), max_length).expect("tokenizer.json loads")
}

fn docs(case: &GoldenCase) -> Vec<&str> {
    case.documents.iter().map(String::as_str).collect()
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sha256sum ({e})"));
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn fixture_files_are_the_ones_golden_json_was_computed_from() {
    let text = std::fs::read_to_string(repo_root().join("tests/fixtures/golden.json"))
        .expect("tests/fixtures/golden.json");
    let meta: serde_json::Value = serde_json::from_str(&text).expect("golden.json parses");
    let dir = tiny_model_dir();
    for (key, file) in [
        ("model_safetensors_sha256", "model.safetensors"),
        ("tokenizer_sha256", "tokenizer.json"),
    ] {
        let expected = meta[key]
            .as_str()
            .unwrap_or_else(|| panic!("golden.json has no `{key}`"));
        assert_eq!(expected.len(), 64, "golden.json `{key}` is not a sha256");
        let actual = sha256_of(&dir.join(file));
        assert_eq!(
            actual, expected,
            "tests/fixtures/tiny-model/{file} does not match golden.json `{key}`: \
             run `make setup` (tokenizer) or `make golden` (model and golden scores)"
        );
    }
}

#[test]
fn golden_file_covers_every_case() {
    let golden = golden();
    let names: Vec<&str> = golden.cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, EXPECTED_CASES, "golden.json cases changed");
    for case in &golden.cases {
        assert_eq!(case.documents.len(), case.input_ids.len(), "{}", case.name);
        assert_eq!(case.documents.len(), case.scores.len(), "{}", case.name);
    }
    // The properties the cases are there for.
    let case = |name: &str| golden.cases.iter().find(|c| c.name == name).unwrap();
    assert!(case("empty_query").query.is_empty());
    assert!(case("empty_document")
        .documents
        .iter()
        .any(String::is_empty));
    assert!(case("emoji").documents.iter().any(|d| !d.is_ascii()));
    let truncation = case("truncation");
    assert!(truncation
        .input_ids
        .iter()
        .any(|ids| ids.len() == truncation.max_length));
    let lengths: Vec<usize> = case("mixed_lengths")
        .input_ids
        .iter()
        .map(Vec::len)
        .collect();
    assert!(lengths.iter().max().unwrap() >= &(10 * lengths.iter().min().unwrap()));
}

#[test]
fn tokenization_matches_golden_input_ids() {
    for case in golden().cases {
        let ids = tokenizer(case.max_length)
            .encode_pairs(&case.query, &docs(&case), Truncation::End)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(ids.len(), case.input_ids.len(), "{}", case.name);
        for (i, (ours, theirs)) in ids.iter().zip(&case.input_ids).enumerate() {
            assert_eq!(
                ours, theirs,
                "{}: token ids of document {i} differ from the HF tokenizer",
                case.name
            );
            assert_eq!(ours[0], 128_000, "{}: BOS first", case.name);
            assert_ne!(*ours.last().unwrap(), 128_001, "{}: no EOS", case.name);
        }
    }
}

/// The query half is tokenized once and joined to each document half; that must equal tokenizing
/// the whole `question:{q} \n \n passage:{d}` string, also for strings the golden cases lack
/// (queries ending in whitespace, newlines, punctuation, digits; documents starting with them).
#[test]
fn split_tokenization_equals_whole_string_tokenization() {
    let plain = plain_tokenizer();
    let pair = tokenizer(8192);
    let queries = [
        "",
        " ",
        "plain",
        "ends with space ",
        "ends with newline\n",
        "ends with crlf\r\n",
        "tab\t",
        "question?",
        "digits 12345",
        "é",
        "中文查询",
        "emoji 🍕",
        "ideographic space\u{3000}",
        "nbsp\u{a0}",
        "'s",
        "<|begin_of_text|>",
    ];
    let documents = [
        "",
        " ",
        "\n",
        "\n\nleading newlines",
        "  two spaces",
        "'ll contraction",
        "123 digits",
        "!!! punctuation",
        "ünïcödé",
        "🍕🍕",
        "<|end_of_text|>",
    ];
    for query in queries {
        let joined = pair
            .encode_pairs(query, &documents, Truncation::None)
            .expect("encode_pairs");
        for (doc, ids) in documents.iter().zip(&joined) {
            let whole = plain
                .encode(format!("question:{query} \n \n passage:{doc}"), true)
                .expect("encode");
            assert_eq!(
                ids.as_slice(),
                whole.get_ids(),
                "query {query:?} + document {doc:?}: split tokenization differs"
            );
        }
    }
}

#[test]
fn score_batch_on_golden_ids_matches_reference() {
    let model = load_model(512);
    for case in golden().cases {
        let sequences: Vec<&[u32]> = case.input_ids.iter().map(Vec::as_slice).collect();
        let scores = model
            .score_batch(&sequences)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_close(&scores, &case.scores, TOL, &case.name);
        let worst = scores
            .iter()
            .zip(&case.scores)
            .map(|(a, e)| (a - e).abs())
            .fold(0.0f32, f32::max);
        println!("{:<24} max |score - reference| = {worst:.2e}", case.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_on_golden_texts_matches_reference() {
    for case in golden().cases {
        let engine = within(
            std::time::Duration::from_secs(60),
            "engine start",
            Engine::start(
                Box::new(load_model(case.max_length)),
                Box::new(tokenizer(case.max_length)),
                EngineConfig {
                    warmup_tokens: 0,
                    ..EngineConfig::default()
                },
                EngineMetrics::detached(),
            ),
        )
        .await
        .expect("engine starts");
        let response = within(
            std::time::Duration::from_secs(60),
            "engine score",
            engine.score(ScoreRequest {
                query: case.query.clone(),
                documents: case.documents.clone(),
                ..ScoreRequest::default()
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        engine.shutdown().await;
        assert_close(&response.scores, &case.scores, TOL, &case.name);
        let tokens: usize = case.input_ids.iter().map(Vec::len).sum();
        assert_eq!(response.tokens, tokens, "{}: tokens read", case.name);
    }
}

#[test]
fn truncate_none_names_the_document_and_bounds_its_token_count() {
    let case = golden()
        .cases
        .into_iter()
        .find(|c| c.name == "truncation")
        .expect("truncation case");
    let full: Vec<usize> = tokenizer(8192)
        .encode_pairs(&case.query, &docs(&case), Truncation::None)
        .expect("untruncated")
        .iter()
        .map(Vec::len)
        .collect();
    assert!(full[0] > case.max_length && full[2] <= case.max_length);

    let strict = tokenizer(case.max_length);
    let err = strict
        .encode_pairs(&case.query, &docs(&case), Truncation::None)
        .expect_err("document 0 is too long");
    let EncodePairsError::TooLong(too_long) = err else {
        panic!("expected TooLong, got {err}");
    };
    // Tokenizing stops once the pair is known to be too long: the count is exact, or a lower
    // bound above max_length.
    assert_eq!(
        (too_long.doc_index, too_long.max_length),
        (0, case.max_length)
    );
    assert!(
        too_long.tokens > case.max_length && too_long.tokens <= full[0],
        "{too_long:?}, full count {}",
        full[0]
    );
    assert_eq!(too_long.exact, too_long.tokens == full[0], "{too_long:?}");
    let message = too_long.to_string();
    assert!(message.contains("document 0"), "{message}");
    assert!(message.contains(&too_long.tokens.to_string()), "{message}");

    // The first offender after a document that fits is named by its own index.
    let short_first = [case.documents[2].as_str(), case.documents[1].as_str()];
    match strict.encode_pairs(&case.query, &short_first, Truncation::None) {
        Err(EncodePairsError::TooLong(t)) => {
            assert_eq!(t.doc_index, 1);
            assert!(t.tokens > case.max_length && t.tokens <= full[1], "{t:?}");
            assert!(t.to_string().contains("document 1"), "{t}");
        }
        other => panic!("expected TooLong for document 1, got {other:?}"),
    }

    // Exactly max_length tokens fits; one fewer allowed token does not.
    let exact = tokenizer(full[2])
        .encode_pairs(&case.query, &[case.documents[2].as_str()], Truncation::None)
        .expect("a pair of exactly max_length tokens fits");
    assert_eq!(exact[0].len(), full[2]);
    assert!(tokenizer(full[2] - 1)
        .encode_pairs(&case.query, &[case.documents[2].as_str()], Truncation::None)
        .is_err());
}

/// A document far longer than max_length is tokenized only up to a safe cut; the pair must come
/// out exactly as tokenizing the whole text and truncating it.
#[test]
fn long_documents_cut_before_tokenizing_give_the_same_tokens() {
    let plain = plain_tokenizer();
    let words = [
        "Reranking",
        "déjà-vu,",
        "   spaced",
        "中文",
        "x",
        "12345",
        "\n\n",
        "it's",
        "🍕",
        "end.",
        "\t",
        "URL:https://example.com/a?b=c",
        "Ünïcode",
        "--",
        "a",
        "THE",
    ];
    for (max_length, pieces) in [(16usize, 2_000usize), (128, 5_000), (512, 40_000)] {
        let document: String = (0..pieces)
            .map(|i| words[(i * 7 + i / 3) % words.len()])
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            document.len() > max_length * 16,
            "the document must be long enough to be cut"
        );
        let query = "what is reranking?";
        let pair = tokenizer(max_length);
        let got = pair
            .encode_pairs(query, &[document.as_str()], Truncation::End)
            .expect("encode_pairs");
        let text = format!("question:{query} \n \n passage:{document}");
        let mut expected = plain.encode(text, true).expect("encode").get_ids().to_vec();
        expected.truncate(max_length);
        assert_eq!(got[0], expected, "max_length {max_length}");
    }
}

/// Whole-text tokenization of `[BOS] question:{query} \n \n passage:{document}`, cut at
/// `max_length`: what Hugging Face does, at whatever cost.
fn reference_pair(query: &str, document: &str, max_length: usize) -> Vec<u32> {
    let plain = plain_tokenizer();
    let text = format!("question:{query} \n \n passage:{document}");
    let mut ids = plain.encode(text, true).expect("encode").get_ids().to_vec();
    ids.truncate(max_length);
    ids
}

/// Documents built from pieces that stress the safe cuts: letters of many scripts next to digits,
/// punctuation, whitespace runs, contractions, emoji and added (special) tokens.
fn stress_document(seed: usize, pieces: usize) -> String {
    const PIECES: &[&str] = &[
        "Reranking",
        "déjà",
        "-vu,",
        "   ",
        "中文",
        "，",
        "日本語",
        "。",
        "x",
        "12345",
        "\n\n",
        "it's",
        "THEY'LL",
        "'d",
        "🍕",
        "end.",
        "\t",
        "https://example.com/a?b=c",
        "Ünïcode",
        "--",
        "a",
        "<|eot_id|>",
        "<|begin_of_text|>",
        "Привет",
        "мир",
        "!",
        "١٢٣",
        "ক্ষ",
        "नमस्ते",
        " ",
        "ﬁ",
        "Ⅻ",
        "x\u{301}",
        "_",
        "'",
        "ab'",
        "s",
    ];
    let mut state = (seed as u64).wrapping_mul(6364136223846793005) ^ 1442695040888963407;
    (0..pieces)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            PIECES[(state >> 33) as usize % PIECES.len()]
        })
        .collect()
}

/// Cutting a long text before tokenizing it must give exactly the whole text's first tokens, for
/// every script and separator, and for queries that alone overflow the window.
#[test]
fn bounded_tokenization_gives_the_whole_texts_first_tokens() {
    for max_length in [8usize, 16, 64, 512] {
        let pair = tokenizer(max_length);
        for seed in 0..24 {
            let document = stress_document(seed, max_length * 6 + 40);
            let query = if seed % 4 == 0 {
                stress_document(seed + 1000, max_length * 4)
            } else {
                "what is reranking?".to_string()
            };
            let got = pair
                .encode_pairs(&query, &[document.as_str()], Truncation::End)
                .expect("encode_pairs");
            assert_eq!(
                got[0],
                reference_pair(&query, &document, max_length),
                "max_length {max_length}, seed {seed}"
            );
        }
    }
}

/// Tokenizing costs O(max_length), not O(document), in both modes: a 5 MB document is cut or
/// refused for about what a 5 KB one costs, counted in bytes handed to the tokenizer.
#[test]
fn tokenization_work_is_bounded_by_max_length_not_by_the_text() {
    const MAX_LENGTH: usize = 512;
    /// The documented bound per text: (max_length + 1) × the longest token (128 bytes in Llama 3),
    /// plus the template's own words.
    const BOUND: u64 = (MAX_LENGTH as u64 + 1) * 128 + 16;
    let pair = tokenizer(MAX_LENGTH);
    let work = |query: &str, document: &str, truncation| {
        let mut work = TokenizeWork::default();
        let result = pair
            .encode_counting(query, &[document], truncation, &mut work)
            .map(|pairs| pairs.into_iter().map(|p| p.ids).collect::<Vec<_>>());
        (result, work)
    };
    let small = "word ".repeat(1_000);
    let texts = [
        ("5 MB of words", "word ".repeat(1_000_000)),
        ("5 MB of one letter", "a".repeat(5_000_000)),
        ("5 MB of CJK without spaces", "中文".repeat(800_000)),
        ("5 MB of spaces", " ".repeat(5_000_000)),
        ("5 MB of digits", "1234567890".repeat(500_000)),
        ("5 MB of emoji", "🍕".repeat(1_250_000)),
    ];
    let (_, small_end) = work("q", &small, Truncation::End);
    let (small_none, small_none_work) = work("q", &small, Truncation::None);
    assert!(
        matches!(small_none, Err(EncodePairsError::TooLong(_))),
        "5 KB of words is over 512 tokens"
    );
    for (name, big) in &texts {
        let (end, end_work) = work("q", big, Truncation::End);
        let ids = end.unwrap_or_else(|e| panic!("{name}: END must score: {e}"));
        assert_eq!(ids[0].len(), MAX_LENGTH, "{name}: cut at max_length");
        assert!(
            end_work.bytes <= BOUND,
            "{name}: END tokenized {end_work:?}"
        );
        let (none, none_work) = work("q", big, Truncation::None);
        match none {
            Err(EncodePairsError::TooLong(t)) => {
                assert_eq!(t.doc_index, 0);
                assert!(t.tokens > MAX_LENGTH, "{name}: {t}");
            }
            other => panic!("{name}: NONE must refuse, got {other:?}"),
        }
        assert!(
            none_work.bytes <= small_none_work.bytes,
            "{name}: refusing 5 MB ({none_work:?}) must cost no more than 5 KB ({small_none_work:?})"
        );
        // A word-rich 5 MB document costs what the 5 KB one does.
        if *name == "5 MB of words" {
            assert_eq!(end_work, small_end, "{name}");
        }
        // The same bound holds for the query half.
        let (query_end, query_work) = work(big, "d", Truncation::End);
        assert_eq!(query_end.expect("END")[0].len(), MAX_LENGTH, "{name}");
        assert!(query_work.bytes <= BOUND, "{name}: query {query_work:?}");
        let (query_none, _) = work(big, "d", Truncation::None);
        assert!(
            matches!(query_none, Err(EncodePairsError::TooLong(_))),
            "{name}: an overlong query under NONE"
        );
    }
    // The cut pair is exactly what tokenizing everything and truncating gives.
    let (end, _) = work("q", &texts[0].1, Truncation::End);
    assert_eq!(
        end.expect("END")[0],
        reference_pair("q", &texts[0].1, MAX_LENGTH)
    );
}
