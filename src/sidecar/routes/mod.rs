//! One file per API shape, each a thin translation to `client.send`; plus health and probes.

pub mod cohere;
pub mod health;
pub mod nim;
pub mod rerank;

use crate::wire::{RerankReply, RerankRequest};

use super::error::ApiError;
use super::AppState;

/// Sends one request to the pool through the client (which sets the deadline and refuses what
/// exceeds NATS `max_payload`), mapping failures to [`ApiError`].
async fn call(state: &AppState, request: RerankRequest) -> Result<RerankReply, ApiError> {
    Ok(state.inner.client.send(request).await?)
}

/// Logistic function, for APIs that ask for probabilities instead of logits.
pub fn sigmoid(logit: f32) -> f32 {
    1.0 / (1.0 + (-logit).exp())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sigmoid_is_the_logistic_function() {
        assert_eq!(super::sigmoid(0.0), 0.5);
        assert!((super::sigmoid(2.0) - 0.880_797).abs() < 1e-6);
        assert!(super::sigmoid(-100.0) >= 0.0 && super::sigmoid(100.0) <= 1.0);
    }
}
