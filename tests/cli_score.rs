//! The `rerank score` contract, end to end through the binary: JSON `{query, documents}` on stdin,
//! `{"scores": [...], "ranked_indices": [...]}` on stdout; errors exit non-zero with one line on
//! stderr. Also sharded weights and the CPU throughput on the tiny model.

use crate::common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use common::*;
use rerank_service::model::{PairTokenizer, Truncation};

const TOL: f32 = 1e-4;

/// What one `rerank score` run left behind.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn scores(&self) -> Vec<f32> {
        assert_eq!(self.code, Some(0), "rerank score failed: {}", self.stderr);
        let value: serde_json::Value = serde_json::from_str(&self.stdout).expect("stdout is JSON");
        serde_json::from_value(value["scores"].clone()).expect("scores are numbers")
    }

    /// Non-zero exit, nothing on stdout, exactly one line on stderr, naming every `needle`.
    fn assert_error(&self, what: &str, needles: &[&str]) {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "{what}: exit {:?}, stdout {:?}",
            self.code,
            self.stdout
        );
        assert!(
            self.stdout.is_empty(),
            "{what}: stdout not empty: {:?}",
            self.stdout
        );
        let line = self.stderr.trim_end_matches('\n');
        assert!(
            !line.is_empty() && !line.contains('\n'),
            "{what}: stderr is not one line: {:?}",
            self.stderr
        );
        for needle in needles {
            assert!(
                line.contains(needle),
                "{what}: stderr does not mention {needle:?}: {line}"
            );
        }
    }
}

/// Runs `rerank score --model <model> <args>` with `stdin`, in an environment that cannot reach the
/// network (the Hub endpoint is a closed loopback port) and ignores the caller's RERANK_*/HF_* vars.
fn rerank_score(model: &Path, args: &[&str], stdin: &[u8]) -> Run {
    let hf_home = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(rerank_bin());
    command.arg("score").arg("--model").arg(model).args(args);
    for var in [
        "RERANK_MODEL",
        "RERANK_MODEL_REVISION",
        "RERANK_MAX_LENGTH",
        "RERANK_DTYPE",
        "RERANK_DEVICE",
        "RERANK_TOKENIZER",
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "RUST_BACKTRACE",
        "RUST_LIB_BACKTRACE",
        "RUST_LOG",
    ] {
        command.env_remove(var);
    }
    command
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", hf_home.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_with_timeout(command, stdin, Duration::from_secs(120))
}

fn run_with_timeout(mut command: Command, stdin: &[u8], limit: Duration) -> Run {
    let mut child = command.spawn().expect("cannot start rerank");
    let mut input = child.stdin.take().expect("piped stdin");
    let stdin = stdin.to_vec();
    // A child that exits early (bad arguments) closes its stdin: ignore the broken pipe.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("piped stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rerank score did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    Run {
        code: status.code(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn request(query: &str, documents: &[&str]) -> Vec<u8> {
    serde_json::json!({"query": query, "documents": documents})
        .to_string()
        .into_bytes()
}

fn case_request(case: &GoldenCase) -> Vec<u8> {
    serde_json::json!({"query": case.query, "documents": case.documents})
        .to_string()
        .into_bytes()
}

fn golden_case(name: &str) -> GoldenCase {
    golden()
        .cases
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("golden case {name}"))
}

/// Indices by descending score, ties by ascending index (computed independently of the binary).
fn expected_ranking(scores: &[f32]) -> Vec<u64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.into_iter().map(|i| i as u64).collect()
}

/// A copy of the tiny model's files in a fresh directory, to damage.
fn model_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(tiny_model_dir().join(file), dir.path().join(file)).expect("copy fixture");
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config.json"))
            .expect("config.json parses");
    edit(&mut config);
    std::fs::write(&path, config.to_string()).expect("write config.json");
}

