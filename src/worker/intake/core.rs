//! The core intake: queue-group subscriptions on the request subjects (the model's own subject,
//! and `rerank.v1` for the pool's default model), request-reply.
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
    /// One subscription per subject, all in the same queue group.
    requests: Vec<async_nats::Subscriber>,
    handlers: JoinSet<()>,
}

impl CoreIntake {
    pub async fn subscribe(
        client: &async_nats::Client,
        subjects: &[String],
        queue_group: &str,
    ) -> Result<Self, async_nats::SubscribeError> {
        let mut requests = Vec::with_capacity(subjects.len());
        for subject in subjects {
            requests.push(
                client
                    .queue_subscribe(subject.clone(), queue_group.to_string())
                    .await?,
            );
        }
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
        let mut requests = futures::stream::select_all(self.requests.iter_mut());
        loop {
            tokio::select! {
                message = requests.next() => match message {
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
        for requests in &mut self.requests {
            if let Err(e) = requests.drain().await {
                tracing::warn!(error = %e, "subscription drain failed");
            }
        }
        // Messages the server sent before the UNSUB still arrive; answer them too.
        for requests in &mut self.requests {
            while let Some(message) = requests.next().await {
                self.handlers.spawn(handler::handle(ctx.clone(), message));
            }
        }
        while self.handlers.join_next().await.is_some() {}
    }

    /// Gives up on what is left (drain timeout).
    pub fn abandon(&mut self) {
        self.handlers.abort_all();
    }
}
