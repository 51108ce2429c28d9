//! Serving HTTP/1.1 to clients that may be slow or hostile: the accept loop shared by the sidecar
//! and the worker's probe listener, in place of `axum::serve` (which applies no timeout at all).
//!
//! What is bounded, and where:
//! - **Connections**: at most [`ServerLimits::max_connections`] at once, by default the
//!   open-files limit less [`RESERVED_FDS`]. Past it a new connection is closed at once, so the
//!   process never runs out of file descriptors and keeps serving the connections it has.
//! - **Idle keep-alive**: a connection with no request in progress and no byte received for
//!   [`Timeouts::idle`] is closed (this also covers a connection that never sends anything).
//! - **Request head**: once its first byte arrives, the whole head must arrive within
//!   [`Timeouts::header`].
//! - **Request body**: the whole body must arrive within [`Timeouts::body`] of its head.
//! - **Body size**: a body is cut off ([`BodyError::TooLarge`]) as soon as it passes the limit; a
//!   `Content-Length` over it is refused by [`admit`] before a byte of the body is read.
//! - **Buffered bytes**: every body byte received (plus its connection's read buffer) counts
//!   against one [`BodyBudget`] per listener until its request is answered. A new request whose body does not fit is refused at once by
//!   [`admit`], and a body that outgrows the room left is cut off ([`BodyError::OverBudget`], 503 +
//!   `Retry-After`), instead of the process growing until it is killed.
//!
//! Refusals are [`BodyError`]s; each application renders them in its own error shape and calls
//! [`admit`] after its authentication, so an unauthenticated caller costs no body bytes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower_service::Service;

use crate::wire::ErrorCode;

/// Default time for a whole request head, from its first byte: a head is under 1 KB, which even a
/// 2G link with a second of latency sends in well under this; a slowloris client is dropped after it.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time for a whole request body, from its head: the largest default body (about 2 MiB)
/// takes ~35 s at 512 kbit/s, a poor mobile uplink; a stalled upload holds its bytes no longer.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a kept-alive connection may wait for its next request: below the 90 s idle
/// timeout of common client pools would cause stale-connection retries, so close to it without
/// letting idle sockets pile up for minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default budget of buffered request-body bytes per listener: a quarter of the chart's 512 MiB
/// sidecar limit, since a parsed and re-encoded body briefly costs about three times its size.
pub const DEFAULT_BODY_BUDGET_BYTES: usize = 128 * 1024 * 1024;
/// File descriptors left for everything but client connections (NATS, the probe listener and
/// its connections in `rerank serve`, model files, logs) when the connection cap is derived from
/// the open-files limit.
pub const RESERVED_FDS: usize = 512;
/// Ceiling of the derived connection cap: a connection costs about 25 KiB of memory (hyper's read
/// buffer, the task, socket state; measured with 2,000 stuck connections), so a container's
/// open-files limit of a million must not become a million connections: 8,192 of them take
/// ~200 MiB, which fits the chart's 512 MiB beside the body budget.
pub const MAX_DERIVED_CONNECTIONS: usize = 8_192;
/// Open-files limit assumed where `/proc/self/limits` cannot be read.
const FALLBACK_OPEN_FILES: usize = 1024;
/// Largest read buffer of a connection (hyper's default grows to ~400 KiB, which a few hundred
/// uploads would turn into a hundred MiB outside the body budget). Also the largest request head.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Most a body costs the budget beyond its bytes: its connection's read buffer (which grows to
/// 64 KiB only as a large body streams in), write buffer and bookkeeping.
const BODY_OVERHEAD_BYTES: usize = 2 * READ_BUFFER_BYTES;

/// The budget a body of `bytes` received bytes takes: half again its bytes for the allocator's
/// fragmentation as uploads come and go (glibc keeps freed chunks per thread arena), plus as many
/// bytes again, up to [`BODY_OVERHEAD_BYTES`], for the buffers it made grow. So the budget bounds
/// the memory uploads really take, not only their payload, while a small body costs little
/// (calibrated by `tests/slow_clients.rs`: 150 trickled uploads against a 64 MiB budget).
fn budget_cost(bytes: usize) -> usize {
    bytes
        .saturating_add(bytes / 2)
        .saturating_add(bytes.min(BODY_OVERHEAD_BYTES))
}
/// Smallest derived connection cap, for very low open-files limits.
const MIN_CONNECTIONS: usize = 16;

/// The three clocks a connection runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub header: Duration,
    pub body: Duration,
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header: DEFAULT_HEADER_TIMEOUT,
            body: DEFAULT_BODY_TIMEOUT,
            idle: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// The largest request body accepted: fixed, or asked per request (the sidecar follows the NATS
