//! The real hf-hub loading path of `rerank score --model org/name`, against a fake Hugging Face Hub
//! served by axum on 127.0.0.1 (`HF_ENDPOINT`), with the cache in a temporary `HF_HOME`. Each run is
//! a child process with its own environment, so the tests do not touch this process's variables.
//!
//! The fake hub answers `GET /{org}/{name}/resolve/{revision}/{file}` as hf-hub 0.4 expects: a
//! `Range: bytes=0-0` probe answered 206 with `etag`, `x-repo-commit` and `content-range`, then
//! ranged downloads (206, clamped to the file's end as HTTP says).

use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use candle_core::Device;
use common::*;

const REPO: &str = "test-org/tiny-rerank";
const SHARDED_REPO: &str = "test-org/tiny-rerank-sharded";
const GATED_REPO: &str = "test-org/gated-rerank";
const TOKEN: &str = "hf_test_token_123";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// One request the fake hub saw.
#[derive(Debug, Clone)]
struct Logged {
    path: String,
    range: Option<String>,
    authorization: Option<String>,
}

#[derive(Clone, Default)]
struct FakeHub {
    /// repo id -> file name -> content.
    repos: Arc<HashMap<String, HashMap<String, Bytes>>>,
    /// Repos that answer 401 without `Authorization: Bearer {TOKEN}`.
    gated: Arc<Vec<String>>,
    log: Arc<Mutex<Vec<Logged>>>,
}

/// A content hash for the etag (hf-hub names cache blobs after it); FNV-1a is enough here.
fn etag(content: &[u8]) -> String {
    let hash = content.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}{:08x}", content.len())
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("x-error-code", code.to_string())],
        message.to_string(),
    )
        .into_response()
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against a file of `size` bytes: the inclusive range, or
/// `None` when unsatisfiable.
fn parse_range(spec: &str, size: usize) -> Option<(usize, usize)> {
    let (start, end) = spec.strip_prefix("bytes=")?.split_once('-')?;
    let (start, end) = match (start.parse::<usize>().ok(), end.parse::<usize>().ok()) {
        (Some(start), Some(end)) => (start, end.min(size.checked_sub(1)?)),
        (Some(start), None) if end.is_empty() => (start, size.checked_sub(1)?),
        (None, Some(suffix)) if start.is_empty() => {
            (size.saturating_sub(suffix), size.checked_sub(1)?)
        }
        _ => return None,
    };
    (start <= end && end < size).then_some((start, end))
}

