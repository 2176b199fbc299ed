//! The meter of one stream: what it delivered, its usage, and how it ended. Dropping it
//! records the outcome (a stream dropped before it finished was cancelled), settles the
//! client's token reservation to what was really used, counts the spend, and hands the
//! request's record to the ledger.

use crate::admission::Permit;
use crate::backend::{BackendError, Usage};
use crate::ledger::Ledger;
use crate::prices::{Details, Price};
use crate::telemetry::{Exchange, Metrics, Outcome, TokenTimes};

/// Which stream this is, for logs and metrics, and the running count of what it delivered.
/// Dropping it records the outcome: a stream dropped before it finished was cancelled.
pub struct StreamGuard {
    metrics: Metrics,
    /// The client's hold on its limits: settled to the real usage when the stream ends.
    permit: Permit,
    pub(super) exchange: Exchange,
    model: String,
    pub(super) times: TokenTimes,
    prompt_tokens: u32,
    delivered_tokens: u32,
    pub(super) reported: Option<Usage>,
    /// The most an upstream's own counts are believed (see [`Bounds`]).
    bounds: Bounds,
    outcome: Option<Outcome>,
    /// The model's price, when it has one.
    price: Option<Price>,
    /// The upstream's cached and reasoning tokens, when it said.
    pub(super) details: Details,
    /// Where the request's record goes when the stream ends.
    ledger: Option<Ledger>,
}

/// The most usage an upstream may report for a request: a count past these is not what it
/// was sent or allowed to write, and billing it would lock the client out for days.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Bounds {
    /// Four times sluice's own count of what was sent, plus room for what it cannot count
    /// (images, another tokenizer), and the reply's own limit.
    pub fn of(sent_tokens: u32, max_reply_tokens: u32) -> Self {
        Bounds {
            prompt_tokens: sent_tokens.saturating_mul(4).saturating_add(8192),
            completion_tokens: max_reply_tokens,
        }
    }
}

impl StreamGuard {
    pub fn new(
        metrics: Metrics,
        permit: Permit,
        exchange: Exchange,
        model: String,
        prompt_tokens: u32,
        bounds: Bounds,
    ) -> Self {
        metrics.stream_started();
        StreamGuard {
            metrics,
            permit,
            exchange,
            model,
            times: TokenTimes::default(),
            prompt_tokens,
            delivered_tokens: 0,
            reported: None,
            bounds,
            outcome: None,
            price: None,
            details: Details::default(),
            ledger: None,
        }
    }

    /// The stream's record goes to `ledger` when it ends.
    pub fn recorded(mut self, ledger: Option<Ledger>) -> Self {
        self.ledger = ledger;
        self
    }

    /// The upstream's details, when its own counts are the usage.
    fn reported_details(&self) -> Details {
        if self.reported.is_some() {
            self.details
        } else {
            Details::default()
        }
    }

    /// The stream's tokens are charged at `price` (none: it costs nothing, and is unpriced).
    pub fn priced(mut self, price: Option<Price>) -> Self {
        self.price = price;
        self
    }

    /// What the stream has cost so far, in USD, from [`StreamGuard::usage`]; `None` when
    /// the model has no price.
    pub fn cost(&self) -> Option<f64> {
        let usage = self.usage();
        let details = self.reported_details();
        self.price
            .map(|p| p.cost(usage.prompt_tokens, usage.completion_tokens, details))
    }

    /// A token (one chunk of text) went to the client. Chunks are counted, not re-tokenised:
    /// the mock and local models send one token a chunk, OpenAI-compatible servers almost
    /// always do too, and their own usage replaces this count whenever they report it.
    pub(super) fn delivered(&mut self) {
        self.times.token(self.exchange.arrived().elapsed());
        self.delivered_tokens = self.delivered_tokens.saturating_add(1);
    }

    /// The backend's own counts when it sent them, else sluice's count of what it delivered.
    /// An upstream's counts are clamped to the request's [`Bounds`].
    pub fn usage(&self) -> Usage {
        match self.reported {
            Some(u) => Usage::new(
                u.prompt_tokens.min(self.bounds.prompt_tokens),
                u.completion_tokens.min(self.bounds.completion_tokens),
            ),
            None => Usage::new(self.prompt_tokens, self.delivered_tokens),
        }
    }

    pub fn finish(&mut self, outcome: Outcome) {
        self.outcome.get_or_insert(outcome);
    }

    /// After a chunk went out: whether the stream may go on. Its key revoked with its
    /// streams ended, or its budget spent (the chunk's cost taken from what the stream holds,
    /// another slice drawn when that is spent), end it here. Two loads and a comparison,
    /// unless a slice is drawn.
    pub(super) async fn may_go_on(&mut self) -> Result<(), BackendError> {
        if self.permit.ended() {
            return Err(BackendError::KeyRevoked);
        }
        if !self.permit.budgeted() {
            return Ok(());
        }
        let usage = self.usage();
        self.permit
            .spend(usage.prompt_tokens, usage.completion_tokens)
            .await
            .map_err(|exhausted| BackendError::BudgetSpent {
                message: exhausted.message(),
                retry_after: exhausted.reset,
            })
    }

    pub(super) fn failed(&mut self, error: &BackendError) {
        self.exchange.failed(error);
        self.finish(Outcome::of(error));
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Outcome::Cancelled);
        let usage = self.usage();
        let details = self.reported_details();
        let cost = self.cost();
        // A cancelled stream is charged what it delivered; a failed one, what it used.
        self.permit.settle(usage.total_tokens);
        self.permit
            .charge(usage.prompt_tokens, usage.completion_tokens, details);
        self.exchange.ended(outcome, self.times.first, usage, cost);
        self.metrics.stream_ended(
            outcome,
            &self.model,
            self.exchange.provider(),
            usage,
            &self.times,
            self.exchange.arrived().elapsed(),
        );
        self.metrics.spent(
            &self.exchange.key_label(),
            &self.model,
            usage,
            details,
            cost,
        );
        if let Some(ledger) = &self.ledger {
            let cached = details.cached.min(usage.prompt_tokens);
            ledger.record(crate::ledger::Record {
                input_tokens: i64::from(usage.prompt_tokens),
                cached_tokens: i64::from(cached),
                cache_write_tokens: i64::from(
                    details.cache_write.min(usage.prompt_tokens - cached),
                ),
                output_tokens: i64::from(usage.completion_tokens),
                reasoning_tokens: i64::from(details.reasoning.min(usage.completion_tokens)),
                ..self.exchange.ledger_record()
            });
        }
    }
}
