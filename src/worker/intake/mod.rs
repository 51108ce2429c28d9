//! Where a worker's requests come from. Both intakes share the handler (decode → engine → reply);
//! they differ in how work arrives, how it is acknowledged and how it drains.
//!
//! - [`core`]: core NATS request-reply in a queue group (lowest latency; no durability).
//! - [`jetstream`]: a durable JetStream work queue (scale to zero; redelivery after a crash).

pub mod core;
pub mod jetstream;