/// Splits `model.safetensors` of `dir` into two shards plus `model.safetensors.index.json`.
/// Returns the shard file names.
fn shard_weights(dir: &Path) -> Vec<String> {
    let single = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).expect("load weights");
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let shards = [
        "model-00001-of-00002.safetensors".to_string(),
        "model-00002-of-00002.safetensors".to_string(),
    ];
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in shards.iter().zip([first, second]) {
        let shard: HashMap<&str, candle_core::Tensor> = part
            .iter()
            .map(|name| (name.as_str(), tensors[*name].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.join(file)).expect("save shard");
        for name in part {
            weight_map.insert(name.to_string(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).expect("index json"),
    )
    .expect("write index");
    std::fs::remove_file(single).expect("remove single file");
    shards.to_vec()
}

#[test]
fn output_is_one_json_object_with_scores_in_input_order_and_ranking() {
    let case = golden_case("protein");
    let run = rerank_score(&tiny_model_dir(), &[], &case_request(&case));
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert!(run.stderr.is_empty(), "stderr: {}", run.stderr);
    assert!(
        run.stdout.ends_with('\n') && run.stdout.trim_end().lines().count() == 1,
        "stdout must be one line: {:?}",
        run.stdout
    );
    let value: serde_json::Value = serde_json::from_str(&run.stdout).expect("stdout is JSON");
    let object = value.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["ranked_indices", "scores"]);
    let scores = run.scores();
    assert_close(&scores, &case.scores, TOL, "protein scores in input order");
    let ranked: Vec<u64> =
        serde_json::from_value(value["ranked_indices"].clone()).expect("integer indices");
    assert_eq!(ranked, expected_ranking(&scores));
    // The golden scores are not in descending order, so this checks the ranking is not the identity.
    assert_ne!(ranked, [0, 1, 2]);
}

#[test]
fn every_golden_case_through_the_cli_with_its_max_length() {
    for case in golden().cases {
        let max_length = case.max_length.to_string();
        let run = rerank_score(
            &tiny_model_dir(),
            &["--max-length", &max_length],
            &case_request(&case),
        );
        assert_close(&run.scores(), &case.scores, TOL, &case.name);
    }
}

#[test]
fn max_length_truncates_from_the_right() {
    let case = golden_case("truncation");
    assert_eq!(case.max_length, 16);
    let truncated = rerank_score(
        &tiny_model_dir(),
        &["--max-length", "16", "--truncate", "END"],
        &case_request(&case),
    );
    assert_close(&truncated.scores(), &case.scores, TOL, "--max-length 16");
    // The default 512 does not truncate these documents, so the truncated pairs score differently.
    let full = rerank_score(&tiny_model_dir(), &[], &case_request(&case)).scores();
    assert!(
        (full[0] - case.scores[0]).abs() > 1e-3,
        "--max-length had no effect"
    );
    assert_close(
        &full[2..],
        &case.scores[2..],
        TOL,
        "short document unaffected",
    );
}

#[test]
fn ties_are_ranked_by_index() {
    let documents = [
        "alpha beta",
        "gamma delta",
        "alpha beta",
        "gamma delta",
        "alpha beta",
    ];
    let run = rerank_score(&tiny_model_dir(), &[], &request("q", &documents));
    let scores = run.scores();
    assert_eq!(
        scores[0], scores[2],
        "identical pairs must score identically"
    );
    assert_eq!(scores[0], scores[4]);
    assert_eq!(scores[1], scores[3]);
    assert_ne!(scores[0], scores[1], "the two documents should differ");
    let value: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    let ranked: Vec<u64> = serde_json::from_value(value["ranked_indices"].clone()).expect("ints");
    let expected: Vec<u64> = if scores[0] > scores[1] {
        vec![0, 2, 4, 1, 3]
    } else {
        vec![1, 3, 0, 2, 4]
    };
    assert_eq!(ranked, expected);
}

#[test]
fn truncate_none_fails_naming_the_document_and_the_limit() {
    let case = golden_case("truncation");
    let run = rerank_score(
        &tiny_model_dir(),
        &["--max-length", "16", "--truncate", "NONE"],
        &case_request(&case),
    );
    // Tokenizing stops once the pair is known to be too long, so the count may be a lower bound.
    run.assert_error(
        "--truncate NONE",
        &[
            "document 0",
            "tokens with the query",
            "max_length is 16",
            "NONE",
        ],
    );
    // The same documents fit under the default max length.
    let fits = rerank_score(
        &tiny_model_dir(),
        &["--truncate", "NONE"],
        &case_request(&case),
    );
    assert_eq!(fits.scores().len(), 3);
}

#[test]
fn empty_documents_give_empty_results() {
    let run = rerank_score(
        &tiny_model_dir(),
        &[],
        br#"{"query": "q", "documents": []}"#,
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.stdout, "{\"scores\":[],\"ranked_indices\":[]}\n");
}

#[test]
fn bad_stdin_fails_with_one_line() {
    let model = tiny_model_dir();
    let cases: &[(&str, &[u8], &[&str])] = &[
        (
            "malformed JSON",
            b"{\"query\": \"q\", \"documents\": [",
            &["JSON"],
        ),
        ("not JSON at all", b"query=q", &["JSON"]),
        ("empty stdin", b"", &["JSON"]),
        (
            "query is a number",
            br#"{"query": 1, "documents": ["d"]}"#,
            &["query"],
        ),
        (
            "documents is a string",
            br#"{"query": "q", "documents": "d"}"#,
            &["documents"],
        ),
        (
            "a document is a number",
            br#"{"query": "q", "documents": ["d", 2]}"#,
            &["documents"],
        ),
        ("documents missing", br#"{"query": "q"}"#, &["documents"]),
        (
            "unknown field",
            br#"{"query": "q", "documents": [], "top_k": 1}"#,
            &["top_k"],
        ),
        (
            "non-UTF-8",
            b"{\"query\": \"\xff\xfe\", \"documents\": []}",
            &["UTF-8"],
        ),
    ];
    for (what, stdin, needles) in cases {
        rerank_score(&model, &[], stdin).assert_error(what, needles);
    }
}

/// The contract is one JSON *object*; serde's derived `Deserialize` also accepts a sequence of the
/// fields in order, so `["q", ["d"]]` is scored today.
#[test]
fn a_json_array_is_refused() {
    rerank_score(&tiny_model_dir(), &[], br#"["q", ["d"]]"#)
        .assert_error("a JSON array", &["JSON object"]);
}

#[test]
fn bad_options_fail_with_one_line() {
    let input = request("q", &["d"]);
    let model = tiny_model_dir();
    let dtype = rerank_score(&model, &["--dtype", "f64"], &input);
    dtype.assert_error("--dtype f64", &["dtype", "f64", "bf16"]);
    assert!(
        !dtype.stderr.contains("config.json"),
        "--dtype is an option, not a config.json value: {}",
        dtype.stderr
    );
    rerank_score(&model, &["--device", "tpu"], &input).assert_error("--device tpu", &["tpu"]);
    rerank_score(&model, &["--max-length", "0"], &input).assert_error("--max-length 0", &["0"]);
    rerank_score(&model, &["--max-length", "9000"], &input)
        .assert_error("--max-length 9000", &["9000", "8192"]);
}

#[test]
fn missing_or_incomplete_model_directories_fail_with_one_line() {
    let input = request("q", &["d"]);
    let root = tempfile::tempdir().expect("tempdir");
    let missing = root.path().join("no-such-model");
    rerank_score(&missing, &[], &input).assert_error(
        "missing model dir",
        &[&missing.display().to_string(), "does not exist"],
    );

    let dir = model_copy();
    std::fs::remove_file(dir.path().join("tokenizer.json")).expect("rm");
    rerank_score(dir.path(), &[], &input).assert_error("no tokenizer.json", &["tokenizer.json"]);

    let dir = model_copy();
    std::fs::remove_file(dir.path().join("config.json")).expect("rm");
    rerank_score(dir.path(), &[], &input).assert_error("no config.json", &["config.json"]);

    let dir = model_copy();
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("rm");
    rerank_score(dir.path(), &[], &input).assert_error(
        "no weights",
        &["model.safetensors", "model.safetensors.index.json"],
    );
}

#[test]
fn corrupt_weights_fail_with_one_line() {
    let input = request("q", &["d"]);

    let dir = model_copy();
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("read weights");
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("truncate");
    rerank_score(dir.path(), &[], &input).assert_error("truncated weights", &["model.safetensors"]);

    let dir = model_copy();
    let weights = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&weights).expect("read weights");
    // Garble the JSON header (it starts right after the 8-byte length).
    for b in &mut bytes[8..64] {
        *b = b'#';
    }
    std::fs::write(&weights, &bytes).expect("garble");
    rerank_score(dir.path(), &[], &input).assert_error("garbled header", &["model.safetensors"]);

    let dir = model_copy();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .expect("w");
    rerank_score(dir.path(), &[], &input).assert_error("not safetensors", &["model.safetensors"]);
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = model_copy();
    let weights = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).expect("load");
    assert!(tensors.remove("model.norm.weight").is_some());
    candle_core::safetensors::save(&tensors, &weights).expect("save");
    rerank_score(dir.path(), &[], &request("q", &["d"]))
        .assert_error("missing tensor", &["model.norm.weight"]);

    let dir = model_copy();
    let weights = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).expect("load");
    assert!(tensors.remove("score.weight").is_some());
    candle_core::safetensors::save(&tensors, &weights).expect("save");
    rerank_score(dir.path(), &[], &request("q", &["d"]))
        .assert_error("missing head", &["score.weight"]);
}

