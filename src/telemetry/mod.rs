//! Logging, OpenTelemetry trace export, trace-context propagation and metric names.

#[cfg(feature = "server")]
mod init;
#[cfg(feature = "server")]
pub mod metrics;
pub mod propagation;

#[cfg(feature = "server")]
pub use init::{init, LogFormat, TelemetryError, TelemetryGuard};
