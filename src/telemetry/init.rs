//! Process-wide tracing setup: structured logs plus OpenTelemetry spans.
//!
//! The W3C propagator and an SDK tracer provider are always installed, so trace context flows
//! through every hop even when nothing is exported. Export (OTLP over HTTP/protobuf) is on only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the standard
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)` are honoured by the SDK.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written to stderr (`--log-format text|json`; the CLI maps the names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("cannot install the tracing subscriber: {0}")]
    Subscriber(String),
}

/// Flushes and stops span export when dropped (at the end of `main`).
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("telemetry shutdown: {e}");
        }
    }
}

fn export_enabled() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()))
}

/// Libraries that log message payloads or HTTP bodies at TRACE; capped at DEBUG unless text
/// logging was asked for, so `RUST_LOG=trace` cannot leak documents.
const PAYLOAD_LOGGING_TARGETS: [&str; 4] = ["async_nats", "hyper", "h2", "reqwest"];

/// Installs logging and tracing for a process whose default service name is `service`.
/// `log_text` allows request text in logs (debugging only).
pub fn init(
    service: &str,
    format: LogFormat,
    log_text: bool,
) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_string());
    }
    let mut provider = SdkTracerProvider::builder().with_resource(resource.build());
    if export_enabled() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer("rerank-service");

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,hyper=warn,reqwest=warn"));
    // Caps (never raises) the payload-logging libraries below TRACE unless text logs are allowed.
    let privacy = tracing_subscriber::filter::filter_fn(move |meta| {
        log_text
            || *meta.level() != tracing::Level::TRACE
            || !PAYLOAD_LOGGING_TARGETS
                .iter()
                .any(|t| meta.target() == *t || meta.target().starts_with(&format!("{t}::")))
    });
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // Separate filters: RUST_LOG=warn quiets the logs but must not cut the request spans out of
    // the traces (or stop trace context from flowing).
    let spans = tracing_subscriber::filter::Targets::new()
        .with_target("rerank_service", tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(logs.with_filter(filter.and(privacy)))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(spans),
        )
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}
