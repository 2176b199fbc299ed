//! Failover with typed deadlines: a route's targets tried in order while nothing of a reply
//! has gone out, then the limits on the chosen one (first token, between chunks, the whole
//! reply), and the end of every stream when sluice shuts down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Plan;
use super::pool::Lease;
use crate::backend::{BackendError, Delta, DeltaStream, ModelRequest, Wait};
use crate::telemetry::{Call, Exchange, Metrics};
use crate::wake::Woken;

/// What failover needs besides the route: its limits, where it counts, and the token that
/// ends every stream at shutdown.
#[derive(Clone)]
pub struct Dispatcher {
    pub timeouts: Timeouts,
    pub metrics: Metrics,
    pub closing: CancellationToken,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub first_token: Duration,
    pub idle: Duration,
    pub total: Duration,
}

/// Runs a request on its route's upstreams, from the one `lease` holds, on by `plan`: a target that
/// cannot be reached, answers 5xx or 429, or sends no first token in time is followed by
/// another target of its pool, then by the fallbacks', but only while nothing of a reply
/// has been relayed (each failure counts against the target's health). Then it applies the
/// limits (first token, between chunks, total: past one, the stream ends with
/// [`BackendError::Timeout`]; time spent waiting on a slow client does not count) and ends
/// the stream when sluice shuts down.
///
/// What of a client's request the target that served it was not sent
/// (`x-sluice-dropped`): known once the target's first event is relayed.
#[derive(Clone, Default)]
pub struct Unsent(Arc<std::sync::Mutex<Vec<String>>>);

impl Unsent {
    pub fn names(&self) -> Vec<String> {
        self.0.lock().map(|n| n.clone()).unwrap_or_default()
    }

    fn set(&self, names: Vec<String>) {
        if let Ok(mut held) = self.0.lock() {
            *held = names;
        }
    }
}

/// Decides for `attempt` whether `backend` takes the client's request as sent (its events
/// relayed as they come) or translated, and returns what the translation leaves out: the
/// client role's names and the fields the backend's API cannot carry.
pub fn verdict(attempt: &mut ModelRequest, backend: &dyn crate::backend::Backend) -> Vec<String> {
    attempt.relayed = attempt
        .native
        .as_ref()
        .is_some_and(|native| native.spoken_by(backend.speaks()));
    if attempt.relayed {
        return Vec::new();
    }
    let mut dropped = attempt.dropped.clone();
    let carried = backend.carried();
    if !carried.is_empty() {
        for field in attempt
            .body
            .keys()
            .filter(|f| !carried.contains(&f.as_str()))
        {
            dropped.add(field);
        }
    }
    dropped.into_names()
}

