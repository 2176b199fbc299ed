//! The router: every surface, and the layers a request passes through, in order.

use std::any::Any;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Router, middleware};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, Any as AnyHeader, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::http::{self, BODY_LIMIT};
use crate::routes;
use crate::state::AppState;

/// sluice's HTTP app. A request passes, in order:
/// 1. request id: `x-request-id` kept from the client when it is a short plain token, else
///    made anew; returned on the response and sent upstream;
/// 2. trace: a span per request carrying that id (and, with OpenTelemetry, the trace's);
/// 3. panic guard: a panic becomes a 500 with OpenAI's error body, logged;
/// 4. observe: the request's [`Exchange`](crate::telemetry::Exchange), which writes its log
///    line at the end (and ends its OpenTelemetry server span, continuing the client's
///    `traceparent`), and `sluice_requests_total` by route, model and status;
/// 5. `X-Content-Type-Options: nosniff` on every answer;
/// 6. CORS, only for the origins in `SLUICE_CORS_ORIGINS` (none: same origin only);
/// 7. body limit: a declared `Content-Length` over 1 MiB is refused (413) before anything
///    is read (so `Expect: 100-continue` gets no `100`), and a longer body while it is read;
/// 8. the route's handler: parse and validate → route → backend → relay (the `/admin`
///    reports only when `SLUICE_ADMIN_KEY` is set).
pub fn app(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let cors = (!state.cors_origins.is_empty()).then(|| cors(&state.cors_origins));
    let layers = ServiceBuilder::new()
        .map_request(plain_request_id)
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        .layer(PropagateRequestIdLayer::new(request_id))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                // No path: it may hold a stream's id, which is logged only for its owner.
                tracing::info_span!(
                    "request",
                    method = %req.method(),
                    request_id = %id,
                    trace_id = tracing::field::Empty,
                    span_id = tracing::field::Empty,
                )
            }),
        )
        .layer(CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            http::observe,
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .option_layer(cors)
        .layer(middleware::from_fn(declared_length))
        .layer(DefaultBodyLimit::max(BODY_LIMIT));

    // The admin API exists only with its key: without it, its routes are 404s.
    let admin = match &state.admin_key {
        Some(_) => routes::admin::router(),
        None => Router::new(),
    };
    Router::new()
        .merge(admin)
        .merge(routes::completions::router())
        .merge(routes::responses::router())
        .merge(routes::anthropic::router())
        .merge(routes::sluice::router())
        .merge(routes::models::router())
        .merge(routes::prompts::router())
        .merge(routes::health::router())
        .merge(routes::ui::router())
        .route_layer(middleware::from_fn(http::name_route))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(layers)
        .with_state(state)
}

/// Browsers on these origins may call the API (with a key, when keys are set).
fn cors(origins: &[String]) -> CorsLayer {
    let origins = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect::<Vec<_>>();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers(AnyHeader)
        .expose_headers(AnyHeader)
}

/// A client's `x-request-id` goes into logs and upstream requests: only a short token of
/// `[A-Za-z0-9._:-]` is kept; anything else is dropped, and a new id is made.
fn plain_request_id<B>(mut req: axum::http::Request<B>) -> axum::http::Request<B> {
    let plain = |v: &HeaderValue| {
        let bytes = v.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= 128
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    };
    let ids = req.headers().get_all("x-request-id");
    let mut ids = ids.iter();
    let keep = matches!((ids.next(), ids.next()), (Some(id), None) if plain(id));
    if !keep {
        req.headers_mut().remove("x-request-id");
    }
    req
}

/// A body declared larger than sluice reads is refused before any of it is read.
async fn declared_length(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return ApiError::PayloadTooLarge { limit: BODY_LIMIT }.into_response();
    }
    next.run(req).await
}

/// A panic in a handler: a 500 with OpenAI's error body, and an error log line.
fn panicked(panic: Box<dyn Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(panic = detail, "a request handler panicked");
    ApiError::Internal.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_is_a_500_with_openai_s_error_body() {
        let response = panicked(Box::new("boom"));
        assert_eq!(response.status(), 500);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn only_plain_short_request_ids_are_kept() {
        let with = |id: &str| {
            let req = axum::http::Request::builder()
                .header("x-request-id", id)
                .body(())
                .expect("a request");
            plain_request_id(req).headers().get("x-request-id").cloned()
        };
        assert!(with("req-1.2:3_x").is_some());
        assert!(with(&"a".repeat(128)).is_some());
        assert!(with(&"a".repeat(129)).is_none());
        assert!(with("a b").is_none());
        assert!(with("x\"} forged").is_none());
    }
}