/// What is broken, how, and what the error must name.
type ConfigEdit = (
    &'static str,
    fn(&mut serde_json::Value),
    &'static [&'static str],
);

#[test]
fn bad_config_fails_naming_the_value() {
    let input = request("q", &["d"]);

    let dir = model_copy();
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": ").expect("w");
    rerank_score(dir.path(), &[], &input).assert_error("invalid JSON", &["config.json"]);

    let edits: [ConfigEdit; 5] = [
        (
            "pooling cls",
            |c| c["pooling"] = "cls".into(),
            &["pooling", "cls"],
        ),
        (
            "rope_type yarn",
            |c| c["rope_scaling"]["rope_type"] = "yarn".into(),
            &["rope_type", "yarn"],
        ),
        (
            "model_type bert",
            |c| c["model_type"] = "bert".into(),
            &["model_type", "bert"],
        ),
        (
            "hidden_size a string",
            |c| c["hidden_size"] = "big".into(),
            &["config.json", "big"],
        ),
        (
            "no num_hidden_layers",
            |c| {
                c.as_object_mut()
                    .map(|o| o.remove("num_hidden_layers"))
                    .expect("object");
            },
            &["config.json", "num_hidden_layers"],
        ),
    ];
    for (what, edit, needles) in edits {
        let dir = model_copy();
        edit_config(dir.path(), edit);
        rerank_score(dir.path(), &[], &input).assert_error(what, needles);
    }

    // A config whose shapes disagree with the weights names the tensor.
    let dir = model_copy();
    edit_config(dir.path(), |c| c["intermediate_size"] = 64.into());
    rerank_score(dir.path(), &[], &input).assert_error("wrong shape", &["mlp"]);
}

