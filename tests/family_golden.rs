//! The BERT and XLM-RoBERTa families against transformers 4.47.1 (`tests/fixtures/golden_families.json`,
//! written by `make_golden_families.py`) and ModernBERT against transformers 4.51.3
//! (`tests/fixtures/golden_modernbert.json`, written by `make_golden_modernbert.py`, mean and CLS
//! pooling): token ids and token types exactly, scores within 1e-4 (f32, CPU), batch invariance
//! (1e-5), truncation END (`longest_first`) and NONE, CHUNK refused, tokenization bounded by
//! `max_length`, `rerank score --model DIR` end to end, and the configs a family cannot run refused.
//!
//! Qwen3-Reranker against transformers 4.51.3 and the model card's code (`golden_qwen3.json`,
//! written by `make_golden_qwen3.py`): the same checks, plus P(yes) = sigmoid(score), a custom
//! instruction, and batch invariance across causal sequences packed together.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device};
use common::*;
use rerank_service::model::family::qwen3_prompt::{Qwen3PromptTokenizer, DEFAULT_INSTRUCTION};
use rerank_service::model::family::{self, Family, LoadOptions};
use rerank_service::model::{
    EncodePairsError, LoadedModel, ModelError, ModelFiles, SequenceRef, TokenizeWork, Truncation,
    UnsupportedPair,
};
use serde::Deserialize;

const TOL: f32 = 1e-4;
const BATCH_TOL: f32 = 1e-5;

#[derive(Debug, Deserialize)]
struct Golden {
    transformers: String,
    families: Vec<FamilyGolden>,
}

#[derive(Debug, Deserialize)]
struct FamilyGolden {
    family: String,
    model_dir: String,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    query: String,
    documents: Vec<String>,
    max_length: usize,
    truncation: String,
    #[serde(default)]
    refused_doc: Option<usize>,
    #[serde(default)]
    ids: Vec<Vec<u32>>,
    #[serde(default)]
    type_ids: Vec<Vec<u32>>,
    #[serde(default)]
    scores: Vec<f32>,
}

/// `golden_modernbert.json`: one model directory, read as written and with config overrides.
#[derive(Debug, Deserialize)]
struct ModernBertGolden {
    transformers: String,
    variants: Vec<ModernBertVariant>,
}

#[derive(Debug, Deserialize)]
struct ModernBertVariant {
    variant: String,
    model_dir: String,
    config_overrides: serde_json::Map<String, serde_json::Value>,
    cases: Vec<Case>,
}

fn golden() -> Golden {
    let path = repo_root().join("tests/fixtures/golden_families.json");
    let text = std::fs::read_to_string(&path).expect("golden_families.json (make golden)");
    serde_json::from_str(&text).expect("golden_families.json parses")
}

fn model_dir(dir: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(dir)
}

fn load(dir: &str, max_length: usize) -> LoadedModel {
    load_path(&model_dir(dir), max_length)
}

fn load_path(dir: &Path, max_length: usize) -> LoadedModel {
    try_load(dir, DType::F32, max_length).expect("model loads")
}

fn try_load(dir: &Path, dtype: DType, max_length: usize) -> Result<LoadedModel, ModelError> {
    let files = ModelFiles::from_dir(dir).expect("model files");
    family::load(&files, None, dtype, &Device::Cpu, max_length)
}

fn modernbert_golden() -> ModernBertGolden {
    let path = repo_root().join("tests/fixtures/golden_modernbert.json");
    let text = std::fs::read_to_string(&path).expect("golden_modernbert.json (make golden)");
    serde_json::from_str(&text).expect("golden_modernbert.json parses")
}

/// A copy of the fixture model `dir` whose config.json has `overrides` applied.
fn model_with_config(
    dir: &str,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(model_dir(dir)).expect("fixture dir") {
        let entry = entry.expect("dir entry");
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).expect("copy fixture");
    }
    let path = copy.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config.json")).expect("JSON");
    for (key, value) in overrides {
        config[key] = value.clone();
    }
    std::fs::write(&path, config.to_string()).expect("write config.json");
    copy
}

fn truncation(name: &str) -> Truncation {
    match name {
        "END" => Truncation::End,
        "NONE" => Truncation::None,
        other => panic!("unknown truncation {other}"),
    }
}

