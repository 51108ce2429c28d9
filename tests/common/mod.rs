//! Shared test helpers: a real `nats-server` on an ephemeral loopback port, worker processes,
//! fixture paths and bounded waits. Every helper fails with a message instead of hanging.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny random model in Hugging Face layout (tokenizer copied in by `make setup`).
pub fn tiny_model_dir() -> PathBuf {
    let dir = repo_root().join("tests/fixtures/tiny-model");
    assert!(
        dir.join("tokenizer.json").is_file(),
        "tests/fixtures/tiny-model/tokenizer.json is missing: run `make setup`"
    );
    dir
}

pub fn rerank_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rerank"))
}

/// Asserts two score vectors agree within `tol`, naming the first mismatch.
pub fn assert_close(actual: &[f32], expected: &[f32], tol: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tol,
            "{what}: score {i} is {a}, expected {e} (|Δ| = {} > {tol})",
            (a - e).abs()
        );
    }
}

/// A free loopback port (bound then released; good enough for tests that start a server on it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

fn nats_server_bin() -> PathBuf {
    if let Ok(path) = std::env::var("NATS_SERVER_BIN") {
        if Path::new(&path).is_file() {
            return PathBuf::from(path);
        }
    }
    let local = repo_root().join(".tools/nats/bin/nats-server");
    if local.is_file() {
        return local;
    }
    PathBuf::from("nats-server")
}

/// A real nats-server process on 127.0.0.1; killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    extra_args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra command-line arguments (auth, `--max_payload`, a config file...).
    pub fn start_with(extra_args: &[&str]) -> Self {
        let mut server = Self {
            child: None,
            port: free_port(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            _dir: tempfile::tempdir().expect("tempdir"),
        };
        server.spawn();
        server
    }

    /// Starts with JetStream on, its store in this server's temporary directory (kept across
    /// [`restart`](Self::restart), so stored streams survive it).
    pub fn start_jetstream() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("jetstream");
        let mut server = Self {
            child: None,
            port: free_port(),
            extra_args: vec!["-js".into(), "-sd".into(), store.display().to_string()],
            _dir: dir,
        };
        server.spawn();
        server
    }

    /// [`start_jetstream`](Self::start_jetstream) with extra arguments (e.g. `-m PORT`).
    pub fn start_jetstream_with(extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("jetstream");
        let mut args = vec!["-js".into(), "-sd".into(), store.display().to_string()];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let mut server = Self {
            child: None,
            port: free_port(),
            extra_args: args,
            _dir: dir,
        };
        server.spawn();
        server
    }

    /// Starts with a configuration file holding `config` (e.g. `max_payload: 8MB`).
    pub fn start_with_config(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, config).expect("write nats.conf");
        let mut server = Self {
            child: None,
            port: free_port(),
            extra_args: vec!["-c".into(), path.display().to_string()],
            _dir: dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}): run `make setup` to install it")
            });
        // Wait for "Server is ready" in its log (bounded).
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && line.contains("Server is ready") {
                    let _ = tx.send(());
                    sent = true;
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("nats-server did not become ready within 10 s");
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts again on the same port (reconnect tests).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

/// A JetStream cluster of real nats-server processes on loopback: each node has its own client
/// port, cluster (route) port and store directory, and routes to every other node. Node `i` is
/// named `n{i}` (the name JetStream reports as a stream's leader).
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start(size: usize) -> Self {
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let nodes = (0..size)
            .map(|i| {
                let dir = tempfile::tempdir().expect("tempdir");
                let store = dir.path().join("jetstream");
                let routes: Vec<String> = route_ports
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, port)| format!("nats://127.0.0.1:{port}"))
                    .collect();
                let mut node = NatsServer {
                    child: None,
                    port: free_port(),
                    extra_args: vec![
                        "-js".into(),
                        "-sd".into(),
                        store.display().to_string(),
                        "-n".into(),
                        format!("n{i}"),
                        "--cluster_name".into(),
                        "rerank-test".into(),
                        "--cluster".into(),
                        format!("nats://127.0.0.1:{}", route_ports[i]),
                        "--routes".into(),
                        routes.join(","),
                    ],
                    _dir: dir,
                };
                node.spawn();
                node
            })
            .collect();
        Self { nodes }
    }

    /// Every node's client URL, comma-separated (what `--nats-url` and `NatsConfig` take).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node JetStream calls `name`.
    pub fn node_named(&self, name: &str) -> usize {
        name.strip_prefix('n')
            .and_then(|i| i.parse().ok())
            .filter(|&i: &usize| i < self.nodes.len())
            .unwrap_or_else(|| panic!("no node named {name}"))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `rerank worker` child process on the tiny model; killed on drop.
pub struct WorkerProcess {
    pub child: Child,
    pub health_port: u16,
}

impl WorkerProcess {
    pub fn start(nats_url: &str, extra_args: &[&str]) -> Self {
        Self::start_with_env(nats_url, extra_args, &[])
    }

    pub fn start_with_env(nats_url: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let health_port = free_port();
        let child = Command::new(rerank_bin())
            .arg("worker")
            .arg("--model")
            .arg(tiny_model_dir())
            .args(["--nats-url", nats_url])
            .args(["--health-listen", &format!("127.0.0.1:{health_port}")])
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start `rerank worker`");
        let worker = Self { child, health_port };
        worker.wait_ready(PATIENCE);
        worker
    }

    pub fn probe_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.health_port)
    }

    /// Polls `/ready` until 200 (bounded).
    pub fn wait_ready(&self, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if http_get_status(self.health_port, "/ready") == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("worker not ready within {limit:?}");
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit (bounded) and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("worker did not exit within {limit:?}");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Minimal blocking HTTP GET status on loopback (no client dependency in sync helpers).
pub fn http_get_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}