async fn resolve(
    State(hub): State<FakeHub>,
    UrlPath((org, name, revision, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let (range, authorization) = (text(header::RANGE), text(header::AUTHORIZATION));
    hub.log.lock().expect("log").push(Logged {
        path: format!("{org}/{name}/resolve/{revision}/{file}"),
        range: range.clone(),
        authorization: authorization.clone(),
    });
    let repo = format!("{org}/{name}");
    let Some(files) = hub.repos.get(&repo) else {
        return error(
            StatusCode::NOT_FOUND,
            "RepoNotFound",
            "Repository not found",
        );
    };
    if hub.gated.contains(&repo) && authorization.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return error(
            StatusCode::UNAUTHORIZED,
            "GatedRepo",
            "Access to this repository is restricted",
        );
    }
    if revision != "main" && revision != COMMIT {
        return error(StatusCode::NOT_FOUND, "RevisionNotFound", "Invalid rev id");
    }
    let Some(content) = files.get(&file) else {
        return error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
    };
    let size = content.len();
    let common = [
        (header::ETAG, format!("\"{}\"", etag(content))),
        (header::ACCEPT_RANGES, "bytes".to_string()),
        (
            header::HeaderName::from_static("x-repo-commit"),
            COMMIT.to_string(),
        ),
    ];
    match range {
        None => (StatusCode::OK, common, content.clone()).into_response(),
        Some(spec) => match parse_range(&spec, size) {
            Some((start, end)) => (
                StatusCode::PARTIAL_CONTENT,
                common,
                [(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"))],
                content.slice(start..=end),
            )
                .into_response(),
            None => (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response(),
        },
    }
}

/// A running fake hub; stopped on drop or by `stop`.
struct RunningHub {
    endpoint: String,
    port: u16,
    hub: FakeHub,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl RunningHub {
    async fn start(hub: FakeHub) -> Self {
        let app = axum::Router::new()
            .route(
                "/{org}/{name}/resolve/{revision}/{*file}",
                axum::routing::get(resolve),
            )
            .with_state(hub.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let port = listener.local_addr().expect("local addr").port();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("fake hub serves");
        });
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            hub,
            server: Some(server),
        }
    }

    async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    fn requests(&self) -> Vec<Logged> {
        self.hub.log.lock().expect("log").clone()
    }
}

impl Drop for RunningHub {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

fn read(path: &Path) -> Bytes {
    Bytes::from(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// The tiny model's files: single-file weights.
fn single_file_repo() -> HashMap<String, Bytes> {
    let dir = tiny_model_dir();
    ["config.json", "tokenizer.json", "model.safetensors"]
        .into_iter()
        .map(|f| (f.to_string(), read(&dir.join(f))))
        .collect()
}

/// The tiny model's files with the weights split into two shards and an index.
fn sharded_repo() -> HashMap<String, Bytes> {
    let dir = tiny_model_dir();
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .expect("load weights");
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut files = HashMap::new();
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let shard: HashMap<&str, candle_core::Tensor> = part
            .iter()
            .map(|name| (name.as_str(), tensors[*name].clone()))
            .collect();
        let path = scratch.path().join(file);
        candle_core::safetensors::save(&shard, &path).expect("save shard");
        files.insert(file.to_string(), read(&path));
        for name in part {
            weight_map.insert(name.to_string(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    files.insert(
        "model.safetensors.index.json".to_string(),
        Bytes::from(index.to_string()),
    );
    for f in ["config.json", "tokenizer.json"] {
        files.insert(f.to_string(), read(&dir.join(f)));
    }
    files
}

fn fake_hub() -> FakeHub {
    FakeHub {
        repos: Arc::new(HashMap::from([
            (REPO.to_string(), single_file_repo()),
            (SHARDED_REPO.to_string(), sharded_repo()),
            (GATED_REPO.to_string(), single_file_repo()),
        ])),
        gated: Arc::new(vec![GATED_REPO.to_string()]),
        log: Arc::default(),
    }
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn assert_ok(&self, what: &str) {
        assert_eq!(self.code, Some(0), "{what}: stderr {}", self.stderr);
    }

    fn assert_error(&self, what: &str, needles: &[&str]) {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "{what}: exit {:?}",
            self.code
        );
        assert!(self.stdout.is_empty(), "{what}: stdout {:?}", self.stdout);
        let line = self.stderr.trim_end_matches('\n');
        assert!(
            !line.is_empty() && !line.contains('\n'),
            "{what}: stderr is not one line: {:?}",
            self.stderr
        );
        for needle in needles {
            assert!(line.contains(needle), "{what}: no {needle:?} in: {line}");
        }
    }
}

/// The golden `protein` case: the Hub runs must reproduce its reference scores.
fn protein() -> GoldenCase {
    golden()
        .cases
        .into_iter()
        .find(|c| c.name == "protein")
        .expect("protein case")
}

/// `rerank score --model <model>` as a child process with exactly the Hub variables given.
async fn rerank_score(model: &str, hf_home: &Path, env: &[(&str, &str)]) -> Run {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new(rerank_bin());
    command.args(["score", "--model", model]);
    for var in [
        "RERANK_MODEL",
        "RERANK_MODEL_REVISION",
        "RERANK_MAX_LENGTH",
        "RERANK_DTYPE",
        "RERANK_DEVICE",
        "RERANK_TOKENIZER",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "RUST_BACKTRACE",
        "RUST_LIB_BACKTRACE",
        "RUST_LOG",
    ] {
        command.env_remove(var);
    }
    command
        .env("HF_HOME", hf_home)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("cannot start rerank");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let case = protein();
    let input = serde_json::json!({"query": case.query, "documents": case.documents});
    stdin
        .write_all(input.to_string().as_bytes())
        .await
        .expect("write stdin");
    drop(stdin);
    let output = within(
        Duration::from_secs(120),
        "rerank score --model <hub repo>",
        child.wait_with_output(),
    )
    .await
    .expect("rerank score ran");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The answer for the same input from the fixture directory: what every Hub run must print.
async fn local_answer() -> String {
    let home = tempfile::tempdir().expect("tempdir");
    let dir = tiny_model_dir();
    let run = rerank_score(dir.to_str().expect("utf-8 path"), home.path(), &[]).await;
    run.assert_ok("local directory");
    let value: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    let scores: Vec<f32> = serde_json::from_value(value["scores"].clone()).expect("scores");
    assert_close(&scores, &protein().scores, 1e-4, "local run");
    run.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_hub_speaks_http_ranges() {
    let hub = RunningHub::start(fake_hub()).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let url = format!("{}/{REPO}/resolve/main/config.json", hub.endpoint);
    let config = read(&tiny_model_dir().join("config.json"));
    let size = config.len();
    let get = |range: Option<String>| {
        let mut request = client.get(&url);
        if let Some(range) = range {
            request = request.header("range", range);
        }
        async move {
            within(PATIENCE, "fake hub GET", request.send())
                .await
                .expect("GET")
        }
    };
    let probe = get(Some("bytes=0-0".into())).await;
    assert_eq!(probe.status(), 206);
    assert_eq!(
        probe.headers()["content-range"],
        format!("bytes 0-0/{size}").as_str()
    );
    assert_eq!(probe.headers()["x-repo-commit"], COMMIT);
    assert!(probe.headers().contains_key("etag"));
    assert_eq!(probe.bytes().await.expect("body").len(), 1);
    // hf-hub asks for one byte past the end (`bytes=0-{size}`): clamped.
    let whole = get(Some(format!("bytes=0-{size}"))).await;
    assert_eq!(whole.status(), 206);
    assert_eq!(whole.bytes().await.expect("body"), config);
    let middle = get(Some("bytes=10-19".into())).await;
    assert_eq!(middle.bytes().await.expect("body"), config.slice(10..20));
    let tail = get(Some(format!("bytes={}-", size - 3))).await;
    assert_eq!(tail.bytes().await.expect("body"), config.slice(size - 3..));
    assert_eq!(get(Some(format!("bytes={size}-"))).await.status(), 416);
    let plain = get(None).await;
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.bytes().await.expect("body"), config);
    let missing = client
        .get(format!("{}/{REPO}/resolve/main/nope.bin", hub.endpoint))
        .send()
        .await
        .expect("GET");
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["x-error-code"], "EntryNotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_from_the_hub_then_works_offline_from_the_cache() {
    let expected = local_answer().await;
    let mut hub = RunningHub::start(fake_hub()).await;
    let home = tempfile::tempdir().expect("HF_HOME");

    let online = rerank_score(REPO, home.path(), &[("HF_ENDPOINT", &hub.endpoint)]).await;
    online.assert_ok("hub download");
    assert_eq!(
        online.stdout, expected,
        "hub scores differ from the local directory"
    );

    let requests = hub.requests();
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        let path = format!("{REPO}/resolve/main/{file}");
        let ranges: Vec<&str> = requests
            .iter()
            .filter(|r| r.path == path)
            .filter_map(|r| r.range.as_deref())
            .collect();
        assert!(ranges.contains(&"bytes=0-0"), "{file}: no metadata probe");
        assert!(
            ranges.iter().any(|r| *r != "bytes=0-0"),
            "{file}: never downloaded"
        );
    }
    assert!(
        requests.iter().all(|r| r.authorization.is_none()),
        "no HF_TOKEN, yet an Authorization header was sent"
    );
    let blobs = std::fs::read_dir(home.path().join("hub/models--test-org--tiny-rerank/blobs"))
        .expect("the download landed in $HF_HOME/hub")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_none_or(|x| x != "lock"))
        .count();
    assert_eq!(blobs, 3, "one cached blob per file");

    hub.stop().await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", hub.port)).is_err(),
        "the fake hub still answers"
    );
    let offline = rerank_score(
        REPO,
        home.path(),
        &[("HF_ENDPOINT", &hub.endpoint), ("HF_HUB_OFFLINE", "1")],
    )
    .await;
    offline.assert_ok("offline from the cache");
    assert_eq!(offline.stdout, expected, "cached scores differ");

    // Offline with an empty cache: a clear error naming the repo and the missing file.
    let empty = tempfile::tempdir().expect("HF_HOME");
    rerank_score(REPO, empty.path(), &[("HF_HUB_OFFLINE", "1")])
        .await
        .assert_error("offline, empty cache", &[REPO, "HF_HUB_OFFLINE"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_repo_fails_naming_it() {
    let hub = RunningHub::start(fake_hub()).await;
    let home = tempfile::tempdir().expect("HF_HOME");
    rerank_score(
        "test-org/no-such-model",
        home.path(),
        &[("HF_ENDPOINT", &hub.endpoint)],
    )
    .await
    .assert_error("unknown repo", &["test-org/no-such-model", "404"]);
    assert!(
        hub.requests()
            .iter()
            .any(|r| r.path.starts_with("test-org/no-such-model/")),
        "the fake hub was never asked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hf_token_is_sent_as_a_bearer_token() {
    let expected = local_answer().await;
    let hub = RunningHub::start(fake_hub()).await;

    let home = tempfile::tempdir().expect("HF_HOME");
    rerank_score(GATED_REPO, home.path(), &[("HF_ENDPOINT", &hub.endpoint)])
        .await
        .assert_error("gated repo without a token", &[GATED_REPO, "401"]);

    let home = tempfile::tempdir().expect("HF_HOME");
    let run = rerank_score(
        GATED_REPO,
        home.path(),
        &[("HF_ENDPOINT", &hub.endpoint), ("HF_TOKEN", TOKEN)],
    )
    .await;
    run.assert_ok("gated repo with HF_TOKEN");
    assert_eq!(run.stdout, expected);
    let with_token: Vec<Logged> = hub
        .requests()
        .into_iter()
        .filter(|r| r.authorization.is_some())
        .collect();
    assert!(!with_token.is_empty(), "HF_TOKEN was never sent");
    let bearer = format!("Bearer {TOKEN}");
    for request in &with_token {
        assert_eq!(request.authorization.as_deref(), Some(bearer.as_str()));
    }
    // Every download of the second run carried it, the ranged ones included.
    assert!(with_token
        .iter()
        .any(|r| r.path.ends_with("model.safetensors") && r.range.as_deref() != Some("bytes=0-0")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_repo_gives_identical_scores() {
    let expected = local_answer().await;
    let hub = RunningHub::start(fake_hub()).await;
    let home = tempfile::tempdir().expect("HF_HOME");
    let run = rerank_score(SHARDED_REPO, home.path(), &[("HF_ENDPOINT", &hub.endpoint)]).await;
    run.assert_ok("sharded repo");
    assert_eq!(run.stdout, expected, "sharded hub scores differ");
    let paths: Vec<String> = hub.requests().into_iter().map(|r| r.path).collect();
    for file in [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        assert!(
            paths.iter().any(|p| p.ends_with(file)),
            "{file} was not fetched"
        );
    }
}

/// `rerank download` (the Helm chart's pre-download init container): fills the cache from the Hub
/// and exits 0, after which a worker-style run works with `HF_HUB_OFFLINE=1` and no hub at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_command_prefills_the_cache_for_offline_workers() {
    let expected = local_answer().await;
    let mut hub = RunningHub::start(fake_hub()).await;
    let home = tempfile::tempdir().expect("HF_HOME");
    let output = within(
        Duration::from_secs(120),
        "rerank download",
        tokio::process::Command::new(rerank_bin())
            .args(["download", "--model", REPO])
            .env("HF_HOME", home.path())
            .env("HF_ENDPOINT", &hub.endpoint)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .output(),
    )
    .await
    .expect("rerank download ran");
    assert!(
        output.status.success(),
        "download failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("models--test-org--tiny-rerank"),
        "prints the snapshot directory: {printed}"
    );
    hub.stop().await;
    let offline = rerank_score(REPO, home.path(), &[("HF_HUB_OFFLINE", "1")]).await;
    offline.assert_ok("offline after rerank download");
    assert_eq!(offline.stdout, expected);

    // A repo that does not exist fails the Job loudly.
    let hub = RunningHub::start(fake_hub()).await;
    let missing = tokio::process::Command::new(rerank_bin())
        .args(["download", "--model", "test-org/no-such-model"])
        .env("HF_HOME", home.path())
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .await
        .expect("rerank download ran");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("test-org/no-such-model"));
}
