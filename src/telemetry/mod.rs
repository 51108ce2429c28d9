//! Logging, OpenTelemetry trace export, trace-context propagation and metric names.

pub mod metrics;
pub mod propagation;
