//! Logging, OpenTelemetry trace export, trace-context propagation and metric names.

mod init;
pub mod metrics;
pub mod propagation;

pub use init::{init, trace_id, LogFormat, TelemetryError, TelemetryGuard};
