//! Helpers for the sidecar and client tests: an in-process sidecar on 127.0.0.1:0, a bounded HTTP
//! client, and NATS stubs (a silent responder, an instant responder, a request counter).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::common::PATIENCE;
use futures::StreamExt;
use rerank_service::nats::NatsConfig;
use rerank_service::sidecar::{self, AppState, SidecarConfig};
use rerank_service::wire::{self, RerankReply, RerankRequest, Usage};
use serde_json::Value;

use crate::common::within;

/// The seed service's example request (`docs/seed-api.md`).
pub fn seed_request() -> Value {
    serde_json::json!({
        "query": "AI tools for productivity",
        "documents": [
            "A task management app built with React and Node.js",
            "An AI-powered writing assistant that helps with emails",
            "A weather widget for the desktop"
        ]
    })
}

/// A real sidecar (router + axum::serve) on an ephemeral loopback port; stopped on drop.
pub struct Sidecar {
    pub addr: SocketAddr,
    pub state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), sidecar::SidecarError>>,
}

impl Sidecar {
    pub async fn start(nats_url: &str) -> Self {
        Self::start_with(nats_url, |_| {}).await
    }

    pub async fn start_with(nats_url: &str, configure: impl FnOnce(&mut SidecarConfig)) -> Self {
        let mut config = SidecarConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            nats: NatsConfig::new(nats_url),
            request_timeout: Duration::from_secs(30),
            ..SidecarConfig::default()
        };
        configure(&mut config);
        let state = within(
            PATIENCE,
            "sidecar connects to NATS",
            AppState::connect(&config),
        )
        .await
        .expect("sidecar state");
        let listener = within(
            PATIENCE,
            "bind 127.0.0.1:0",
            tokio::net::TcpListener::bind(config.listen),
        )
        .await
        .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sidecar::serve(listener, state.clone(), async {
            let _ = rx.await;
        }));
        Self {
            addr,
            state,
            stop: Some(tx),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful stop (in-flight requests finish).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = &mut self.task;
        let _ = within(crate::common::PATIENCE, "sidecar stops", task).await;
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP answer, body parsed as JSON when it is JSON.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Asserts the `{"error": {"code", "message"}}` shape and returns the code.
    pub fn error_code(&self) -> String {
        let body = self.json();
        let error = body
            .get("error")
            .unwrap_or_else(|| panic!("no error object: {body}"));
        assert!(error["message"].is_string(), "no message: {body}");
        assert_eq!(
            body.as_object().map(|o| o.len()),
            Some(1),
            "extra fields: {body}"
        );
        error["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no code: {body}"))
            .to_string()
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

async fn answer(request: reqwest::RequestBuilder, what: &str) -> Answer {
    within(crate::common::PATIENCE, what, async {
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        Answer {
            status,
            headers,
            text,
        }
    })
    .await
}

pub async fn get(url: &str, token: Option<&str>) -> Answer {
    let mut request = http().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    answer(request, &format!("GET {url}")).await
}

pub async fn post(url: &str, body: &Value, token: Option<&str>) -> Answer {
    let mut request = http().post(url).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    answer(request, &format!("POST {url}")).await
}

pub async fn post_raw(url: &str, body: impl Into<reqwest::Body>, content_type: &str) -> Answer {
    let request = http()
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .body(body);
    answer(request, &format!("POST {url}")).await
}

pub async fn nats_connect(url: &str) -> async_nats::Client {
    crate::common::connect_nats(url).await
}

/// A plain (non-queue) subscriber on the subject: it sees a copy of every request and never
/// answers. Returns the count and the payloads (with their arrival time).
pub struct Tap {
    pub count: Arc<AtomicUsize>,
    pub seen: Arc<std::sync::Mutex<Vec<(std::time::SystemTime, RerankRequest)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    pub async fn start(client: &async_nats::Client, subject: &str) -> Self {
        let mut sub = within(
            PATIENCE,
            "tap subscribes",
            client.subscribe(subject.to_string()),
        )
        .await
        .expect("subscribe");
        within(crate::common::PATIENCE, "flush", client.flush())
            .await
            .expect("flush");
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, s) = (count.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while let Some(message) = sub.next().await {
                c.fetch_add(1, Ordering::SeqCst);
                if let Ok(request) = wire::decode_request(&message.payload) {
                    s.lock()
                        .unwrap()
                        .push((std::time::SystemTime::now(), request));
                }
            }
        });
        Self { count, seen, task }
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits (up to the tests' patience) until at least `n` messages were seen; returns the count.
    pub async fn wait_for(&self, n: usize) -> usize {
        let started = std::time::Instant::now();
        while self.count() < n && started.elapsed() < crate::common::PATIENCE {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.count()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A stand-in worker answering every request at once with fixed scores (0, -1, -2, ...), to
/// measure the HTTP path without the model.
pub async fn instant_responder(
    client: &async_nats::Client,
    subject: &str,
) -> tokio::task::JoinHandle<()> {
    let mut sub = client
        .queue_subscribe(subject.to_string(), "stub".to_string())
        .await
        .expect("subscribe");
    within(crate::common::PATIENCE, "flush", client.flush())
        .await
        .expect("flush");
    let client = client.clone();
    tokio::spawn(async move {
        while let Some(message) = sub.next().await {
            let Some(reply_to) = message.reply else {
                continue;
            };
            let n = wire::decode_request(&message.payload)
                .map(|r| r.documents.len())
                .unwrap_or(0);
            let scores: Vec<f32> = (0..n).map(|i| -(i as f32)).collect();
            let reply = RerankReply {
                ranked_indices: wire::rank(&scores, None),
                scores,
                model: "stub".into(),
                usage: Usage {
                    pairs: n as u64,
                    tokens: 10 * n as u64,
                },
                request_id: None,
                spans: None,
            };
            let _ = client
                .publish(reply_to, Bytes::from(wire::encode(&reply)))
                .await;
        }
    })
}

/// Percentile (0–100) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The directory holding the nats-server binary the tests use (for a child's PATH).
pub fn nats_server_dir() -> std::path::PathBuf {
    let candidates = [
        std::env::var_os("NATS_SERVER_BIN").map(std::path::PathBuf::from),
        Some(crate::common::repo_root().join(".tools/nats/bin/nats-server")),
    ];
    for path in candidates.into_iter().flatten() {
        if path.is_file() {
            if let Some(dir) = path.parent() {
                return dir.to_path_buf();
            }
        }
    }
    panic!("nats-server not found: run `make setup`")
}
