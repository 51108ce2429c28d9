//! Slow and large-body clients against a real sidecar and a real worker's probe (nats-server, tiny
//! model, loopback): stuck connections are closed by the timeouts while legitimate requests keep
//! succeeding, trickled bodies stay within the buffered-bytes budget (RSS read from /proc), and
//! bodies are judged (auth, size, budget) before they are read.
//!
//! The timed facts here are lower bounds only (the server must not close a connection before its
//! timeout), which a slow machine cannot break; upper bounds are generous polling limits.

use crate::common;
use crate::stack;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rerank_service::sidecar::body_limit_for;
use stack::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "slow-clients-key";

/// A `rerank sidecar` child process on 127.0.0.1 (its own file-descriptor table and RSS).
struct SidecarProcess {
    child: Child,
    port: u16,
}

impl SidecarProcess {
    fn start(nats_url: &str, args: &[&str]) -> Self {
        let port = free_port();
        let child = Command::new(rerank_bin())
            .arg("sidecar")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--nats-url", nats_url])
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start `rerank sidecar`");
        let sidecar = Self { child, port };
        let start = Instant::now();
        while http_get_status(port, "/live") != Some(200) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "sidecar not listening within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sidecar
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id()).expect("the sidecar is running")
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// (soft, hard) open-files limits of this process.
fn open_files() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let mut fields = line.split_whitespace().skip(3);
    let mut next = || match fields.next() {
        Some("unlimited") => u64::MAX,
        Some(n) => n.parse().expect("a number"),
        None => panic!("malformed {line:?}"),
    };
    (next(), next())
}

/// Makes sure this process may hold `needed` descriptors, raising its soft limit to the hard one
/// (with util-linux `prlimit` on its own PID) when it is lower.
fn ensure_open_files(needed: u64) {
    let (soft, hard) = open_files();
    if soft >= needed {
        return;
    }
    assert!(
        hard >= needed,
        "this test holds {needed} sockets; the hard open-files limit is {hard}"
    );
    let status = Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={hard}:{hard}"))
        .status()
        .expect("prlimit (util-linux) to raise the open-files limit");
    assert!(status.success(), "prlimit failed");
    assert!(open_files().0 >= needed, "open-files limit still too low");
}

/// One HTTP answer read off a raw socket.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    head: String,
    body: String,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    fn code(&self) -> String {
        let body: serde_json::Value =
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"));
        body["error"]["code"].as_str().unwrap_or("").to_string()
    }
}

/// Reads one answer (head plus Content-Length bytes); `None` if the server closed first.
async fn read_answer(stream: &mut TcpStream) -> Option<RawAnswer> {
    let mut response = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&response).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let answer = RawAnswer {
                status: head.split_whitespace().nth(1)?.parse().ok()?,
                head: head.to_string(),
                body: String::new(),
            };
            let length: usize = answer
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return Some(RawAnswer {
                    body: body[..length].to_string(),
                    ..answer
                });
            }
        }
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
        }
    }
}