/// Checks `cases` against the model in `dir`: token ids and types exactly, scores within [`TOL`]
/// alone, and the same in a batch and a reversed batch (within [`BATCH_TOL`]); returns the largest
/// score difference from transformers.
fn check_cases(name: &str, dir: &Path, cases: &[Case], expected_family: Family) -> f32 {
    let mut worst = 0f32;
    for case in cases {
        let what = format!("{name} / {}", case.name);
        let loaded = load_path(dir, case.max_length);
        assert_eq!(loaded.family, expected_family, "{what}");
        assert_eq!(loaded.reranker.family(), expected_family, "{what}");
        let docs: Vec<&str> = case.documents.iter().map(String::as_str).collect();
        let mut work = TokenizeWork::default();
        let encoded = loaded.encoder.encode_pairs_counting(
            &case.query,
            &docs,
            truncation(&case.truncation),
            &mut work,
        );
        if let Some(refused) = case.refused_doc {
            match encoded {
                Err(EncodePairsError::TooLong(t)) => {
                    assert_eq!(t.doc_index, refused, "{what}");
                    assert!(t.tokens > case.max_length, "{what}: {t}");
                }
                other => panic!("{what}: expected document {refused} refused, got {other:?}"),
            }
            continue;
        }
        let pairs = encoded.unwrap_or_else(|e| panic!("{what}: {e}"));
        let ids: Vec<Vec<u32>> = pairs.iter().map(|p| p.ids.clone()).collect();
        assert_eq!(ids, case.ids, "{what}: token ids");
        for (pair, types) in pairs.iter().zip(&case.type_ids) {
            let ours: Vec<u32> = (0..pair.ids.len())
                .map(|i| u32::from(i >= pair.second_segment))
                .collect();
            assert_eq!(&ours, types, "{what}: token types");
        }
        let sequences: Vec<SequenceRef<'_>> = pairs
            .iter()
            .map(|p| SequenceRef {
                ids: &p.ids,
                second_segment: p.second_segment,
            })
            .collect();
        let alone: Vec<f32> = sequences
            .iter()
            .map(|s| loaded.reranker.score_sequences(&[*s]).expect("score")[0])
            .collect();
        assert_close(&alone, &case.scores, TOL, &what);
        for (a, b) in alone.iter().zip(&case.scores) {
            worst = worst.max((a - b).abs());
        }
        // The same pairs in one padded batch, and reversed.
        let batched = loaded.reranker.score_sequences(&sequences).expect("batch");
        assert_close(&batched, &alone, BATCH_TOL, &format!("{what}: batch"));
        let reversed: Vec<SequenceRef<'_>> = sequences.iter().rev().copied().collect();
        let mut back = loaded.reranker.score_sequences(&reversed).expect("batch");
        back.reverse();
        assert_close(&back, &alone, BATCH_TOL, &format!("{what}: reversed batch"));
    }
    worst
}

#[test]
fn every_family_matches_transformers() {
    let golden = golden();
    assert_eq!(golden.transformers, "4.47.1");
    let families: Vec<&str> = golden.families.iter().map(|f| f.family.as_str()).collect();
    assert_eq!(families, ["bert", "xlm-roberta"]);
    for fam in &golden.families {
        let expected_family = match fam.family.as_str() {
            "bert" => Family::Bert,
            _ => Family::XlmRoberta,
        };
        let worst = check_cases(
            &fam.family,
            &model_dir(&fam.model_dir),
            &fam.cases,
            expected_family,
        );
        eprintln!("{}: max |score - transformers| = {worst:e}", fam.family);
    }
}

/// What a forward pass computes, as the engine reports it (`rerank_batch_padded_tokens`): the
/// packed families their real tokens, ModernBERT every sequence padded to the longest.
#[test]
fn each_family_reports_the_tokens_its_forward_pass_computes() {
    let (short, long) = ([2u32, 5, 3], [2u32, 5, 6, 7, 8, 9, 3]);
    let sequences = [SequenceRef::single(&short), SequenceRef::single(&long)];
    for (dir, computed) in [
        ("bert-tiny", 10),
        ("xlmr-tiny", 10),
        ("modernbert-tiny", 14),
    ] {
        let loaded = load(dir, 64);
        assert_eq!(
            loaded.reranker.computed_tokens(&sequences),
            computed,
            "{dir}"
        );
        assert_eq!(
            loaded
                .reranker
                .score_sequences(&sequences)
                .expect("scores")
                .len(),
            2
        );
    }
}