#[test]
fn sharded_weights_give_identical_scores() {
    let case = golden_case("mixed_lengths");
    let single = rerank_score(&tiny_model_dir(), &[], &case_request(&case));
    assert_close(&single.scores(), &case.scores, TOL, "single file");

    let dir = model_copy();
    let shards = shard_weights(dir.path());
    assert!(!dir.path().join("model.safetensors").exists());
    let sharded = rerank_score(dir.path(), &[], &case_request(&case));
    assert_eq!(sharded.code, Some(0), "stderr: {}", sharded.stderr);
    assert_eq!(sharded.stdout, single.stdout, "sharded output differs");

    // A shard named in the index but absent is named in the error.
    std::fs::remove_file(dir.path().join(&shards[1])).expect("rm shard");
    rerank_score(dir.path(), &[], &case_request(&case))
        .assert_error("missing shard", &[shards[1].as_str()]);
}

#[test]
fn cpu_throughput_of_rerank_score() {
    let documents: Vec<String> = golden()
        .cases
        .iter()
        .filter(|c| c.name != "long")
        .flat_map(|c| c.documents.clone())
        .cycle()
        .take(200)
        .collect();
    let docs: Vec<&str> = documents.iter().map(String::as_str).collect();
    let input = request("why do rivers flood in spring?", &docs);
    let model: PathBuf = tiny_model_dir();

    // Best of three, the machine is shared.
    let timed = |input: &[u8], expected: usize| {
        (0..3)
            .map(|_| {
                let start = Instant::now();
                let run = rerank_score(&model, &[], input);
                let elapsed = start.elapsed();
                assert_eq!(run.scores().len(), expected);
                elapsed
            })
            .min()
            .expect("three runs")
    };
    let startup = timed(&request("why do rivers flood in spring?", &docs[..1]), 1);
    let elapsed = timed(&input, 200);
    let tokens: usize = PairTokenizer::from_file(&model.join("tokenizer.json"), 512)
        .expect("tokenizer")
        .encode_pairs("why do rivers flood in spring?", &docs, Truncation::End)
        .expect("tokenize")
        .iter()
        .map(Vec::len)
        .sum();
    let compute = elapsed.saturating_sub(startup).as_secs_f64().max(1e-6);
    println!(
        "rerank score, tiny model, CPU: 200 pairs ({tokens} tokens) in {:.3} s = {:.0} pairs/s \
         end to end; one-pair run (process start, model load) {:.3} s; \
         excluding it {:.0} pairs/s, {:.0} tokens/s",
        elapsed.as_secs_f64(),
        200.0 / elapsed.as_secs_f64(),
        startup.as_secs_f64(),
        200.0 / compute,
        tokens as f64 / compute,
    );
}
