//! The core intake: a queue-group subscription on the request subject, request-reply.
//!
//! The lowest-latency path, but with no durability: a request sent while no worker subscribes
//! fails at once (no responders), and one accepted by a worker that dies is lost unless the
//! caller retries. On drain the subscription is drained (UNSUB + PING) and what already arrived is
//! answered; async-nats 0.51 may still drop a message routed to us just before the UNSUB took
//! effect (see the JetStream intake for the path without that race).

use std::sync::Arc;

use futures::StreamExt;
use tokio::task::JoinSet;

use super::super::handler::{self, HandlerContext};

/// A subscribed core intake.
pub struct CoreIntake {
    requests: async_nats::Subscriber,
    handlers: JoinSet<()>,
}

impl CoreIntake {
    pub async fn subscribe(
        client: &async_nats::Client,
        subject: &str,
        queue_group: &str,
    ) -> Result<Self, async_nats::SubscribeError> {
        let requests = client
            .queue_subscribe(subject.to_string(), queue_group.to_string())
            .await?;
        Ok(Self {
            requests,
            handlers: JoinSet::new(),
        })
    }

    /// Takes requests until `stop` resolves (or the subscription ends).
    pub async fn serve(
        &mut self,
        ctx: &Arc<HandlerContext>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                message = self.requests.next() => match message {
                    Some(message) => { self.handlers.spawn(handler::handle(ctx.clone(), message)); }
                    None => break,
                },
                () = &mut stop => break,
                // Reap finished handlers so the set does not grow without bound.
                Some(_) = self.handlers.join_next(), if !self.handlers.is_empty() => {}
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.handlers.len()
    }

    /// Drains the subscription and answers everything accepted.
    pub async fn drain(&mut self, ctx: &Arc<HandlerContext>) {
        if let Err(e) = self.requests.drain().await {
            tracing::warn!(error = %e, "subscription drain failed");
        }
        // Messages the server sent before the UNSUB still arrive; answer them too.
        while let Some(message) = self.requests.next().await {
            self.handlers.spawn(handler::handle(ctx.clone(), message));
        }
        while self.handlers.join_next().await.is_some() {}
    }

    /// Gives up on what is left (drain timeout).
    pub fn abandon(&mut self) {
        self.handlers.abort_all();
    }
}
