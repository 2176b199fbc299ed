//! The one chat path every surface shares, whatever its wire format: check the request's
//! size, resolve the model, admit the client (the checks that cost nothing first: see
//! [`admit`]), count the prompt, reserve the tokens of all it sends, then start the backend
//! stream with its meter.

use crate::admission::{DEFAULT_REPLY_TOKENS, Permit, Principal, Quota};
use crate::backend::{DeltaStream, MAX_MODEL_NAME, ModelRequest};
use crate::dispatch::{self, Route, Unavailable};
use crate::error::ApiError;
use crate::relay::{Bounds, StreamGuard};
use crate::state::AppState;
use crate::telemetry::Exchange;

/// The most tokens a request may ask for: far beyond any model's context, well within
/// sluice's arithmetic.
pub const MAX_TOKENS: u32 = 1_000_000;

pub use crate::dialect::{ClientRequest, Dropped};

/// An admitted request with its backend stream started (lazily: nothing runs until the
/// stream is polled) and its meter.
pub struct Started {
    pub stream: DeltaStream,
    pub guard: StreamGuard,
    /// `x-ratelimit-*` for the answer.
    pub rate: Quota,
    pub model: String,
    /// The prompt's size as sluice counted it.
    pub prompt_tokens: u32,
    /// What the target that serves was not sent of the client's request, once its first
    /// event came (see [`ClientRequest::dropped`]).
    pub dropped: dispatch::Unsent,
}

/// Checks, resolves and admits `chat`, then starts it.
pub async fn start(
    state: &AppState,
    who: &Principal,
    exchange: &Exchange,
    chat: ClientRequest,
) -> Result<Started, ApiError> {
    admit(
        state,
        who,
        exchange,
        &chat.model,
        chat.max_tokens,
        chat.max_tokens_param,
    )
    .await?
    .start(state, exchange, chat)
    .await
}

/// A request that passed the checks that cost nothing: its model routes somewhere and the
/// client may start it now. A route that must load stored state to build its request (a
/// continued conversation) does so only once it has one of these.
pub struct Admitted {
    permit: Permit,
    route: std::sync::Arc<Route>,
    /// The client, as a pool's health and queue tell clients apart.
    who: dispatch::target::Who,
}

/// The request's size limits, its model, and the client's request rate and stream slot.
pub async fn admit(
    state: &AppState,
    who: &Principal,
    exchange: &Exchange,
    model: &str,
    max_tokens: Option<u32>,
    max_tokens_param: &str,
) -> Result<Admitted, ApiError> {
    if model.len() > MAX_MODEL_NAME {
        return Err(ApiError::invalid(
            format!("`model` is longer than {MAX_MODEL_NAME} bytes"),
            Some("model"),
        ));
    }
    if max_tokens.is_some_and(|n| n > MAX_TOKENS) {
        return Err(ApiError::invalid(
            format!("`{max_tokens_param}` must be at most {MAX_TOKENS}"),
            Some(max_tokens_param),
        ));
    }
    // Logged whether or not it routes anywhere (its length is bounded above).
    exchange.set_model(model);
    let route = state
        .routes
        .resolve(model)
        .ok_or_else(|| ApiError::ModelNotFound(model.to_owned()))?;
    if let Some(unset) = route.off() {
        return Err(ApiError::ModelOff {
            model: model.to_owned(),
            unset: unset.to_vec(),
        });
    }
    let asked = std::time::Instant::now();
    let permit = state.admission.admit(who, model).await?;
    exchange.admitted(asked.elapsed());
    Ok(Admitted {
        permit,
        route,
        who: dispatch::target::who(&who.name),
    })
}

impl Admitted {
    /// Counts the prompt, reserves the tokens of everything that goes upstream (the
    /// messages' text as tiktoken counts it; tools, schemas, images and the rest at a token
    /// per four bytes) and the reply's, then starts the backend stream with its meter.
    pub async fn start(
        self,
        state: &AppState,
        exchange: &Exchange,
        chat: ClientRequest,
    ) -> Result<Started, ApiError> {
        let Admitted {
            mut permit,
            route,
            who,
        } = self;
        exchange.set_max_tokens(chat.max_tokens);
        let text_bytes: usize = chat.messages.iter().map(|m| m.content.len()).sum();
        let (messages, prompt_tokens) = state.tokens.prompt(chat.messages).await;
        let rest = u32::try_from(chat.size.saturating_sub(text_bytes) / 4).unwrap_or(u32::MAX);
        let sent_tokens = prompt_tokens.saturating_add(rest);
        let reply_tokens = chat.max_tokens.unwrap_or(DEFAULT_REPLY_TOKENS);
        permit
            .reserve(sent_tokens.saturating_add(reply_tokens))
            .await?;
        // Its budgets: the prompt and a first slice of the reply, never its `max_tokens`.
        let price = state.prices.of(&chat.model);
        permit.budget(sent_tokens, price).await?;
        let rate = permit.quota().clone();
        // Metric labels only for admitted requests, and only from a bounded set of names.
        let label = state.routes.label(&chat.model);
        exchange.set_label(label.clone());

        let request = ModelRequest {
            // Each target of the route has its own name for the model: dispatch sets it.
            model: chat.model.clone(),
            messages,
            prompt_tokens,
            max_tokens: chat.max_tokens,
            temperature: chat.temperature,
            top_p: chat.top_p,
            seed: chat.seed,
            body: chat.body,
            request_id: exchange.request_id().to_owned(),
            trace: Vec::new(),
            native: chat.native,
            // Dispatch decides, for the target it chooses.
            relayed: false,
            dropped: chat.dropped,
        };
        let guard = StreamGuard::new(
            state.metrics.clone(),
            permit,
            exchange.clone(),
            label.clone(),
            prompt_tokens,
            Bounds::of(sent_tokens, chat.max_tokens.unwrap_or(MAX_TOKENS)),
        )
        .priced(price)
        .recorded(state.ledger.clone());
        // A target of the route's pool, waiting in its queue while every one is full.
        // A request still waiting when the shutdown grace period ends is told so.
        let queued = std::time::Instant::now();
        let begun = tokio::select! {
            biased;
            begun = route.begin(who) => begun,
            () = state.closing.cancelled() => return Err(ApiError::Restarting),
        };
        exchange.admitted(queued.elapsed());
        let start = begun.map_err(|why| match why {
            Unavailable::Full(retry_after) => ApiError::PoolFull {
                model: chat.model.clone(),
                retry_after,
            },
            Unavailable::Down(retry_after) => ApiError::NoHealthyUpstream {
                model: chat.model.clone(),
                retry_after,
            },
        })?;
        let unsent = dispatch::Unsent::default();
        let stream = dispatch::upstream(
            &state.dispatcher,
            exchange,
            start,
            &label,
            request,
            unsent.clone(),
        );
        // A name a pattern route served is one `/v1/models` lists from then on.
        let stream = match state.routes.pattern_of(&chat.model) {
            Some(pattern) => {
                let (routes, model) = (state.routes.clone(), chat.model.clone());
                let mut told = false;
                Box::pin(futures::StreamExt::inspect(stream, move |item| {
                    if !told
                        && matches!(item, Ok(d) if !matches!(d, crate::backend::Delta::Queued(_)))
                    {
                        told = true;
                        routes.served(&pattern, &model);
                    }
                })) as DeltaStream
            }
            None => stream,
        };
        Ok(Started {
            stream,
            guard,
            rate,
            model: chat.model,
            prompt_tokens,
            dropped: unsent,
        })
    }
}