#[test]
fn tokenizing_is_bounded_by_max_length_not_by_the_document() {
    for dir in ["bert-tiny", "xlmr-tiny", "modernbert-tiny"] {
        let loaded = load(dir, 64);
        let sentence = "Rerankers reorder passages; 東京 and Москва too, naïve café. ";
        let small = sentence.repeat(60); // ~4 KB
        let huge = sentence.repeat(80_000); // ~5 MB
        let mut small_work = TokenizeWork::default();
        let mut huge_work = TokenizeWork::default();
        let encode = |doc: &str, work: &mut TokenizeWork| {
            loaded
                .encoder
                .encode_pairs_counting("what reorders passages?", &[doc], Truncation::End, work)
                .expect("END never refuses")
        };
        let a = encode(&small, &mut small_work);
        let b = encode(&huge, &mut huge_work);
        assert_eq!(
            a[0].ids, b[0].ids,
            "{dir}: the first tokens do not depend on the rest"
        );
        assert_eq!(a[0].ids.len(), 64, "{dir}");
        assert!(
            huge_work.bytes <= 64 * 1024,
            "{dir}: a 5 MB document cost {} tokenized bytes",
            huge_work.bytes
        );
        let mut none_work = TokenizeWork::default();
        let refused =
            loaded
                .encoder
                .encode_pairs_counting("q", &[&huge], Truncation::None, &mut none_work);
        assert!(
            matches!(refused, Err(EncodePairsError::TooLong(_))),
            "{dir}"
        );
        assert!(none_work.bytes <= 64 * 1024, "{dir}: {}", none_work.bytes);
        let chunk = loaded.encoder.encode_pairs_counting(
            "q",
            &["d"],
            Truncation::Chunk(Default::default()),
            &mut TokenizeWork::default(),
        );
        assert!(
            matches!(
                chunk,
                Err(EncodePairsError::Unsupported(UnsupportedPair::Chunk { .. }))
            ),
            "{dir}: {chunk:?}"
        );
    }
}

