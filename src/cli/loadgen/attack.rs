//! The hostile clients of `rerank loadgen --attack`: many connections that stall in their
//! headers, stall in their bodies, or trickle bodies far over the limit. Each reconnects as soon
//! as the server closes it, so the pressure holds for the whole measurement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// Send half a request head, then nothing.
    SlowHeaders,
    /// Send a head announcing a 1 KB body and 10 bytes of it, then nothing.
    SlowBodies,
    /// Trickle a chunked 8 MB body (16 KiB every 100 ms).
    Trickle,
}

/// The attacked address (`host:port`) of a base URL like `http://127.0.0.1:8001`.
pub fn target(url: &str) -> anyhow::Result<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    anyhow::ensure!(!authority.is_empty(), "no host in {url:?}");
    Ok(authority.to_string())
}

const TRICKLE_TOTAL: usize = 8 * 1024 * 1024;
const TRICKLE_CHUNK: usize = 16 * 1024;
const TRICKLE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Default, Serialize)]
pub struct AttackReport {
    pub kind: Option<AttackKind>,
    pub connections: usize,
    /// Connections the attack opened in all (it reopens those the server closes).
    pub opened: u64,
    /// Connections the server closed (or refused) while the attack ran.
    pub closed_by_server: u64,
}

pub struct Attack {
    kind: AttackKind,
    connections: usize,
    opened: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Attack {
    pub fn start(target: String, kind: AttackKind, connections: usize) -> Self {
        let (stop, stopped) = watch::channel(false);
        let (opened, closed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..connections {
            let (target, stopped) = (target.clone(), stopped.clone());
            let (opened, closed) = (opened.clone(), closed.clone());
            tasks.spawn(async move {
                let mut stop = stopped.clone();
                loop {
                    if *stop.borrow() {
                        return;
                    }
                    let Ok(stream) = TcpStream::connect(&target).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    opened.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        () = attack_once(stream, kind) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        Self {
            kind,
            connections,
            opened,
            closed,
            stop,
            tasks,
        }
    }

    /// Waits until `count` connections were opened (bounded by `limit`).
    pub async fn wait_opened(&self, count: usize, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while (self.opened.load(Ordering::Relaxed) as usize) < count
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(mut self) -> AttackReport {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        AttackReport {
            kind: Some(self.kind),
            connections: self.connections,
            opened: self.opened.load(Ordering::Relaxed),
            closed_by_server: self.closed.load(Ordering::Relaxed),
        }
    }
}

/// One hostile connection, until the server closes it.
async fn attack_once(mut stream: TcpStream, kind: AttackKind) {
    let sent = match kind {
        AttackKind::SlowHeaders => stream
            .write_all(b"POST /rerank HTTP/1.1\r\nHost: attack\r\nContent-Ty")
            .await
            .is_ok(),
        AttackKind::SlowBodies => stream
            .write_all(
                b"POST /rerank HTTP/1.1\r\nHost: attack\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"query\":",
            )
            .await
            .is_ok(),
        AttackKind::Trickle => trickle(&mut stream).await,
    };
    if sent {
        // Wait for the server to close the connection (an answer may come first).
        let mut buffer = [0u8; 4096];
        while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
    }
}

/// Sends a chunked 8 MB body slowly; false once the server stops taking it.
async fn trickle(stream: &mut TcpStream) -> bool {
    let head = b"POST /rerank HTTP/1.1\r\nHost: attack\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if stream.write_all(head).await.is_err() {
        return false;
    }
    let mut chunk = format!("{TRICKLE_CHUNK:x}\r\n").into_bytes();
    chunk.extend(std::iter::repeat_n(b'x', TRICKLE_CHUNK));
    chunk.extend_from_slice(b"\r\n");
    let mut interval = tokio::time::interval(TRICKLE_EVERY);
    let (mut stream_read, mut stream_write) = stream.split();
    let mut sink = [0u8; 4096];
    let mut sent = 0;
    while sent < TRICKLE_TOTAL {
        tokio::select! {
            _ = interval.tick() => {
                if stream_write.write_all(&chunk).await.is_err() {
                    return false;
                }
                sent += TRICKLE_CHUNK;
            }
            // The server answered (413, 503) or closed: stop sending.
            read = stream_read.read(&mut sink) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return false;
                }
                return true;
            }
        }
    }
    true
}