fn head(path: &str, length: Option<usize>, token: Option<&str>) -> Vec<u8> {
    let mut head =
        format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n");
    match length {
        Some(length) => head.push_str(&format!("Content-Length: {length}\r\n")),
        None => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Sends only a request head and returns the answer that comes without a byte of the body.
async fn answer_to_head(addr: SocketAddr, head: &[u8], what: &str) -> RawAnswer {
    within(Duration::from_secs(20), what, async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(head).await.expect("head");
        read_answer(&mut stream)
            .await
            .unwrap_or_else(|| panic!("{what}: closed without an answer"))
    })
    .await
}

/// A legitimate caller: POSTs the seed request until `done`, honouring 503 + Retry-After like a
/// well-behaved client; returns (answered 200, 503 retries). Panics on any other answer.
async fn legitimate_caller(
    url: String,
    token: Option<&'static str>,
    done: Arc<AtomicUsize>,
) -> (usize, usize) {
    let (mut ok, mut retried) = (0, 0);
    while done.load(Ordering::SeqCst) == 0 || ok == 0 {
        let answer = post(&url, &seed_request(), token).await;
        match answer.status {
            200 => ok += 1,
            503 => {
                assert_eq!(
                    answer.header("retry-after").as_deref(),
                    Some("1"),
                    "{}",
                    answer.text
                );
                retried += 1;
                assert!(retried < 100, "legitimate requests kept getting 503");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => panic!("a legitimate request got {other}: {}", answer.text),
        }
    }
    (ok, retried)
}

/// Opens a connection, sends `prefix`, and waits for the server to close it; returns how long the
/// connection lived after the prefix was sent.
async fn stuck_connection(
    addr: SocketAddr,
    prefix: &'static [u8],
    connected: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
) -> Duration {
    let mut stream = within(Duration::from_secs(30), "connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    if !prefix.is_empty() {
        stream.write_all(prefix).await.expect("write the prefix");
    }
    connected.fetch_add(1, Ordering::SeqCst);
    let opened = Instant::now();
    let mut buffer = [0u8; 1024];
    while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
    closed.fetch_add(1, Ordering::SeqCst);
    opened.elapsed()
}

const HALF_HEAD: &[u8] = b"POST /rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty";
const HALF_BODY: &[u8] =
    b"POST /rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{\"query\": \"q\"";
const PROBE_HALF_HEAD: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAcc";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_connections_are_closed_by_the_timeouts_while_requests_succeed() {
    const IN_HEADERS: usize = 1_000;
    const IN_BODY: usize = 1_000;
    const IDLE: usize = 100;
    const ON_PROBE: usize = 150;
    ensure_open_files((IN_HEADERS + IN_BODY + IDLE + ON_PROBE + 256) as u64);
    let timeouts = [
        "--http-header-timeout",
        "2",
        "--http-body-timeout",
        "2",
        "--http-idle-timeout",
        "3",
    ];
    let nats = NatsServer::start();
    let worker = tokio::task::spawn_blocking({
        let url = nats.url();
        move || WorkerProcess::start(&url, &timeouts)
    })
    .await
    .unwrap();
    let sidecar = SidecarProcess::start(&nats.url(), &timeouts);
    let probe = SocketAddr::from(([127, 0, 0, 1], worker.health_port));

    let closed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let caller = tokio::spawn(legitimate_caller(
        sidecar.url("/rerank"),
        None,
        done.clone(),
    ));
    let probe_caller = tokio::spawn({
        let (url, done) = (worker.probe_url("/live"), done.clone());
        async move {
            let mut ok = 0;
            while done.load(Ordering::SeqCst) == 0 || ok == 0 {
                let answer = get(&url, None).await;
                assert_eq!(
                    answer.status, 200,
                    "/live during the attack: {}",
                    answer.text
                );
                ok += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ok
        }
    });

    // Open the attack in batches, so the listen backlog is not what refuses them.
    let mut attack = Vec::new();
    let plan = [
        (
            sidecar.addr(),
            HALF_HEAD,
            IN_HEADERS,
            Duration::from_secs(2),
        ),
        (sidecar.addr(), HALF_BODY, IN_BODY, Duration::from_secs(2)),
        (sidecar.addr(), &b""[..], IDLE, Duration::from_secs(3)),
        (probe, PROBE_HALF_HEAD, ON_PROBE, Duration::from_secs(2)),
    ];
    // Each batch is connected before the next starts, so the accept queue never overflows (an
    // overflowing queue drops handshakes the client believes complete: no server could close them).
    let connected = Arc::new(AtomicUsize::new(0));
    for (addr, prefix, count, timeout) in plan {
        for batch in 0..count.div_ceil(100) {
            let n = 100.min(count - batch * 100);
            for _ in 0..n {
                let task = tokio::spawn(stuck_connection(
                    addr,
                    prefix,
                    connected.clone(),
                    closed.clone(),
                ));
                attack.push((task, timeout, String::from_utf8_lossy(prefix).to_string()));
            }
            let started = Instant::now();
            while connected.load(Ordering::SeqCst) < attack.len() {
                assert!(
                    started.elapsed() < PATIENCE,
                    "attack connections not established"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    let total = attack.len();

    // Every stuck connection is closed by the server (the bound is generous; the timeouts are 2-3 s).
    let start = Instant::now();
    while closed.load(Ordering::SeqCst) < total {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{} of {total} stuck connections still open after 120 s",
            total - closed.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut longest = Duration::ZERO;
    for (task, timeout, prefix) in attack {
        let lived = task.await.expect("attack task");
        // Never before its timeout: a slow client that is merely slow must not be cut short.
        assert!(
            lived + Duration::from_millis(50) >= timeout,
            "a connection stuck after {prefix:?} was closed after {lived:?}, before its {timeout:?} timeout"
        );
        longest = longest.max(lived);
    }
    done.store(1, Ordering::SeqCst);
    let (ok, retried) = within(Duration::from_secs(60), "legitimate caller", caller)
        .await
        .unwrap();
    let probes = within(Duration::from_secs(60), "probe caller", probe_caller)
        .await
        .unwrap();
    assert_eq!(
        retried, 0,
        "no body is buffered, so no request waits for the budget"
    );
    // Still serving afterwards.
    let answer = post(&sidecar.url("/rerank"), &seed_request(), None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    println!(
        "slow clients: {total} stuck connections ({IN_HEADERS} in headers, {IN_BODY} in bodies, {IDLE} idle, {ON_PROBE} on the probe) all closed within {:.1} s (longest lived {longest:.1?}); {ok} rerank requests and {probes} /live probes answered 200 meanwhile",
        start.elapsed().as_secs_f64()
    );
}

/// How a trickled upload ended.
#[derive(Debug, Default, Clone)]
struct Trickles {
    too_large: usize,
    over_budget: usize,
    closed: usize,
    most_sent: usize,
}

/// Trickles a chunked 8 MB body (32 KiB every 50 ms) until the server answers or closes.
async fn trickle(addr: SocketAddr, outcomes: Arc<Mutex<Trickles>>) {
    const TOTAL: usize = 8 * 1024 * 1024;
    const CHUNK: usize = 32 * 1024;
    let mut stream = within(Duration::from_secs(30), "connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    stream
        .write_all(&head("/rerank", None, None))
        .await
        .expect("head");
    let mut chunk = format!("{CHUNK:x}\r\n").into_bytes();
    chunk.extend(std::iter::repeat_n(b'x', CHUNK));
    chunk.extend_from_slice(b"\r\n");
    let mut sent = 0;
    let (mut reader, mut writer) = stream.split();
    let mut first = [0u8; 1];
    let answered = loop {
        if sent >= TOTAL {
            break false;
        }
        tokio::select! {
            read = reader.read(&mut first) => break matches!(read, Ok(1)),
            written = async {
                writer.write_all(&chunk).await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, std::io::Error>(())
            } => {
                if written.is_err() {
                    break false;
                }
                sent += CHUNK;
            }
        }
    };
    assert!(sent < TOTAL, "a trickled 8 MB body was read to its end");
    let answer = if answered {
        let mut rest = Vec::new();
        let _ = within(
            Duration::from_secs(30),
            "rest of the answer",
            reader.read_to_end(&mut rest),
        )
        .await;
        let text = format!("{}{}", first[0] as char, String::from_utf8_lossy(&rest));
        text.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
    } else {
        None
    };
    let mut outcomes = outcomes.lock().unwrap();
    outcomes.most_sent = outcomes.most_sent.max(sent);
    match answer {
        Some(413) => outcomes.too_large += 1,
        Some(503) => outcomes.over_budget += 1,
        Some(other) => panic!("a trickled 8 MB body got {other}"),
        // Closed while we were still sending (the answer lost to the reset).
        None => outcomes.closed += 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_bodies_stay_within_the_buffered_bytes_budget() {
    const UPLOADS: usize = 150;
    const BUDGET: usize = 64 * 1024 * 1024;
    ensure_open_files((UPLOADS + 256) as u64);
    let nats = NatsServer::start();
    let _worker = tokio::task::spawn_blocking({
        let url = nats.url();
        move || WorkerProcess::start(&url, &[])
    })
    .await
    .unwrap();
    let budget = BUDGET.to_string();
    let sidecar = SidecarProcess::start(
        &nats.url(),
        &[
            "--http-body-budget-bytes",
            &budget,
            "--http-body-timeout",
            "30",
        ],
    );
    // Warm: the baseline includes what serving a request allocates anyway.
    for _ in 0..20 {
        let answer = post(&sidecar.url("/rerank"), &seed_request(), None).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    let baseline = sidecar.rss_kib();

    let done = Arc::new(AtomicUsize::new(0));
    let caller = tokio::spawn(legitimate_caller(
        sidecar.url("/rerank"),
        None,
        done.clone(),
    ));
    let outcomes = Arc::new(Mutex::new(Trickles::default()));
    let uploads: Vec<_> = (0..UPLOADS)
        .map(|_| tokio::spawn(trickle(sidecar.addr(), outcomes.clone())))
        .collect();
    let mut peak = baseline;
    let start = Instant::now();
    while uploads.iter().any(|u| !u.is_finished()) {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "trickled uploads still running after 180 s"
        );
        peak = peak.max(sidecar.rss_kib());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for upload in uploads {
        upload.await.expect("upload task");
    }
    peak = peak.max(sidecar.rss_kib());
    done.store(1, Ordering::SeqCst);
    let (ok, retried) = within(Duration::from_secs(120), "legitimate caller", caller)
        .await
        .unwrap();
    let increase = (peak - baseline) * 1024;
    let outcomes = outcomes.lock().unwrap().clone();
    println!(
        "trickle: {UPLOADS} uploads of 8 MB: {} cut at the body limit (413), {} refused over the budget (503), {} closed mid-send; most sent {:.1} MiB; sidecar RSS {:.0} MiB -> peak {:.0} MiB (+{:.0} MiB, budget {} MiB); {ok} legitimate requests answered 200 ({retried} retried after 503)",
        outcomes.too_large,
        outcomes.over_budget,
        outcomes.closed,
        outcomes.most_sent as f64 / 1048576.0,
        baseline as f64 / 1024.0,
        peak as f64 / 1024.0,
        increase as f64 / 1048576.0,
        BUDGET >> 20
    );
    assert!(
        increase < BUDGET as u64,
        "the sidecar's RSS grew by {increase} bytes, over the {BUDGET}-byte budget"
    );
    assert!(ok > 0);
    let answer = post(&sidecar.url("/rerank"), &seed_request(), None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_judged_before_they_are_read() {
    let nats = NatsServer::start();
    let worker = tokio::task::spawn_blocking({
        let url = nats.url();
        move || WorkerProcess::start(&url, &[])
    })
    .await
    .unwrap();
    let locked = Sidecar::start_with(&nats.url(), |c| c.api_key = Some(TOKEN.into())).await;
    // The default limit follows the NATS server's max_payload (1 MiB by default).
    let limit = body_limit_for(1024 * 1024);
    assert_eq!(locked.state.max_body_bytes(), limit);

    // A Content-Length over the limit: 413 without a byte of the body.
    let answer = answer_to_head(
        locked.addr,
        &head("/rerank", Some(100_000_000), Some(TOKEN)),
        "413",
    )
    .await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (413, "payload_too_large"),
        "{answer:?}"
    );
    assert!(answer.body.contains("max-body-bytes"), "{answer:?}");
    let answer = answer_to_head(
        locked.addr,
        &head("/v1/rerank", Some(limit + 1), Some(TOKEN)),
        "limit + 1",
    )
    .await;
    assert_eq!(answer.status, 413, "{answer:?}");

    // Authentication first: no token is 401 before the body, even when the body is too large.
    for length in [1_000, limit + 1, 100_000_000] {
        let answer = answer_to_head(locked.addr, &head("/rerank", Some(length), None), "401").await;
        assert_eq!(
            (answer.status, answer.code().as_str()),
            (401, "unauthorized"),
            "{length}: {answer:?}"
        );
    }
    let answer = answer_to_head(
        locked.addr,
        &head("/rerank", None, Some("wrong")),
        "401 chunked",
    )
    .await;
    assert_eq!(answer.status, 401, "{answer:?}");

    // A chunked body is cut off as it passes the limit: the answer comes with no byte more.
    let answer = within(Duration::from_secs(60), "chunked over the limit", async {
        let mut stream = TcpStream::connect(locked.addr).await.expect("connect");
        stream
            .write_all(&head("/rerank", None, Some(TOKEN)))
            .await
            .expect("head");
        let chunk_len = 64 * 1024;
        let mut chunk = format!("{chunk_len:x}\r\n").into_bytes();
        chunk.extend(std::iter::repeat_n(b'x', chunk_len));
        chunk.extend_from_slice(b"\r\n");
        let mut sent = 0;
        while sent <= limit {
            stream.write_all(&chunk).await.expect("chunk");
            sent += chunk_len;
        }
        // Just past the limit, and nothing more is sent.
        read_answer(&mut stream).await.expect("an answer")
    })
    .await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (413, "payload_too_large"),
        "{answer:?}"
    );

    // The probe takes no bodies: refused unread too.
    let probe = SocketAddr::from(([127, 0, 0, 1], worker.health_port));
    let answer = answer_to_head(probe, &head("/live", Some(100_000_000), None), "probe 413").await;
    assert_eq!(answer.status, 413, "{answer:?}");

    // Within the limit and authenticated, the request is served.
    let answer = post(&locked.url("/rerank"), &seed_request(), Some(TOKEN)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_budget_new_bodies_get_503_and_past_the_cap_connections_are_closed() {
    let nats = NatsServer::start();
    let _worker = tokio::task::spawn_blocking({
        let url = nats.url();
        move || WorkerProcess::start(&url, &[])
    })
    .await
    .unwrap();
    const BUDGET: usize = 2 * 1024 * 1024;
    const CAP: usize = 20;
    let sidecar = Sidecar::start_with(&nats.url(), |c| {
        c.body_budget_bytes = BUDGET;
        c.max_body_bytes = Some(BUDGET / 2);
        c.max_connections = CAP;
    })
    .await;

    // One upload sends 900 KB of a 1 MB body and stalls: those bytes are buffered (and cost
    // the budget ~1.5 MB with their overhead).
    let mut holder = TcpStream::connect(sidecar.addr).await.expect("connect");
    holder
        .write_all(&head("/rerank", Some(1_000_000), None))
        .await
        .unwrap();
    holder.write_all(&vec![b' '; 900_000]).await.unwrap();
    // A body of 400 KB no longer fits: 503 + Retry-After at once, before a byte of it is sent.
    // (Until the server has read the holder's bytes it still fits: poll.)
    let start = Instant::now();
    let refused = loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no 503 within 30 s"
        );
        let mut stream = TcpStream::connect(sidecar.addr).await.expect("connect");
        stream
            .write_all(&head("/rerank", Some(400_000), None))
            .await
            .unwrap();
        if let Ok(Some(answer)) =
            tokio::time::timeout(Duration::from_millis(500), read_answer(&mut stream)).await
        {
            break answer;
        }
    };
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (503, "unavailable"),
        "{refused:?}"
    );
    assert_eq!(
        refused.header("retry-after").as_deref(),
        Some("1"),
        "{refused:?}"
    );
    assert!(
        refused.body.contains("http-body-budget-bytes"),
        "{refused:?}"
    );
    // A small request still fits beside it.
    let answer = post(&sidecar.url("/rerank"), &seed_request(), None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    // The holder's bytes go back once it is gone: the 400 KB body is admitted again (it then
    // waits for its body, so no answer comes).
    drop(holder);
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "budget not given back within 30 s"
        );
        let mut stream = TcpStream::connect(sidecar.addr).await.expect("connect");
        stream
            .write_all(&head("/rerank", Some(400_000), None))
            .await
            .unwrap();
        if tokio::time::timeout(Duration::from_millis(500), read_answer(&mut stream))
            .await
            .is_err()
        {
            break;
        }
    }

    // The connection cap: CAP connections held, the next is closed at once (before any request).
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(TcpStream::connect(sidecar.addr).await.expect("connect"));
    }
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no connection refused at the cap"
        );
        let mut extra = TcpStream::connect(sidecar.addr).await.expect("connect");
        let mut buffer = [0u8; 16];
        // Closed by the server without an answer (an earlier connection may still be in the
        // server's hands while the holder's ends; then the extra one is served: try again).
        match tokio::time::timeout(Duration::from_millis(500), extra.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            _ => held.push(extra),
        }
    }
    // Freeing connections lets new ones in.
    held.clear();
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no connection served after the cap freed"
        );
        if let Ok(answer) = http().get(sidecar.url("/live")).send().await {
            assert_eq!(answer.status().as_u16(), 200);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