/// `rerank score --model DIR` on the case's query and documents, at the CLI defaults.
fn rerank_score(dir: &Path, case: &Case, what: &str) {
    assert_eq!(
        case.max_length, 512,
        "{what}: the first case runs at the CLI default"
    );
    let mut child = Command::new(rerank_bin())
        .arg("score")
        .arg("--model")
        .arg(dir)
        .env_remove("RERANK_MAX_LENGTH")
        .env_remove("RERANK_DTYPE")
        .env_remove("RERANK_TOKENIZER")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rerank starts");
    let input = serde_json::json!({"query": case.query, "documents": case.documents});
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(input.to_string().as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("rerank finishes");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let scores: Vec<f32> = serde_json::from_value(value["scores"].clone()).expect("scores");
    assert_close(&scores, &case.scores, TOL, what);
}

#[test]
fn rerank_score_serves_every_family() {
    let golden = golden();
    for fam in &golden.families {
        rerank_score(&model_dir(&fam.model_dir), &fam.cases[0], &fam.family);
    }
    let modernbert = modernbert_golden();
    let mean = &modernbert.variants[0];
    assert!(mean.config_overrides.is_empty());
    rerank_score(&model_dir(&mean.model_dir), &mean.cases[0], "modernbert");
}

#[test]
fn modernbert_matches_transformers() {
    let golden = modernbert_golden();
    assert_eq!(golden.transformers, "4.51.3");
    let variants: Vec<&str> = golden.variants.iter().map(|v| v.variant.as_str()).collect();
    assert_eq!(variants, ["mean", "cls"], "both poolings");
    for variant in &golden.variants {
        let copy = model_with_config(&variant.model_dir, &variant.config_overrides);
        let name = format!("modernbert ({} pooling)", variant.variant);
        let worst = check_cases(&name, copy.path(), &variant.cases, Family::ModernBert);
        eprintln!("{name}: max |score - transformers| = {worst:e}");
    }
}

#[test]
fn modernbert_refuses_what_it_cannot_run() {
    let refused = |overrides: serde_json::Value, dtype: DType| {
        let copy = model_with_config("modernbert-tiny", overrides.as_object().expect("object"));
        try_load(copy.path(), dtype, 512).expect_err("refused")
    };
    // A checkpoint without the sequence-classification head.
    let e = refused(
        serde_json::json!({"architectures": ["ModernBertForMaskedLM"]}),
        DType::F32,
    );
    assert!(
        matches!(&e, ModelError::UnsupportedFamily { model_type, architectures, .. }
            if model_type == "modernbert" && architectures == "ModernBertForMaskedLM"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("ModernBertForSequenceClassification"),
        "{e}"
    );
    // Options candle-transformers' encoder would silently ignore, and dtypes it cannot run.
    for (overrides, dtype, field) in [
        (
            serde_json::json!({"attention_bias": true}),
            DType::F32,
            "attention_bias",
        ),
        (
            serde_json::json!({"hidden_activation": "silu"}),
            DType::F32,
            "hidden_activation",
        ),
        (serde_json::json!({}), DType::BF16, "dtype"),
    ] {
        let e = refused(overrides, dtype);
        assert!(
            matches!(&e, ModelError::Unsupported { field: f, .. } if *f == field),
            "{field}: {e}"
        );
    }
    // A classifier with more than one label is not a reranker.
    let e = refused(
        serde_json::json!({"id2label": {"0": "no", "1": "yes"}}),
        DType::F32,
    );
    assert!(matches!(e, ModelError::Config { .. }), "{e}");
    // Past the position table.
    let e = refused(
        serde_json::json!({"max_position_embeddings": 256}),
        DType::F32,
    );
    assert!(matches!(e, ModelError::MaxLength { max: 256, .. }), "{e}");
}

// ---- Qwen3-Reranker ----

#[derive(Debug, Deserialize)]
struct Qwen3Golden {
    transformers: String,
    model_dir: String,
    default_instruction: String,
    yes_id: u32,
    no_id: u32,
    prefix_ids: Vec<u32>,
    suffix_ids: Vec<u32>,
    cases: Vec<Qwen3Case>,
}

#[derive(Debug, Deserialize)]
struct Qwen3Case {
    name: String,
    instruction: Option<String>,
    query: String,
    documents: Vec<String>,
    max_length: usize,
    truncation: String,
    #[serde(default)]
    refused_doc: Option<usize>,
    #[serde(default)]
    ids: Vec<Vec<u32>>,
    #[serde(default)]
    scores: Vec<f32>,
    #[serde(default)]
    probabilities: Vec<f32>,
}

fn qwen3_golden() -> Qwen3Golden {
    let path = repo_root().join("tests/fixtures/golden_qwen3.json");
    let text = std::fs::read_to_string(&path).expect("golden_qwen3.json (make golden)");
    serde_json::from_str(&text).expect("golden_qwen3.json parses")
}

fn load_qwen3(dir: &str, max_length: usize, instruction: Option<&str>) -> LoadedModel {
    let files = ModelFiles::from_dir(&model_dir(dir)).expect("model files");
    let options = LoadOptions {
        instruction: instruction.map(str::to_string),
    };
    family::load_with(&files, None, DType::F32, &Device::Cpu, max_length, &options)
        .expect("model loads")
}

#[test]
fn qwen3_matches_the_model_card() {
    let golden = qwen3_golden();
    assert_eq!(golden.transformers, "4.51.3");
    assert_eq!(golden.default_instruction, DEFAULT_INSTRUCTION);
    let tokenizer = Qwen3PromptTokenizer::from_file(
        &model_dir(&golden.model_dir).join("tokenizer.json"),
        512,
        None,
    )
    .expect("tokenizer loads");
    let answers = tokenizer.answers();
    assert_eq!((answers.yes, answers.no), (golden.yes_id, golden.no_id));
    let mut worst = 0f32;
    let mut all_ids: Vec<Vec<u32>> = Vec::new();
    let mut all_scores: Vec<f32> = Vec::new();
    for case in &golden.cases {
        let what = format!("qwen3 / {}", case.name);
        let loaded = load_qwen3(
            &golden.model_dir,
            case.max_length,
            case.instruction.as_deref(),
        );
        assert_eq!(loaded.family, Family::Qwen3, "{what}");
        assert_eq!(loaded.reranker.family(), Family::Qwen3, "{what}");
        let docs: Vec<&str> = case.documents.iter().map(String::as_str).collect();
        let encoded = loaded.encoder.encode_pairs_counting(
            &case.query,
            &docs,
            truncation(&case.truncation),
            &mut TokenizeWork::default(),
        );
        if let Some(refused) = case.refused_doc {
            match encoded {
                Err(EncodePairsError::TooLong(t)) => {
                    assert_eq!(t.doc_index, refused, "{what}");
                    assert!(t.tokens > case.max_length, "{what}: {t}");
                }
                other => panic!("{what}: expected document {refused} refused, got {other:?}"),
            }
            continue;
        }
        let pairs = encoded.unwrap_or_else(|e| panic!("{what}: {e}"));
        let ids: Vec<Vec<u32>> = pairs.iter().map(|p| p.ids.clone()).collect();
        assert_eq!(ids, case.ids, "{what}: token ids");
        for pair in &ids {
            assert!(pair.starts_with(&golden.prefix_ids), "{what}: prefix");
            assert!(pair.ends_with(&golden.suffix_ids), "{what}: suffix");
            assert!(pair.len() <= case.max_length, "{what}: length");
        }
        let sequences: Vec<SequenceRef<'_>> =
            ids.iter().map(|ids| SequenceRef::single(ids)).collect();
        let alone: Vec<f32> = sequences
            .iter()
            .map(|s| loaded.reranker.score_sequences(&[*s]).expect("score")[0])
            .collect();
        assert_close(&alone, &case.scores, TOL, &what);
        for (a, b) in alone.iter().zip(&case.scores) {
            worst = worst.max((a - b).abs());
        }
        // `normalize: true` is the sidecar's sigmoid of the raw score: the card's P(yes).
        let probabilities: Vec<f32> = alone
            .iter()
            .map(|&s| rerank_service::sidecar::routes::sigmoid(s))
            .collect();
        assert_close(
            &probabilities,
            &case.probabilities,
            TOL,
            &format!("{what}: P(yes)"),
        );
        let batched = loaded.reranker.score_sequences(&sequences).expect("batch");
        assert_close(&batched, &alone, BATCH_TOL, &format!("{what}: batch"));
        all_ids.extend(ids.iter().cloned());
        all_scores.extend(alone);
    }
    eprintln!("qwen3: max |score - transformers| = {worst:e}");

    // Every pair of every case packed into one causal batch, forwards and backwards, with a
    // one-token sequence in between: a query that saw a key of another sequence would move.
    let loaded = load_qwen3(&golden.model_dir, 512, None);
    let one = [golden.yes_id];
    let mut sequences: Vec<SequenceRef<'_>> =
        all_ids.iter().map(|ids| SequenceRef::single(ids)).collect();
    sequences.insert(sequences.len() / 2, SequenceRef::single(&one));
    let mut batched = loaded.reranker.score_sequences(&sequences).expect("batch");
    batched.remove(sequences.len() / 2);
    assert_close(
        &batched,
        &all_scores,
        BATCH_TOL,
        "qwen3: every pair in one batch",
    );
    sequences.reverse();
    let mut reversed = loaded.reranker.score_sequences(&sequences).expect("batch");
    reversed.reverse();
    reversed.remove(sequences.len() / 2);
    assert_close(&reversed, &all_scores, BATCH_TOL, "qwen3: reversed batch");
}

#[test]
fn qwen3_tokenizing_is_bounded_by_max_length_not_by_the_text() {
    let golden = qwen3_golden();
    let loaded = load_qwen3(&golden.model_dir, 128, None);
    let sentence = "Rerankers reorder passages; 東京 and Москва too, naïve café. ";
    let small = sentence.repeat(60); // ~4 KB
    let huge = sentence.repeat(80_000); // ~5 MB
    let encode = |query: &str, doc: &str, truncation, work: &mut TokenizeWork| {
        loaded
            .encoder
            .encode_pairs_counting(query, &[doc], truncation, work)
    };
    let mut small_work = TokenizeWork::default();
    let mut huge_work = TokenizeWork::default();
    let a = encode("what reorders?", &small, Truncation::End, &mut small_work).expect("END");
    let b = encode("what reorders?", &huge, Truncation::End, &mut huge_work).expect("END");
    assert_eq!(
        a[0].ids, b[0].ids,
        "the first tokens do not depend on the rest"
    );
    assert_eq!(a[0].ids.len(), 128);
    assert!(
        a[0].ids.ends_with(&golden.suffix_ids),
        "the suffix survives"
    );
    assert!(
        huge_work.bytes <= 64 * 1024,
        "a 5 MB document cost {} tokenized bytes",
        huge_work.bytes
    );
    // A 5 MB query: the body is its first tokens, whatever the document.
    let mut query_work = TokenizeWork::default();
    let c = encode(&huge, "d", Truncation::End, &mut query_work).expect("END");
    assert_eq!(c[0].ids.len(), 128);
    assert!(query_work.bytes <= 64 * 1024, "{}", query_work.bytes);
    for (query, doc) in [("q", huge.as_str()), (huge.as_str(), "d")] {
        let mut work = TokenizeWork::default();
        let refused = encode(query, doc, Truncation::None, &mut work);
        assert!(
            matches!(refused, Err(EncodePairsError::TooLong(_))),
            "{refused:?}"
        );
        assert!(work.bytes <= 64 * 1024, "{}", work.bytes);
    }
    let chunk = encode(
        "q",
        "d",
        Truncation::Chunk(Default::default()),
        &mut TokenizeWork::default(),
    );
    assert!(
        matches!(
            chunk,
            Err(EncodePairsError::Unsupported(UnsupportedPair::Chunk { .. }))
        ),
        "{chunk:?}"
    );
}

#[test]
fn qwen3_load_errors_are_typed() {
    let golden = qwen3_golden();
    let files = ModelFiles::from_dir(&model_dir(&golden.model_dir)).expect("model files");
    // The Llama 3 tokenizer is no Qwen3 chat tokenizer.
    let llama = repo_root().join("tests/fixtures/tokenizer/tokenizer.json");
    let e = family::load(&files, Some(&llama), DType::F32, &Device::Cpu, 512).unwrap_err();
    assert!(
        matches!(&e, ModelError::Tokenizer { message, .. } if message.contains("<|im_start|>")),
        "{e}"
    );
    // No room for a body after the prompt.
    let e = family::load(&files, None, DType::F32, &Device::Cpu, 70).unwrap_err();
    assert!(e.to_string().contains("leaves no room"), "{e}");
    // An instruction for a family without one.
    let bert = ModelFiles::from_dir(&model_dir("bert-tiny")).expect("bert files");
    let options = LoadOptions {
        instruction: Some("x".into()),
    };
    let e = family::load_with(&bert, None, DType::F32, &Device::Cpu, 64, &options).unwrap_err();
    assert!(
        matches!(e, ModelError::InstructionUnsupported { family: "bert" }),
        "{e}"
    );
}

#[test]
fn rerank_score_serves_qwen3_with_its_instruction() {
    let golden = qwen3_golden();
    for case in golden.cases.iter().filter(|c| c.max_length == 512) {
        let mut command = Command::new(rerank_bin());
        command
            .arg("score")
            .arg("--model")
            .arg(model_dir(&golden.model_dir))
            .env_remove("RERANK_MAX_LENGTH")
            .env_remove("RERANK_DTYPE")
            .env_remove("RERANK_TOKENIZER")
            .env_remove("RERANK_INSTRUCTION")
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(instruction) = &case.instruction {
            command.arg("--instruction").arg(instruction);
        }
        let mut child = command.spawn().expect("rerank starts");
        let input = serde_json::json!({"query": case.query, "documents": case.documents});
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(input.to_string().as_bytes())
                .expect("write stdin");
        }
        let out = child.wait_with_output().expect("rerank finishes");
        assert!(
            out.status.success(),
            "{}: {}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let scores: Vec<f32> = serde_json::from_value(value["scores"].clone()).expect("scores");
        assert_close(&scores, &case.scores, TOL, &case.name);
    }
}

/// Half precision on the CPU takes the path CUDA takes (q/k norms on the unfused rows, candle's
/// `rope_thd`, the per-sequence causal attention): close to the f32 reference, and a pair scores
/// the same alone or in a batch.
#[test]
fn qwen3_half_precision_takes_the_per_sequence_path() {
    let golden = qwen3_golden();
    let case = &golden.cases[0];
    let files = ModelFiles::from_dir(&model_dir(&golden.model_dir)).expect("model files");
    let loaded = family::load(&files, None, DType::F16, &Device::Cpu, case.max_length)
        .expect("model loads in f16");
    let sequences: Vec<SequenceRef<'_>> = case
        .ids
        .iter()
        .map(|ids| SequenceRef::single(ids))
        .collect();
    let alone: Vec<f32> = sequences
        .iter()
        .map(|s| loaded.reranker.score_sequences(&[*s]).expect("score")[0])
        .collect();
    let worst = alone
        .iter()
        .zip(&case.scores)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("qwen3 f16: max |score - transformers f32| = {worst:e}");
    assert_close(&alone, &case.scores, 0.1, "qwen3 f16");
    let batched = loaded.reranker.score_sequences(&sequences).expect("batch");
    let spread = batched
        .iter()
        .zip(&alone)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("qwen3 f16: max |batch - alone| = {spread:e}");
    assert_close(&batched, &alone, 1e-2, "qwen3 f16: batch");
}