/// Minimal blocking HTTP GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Sum of every sample of `metric` (all label sets) in a Prometheus text exposition.
pub fn metric_sum(exposition: &str, metric: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The tiny model's `tokenizer.json` (the real Llama 3.2 one) with padding and truncation off:
/// whole-text tokenization, as Hugging Face does it. Loaded once per test binary (9 MB of JSON).
pub fn plain_tokenizer() -> &'static tokenizers::Tokenizer {
    static PLAIN: std::sync::OnceLock<tokenizers::Tokenizer> = std::sync::OnceLock::new();
    PLAIN.get_or_init(|| {
        let mut plain = tokenizers::Tokenizer::from_file(tiny_model_dir().join("tokenizer.json"))
            .expect("tokenizer.json");
        plain.with_padding(None);
        plain.with_truncation(None).expect("no truncation");
        plain
    })
}

/// How long a test waits for anything that should happen: long enough for the slowest machine,
/// short enough that a hang fails the run instead of stalling it. Tests never assert on speed.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// A plain NATS connection for tests, whose core requests wait up to [`PATIENCE`] (async-nats's
/// default 10 s request timeout would make a test depend on the machine's speed).
pub async fn connect_nats(url: &str) -> async_nats::Client {
    within(
        PATIENCE,
        "connect to nats",
        async_nats::ConnectOptions::new()
            .request_timeout(Some(PATIENCE))
            .connect(url),
    )
    .await
    .expect("connect to nats")
}

/// Runs a future with a deadline, failing the test with `what` instead of hanging.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"))
}

/// The golden file written by `tests/fixtures/make_golden.py`.
#[derive(serde::Deserialize)]
pub struct Golden {
    pub cases: Vec<GoldenCase>,
}

#[derive(serde::Deserialize, Clone)]
pub struct GoldenCase {
    pub name: String,
    pub query: String,
    pub documents: Vec<String>,
    pub max_length: usize,
    pub input_ids: Vec<Vec<u32>>,
    pub scores: Vec<f32>,
}

pub fn golden() -> Golden {
    let text = std::fs::read_to_string(repo_root().join("tests/fixtures/golden.json"))
        .expect("tests/fixtures/golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}

/// An OTLP/HTTP trace receiver on loopback that decodes every export with the real protobuf types.
pub struct OtlpReceiver {
    pub endpoint: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
}

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: Vec<(String, String)>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: bytes::Bytes| {
                let sink = sink.clone();
                async move {
                    let request =
                        ExportTraceServiceRequest::decode(body).expect("valid OTLP protobuf");
                    let mut sink = sink.lock().unwrap();
                    for resource in request.resource_spans {
                        let service = resource
                            .resource
                            .iter()
                            .flat_map(|r| r.attributes.iter())
                            .find(|kv| kv.key == "service.name")
                            .and_then(|kv| kv.value.as_ref())
                            .map(|v| format!("{:?}", v.value))
                            .unwrap_or_default();
                        for scope in resource.scope_spans {
                            for span in scope.spans {
                                sink.push(ReceivedSpan {
                                    service: service.clone(),
                                    name: span.name,
                                    trace_id: hex(&span.trace_id),
                                    span_id: hex(&span.span_id),
                                    parent_span_id: hex(&span.parent_span_id),
                                    attributes: span
                                        .attributes
                                        .iter()
                                        .map(|kv| (kv.key.clone(), format!("{:?}", kv.value)))
                                        .collect(),
                                });
                            }
                        }
                    }
                    (
                        [(http::header::CONTENT_TYPE, "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { endpoint, spans }
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until spans named `names` of `trace_id` have all arrived.
    pub async fn wait_for(
        &self,
        trace_id: &str,
        names: &[&str],
        limit: Duration,
    ) -> Vec<ReceivedSpan> {
        let start = Instant::now();
        loop {
            let spans: Vec<ReceivedSpan> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
                return spans;
            }
            if start.elapsed() > limit {
                let got: Vec<_> = self
                    .spans()
                    .iter()
                    .map(|s| {
                        format!(
                            "{}:{}:{}<-{}",
                            s.name, s.trace_id, s.span_id, s.parent_span_id
                        )
                    })
                    .collect();
                panic!("spans {names:?} of trace {trace_id} not all received within {limit:?}; got {got:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Parses Prometheus text exposition strictly enough to catch malformed output:
/// returns (metric name with labels, value) for every sample; panics on a malformed line.
pub fn parse_prometheus(text: &str) -> Vec<(String, String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment line: {line}");
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("malformed sample: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let labels = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                (name.to_string(), labels.to_string())
            }
            None => (series.to_string(), String::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in: {line}"
        );
        samples.push((name, labels, value));
    }
    samples
}

/// Sum of the samples of `name` whose labels contain every `label=\"value\"` in `with`.
pub fn sample_sum(samples: &[(String, String, f64)], name: &str, with: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(n, labels, _)| n == name && with.iter().all(|w| labels.contains(w)))
        .map(|(_, _, v)| v)
        .sum()
}
