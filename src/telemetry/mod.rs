//! Logging, OpenTelemetry trace export, trace-context propagation and metric names.

mod init;
pub mod metrics;
pub mod propagation;

pub use init::{init, LogFormat, TelemetryError, TelemetryGuard};
