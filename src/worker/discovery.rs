//! NATS service discovery (ADR-32: `$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`), answered from the
//! worker's own counters.
//!
//! Why not async-nats's service API (`service_builder().start()` + `endpoint()`): a worker has to
//! serve its subject through that API's endpoint for STATS to count anything, and that endpoint
//! cannot do what the worker needs:
//! - error replies: `Request::respond(Err(..))` sends the ADR-32 headers with an *empty* body,
//!   while our callers read a MessagePack `ErrorReply` body next to those headers;
//! - drain: `Endpoint::stop()`/`Service::stop()` plainly unsubscribe, so requests the server had
//!   already routed to a stopping worker are lost (our core intake drains its subscription and
//!   answers them);
//! - the JetStream intake has no core subscription at all, yet `nats micro stats rerank` should
//!   still count its jobs.
//!
//! So the worker serves through its own intake and this module answers the nine discovery
//! subjects (`$SRV.<VERB>`, `$SRV.<VERB>.<name>`, `$SRV.<VERB>.<name>.<id>`) itself, in the JSON
//! shapes `nats micro info|stats` reads (`io.nats.micro.v1.*_response`). The counters are
//! [`ServiceStats`], fed by the handler for every reply it sends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

/// Who this instance is: the service-level fields of every discovery answer.
#[derive(Debug, Clone)]
pub struct ServiceIdentity {
    /// Service name (`rerank`).
    pub name: String,
    /// Unique per instance.
    pub id: String,
    /// Semantic version of the worker.
    pub version: String,
    pub description: String,
    /// Model, device, dtype, max_length, subject...
    pub metadata: HashMap<String, String>,
}

/// The one endpoint a worker serves.
#[derive(Debug, Clone)]
pub struct EndpointInfo {
    pub name: String,
    /// The subject requests arrive on (the core subject, or the JetStream jobs subject).
    pub subject: String,
    /// The core queue group, or the durable consumer's name for the JetStream intake.
    pub queue_group: String,
    pub metadata: HashMap<String, String>,
}

#[derive(Debug, Default)]
struct Counters {
    requests: u64,
    errors: u64,
    processing: Duration,
    /// `"<status>:<description>"`, as ADR-32 and async-nats write it.
    last_error: Option<String>,
}

/// Request counters of one worker, shared by the handlers and the discovery responder.
#[derive(Debug, Clone, Default)]
pub struct ServiceStats {
    inner: Arc<Mutex<Counters>>,
}

/// A snapshot of [`ServiceStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub errors: u64,
    pub processing: Duration,
    pub last_error: Option<String>,
}

impl ServiceStats {
    /// Counts one answered request that took `took`; `error` is its status and message.
    pub fn record(&self, took: Duration, error: Option<(u16, &str)>) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        c.requests += 1;
        c.processing += took;
        if let Some((status, message)) = error {
            c.errors += 1;
            c.last_error = Some(format!("{status}:{message}"));
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        StatsSnapshot {
            requests: c.requests,
            errors: c.errors,
            processing: c.processing,
            last_error: c.last_error.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Ping,
    Info,
    Stats,
}

impl Verb {
    const ALL: [Verb; 3] = [Verb::Ping, Verb::Info, Verb::Stats];

    fn token(self) -> &'static str {
        match self {
            Verb::Ping => "PING",
            Verb::Info => "INFO",
            Verb::Stats => "STATS",
        }
    }
}

/// The running responder; dropping or [`stop`](Self::stop)ping it leaves discovery.
pub struct Discovery {
    task: tokio::task::JoinHandle<()>,
}

impl Discovery {
    /// Subscribes to the nine discovery subjects and answers them until stopped.
    pub async fn start(
        client: async_nats::Client,
        identity: ServiceIdentity,
        endpoint: EndpointInfo,
        stats: ServiceStats,
    ) -> Result<Self, async_nats::SubscribeError> {
        let mut subscriptions = Vec::new();
        for verb in Verb::ALL {
            for subject in [
                format!("$SRV.{}", verb.token()),
                format!("$SRV.{}.{}", verb.token(), identity.name),
                format!("$SRV.{}.{}.{}", verb.token(), identity.name, identity.id),
            ] {
                let subscriber = client.subscribe(subject).await?;
                subscriptions.push(subscriber.map(move |message| (verb, message)).boxed());
            }
        }
        let started = rfc3339(SystemTime::now());
        let responder = Responder {
            identity,
            endpoint,
            stats,
            started,
        };
        let task = tokio::spawn(async move {
            let mut requests = futures::stream::select_all(subscriptions);
            while let Some((verb, message)) = requests.next().await {
                let Some(reply) = message.reply else { continue };
                let body = responder.answer(verb);
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                if let Err(e) = client.publish(reply, Bytes::from(bytes)).await {
                    tracing::debug!(error = %e, "could not answer service discovery");
                }
            }
        });
        Ok(Self { task })
    }

    /// Leaves discovery (the subscriptions end with the task).
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Responder {
    identity: ServiceIdentity,
    endpoint: EndpointInfo,
    stats: ServiceStats,
    started: String,
}

impl Responder {
    fn answer(&self, verb: Verb) -> Value {
        let id = &self.identity;
        let ep = &self.endpoint;
        match verb {
            Verb::Ping => json!({
                "type": "io.nats.micro.v1.ping_response",
                "name": id.name,
                "id": id.id,
                "version": id.version,
                "metadata": id.metadata,
            }),
            Verb::Info => json!({
                "type": "io.nats.micro.v1.info_response",
                "name": id.name,
                "id": id.id,
                "version": id.version,
                "description": id.description,
                "metadata": id.metadata,
                "endpoints": [{
                    "name": ep.name,
                    "subject": ep.subject,
                    "queue_group": ep.queue_group,
                    "metadata": ep.metadata,
                }],
            }),
            Verb::Stats => {
                let s = self.stats.snapshot();
                let average = if s.requests == 0 {
                    0
                } else {
                    s.processing.as_nanos() / u128::from(s.requests)
                };
                json!({
                    "type": "io.nats.micro.v1.stats_response",
                    "name": id.name,
                    "id": id.id,
                    "version": id.version,
                    "metadata": id.metadata,
                    "started": self.started,
                    "endpoints": [{
                        "name": ep.name,
                        "subject": ep.subject,
                        "queue_group": ep.queue_group,
                        "num_requests": s.requests,
                        "num_errors": s.errors,
                        "processing_time": nanos(s.processing),
                        "average_processing_time": u64::try_from(average).unwrap_or(u64::MAX),
                        "last_error": s.last_error.unwrap_or_default(),
                    }],
                })
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` (UTC) without a date library.
fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:09}Z",
        since.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_210_096, 5);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.000000005Z");
    }

    #[test]
    fn stats_count_errors_and_keep_the_last() {
        let stats = ServiceStats::default();
        stats.record(Duration::from_millis(3), None);
        stats.record(Duration::from_millis(1), Some((400, "bad")));
        let s = stats.snapshot();
        assert_eq!((s.requests, s.errors), (2, 1));
        assert_eq!(s.processing, Duration::from_millis(4));
        assert_eq!(s.last_error.as_deref(), Some("400:bad"));
    }
}
