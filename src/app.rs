//! The router: every surface, and the layers a request passes through, in order.

use axum::extract::DefaultBodyLimit;
use axum::http::HeaderName;
use axum::{Router, middleware};
use tower::ServiceBuilder;
use tower_http::cors::CorsLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::metrics;
use crate::routes::{self, BODY_LIMIT};
use crate::state::AppState;

/// sluice's HTTP app. A request passes, in order:
/// 1. request id: `x-request-id` kept from the client or made, and returned;
/// 2. trace: a span per request carrying that id;
/// 3. observe: the request's [`Exchange`](crate::metrics::Exchange), which writes its log
///    line at the end, and `sluice_requests_total` by route, model and status;
/// 4. CORS: browsers on other origins may call the API;
/// 5. body limit: bodies over 1 MiB are refused (413) before they are read in full;
/// 6. the route's handler: parse and validate → route → backend → relay.
pub fn app(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let layers = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        .layer(PropagateRequestIdLayer::new(request_id))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            metrics::observe,
        ))
        .layer(CorsLayer::permissive())
        .layer(DefaultBodyLimit::max(BODY_LIMIT));

    Router::new()
        .merge(routes::openai::router())
        .merge(routes::chat::router())
        .merge(routes::models::router())
        .merge(routes::prompts::router())
        .merge(routes::health::router())
        .merge(routes::ui::router())
        .route_layer(middleware::from_fn(metrics::name_route))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(layers)
        .with_state(state)
}