/// server's `max_payload`, learned at connect and possibly different after a reconnect).
#[derive(Clone)]
pub enum BodyLimit {
    Fixed(usize),
    Dynamic(Arc<dyn Fn() -> usize + Send + Sync>),
}

impl BodyLimit {
    pub fn bytes(&self) -> usize {
        match self {
            BodyLimit::Fixed(limit) => *limit,
            BodyLimit::Dynamic(limit) => limit(),
        }
    }
}

impl std::fmt::Debug for BodyLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyLimit::Fixed(limit) => write!(f, "Fixed({limit})"),
            BodyLimit::Dynamic(limit) => write!(f, "Dynamic(now {})", limit()),
        }
    }
}

/// Everything [`serve`] bounds.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub timeouts: Timeouts,
    pub max_connections: usize,
    pub body_limit: BodyLimit,
    pub body_budget_bytes: usize,
}

/// Why a request body was refused or cut off.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error(
        "the server is buffering its limit of {budget} bytes of request bodies; try again shortly"
    )]
    OverBudget { budget: usize },
    #[error("the request body did not arrive within {0:?}")]
    TimedOut(Duration),
    #[error("cannot read the request body: {0}")]
    Read(String),
}

impl BodyError {
    /// The wire code of the answer.
    pub fn code(&self) -> ErrorCode {
        match self {
            BodyError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
            BodyError::OverBudget { .. } => ErrorCode::Unavailable,
            BodyError::TimedOut(_) | BodyError::Read(_) => ErrorCode::InvalidRequest,
        }
    }
}

/// Bytes of request bodies held at once across every connection of a listener.
#[derive(Debug)]
pub struct BodyBudget {
    capacity: usize,
    used: AtomicUsize,
}

impl BodyBudget {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            used: AtomicUsize::new(0),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes)
                    .filter(|&total| total <= self.capacity)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One request's share of the budget, given back when both its body and its handling are done.
#[derive(Debug)]
struct Held {
    budget: Arc<BodyBudget>,
    reserved: AtomicUsize,
    received: AtomicUsize,
}

impl Held {
    fn new(budget: Arc<BodyBudget>) -> Self {
        Self {
            budget,
            reserved: AtomicUsize::new(0),
            received: AtomicUsize::new(0),
        }
    }

    /// Makes sure `total` bytes are taken for this request; false when the budget is spent.
    fn cover(&self, total: usize) -> bool {
        let reserved = self.reserved.load(Ordering::Acquire);
        if total <= reserved {
            return true;
        }
        if !self.budget.try_take(total - reserved) {
            return false;
        }
        self.reserved.store(total, Ordering::Release);
        true
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give_back(*self.reserved.get_mut());
    }
}

/// Put in every request's extensions by [`serve`]; read by [`admit`].
#[derive(Clone, Debug)]
pub struct BodyAdmission {
    limit: usize,
    held: Arc<Held>,
}

/// The checks before a body is read, for the application to call after authentication: a
/// declared length over the limit is refused without reading, and so is any body when the budget
/// has no room for it (a declared length must fit whole; a chunked body needs some room). Bytes
/// are taken from the budget as they arrive, not on admission, so a head that declares a large
/// body and sends nothing costs the budget nothing. Requests not served by [`serve`] pass.
pub fn admit(request: &Request) -> Result<(), BodyError> {
    let Some(admission) = request.extensions().get::<BodyAdmission>() else {
        return Ok(());
    };
    let budget = &admission.held.budget;
    let over_budget = || BodyError::OverBudget {
        budget: budget.capacity(),
    };
    match request.body().size_hint().exact() {
        Some(0) => Ok(()),
        Some(length) => {
            let length = usize::try_from(length).unwrap_or(usize::MAX);
            if length > admission.limit {
                return Err(BodyError::TooLarge {
                    limit: admission.limit,
                });
            }
            if budget.used().saturating_add(budget_cost(length)) > budget.capacity() {
                return Err(over_budget());
            }
            Ok(())
        }
        None if budget.used() >= budget.capacity() => Err(over_budget()),
        None => Ok(()),
    }
}

