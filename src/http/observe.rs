//! The middleware that observes every request: its [`Exchange`] (the log line at its end,
//! the server span) and `sluice_requests_total`, and the route's name once matched.

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::{Answered, RateLimited};
use crate::telemetry::{Exchange, Metrics};

/// The outermost middleware after the request id: makes the request's [`Exchange`], counts
/// `sluice_requests_total` and rate-limit refusals when the response head is ready.
pub async fn observe(State(metrics): State<Metrics>, mut req: Request, next: Next) -> Response {
    let path: String = req.uri().path().chars().take(256).collect();
    // A server span per request (health and metrics requests aside), continuing the
    // client's `traceparent`; named once the route or the model is known.
    let span = metrics
        .otel()
        .filter(|_| !matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics"))
        .map(|otel| otel.server_span(req.method().to_string(), req.headers()));
    let exchange = Exchange::new(
        super::request_id(req.headers()),
        req.method().to_string(),
        // Logged only when no route matched (a route is logged as its template).
        path,
        span,
    );
    // Every log line of the request carries the trace's ids.
    if let Some((trace_id, span_id)) = exchange.trace_ids() {
        let current = tracing::Span::current();
        current.record("trace_id", trace_id.as_str());
        current.record("span_id", span_id.as_str());
    }
    req.extensions_mut().insert(exchange.clone());
    let response = next.run(req).await;
    let status = response.status().as_u16();
    if let Some(Answered(error)) = response.extensions().get::<Answered>() {
        exchange.answered(error);
    }
    let (route, model) = exchange.responded(status);
    metrics
        .counter(
            "sluice_requests_total",
            &[
                ("route", &route),
                ("model", &model),
                ("status", &status.to_string()),
            ],
        )
        .increment(1);
    if let Some(RateLimited(limit)) = response.extensions().get::<RateLimited>() {
        metrics
            .counter("sluice_rate_limited_total", &[("limit", limit)])
            .increment(1);
    }
    response
}

/// Per route (after matching): names the route in the request's [`Exchange`].
pub async fn name_route(matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    if let (Some(matched), Some(exchange)) = (matched, req.extensions().get::<Exchange>()) {
        exchange.set_route(matched.as_str());
    }
    next.run(req).await
}