/// A stream it returns ends either with [`Delta::Finish`] (and perhaps usage) or with an
/// error: one that just stops did not complete, whatever the backend thought.
pub fn upstream(
    dispatcher: &Dispatcher,
    exchange: &Exchange,
    (mut plan, mut lease): (Plan, Lease),
    label: &str,
    request: ModelRequest,
    unsent: Unsent,
) -> DeltaStream {
    let label = label.to_owned();
    let limits = dispatcher.timeouts;
    let metrics = dispatcher.metrics.clone();
    let closing = dispatcher.closing.clone().cancelled_owned();
    let exchange = exchange.clone();
    Box::pin(async_stream::stream! {
        // Polled only when they go off, not at every chunk (see `wake`).
        let mut total = Woken::new(Box::pin(tokio::time::sleep(limits.total)));
        let mut closing = Woken::new(Box::pin(closing));
        let mut request = Some(request);
        // Targets that failed this request before its first byte: theirs to answer for
        // only if another serves it.
        let mut suspects = Vec::new();
        'attempts: loop {
            let more = plan.more();
            let mut attempt = if more { request.clone() } else { request.take() }.unwrap_or_default();
            let target = lease.target();
            if let Some(model) = &target.model {
                attempt.model.clone_from(model);
            }
            let target_label = target.model.as_deref().unwrap_or(&label);
            // Relayed as sent, or translated: decided here, once, for this target.
            let left_out = verdict(&mut attempt, target.backend.as_ref());
            exchange.set_target(target.state.name.clone(), &attempt.model);
            // The attempt's meter and, with OpenTelemetry, its span, named upstream.
            let mut call = metrics.upstream_call(
                Call {
                    label: target_label,
                    provider: target.backend.provider(),
                    server: target.backend.upstream(),
                    request: &attempt,
                },
                &exchange,
            );
            attempt.trace = call.trace_headers();
            let started = Instant::now();
            let mut inner = target.backend.stream(attempt);
            let mut deadline = Woken::new(Box::pin(tokio::time::sleep(limits.first_token)));
            let mut waiting_for = Wait::FirstToken;
            // When the last chunk went on: the limit on silence runs from there.
            let mut moved: Option<tokio::time::Instant> = None;
            let mut finished = false;
            let mut relayed = false;
            loop {
                // The limits before the stream: an upstream that is always ready (an
                // endless run of bytes) must not keep them from being looked at.
                let item = tokio::select! {
                    biased;
                    () = &mut closing => Err(BackendError::ShuttingDown),
                    () = &mut total => Err(BackendError::Timeout(Wait::End)),
                    () = &mut deadline => {
                        // Between chunks the deadline moves lazily: each chunk only notes its
                        // time, and the timer is set again only when it goes off early.
                        let due = moved.map(|at| at + limits.idle);
                        match due.filter(|due| *due > tokio::time::Instant::now()) {
                            Some(due) => {
                                deadline.get_mut().as_mut().reset(due);
                                continue;
                            }
                            None => Err(BackendError::Timeout(waiting_for)),
                        }
                    }
                    item = inner.next() => match item {
                        Some(item) => item,
                        None if finished => return,
                        None => Err(BackendError::Interrupted(
                            "the stream ended before the reply was finished".into(),
                        )),
                    },
                };
                let delta = match item {
                    Ok(delta) => delta,
                    Err(e) => {
                        call.failed(&e);
                        let reason = e.fallback_reason().filter(|_| !relayed);
                        if reason.is_some() {
                            lease.failed(&e);
                        }
                        let next = match reason {
                            // Boxed: the choice's future (a Redis call among it) would
                            // make every stream's state as large as it, for a rare path.
                            Some(_) if more => Box::pin(plan.next()).await,
                            _ => None,
                        };
                        if let (Some(reason), Some(next)) = (reason, next) {
                            tracing::warn!(
                                request_id = exchange.request_id(),
                                model = target_label,
                                upstream = target.backend.upstream().unwrap_or("-"),
                                error = %e,
                                "trying another upstream of the route"
                            );
                            metrics.fallback(target_label, reason.as_str());
                            exchange.fell_back(&e);
                            suspects.push(lease.suspect());
                            lease = next;
                            continue 'attempts;
                        }
                        yield Err(e);
                        return;
                    }
                };
                let first = !relayed && !matches!(delta, Delta::Queued(_));
                if first {
                    // What the target that serves was not sent: named to the client.
                    if !left_out.is_empty() {
                        tracing::debug!(
                            dropped = %left_out.join(","),
                            "the upstream does not speak the client's API: these request fields were left out"
                        );
                        metrics.dropped(&left_out);
                    }
                    unsent.set(left_out.clone());
                    lease.succeeded(started.elapsed());
                    call.first_chunk();
                    for suspect in suspects.drain(..) {
                        suspect.confirm();
                    }
                }
                match &delta {
                    Delta::Text(text) => {
                        call.text(text);
                        waiting_for = Wait::Chunk;
                    }
                    Delta::ChatFields(_)
                    | Delta::Reasoning(_)
                    | Delta::ToolCall(_)
                    | Delta::Event(_)
                    | Delta::Signature(_)
                    | Delta::Redacted(_)
                    | Delta::Annotation(_)
                    | Delta::Untranslated(_) => waiting_for = Wait::Chunk,
                    Delta::Finish(reason) => {
                        call.finished(reason.chat());
                        finished = true;
                    }
                    // Moving up the queue is progress: the wait for a first token starts
                    // when the model takes the request.
                    Delta::Queued(_) => deadline
                        .get_mut()
                        .as_mut()
                        .reset(tokio::time::Instant::now() + limits.first_token),
                    Delta::Usage(usage) => call.usage(*usage),
                    // Each comes just before the content or usage it belongs to.
                    Delta::UsageDetails(_)
                    | Delta::Identity(_)
                    | Delta::Logprobs(_) => {}
                }
                relayed |= first;
                let received = first.then(Instant::now);
                yield Ok(delta);
                if let Some(received) = received {
                    // Resumed once the first chunk has been written: sluice's own share of
                    // the time to first byte is what came before the call, and this.
                    metrics.overhead(started.duration_since(exchange.arrived()) + received.elapsed());
                }
                if waiting_for == Wait::Chunk {
                    let now = tokio::time::Instant::now();
                    if moved.is_none() {
                        deadline.get_mut().as_mut().reset(now + limits.idle);
                    }
                    moved = Some(now);
                }
            }
        }
    })
}