/// Reads a whole body into memory and returns the [`BodyError`] that stopped it. A declared
/// length (checked against the limit by then) is allocated once; a chunked body is kept as
/// exact-size copies of its chunks until it is complete, so neither hyper's read buffers nor a
/// doubling `Vec` hold more memory than the budget counts.
pub async fn read_body(body: Body) -> Result<Bytes, BodyError> {
    use futures::StreamExt;
    let declared = body.size_hint().exact();
    let mut stream = body.into_data_stream();
    let mut whole = Vec::with_capacity(declared.map_or(0, |n| usize::try_from(n).unwrap_or(0)));
    let mut chunks: Vec<Bytes> = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) if declared.is_some() => whole.extend_from_slice(&chunk),
            Ok(chunk) => chunks.push(Bytes::copy_from_slice(&chunk)),
            Err(error) => {
                let error = error.into_inner();
                return Err(match error.downcast::<BodyError>() {
                    Ok(body_error) => *body_error,
                    Err(other) => BodyError::Read(other.to_string()),
                });
            }
        }
    }
    if declared.is_some() {
        return Ok(Bytes::from(whole));
    }
    if chunks.len() == 1 {
        return Ok(chunks.swap_remove(0));
    }
    Ok(Bytes::from(chunks.concat()))
}

/// A request body that enforces the limit, the budget and the body timeout as it is read.
struct GuardedBody {
    inner: Incoming,
    limit: usize,
    held: Arc<Held>,
    deadline: Instant,
    timeout: Duration,
    /// Armed at the first wait for data, so bodies read at once cost no timer.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    failed: bool,
}

impl GuardedBody {
    fn fail(&mut self, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.failed = true;
        Poll::Ready(Some(Err(error)))
    }
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let total =
                        this.held.received.fetch_add(data.len(), Ordering::AcqRel) + data.len();
                    if total > this.limit {
                        let limit = this.limit;
                        return this.fail(BodyError::TooLarge { limit });
                    }
                    if !this.held.cover(budget_cost(total)) {
                        let budget = this.held.budget.capacity();
                        return this.fail(BodyError::OverBudget { budget });
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => this.fail(BodyError::Read(error.to_string())),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = this.deadline;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.as_mut().poll(cx).is_ready() {
                    let timeout = this.timeout;
                    return this.fail(BodyError::TimedOut(timeout));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where a connection is in its request cycle, for the watchdog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Between requests (or before the first): the idle timeout runs.
    Idle = 0,
    /// A request head has started to arrive: the header timeout runs.
    Head = 1,
    /// A request is being handled; its body has its own timeout.
    Request = 2,
}

/// The connection's phase and when it began, shared by the stream, the service and the watchdog.
struct ConnClock {
    origin: Instant,
    phase: AtomicU8,
    since_ms: AtomicU64,
    changed: Notify,
}

impl ConnClock {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            phase: AtomicU8::new(Phase::Idle as u8),
            since_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Idle,
            1 => Phase::Head,
            _ => Phase::Request,
        }
    }

    fn enter(&self, phase: Phase) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.since_ms.store(now, Ordering::Release);
        self.phase.store(phase as u8, Ordering::Release);
        self.changed.notify_one();
    }

    /// Bytes arrived: an idle connection has started its next request head.
    fn bytes_read(&self) {
        if self.phase() == Phase::Idle {
            self.enter(Phase::Head);
        }
    }

    /// Resolves with the phase whose timeout passed.
    async fn expired(&self, timeouts: Timeouts) -> Phase {
        loop {
            let notified = self.changed.notified();
            let (phase, since) = (self.phase(), self.since_ms.load(Ordering::Acquire));
            let limit = match phase {
                Phase::Idle => timeouts.idle,
                Phase::Head => timeouts.header,
                Phase::Request => {
                    notified.await;
                    continue;
                }
            };
            let deadline = self.origin + Duration::from_millis(since) + limit;
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    if self.phase() == phase && self.since_ms.load(Ordering::Acquire) == since {
                        return phase;
                    }
                }
            }
        }
    }
}

/// The TCP stream, telling the clock when bytes arrive.
struct WatchedStream {
    inner: TcpStream,
    clock: Arc<ConnClock>,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What every connection of one listener shares.
struct Shared {
    router: Router,
    timeouts: Timeouts,
    body_limit: BodyLimit,
    budget: Arc<BodyBudget>,
}

/// Serves `router` on `listener` within `limits` until `stop` resolves, then lets in-flight
/// requests finish (still under the timeouts) and returns.
/// Pending connections the kernel queues for `accept` (the usual `somaxconn`). tokio's
/// `TcpListener::bind` asks for 1,024; a burst past the queue is dropped in the handshake, where
/// the peer may believe it is connected and wait forever, so the queue is sized for bursts.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener for [`serve`] with a backlog sized for bursts of connections.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    stop: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let max_connections = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let connections = Arc::new(Semaphore::new(max_connections));
    let shared = Arc::new(Shared {
        router,
        timeouts: limits.timeouts,
        body_limit: limits.body_limit,
        budget: Arc::new(BodyBudget::new(limits.body_budget_bytes)),
    });
    let (stopping_tx, stopping) = watch::channel(false);
    let mut refused: u64 = 0;
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            // The peer gave up before we accepted: nothing to do.
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                // Out of file descriptors or memory: wait rather than spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // At the cap: close at once (dropping the stream), so the connections being served
            // keep their descriptors and the caller learns immediately.
            drop(stream);
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    max_connections,
                    "connection cap reached: closing new connections"
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(
            stream,
            shared.clone(),
            stopping.clone(),
            permit,
        ));
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    // Each connection holds a permit until it ends: having them all means every one has ended.
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let _ = connections.acquire_many(all).await;
    Ok(())
}

fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

async fn serve_connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    mut stopping: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let clock = Arc::new(ConnClock::new());
    let io = TokioIo::new(WatchedStream {
        inner: stream,
        clock: clock.clone(),
    });
    let service = {
        let (clock, shared) = (clock.clone(), shared.clone());
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            clock.enter(Phase::Request);
            let held = Arc::new(Held::new(shared.budget.clone()));
            let limit = shared.body_limit.bytes();
            let (mut parts, body) = request.into_parts();
            parts.extensions.insert(BodyAdmission {
                limit,
                held: held.clone(),
            });
            let body = GuardedBody {
                inner: body,
                limit,
                held: held.clone(),
                deadline: Instant::now() + shared.timeouts.body,
                timeout: shared.timeouts.body,
                timer: None,
                failed: false,
            };
            let request = Request::from_parts(parts, Body::new(body));
            let mut router = shared.router.clone();
            let clock = clock.clone();
            async move {
                let response = router.call(request).await;
                // The request's bytes are gone once it is answered.
                drop(held);
                clock.enter(Phase::Idle);
                response
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The watchdog below applies the header timeout (hyper's would need its timer and would
    // count idle time as header time).
    builder
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(READ_BUFFER_BYTES);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let watchdog = clock.expired(shared.timeouts);
    tokio::pin!(watchdog);
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "HTTP connection ended with an error");
                }
                return;
            }
            phase = &mut watchdog => {
                // Dropping the connection closes the socket.
                tracing::debug!(?phase, "closing a connection past its timeout");
                return;
            }
            _ = stopping.wait_for(|stop| *stop), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The soft open-files limit (`RLIMIT_NOFILE`) from `/proc/self/limits`; `None` where unknown.
pub fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files(&limits)
}

fn parse_open_files(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.split_whitespace().nth(3)?;
    if soft == "unlimited" {
        return Some(usize::MAX);
    }
    soft.parse().ok()
}

/// The connection cap derived from the open-files limit: all of it but [`RESERVED_FDS`], at most
/// [`MAX_DERIVED_CONNECTIONS`].
pub fn default_max_connections() -> usize {
    open_files_limit()
        .unwrap_or(FALLBACK_OPEN_FILES)
        .saturating_sub(RESERVED_FDS)
        .clamp(MIN_CONNECTIONS, MAX_DERIVED_CONNECTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_files_limit_is_parsed() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95000                95000                processes \n\
                      Max open files            20000                524288               files     \n";
        assert_eq!(parse_open_files(limits), Some(20_000));
        assert_eq!(parse_open_files("Max cpu time unlimited"), None);
        assert!(open_files_limit().is_some_and(|n| n > 0));
        assert!(default_max_connections() >= MIN_CONNECTIONS);
    }

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let budget = Arc::new(BodyBudget::new(100));
        let first = Held::new(budget.clone());
        assert!(first.cover(60));
        assert!(first.cover(40), "already covered");
        let second = Held::new(budget.clone());
        assert!(!second.cover(41), "over the budget");
        assert!(second.cover(40));
        assert_eq!(budget.used(), 100);
        drop(first);
        assert_eq!(budget.used(), 40);
        drop(second);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn refusals_use_the_wire_codes() {
        assert_eq!(
            BodyError::TooLarge { limit: 1 }.code(),
            ErrorCode::PayloadTooLarge
        );
        assert_eq!(
            BodyError::OverBudget { budget: 1 }.code(),
            ErrorCode::Unavailable
        );
        assert_eq!(
            BodyError::TimedOut(Duration::from_secs(1)).code(),
            ErrorCode::InvalidRequest
        );
    }
}
